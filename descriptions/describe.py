"""Write SemPT's attribute descriptions of a dataset with any OpenAI-compatible chat LLM (two-step prompting).

    OPENAI_API_KEY=... python descriptions/describe.py --dataset dtd --root ~/data \\
        --llm-url https://api.openai.com/v1 --llm-model gpt-4o

Step 1, once per dataset: the K visual attributes shared by all its classes (STEP1 below). Step 2, once per class:
J sentences per attribute (STEP2). Every answer is validated (K distinct attributes; every attribute of a class has
sentences that fit CLIP's 77-token context) and cached under descriptions/.cache/<name>/, keyed by the model and
the prompt, so an interrupted run resumes, and a finished one run again, without asking again. An endpoint that is
no chat API, refuses, or never answers ends the run with one error line. The API key is read from the environment
variable named by --llm-key-env and is never printed or written. The result, read by sempt.py:

    {"dataset", "llm", "prompt_version", "attributes": [K], "descriptions": {class: {attribute: [J sentences]}}}

The prompts are a reconstruction (SemPT's wording is not public); change them -> change PROMPT_VERSION.
"""
import argparse
import hashlib
import json
import os
import random
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: clip, data, experiment, files
import clip  # noqa: E402
import data  # noqa: E402
import experiment  # noqa: E402
import files  # noqa: E402

PROMPT_VERSION = "v1"
SYSTEM = "You are an expert in visual recognition. Answer with one JSON object and nothing else."
STEP1 = ("Here are all category names of an image classification dataset of {domain}: {names}.\n"
         "Name exactly {k} visual attributes that (1) can be seen in a single image, (2) apply to every one of these "
         "categories, and (3) help most to tell them apart. Use short noun phrases; no non-visual properties (price, "
         "behaviour, origin, taste).\nAnswer as {{\"attributes\": [{k} strings]}}.")
STEP2 = ("Category: \"{name}\", one of the categories of a dataset of {domain}.\n"
         "For each of these visual attributes: {attributes}, write {j} different short sentences (at most 20 words "
         "each) that describe how this attribute looks for a \"{name}\" in a typical image. Every sentence starts "
         "with \"{name}, which\" and talks only about that attribute and visible appearance. If the attribute does "
         "not apply, describe how its absence looks.\n"
         "Answer as {{\"<attribute>\": [{j} sentences], ...}} with exactly these attribute names as keys.")
DOMAINS = {"world": "small rendered images of coloured shapes on a dark noisy background",
           "imagenet": "everyday objects and animals", "caltech101": "objects", "oxford_pets": "pets (cat and dog breeds)",
           "stanford_cars": "car models", "oxford_flowers": "flower species", "food101": "dishes of food",
           "fgvc_aircraft": "aircraft models", "sun397": "scenes", "dtd": "texture photographs",
           "eurosat": "satellite images of land use and land cover", "ucf101": "people doing actions"}
HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description="Write descriptions/<dataset>.json for SemPT with an LLM",
                                 formatter_class=experiment.HelpWithDefaults)
parser.add_argument("--dataset", required=True, help="dataset name (see data.DATASETS) or 'folder'")
parser.add_argument("--root", default=str(data.ROOT), type=files.path, help="folder holding the datasets (for the class names)")
parser.add_argument("--download", action="store_true", help="fetch the dataset with torchvision if it is missing")
parser.add_argument("--out", default=None, type=files.path, help="description file to write (default descriptions/<dataset>.json)")
parser.add_argument("--force", action="store_true", help="overwrite --out if it exists (default: write beside it)")
parser.add_argument("--llm-url", default="https://api.openai.com/v1", help="base URL of an OpenAI-compatible chat API")
parser.add_argument("--llm-model", default="gpt-4o", help="chat model name")
parser.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="NAME of the environment variable holding the API key")
parser.add_argument("--llm-timeout", type=experiment.positive, default=120.0, help="seconds to wait for one answer")
parser.add_argument("--llm-json-mode", action=argparse.BooleanOptionalAction, default=True,
                    help="ask for response_format json_object (--no-llm-json-mode for servers without it)")
