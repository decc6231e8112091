"""The tables' baselines: linear-probe CLIP (lpclip.py), zero-shot CLIP's prompt ensemble (coop.py --ensemble) and
plain VPT-deep (davpt.py with both losses off)."""
import math

import pytest
import torch

import coop
import davpt
import lpclip
from harness import runs


def test_logistic_regression_is_at_sklearns_optimum():
    """At the solution the gradient of C * sum CE + 0.5 ||W||^2 (bias free), written out by hand, vanishes."""
    g = torch.Generator().manual_seed(0)
    x, y, C = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.arange(40) % 3, 0.7
    W, b = lpclip.fit_logistic(x, y, 3, C)
    p = torch.softmax(x @ W.t() + b, dim=1)  # (N, C)
    residual = p - torch.nn.functional.one_hot(y, 3).double()
    grad_W, grad_b = C * residual.t() @ x + W, C * residual.sum(0)
    assert grad_W.abs().max() < 1e-3 * C * len(y) and grad_b.abs().max() < 1e-3 * C * len(y)
    assert W.abs().max() > 0.1  # not the zero start


def test_logistic_regression_tiny_case_by_hand():
    """x = +1 (class 0), -1 (class 1): by symmetry b = 0, W = (a, -a), and a = 2C sigmoid(-2a) (found by bisection)."""
    C = 1.0
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < 2 * C / (1 + math.exp(2 * mid)) else (lo, mid)
    W, b = lpclip.fit_logistic(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]), 2, C)
    assert torch.allclose(W.flatten(), torch.tensor([lo, -lo], dtype=torch.float64), atol=1e-4)
    assert b.abs().max() < 1e-4


def test_c_search_follows_coops_steps():
    """A fake validation accuracy -|log10 C - 2.3|: the grid picks 1e2, then (hand-worked) the rounds compare
    10 | 1000 -> 1000, 100 | 1000 -> 100, 10^2 | 10^2.5 -> 10^2.5, 10^2.25 | 10^2.5 -> 10^2.25."""
    acc = lambda c: -abs(math.log10(c) - 2.3)  # noqa: E731
    c, clf = lpclip.search_c(lambda c: c, acc, steps=4)
    assert c == pytest.approx(10 ** 2.25) and clf == c
    assert lpclip.search_c(lambda c: c, acc, steps=1)[0] == pytest.approx(1000)
    # every C ties: the grid keeps its first (1e6), and every round keeps the left end (1e5)
    assert lpclip.search_c(lambda c: c, lambda c: 0.5, steps=3)[0] == pytest.approx(1e5)


def test_lpclip_on_the_world_end_to_end(tmp_path):
    out = lpclip.main(["--root", str(tmp_path), "--shots", "1", "--search-steps", "1", "--max-iter", "20",
                       "--store", "none", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert 1 / 32 * 100 < out["acc"] <= 100 and out["C"] > 0 and (tmp_path / "run" / "results.json").exists()


def test_lpclip_refuses_base_to_new(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        lpclip.main(["--setting", "base2new", "--root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "cannot score classes it was not trained on" in capsys.readouterr().err


def test_ensemble_templates_are_coops():
    """CoOp's trainers/imagenet_templates.py IMAGENET_TEMPLATES_SELECT, written out from the official file."""
    assert coop.ENSEMBLE == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                             "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
    (zs,) = runs.plan(coop.parser, coop.configure, coop.__file__, ["--epochs", "0", "--ensemble"])[1]
    (plain,) = runs.plan(coop.parser, coop.configure, coop.__file__, ["--epochs", "0"])[1]
    assert (zs.method, plain.method) == ("zero-shot-ensemble", "zero-shot")


def test_vpt_deep_is_a_row_of_its_own_and_the_world_preset():
    plan = lambda argv: runs.plan(davpt.parser, davpt.configure, davpt.__file__, argv)[1][0]  # noqa: E731
    vpt, da = plan(["--beta", "0", "--lam", "0"]), plan([])
    assert (vpt.method, da.method, plan(["--beta", "0"]).method) == ("vpt-deep", "davpt", "davpt")
    assert plan(["--beta", "0", "--lam", "0", "--tune-bias", "kv"]).method == "vpt-deep+"
    assert (da.num_guided, da.num_other, vpt.num_guided, vpt.num_other) == (2, 2, 2, 2)  # world: 16 patches
    assert (da.beta, da.lam, da.lr, da.guided_layers) == (0.01, 0.01, 1e-3, "-1")
    assert plan(["--dataset", "eurosat", "--root", "/x"]).num_other == 20  # other datasets keep the no-config row
