"""clip.tokenize against open_clip's tokenizer (an independent copy of OpenAI's simple_tokenizer.py).

Run: python -m pytest -q tests/test_clip_tokenizer.py
"""
import glob
import hashlib
import json
from pathlib import Path
import random

import pytest
import torch

import clip
from clip.tokenizer import VOCAB_FILE

open_clip = pytest.importorskip("open_clip")


def test_vocab_file_is_openais():
    data = VOCAB_FILE.read_bytes()
    assert len(data) == 1_356_917
    assert hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def texts():
    """Class names of the CoOp benchmarks, as prompts, plus unicode, accents, punctuation, numbers, whitespace."""
    names = set()
    for path in glob.glob(str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "coop_splits" / "split_*.json")):
        for split in json.load(open(path)).values():
            names.update(item[2] for item in split)
    names = sorted(names)
    out = names + [f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in names]
    for path in sorted((Path(__file__).resolve().parents[1] / "descriptions").glob("*.json")):  # SemPT's sentences
        out += [s for attrs in json.load(open(path))["descriptions"].values() for ss in attrs.values() for s in ss]
    out += ["", " ", "\t\n  spaced   out \n", "Café crème brûlée", "naïve Zoë façade", "ÅNGSTRÖM", "日本語のテキスト",
            "emoji 🐶🐱 and 🚗!", "Ελληνικά κείμενα", "русский текст", "&amp; &lt;tag&gt; &quot;quoted&quot;",
            "it's they're we've I'm you'll he'd", "3.14159 and 2,718 or 1e-10", "A-B_C/D\\E|F", "MiXeD CaSe",
"\u00a0non-breaking\u00a0space", "mojibake: Ã©tÃ©",
            "tab\tand\u200bzero-width", "hyphen—dash–en", "(((nested))) [brackets] {braces}", "1234567890" * 3]
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGH0123456789 .,;:!?'\"-_/()éüñçøß漢字😀\t\n"
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    return out


def test_matches_open_clip():
    batch = texts()
    assert len(batch) >= 1000
    ours, theirs = clip.tokenize(batch), open_clip.tokenize(batch)
    assert ours.shape == (len(batch), 77) and ours.dtype == torch.long
    bad = [t for t, a, b in zip(batch, ours, theirs) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]}"


def test_known_ids():
    # hand-checked: <start>=49406, "a</w>"=320, "photo</w>"=1125, "of</w>"=539, "dog</w>"=1929, "."=269, <end>=49407
    ids = clip.tokenize("a photo of a dog.")[0]
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407] and not ids[8:].any()


def test_openai_special_token_strings():
    # OpenAI's simple_tokenizer.py spells them <|startoftext|> / <|endoftext|> (open_clip: <start_of_text>), and maps
    # them to their ids even inside a text; "inside</w>" = 2912
    ids = clip.tokenize("<|startoftext|> inside <|endoftext|>")[0]
    assert ids[:5].tolist() == [49406, 49406, 2912, 49407, 49407]


def test_too_long_raises_naming_the_text():
    text = "word " * 100
    with pytest.raises(RuntimeError, match="truncate=True") as e:
        clip.tokenize(["short", text])
    assert "word word" in str(e.value)


def test_truncate_ends_with_eot_and_matches_open_clip():
    long_texts = [" ".join(f"token{i}" for i in range(n)) for n in (30, 60, 200)] + ["a photo " * 80]
    ours = clip.tokenize(long_texts, truncate=True)
    assert (ours[:, -1] == 49407).all() and (ours[:, 0] == 49406).all()
    assert torch.equal(ours, open_clip.tokenize(long_texts))  # open_clip always truncates, eot last
    short = clip.tokenize(["a dog"], context_length=5, truncate=True)
    assert short.tolist() == [[49406, 320, 1929, 49407, 0]]