parser.add_argument("--llm-retries", type=experiment.positive_int, default=5, help="tries per question before giving up")
parser.add_argument("--llm-backoff", type=experiment.non_negative, default=2.0, help="first wait between tries, doubled after each")
parser.add_argument("--domain", default=None, help="what the dataset shows, for the prompts (default: per dataset)")
parser.add_argument("--n-attributes", type=experiment.positive_int, default=5, help="K: shared attributes asked for in step 1 (5)")
parser.add_argument("--n-sentences", type=experiment.positive_int, default=3, help="J: sentences per attribute asked for in step 2 (3)")


def ask(url, model, messages, key, timeout, json_mode=True):
    """One chat completion over plain HTTP + JSON: the answer's text (a reply of another kind: InputError)."""
    url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
    body = {"model": model, "messages": messages, "temperature": 0}
    body = json.dumps(body | ({"response_format": {"type": "json_object"}} if json_mode else {})).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = response.read()
        try:
            return json.loads(reply)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):  # a web page, another API: asking again cannot help
            raise files.InputError(f"{url} answered {came_back(response.headers, reply)}, not a chat completion: check "
                                   f"--llm-url (an OpenAI-compatible API's base, often ending in /v1)") from None


def came_back(headers, reply):
    """What an endpoint sent back, for an error line: its content type and first bytes."""
    text = " ".join(reply[:300].decode(errors="replace").split())[:100]  # the first bytes, on one line
    return f"{headers.get('Content-Type') or 'no content type'} {text!r}"


def parse_json(text):
    """The JSON object in an answer (tolerates a ```json fence around it)."""
    if not isinstance(text, str):
        raise ValueError("the answer has no text")
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("the answer is JSON but not an object")
    return obj


def check_attributes(answer, k):
    """Step 1: exactly k distinct, non-empty attribute names."""
    attributes = answer.get("attributes")
    if not (isinstance(attributes, list) and all(isinstance(a, str) and a.strip() for a in attributes)):
        raise ValueError("'attributes' is not a list of strings")
    attributes = [a.strip() for a in attributes]
    if len(attributes) != k or len(set(attributes)) != k:
        raise ValueError(f"expected {k} distinct attributes, got {attributes}")
    return attributes


def check_sentences(answer, attributes):
    """Step 2: every attribute present with >= 1 sentence, each sentence within CLIP's 77-token context."""
    out = {}
    for a in attributes:
        sentences = answer.get(a)
        if not (isinstance(sentences, list) and sentences and all(isinstance(s, str) and s.strip() for s in sentences)):
            raise ValueError(f"attribute {a!r} is missing or has no sentences")
        for s in sentences:
            clip.tokenize(s)  # raises if the sentence does not fit CLIP's context
        out[a] = [s.strip() for s in sentences]
    return out


