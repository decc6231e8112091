"""The speed paths compute what the plain paths compute.

Run: python -m pytest -q tests/test_speed.py
"""
import torch
import torch.nn.functional as F

from clip.model import Attention, set_sdpa
from conftest import make_clip


def test_attention_rule_takes_math_up_to_77_tokens_and_sdpa_beyond(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 4)
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.shape[-2]) or sdpa(q, *a, **k))
    xs = [torch.randn(2, N, 64) for N in (11, 77, 78, 197)]
    outs = [attn(x) for x in xs]
    assert seen == [78, 197]  # the rule: SDPA only beyond 77 tokens
    for x, out in zip(xs, outs):
        attn.use_sdpa = x.shape[1] <= 77  # the other path, forced: the same numbers
        assert (out - attn(x)).abs().max() <= 1e-5
    model = set_sdpa(set_sdpa(make_clip(), True), None)  # None restores the rule
    assert all(m.use_sdpa is None for m in model.modules() if isinstance(m, Attention))
