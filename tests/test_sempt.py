"""sempt.py: the weighting and the memory-safe logits against hand and direct computation, head choice, the
description loader on every format, the LLM generator against a real local HTTP server, and a whole run.

Run: python -m pytest tests/test_sempt.py
"""
import json
import math
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip
import data
import sempt
from conftest import NAMES
from descriptions import describe

ROOT = Path(__file__).resolve().parents[1]
ATTRS = ["colour", "outline"]
KEY = "sk-test-secret-0123456789"


@pytest.fixture(scope="module")
def descriptions(tiny):
    """A description file in the project's format for the 5 classes of the tiny dataset."""
    desc = {c: {a: [f"{c}, which has a {a} like {c.split()[0]}.", f"{c}, which shows its {a}."] for a in ATTRS} for c in NAMES}
    (tiny / "desc.json").write_text(json.dumps({"dataset": "folder", "llm": "hand", "prompt_version": "v1",
                                                "attributes": ATTRS, "descriptions": desc}))
    return tiny / "desc.json"


def test_weighting_on_a_hand_computed_example():
    f = torch.tensor([[1.0, 0.0]])
    A = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one class, attribute 0 along the image, attribute 1 orthogonal
    w = sempt.attribute_weights(torch.einsum("be,cke->bck", f, A), tau=0.5)  # softmax([1/0.5, 0/0.5]) = softmax([2, 0])
    assert w[0, 0].tolist() == pytest.approx([math.e ** 2 / (math.e ** 2 + 1), 1 / (math.e ** 2 + 1)], abs=1e-6)


def test_memory_safe_attribute_logits_equal_the_direct_ones():
    torch.manual_seed(0)
    B, C, K, E = 3, 4, 5, 8
    f, t = F.normalize(torch.randn(B, E), dim=-1), F.normalize(torch.randn(C, E), dim=-1)
    A = F.normalize(torch.randn(C, K, E), dim=-1)
    for beta, tau in [(1.0, 0.01), (0.5, 0.3)]:
        w = (torch.einsum("be,cke->bck", f, A) / tau).softmax(-1)  # (B, C, K)
        u = F.normalize(t[None] + beta * torch.einsum("bck,cke->bce", w, A), dim=-1)  # (B, C, E): the direct way
        direct = 100 * torch.einsum("be,bce->bc", f, u)
        ours = sempt.attribute_logits(f, t, A, A @ A.transpose(1, 2), beta, tau, 100)
        assert torch.allclose(ours, direct, atol=1e-4)


def test_seen_classes_use_the_label_head_unseen_the_attribute_head(tiny):
    assert sempt.use_label_head(["a", "b", "c"], {"a", "b"}).tolist() == [True, True, False]
    assert sempt.use_label_head(["a", "b"], {"a", "b"}, seen_head="attr").tolist() == [False, False]
    model = clip.load(str(tiny / "clip.pt"))[0]
    module = sempt.SemPT(model, ["a", "b", "c"], sempt.SemPTConfig())
    torch.manual_seed(0)
    f, t = F.normalize(torch.randn(2, 32), dim=-1), F.normalize(torch.randn(3, 32), dim=-1)
    module.A = A = F.normalize(torch.randn(3, 2, 32), dim=-1)
    module.M = A @ A.transpose(1, 2)
    out = module.logits(f, t, torch.tensor([True, False, True]), 10.0)
    attr = sempt.attribute_logits(f, t, A, A @ A.transpose(1, 2), module.cfg.beta, module.cfg.tau, 10.0)
    assert torch.allclose(out[:, [0, 2]], 10 * f @ t[[0, 2]].t()) and torch.allclose(out[:, 1], attr[:, 1])


@pytest.mark.parametrize("style", ["ours", "tap", "cupl", "dclip"])
def test_loader_reads_every_format_and_normalises_names(tmp_path, style):
    names = ["american bulldog", "Sea or Lake"]
    keys = ["american_bulldog", "sea or lake"]  # the file's spelling differs only by data.py's rule and case
    if style in ("ours", "tap"):
        table = {k: {"Fur": [f"{k}, which is short."], "Ears": [f"{k}, which droop."]} for k in keys}
        raw = {"dataset": "x", "llm": "m", "prompt_version": "v1", "attributes": ["Fur", "Ears"],
               "descriptions": table} if style == "ours" else table
        expected = ["Fur", "Ears"]
    else:
        raw = {k: [f"{k}, which is a thing.", f"A photo of {k}."] for k in keys}
        expected = ["description"]
    (tmp_path / "d.json").write_text(json.dumps(raw))
    attributes, desc = sempt.load_descriptions(tmp_path / "d.json", names)
    assert attributes == expected and list(desc) == names
    assert all(len(desc[c][a]) >= 1 for c in names for a in attributes)


def test_loader_names_the_missing_classes(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"red circle": ["a red circle."]}))
    with pytest.raises(ValueError, match=r"2 classes: \['blue square', 'green triangle'\]"):
        sempt.load_descriptions(tmp_path / "d.json", ["red circle", "blue square", "green triangle"])
    with pytest.raises(data.InputError, match="describe.py"):
        sempt.load_descriptions(tmp_path / "none.json", ["red circle"])


