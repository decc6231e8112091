"""Bad input to the descriptions, as one error line: sempt.py's loader checks every value of every description
format; descriptions/describe.py names an endpoint that is no chat API, refuses, or never answers at once (what came
back, what it waited for), and the finished command run again asks nothing again.

Run: python -m pytest tests/test_describe.py
"""
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data
import sempt
from conftest import NAMES
from descriptions import describe

ATTRS = ["colour", "outline"]


# --- sempt.load_descriptions: every value a list of non-empty strings ----------------------------------------------

def ours(table, attributes=ATTRS):
    return {"dataset": "folder", "llm": "hand", "prompt_version": "v1", "attributes": attributes, "descriptions": table}


GOOD = {c: {a: [f"{c}, which has a {a}."] for a in ATTRS} for c in NAMES[:2]}
BAD_FILES = {  # file contents -> the error line's part that names the place and what was found
    "cupl, a string for a list": ({"red circle": "a red circle.", "blue square": ["a blue square."]},
                                  "class 'red circle' must be a list of non-empty strings, found \"a red circle.\";"),
    "cupl, a number for a sentence": ({"red circle": ["a red circle.", 7], "blue square": ["a blue square."]},
                                      "class 'red circle' must be a list of non-empty strings, found 7 in it;"),
    "cupl, an empty sentence": ({"red circle": [" "], "blue square": ["a blue square."]},
                                "class 'red circle' must be a list of non-empty strings, found \" \" in it;"),
    "tap, a string for a list": (GOOD | {"blue square": {"colour": "blue.", "outline": ["square."]}},
                                 "class 'blue square', attribute 'colour' must be a list of non-empty strings, "
                                 "found \"blue.\";"),
    "tap, no attributes": (GOOD | {"blue square": {}}, "class 'blue square' must be a list of non-empty strings, found {};"),
    "ours, null for a list": (ours(GOOD | {"red circle": {"colour": None, "outline": ["round."]}}),
                              "class 'red circle', attribute 'colour' must be a list of non-empty strings, found null;"),
    "ours, an empty list": (ours(GOOD | {"red circle": {"colour": [], "outline": ["round."]}}),
                            "class 'red circle', attribute 'colour' must be a list of non-empty strings, found [];"),
    "ours, attributes a string": (ours(GOOD, attributes="colour"),
                                  'its "attributes" must be a list of non-empty strings, found "colour";'),
    "ours, descriptions a list": (ours([["a red circle."]]), 'expected an object {class: ...}, found [["a red circle."]];'),
    "a list, not an object": ([["a red circle."]], 'expected an object {class: ...}, found [["a red circle."]];'),
    "a class not asked for": (GOOD | {"yellow star": "a star."},  # every value of the file is checked
                              "class 'yellow star' must be a list of non-empty strings, found \"a star.\";"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_loader_names_the_class_and_attribute_of_a_bad_value(tmp_path, case):
    content, message = BAD_FILES[case]
    (tmp_path / "d.json").write_text(json.dumps(content))
    with pytest.raises(data.InputError) as e:
        sempt.load_descriptions(tmp_path / "d.json", NAMES[:2])
    assert str(e.value) == f"{tmp_path / 'd.json'}: {message} fix the file or write it again with descriptions/describe.py"


def test_sempt_with_a_bad_description_file_is_one_error_line(tiny, tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps({c: [f"a photo of a {c}.", 3] for c in NAMES}))
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "1", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run"),
            "--descriptions", str(tmp_path / "d.json")]
    with pytest.raises(SystemExit) as e:
        sempt.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and "Traceback" not in err
    assert lines[-1].startswith(f"error: {tmp_path / 'd.json'}: class ") and "found 3 in it" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1


# --- describe.py against endpoints that are not what --llm-url should name ---------------------------------------

class Endpoint:
    """127.0.0.1 HTTP server: answers every POST with `reply` (code, content type, body), or as a chat API when it
    is None; counts the requests."""

    def __init__(self):
        self.reply, self.requests = None, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
                fake.requests += 1
                code, kind, body = fake.reply or (200, "application/json", json.dumps({"choices": [{"message": {
                    "role": "assistant", "content": json.dumps(answer(prompt))}}]}))
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def answer(prompt):
    """A valid answer to either step's prompt."""
    if "Name exactly" in prompt:
        return {"attributes": ATTRS}
    name = re.search(r'Category: "(.+?)"', prompt).group(1)
    return {a: [f"{name}, which has a plain {a}."] for a in ATTRS}


@pytest.fixture
def endpoint():
    fake = Endpoint()
    yield fake
    fake.server.shutdown()


def argv(tiny, out, url):
    return ["--dataset", "folder", "--root", str(tiny / "ds"), "--out", str(out), "--llm-url", url,
            "--llm-model", "fake", "--llm-timeout", "0.5", "--llm-backoff", "0.01", "--n-attributes", "2",
            "--n-sentences", "1", "--llm-key-env", "NANOPROMPT_TEST_KEY"]


def error_line(argv, capsys):
    """describe.main(argv) ends with exit status 2 and one `error:` line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        describe.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


WRONG_KIND = {  # what an endpoint that is no chat API sends back -> what the error line shows of it
    "a web page": ((200, "text/html", "<!DOCTYPE html>\n<html><body>Welcome to nginx!</body></html>"),
                   "answered text/html '<!DOCTYPE html> <html><body>Welcome to nginx!</body></html>', not a chat"),
    "JSON without choices": ((200, "application/json", json.dumps({"object": "list", "data": []})),
                             "answered application/json '{\"object\": \"list\", \"data\": []}', not a chat"),
    "a 404 page": ((404, "text/html", "<html><title>404 Not Found</title></html>"),
                   "(HTTP 404, text/html '<html><title>404 Not Found</title></html>'): check --llm-url"),
}


@pytest.mark.parametrize("case", sorted(WRONG_KIND))
def test_an_answer_of_the_wrong_kind_is_not_retried_and_is_shown(tiny, tmp_path, endpoint, case, capsys):
    endpoint.reply, shown = WRONG_KIND[case]
    line = error_line(argv(tiny, tmp_path / "d.json", endpoint.url), capsys)
    assert endpoint.requests == 1 and shown in line and "--llm-url" in line
    assert not (tmp_path / "d.json").exists()


def test_a_refusal_says_the_key_is_not_set(tiny, tmp_path, endpoint, capsys, monkeypatch):
    monkeypatch.delenv("NANOPROMPT_TEST_KEY", raising=False)
    endpoint.reply = (401, "application/json", json.dumps({"error": {"message": "no key"}}))
    line = error_line(argv(tiny, tmp_path / "d.json", endpoint.url), capsys)
    assert endpoint.requests == 1 and "HTTP 401" in line and "$NANOPROMPT_TEST_KEY (not set)" in line


def test_a_dead_endpoint_says_what_it_waits_for_and_fails_at_once(tiny, tmp_path, capsys):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()  # nothing listens there: connection refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are accepted by the kernel, but no byte ever comes back: a timeout
    try:
        for url, why in [(refused, "refused"), (f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "timed out")]:
            with pytest.raises(SystemExit) as e:
                describe.main(argv(tiny, tmp_path / "d.json", url) + ["--llm-timeout", "0.3"])
            out, err = capsys.readouterr()
            assert out.splitlines()[0] == f"step 1: asking {url} (model fake), waiting up to 0.3 s for its answer"
            assert e.value.code == 2 and "try" not in out  # no retries: one wait, announced
            assert err.startswith(f"error: step 1: no answer (") and why in err and f"from {url}: check --llm-url" in err
    finally:
        silent.close()


def test_bad_flags_are_one_error_line_before_any_question(tiny, tmp_path, endpoint, capsys):
    with pytest.raises(SystemExit) as e:
        describe.main(argv(tiny, tmp_path / "d.json", "localhost:8000/v1"))
    assert e.value.code == 2 and "error: --llm-url 'localhost:8000/v1' is not an http:// or https:// URL" in \
        capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    line = error_line(argv(tiny, tmp_path / "folder", endpoint.url), capsys)
    assert line.startswith(f"error: --out {tmp_path / 'folder'} is a folder") and endpoint.requests == 0


def test_the_finished_command_run_again_asks_nothing_again(tiny, tmp_path, endpoint):
    first = describe.main(argv(tiny, tmp_path / "d.json", endpoint.url))
    assert endpoint.requests == 1 + len(NAMES)
    second = describe.main(argv(tiny, tmp_path / "d.json", endpoint.url))  # d.json exists: written beside it
    assert endpoint.requests == 1 + len(NAMES)  # every answer came from the cache
    assert second == tmp_path / "d.fake.json" and json.loads(second.read_text()) == json.loads(first.read_text())
