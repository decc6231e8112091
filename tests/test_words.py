"""`python eval.py words RUN`: the nearest vocabulary words of a run's learned context (CoOp's interpret_prompt.py).

Run: python -m pytest -q tests/test_words.py
"""
import pytest
import torch

import clip
import coop
import davpt
import eval as evaluation
import files


def test_context_set_to_known_words_reads_back_as_those_words(tiny, tmp_path, capsys):
    model = clip.load(str(tiny / "clip.pt"), device="cpu")[0]
    ids = [int(clip.tokenize(w)[0, 1]) for w in ("photo", "dog", "red")]  # <start> word <end>: the word's id
    run = tmp_path / "run"
    files.save_json(run / "args.json", {"backbone": str(tiny / "clip.pt"), "method": "coop"})
    torch.save({"trainable": {"ctx": model.token_embedding.weight[ids].detach().clone()}, "classnames": []},
               run / "checkpoint.pt")
    evaluation.words([str(run), "--topk", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["photo", "dog", "red"]
    assert all(line.split()[3] == "(0.000)" for line in lines[1:])


def test_a_world_run_has_one_line_per_context_vector(tmp_path, capsys):
    coop.main(["--epochs", "1", "--shots", "1", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run")])
    capsys.readouterr()
    evaluation.words([str(tmp_path / "run")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("coop, backbone " + str(files.HERE / "world_clip.pt"))
    assert [line.split(":")[0] for line in out[1:]] == ["ctx 1", "ctx 2", "ctx 3", "ctx 4"]  # "a photo of a"


def refused(run, capsys):
    """words(RUN)'s exit status and its one stderr line."""
    with pytest.raises(SystemExit) as e:
        evaluation.words([str(run)])
    return e.value.code, capsys.readouterr().err.strip()


def test_visual_prompts_are_no_words(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    davpt.main(["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
                "--epochs", "1", "--device", "cpu", "--workers", "0", "--setting", "fewshot", "--num-guided", "2",
                "--out", str(run)])
    capsys.readouterr()
    code, err = refused(run, capsys)
    assert code == 2 and err.startswith("error: ") and "no learned word context" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method, trainable", [
    ("zero-shot", {"ctx": torch.zeros(4, 64)}),  # a zero-shot run keeps its untrained initial context
    ("coop", {"ctx": torch.zeros(2, 4, 64)}),  # class-specific context (C, M, D): not a (M, D) prompt
    ("other", {"head.weight": torch.zeros(5, 64)}),  # no tensor named ctx at all
])
def test_a_run_without_learned_words_is_one_error_line(tiny, tmp_path, capsys, method, trainable):
    files.save_json(tmp_path / "args.json", {"backbone": str(tiny / "clip.pt"), "method": method})
    torch.save({"trainable": trainable, "classnames": []}, tmp_path / "checkpoint.pt")
    code, err = refused(tmp_path, capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path}: a {method} run") and len(err.splitlines()) == 1