# Class names as data.py writes them from CoOp's split files (checked against the files when they are here).
CLASSNAMES = {
    "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
                "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"],
    "dtd": "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous "
           "flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted "
           "meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled "
           "stained stratified striped studded swirly veined waffled woven wrinkled zigzagged".split(),
    "oxford_pets": ["abyssinian", "american bulldog", "american pit bull terrier", "basset hound", "beagle", "bengal",
                    "birman", "bombay", "boxer", "british shorthair", "chihuahua", "egyptian mau",
                    "english cocker spaniel", "english setter", "german shorthaired", "great pyrenees", "havanese",
                    "japanese chin", "keeshond", "leonberger", "maine coon", "miniature pinscher", "newfoundland",
                    "persian", "pomeranian", "pug", "ragdoll", "russian blue", "saint bernard", "samoyed",
                    "scottish terrier", "shiba inu", "siamese", "sphynx", "staffordshire bull terrier",
                    "wheaten terrier", "yorkshire terrier"],
}
SPLIT_FILES = {"eurosat": "EuroSAT", "dtd": "DescribableTextures", "oxford_pets": "OxfordPets"}


@pytest.mark.parametrize("dataset", ["world", "eurosat", "dtd", "oxford_pets"])
def test_shipped_description_files_are_complete(dataset):
    """Every class (names as data.py writes them), K = 5 attributes, every sentence within CLIP's context."""
    import world
    path = sempt.default_descriptions(dataset)
    raw = json.loads(path.read_text())
    names = world.CLASSNAMES if dataset == "world" else CLASSNAMES[dataset]
    attributes, desc = sempt.load_descriptions(path, names)
    assert raw["prompt_version"] == describe.PROMPT_VERSION and len(attributes) == 5 and set(raw["descriptions"]) == set(names)
    for c in names:
        for a in attributes:
            describe.check_sentences({a: desc[c][a]}, [a])


@pytest.mark.parametrize("dataset", sorted(SPLIT_FILES))
def test_class_lists_match_coop_split_files(dataset):
    reference = ROOT.parent / "shared" / "reference" / "coop_splits" / f"split_zhou_{SPLIT_FILES[dataset]}.json"
    if not reference.exists():
        pytest.skip("the CoOp split files are not beside the repo")
    split = data._read_split_file(reference, Path("images"))
    assert data._classnames(split["train"]) == CLASSNAMES[dataset]


# --- the generator against a real HTTP server --------------------------------------------------------------------