def cached_answer(prompt, validate, args, key, cache_dir, what):
    """Ask once: a validated answer is stored under a hash of (model, prompt). Failures are retried with backoff,
    except those asking again cannot mend: a refusal (HTTP 4xx), a reply that is no chat completion, and no answer
    at all before the endpoint has answered once (a wrong --llm-url): those end the run with one error line."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    path = Path(cache_dir) / (hashlib.sha256(json.dumps([args.llm_model, messages]).encode()).hexdigest() + ".json")
    if path.exists():
        try:
            return validate(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, RuntimeError, UnicodeDecodeError) as e:  # a damaged entry: ask again
            print(f"{what}: the cached answer {path} is unusable ({e}); asking again")
    delay, error, wait = args.llm_backoff, None, f"waiting up to {args.llm_timeout:g} s for its answer"
    for attempt in range(1, args.llm_retries + 1):
        if attempt == 1 and not args.answered:
            print(f"{what}: asking {args.llm_url} (model {args.llm_model}), {wait}")
        try:
            text = ask(args.llm_url, args.llm_model, messages, key, args.llm_timeout, args.llm_json_mode)
            args.answered = True
            answer = parse_json(text)
            result = validate(answer)
            files.save_json(path, answer)
            return result
        except files.InputError:  # the endpoint is no chat API: asking again cannot help
            raise
        except urllib.error.HTTPError as e:
            args.answered = True
            if 400 <= e.code < 500 and e.code not in (408, 429):  # refused (429: too many requests, retried)
                raise files.InputError(
                    f"the LLM endpoint refused the request for {what} (HTTP {e.code}, {came_back(e.headers, e.read())})"
                    f": check --llm-url, --llm-model and the key in ${args.llm_key_env}{'' if key else ' (not set)'} "
                    f"(servers without JSON mode answer 400: add --no-llm-json-mode)") from None
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
            error = f"no answer ({getattr(e, 'reason', e)})"
            if not args.answered:
                raise files.InputError(f"{what}: {error} from {args.llm_url}: check --llm-url and that the server runs "
                                       f"(a slow one: raise --llm-timeout, now {args.llm_timeout:g} s)") from None
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
            error = f"malformed answer ({e})"
        if attempt < args.llm_retries:
            print(f"{what}: try {attempt}/{args.llm_retries} failed: {error}; try {attempt + 1} in {delay:.1f} s, "
                  f"{wait}")
            time.sleep(delay)
            delay *= 2
    raise SystemExit(f"{what}: no valid answer after {args.llm_retries} tries (last: {error}). The answers so far are "
                     f"cached in {cache_dir}; run the same command again to resume.")


def output_path(args):
    """(file to write, cache folder): --out, or descriptions/<dataset>.json; an existing file is kept (a new name
    beside it) unless --force. The cache follows the name asked for: the same command again asks nothing again."""
    out = asked = Path(args.out) if args.out else HERE / f"{args.dataset}.json"
    if asked.is_dir():
        raise files.InputError(f"--out {asked} is a folder: give the file to write, e.g. {asked / args.dataset}.json")
    if out.exists() and not args.force:
        stem = f"{out.stem}.{re.sub(r'[^A-Za-z0-9.-]+', '-', args.llm_model)}"
        out = next(p for i in range(1, 10_000) for p in [out.with_name(f"{stem}{'' if i == 1 else f'.{i}'}.json")]
                   if not p.exists())
    return out, asked.parent / ".cache" / asked.stem  # beside the file: descriptions/.cache/ is git-ignored


def describe(args):
    """Step 1 once per dataset (K shared attributes), step 2 once per class (J sentences per attribute)."""
    out, cache_dir = output_path(args)
    classnames = data.load_dataset(args.dataset, args.root, args.download).classnames
    domain = args.domain or DOMAINS.get(args.dataset, "images")
    key = os.environ.get(args.llm_key_env)  # never printed, never saved
    args.answered = False  # until the endpoint answers once, no answer at all means a wrong --llm-url
    shown = classnames if len(classnames) <= 100 else sorted(random.Random(0).sample(classnames, 100))  # long lists
    prompt = STEP1.format(domain=domain, names=", ".join(shown), k=args.n_attributes)
    attributes = cached_answer(prompt, lambda a: check_attributes(a, args.n_attributes), args, key, cache_dir, "step 1")
    print(f"attributes of {args.dataset}: {attributes}")
    descriptions = {}
    for name in tqdm(classnames, desc="step 2: classes"):
        prompt = STEP2.format(name=name, domain=domain, attributes=json.dumps(attributes), j=args.n_sentences)
        descriptions[name] = cached_answer(prompt, lambda a: check_sentences(a, attributes), args, key, cache_dir,
                                           f"step 2 ({name})")
    how = f"{args.llm_model}, the {PROMPT_VERSION} prompts through describe.py's client"
    files.save_json(out, {"dataset": args.dataset, "llm": how, "prompt_version": PROMPT_VERSION,
                               "attributes": attributes, "descriptions": descriptions})
    print(f"wrote {out}: {len(classnames)} classes x {len(attributes)} attributes")
    return out


def main(argv=None):
    args = parser.parse_args(argv)
    if not re.match(r"https?://[^/\s]+", args.llm_url):  # urllib sends nothing else
        parser.error(f"--llm-url {args.llm_url!r} is not an http:// or https:// URL (e.g. http://localhost:8000/v1)")
    try:
        return describe(args)
    except files.InputError as e:  # bad input (a dataset name, a missing folder): one line, as the training scripts
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