class FakeLLM:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that plays a script of behaviours, then answers well."""

    def __init__(self):
        self.script, self.answered, self.requests, self.keys, self.formats = [], [], 0, [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests += 1
                fake.keys.append(self.headers.get("Authorization"))
                fake.formats.append(body.get("response_format"))
                behaviour = fake.script.pop(0) if fake.script else "good"
                prompt = body["messages"][-1]["content"]
                if behaviour == "500":
                    return self.reply(500, {"error": "overloaded"})
                if behaviour in ("slow", "hang"):
                    time.sleep(2 if behaviour == "slow" else 60)
                if behaviour == "401":
                    return self.reply(401, {"error": "bad key"})
                if "Name exactly" in prompt:
                    answer = {"attributes": ATTRS}
                else:
                    name = re.search(r'Category: "(.+?)"', prompt).group(1)
                    answer = {a: [f"{name}, which has a plain {a}."] for a in ATTRS}
                    if behaviour == "incomplete":
                        answer.pop(ATTRS[1])
                    if behaviour == "too long":
                        answer[ATTRS[0]] = [" ".join(["word"] * 100)]
                content = {"malformed": "this is { not json", "null": None}.get(behaviour, json.dumps(answer))
                if behaviour == "good":
                    fake.answered.append(prompt)
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def reply(self, code, obj):
                payload = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def llm():
    fake = FakeLLM()
    yield fake
    fake.server.shutdown()


def describe_argv(tiny, out, url):
    return ["--dataset", "folder", "--root", str(tiny / "ds"), "--out", str(out),
            "--llm-url", url, "--llm-model", "fake", "--llm-timeout", "0.5", "--llm-backoff", "0.01",
            "--n-attributes", "2", "--n-sentences", "1", "--llm-key-env", "NANOPROMPT_TEST_KEY"]


def test_generator_survives_bad_answers_and_keeps_the_key_secret(tiny, tmp_path, llm, monkeypatch, capsys):
    monkeypatch.setenv("NANOPROMPT_TEST_KEY", KEY)
    llm.script = ["malformed", "good", "500", "slow", "incomplete", "too long", "good", "null"]  # then good
    out = describe.main(describe_argv(tiny, tmp_path / "d.json", llm.url))
    raw = json.loads(Path(out).read_text())
    assert raw["attributes"] == ATTRS and sorted(raw["descriptions"]) == sorted(NAMES)
    assert raw["llm"] == "fake, the v1 prompts through describe.py's client" and raw["prompt_version"] == "v1"
    assert len(llm.answered) == len(set(llm.answered)) == 1 + len(NAMES)  # each question answered exactly once
    assert llm.requests == 1 + len(NAMES) + 6  # six bad answers, each retried once
    assert set(llm.keys) == {f"Bearer {KEY}"}  # the key reaches the server ...
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(KEY in text for text in written)  # ... and nothing on disk
    assert KEY not in capsys.readouterr().out  # ... nor the log


def test_generator_json_mode_can_be_switched_off(tiny, tmp_path, llm):
    describe.main(describe_argv(tiny, tmp_path / "a.json", llm.url))
    assert llm.formats and all(f == {"type": "json_object"} for f in llm.formats)
    llm.formats.clear()
    describe.main(describe_argv(tiny, tmp_path / "b.json", llm.url) + ["--no-llm-json-mode"])
    assert llm.formats and all(f is None for f in llm.formats)


def test_generator_gives_up_with_a_clear_error(tiny, tmp_path, llm, capsys):
    llm.script = ["500"] * 10
    with pytest.raises(SystemExit, match="no valid answer after 5 tries .* run the same command again to resume"):
        describe.main(describe_argv(tiny, tmp_path / "d.json", llm.url))
    llm.script = ["401"]
    with pytest.raises(SystemExit) as e:  # a refusal is bad input: one error line, exit 2
        describe.main(describe_argv(tiny, tmp_path / "d.json", llm.url))
    assert e.value.code == 2 and re.match(r"error: .*HTTP 401.*NANOPROMPT_TEST_KEY", capsys.readouterr().err)
    assert not (tmp_path / "d.json").exists()


def test_generator_asks_again_for_a_damaged_cached_answer_and_names_bad_input(tiny, tmp_path, llm, capsys):
    describe.main(describe_argv(tiny, tmp_path / "d.json", llm.url))
    cached = sorted((tmp_path / ".cache" / "d").glob("*.json"))
    assert len(cached) == 1 + len(NAMES)
    cached[0].write_text("{garbled")
    (tmp_path / "d.json").unlink()
    describe.main(describe_argv(tiny, tmp_path / "d.json", llm.url))
    assert len(llm.answered) == 2 + len(NAMES) and "asking again" in capsys.readouterr().out  # only that one
    with pytest.raises(SystemExit) as e:
        describe.main(describe_argv(tiny, tmp_path / "e.json", llm.url)[2:] + ["--dataset", "nosuch"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unknown dataset 'nosuch'")


def test_generator_resumes_after_a_kill_without_asking_again(tiny, tmp_path, llm):
    llm.script = ["good"] * 3 + ["hang"]  # step 1 and two classes, then the server stalls and we kill the run
    proc = subprocess.Popen([sys.executable, "descriptions/describe.py", *describe_argv(tiny, tmp_path / "d.json", llm.url),
                             "--llm-timeout", "120"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while llm.requests < 4 and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert llm.requests == 4 and len(llm.answered) == 3 and not (tmp_path / "d.json").exists()
    describe.main(describe_argv(tiny, tmp_path / "d.json", llm.url))
    assert len(llm.answered) == len(set(llm.answered)) == 1 + len(NAMES)  # the 3 cached answers were not asked again
    assert sorted(json.loads((tmp_path / "d.json").read_text())["descriptions"]) == sorted(NAMES)


# --- a whole run --------------------------------------------------------------------------------------------------

def test_main_trains_then_eval_only_reproduces(tiny, descriptions, tmp_path):
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "2", "--lr", "0.05", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run"),
            "--descriptions", str(descriptions), "--store", str(tmp_path / "cache")]
    model, _ = clip.load(str(tiny / "clip.pt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = sempt.main(argv)
    assert (trained["base_head"], trained["new_head"]) == ("label", "attribute")
    assert len(list((tmp_path / "cache").glob("sempt_attributes_*.pt"))) == 1
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(state["trainable"]) == {"prompt_learner.ctx"} and state["classnames"] == sorted(NAMES)[:3]
    again = sempt.main(argv + ["--eval-only"])
    assert (again["base_acc"], again["new_acc"]) == (trained["base_acc"], trained["new_acc"])
    assert all(torch.equal(before[k], v) for k, v in clip.load(str(tiny / "clip.pt"))[0].state_dict().items())


def test_attribute_embeddings_are_the_mean_of_sentence_features_and_cached(tiny, descriptions, tmp_path):
    model, _ = clip.load(str(tiny / "clip.pt"))
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    attributes, desc = sempt.load_descriptions(descriptions, NAMES)
    emb = sempt.attribute_embeddings(model, attributes, desc, tmp_path, off)
    s = desc[NAMES[0]][ATTRS[1]]
    reference = F.normalize(F.normalize(model.encode_text(clip.tokenize(s)), dim=-1).mean(0), dim=-1)
    assert torch.allclose(emb[NAMES[0]][1], reference, atol=1e-5)
    cache = next(tmp_path.glob("sempt_attributes_*.pt"))
    cache.write_bytes(b"garbage")  # a corrupt cache is rebuilt, not trusted
    again = sempt.attribute_embeddings(model, attributes, desc, tmp_path, off)
    assert torch.allclose(again[NAMES[0]], emb[NAMES[0]]) and cache.stat().st_size > 100
