"""CLIP's byte-level BPE tokenizer, giving the same token ids as OpenAI's `simple_tokenizer.py`.

Text is cleaned (ftfy, html unescape, whitespace collapsed, lower-cased), split into words by a regex, each word's
UTF-8 bytes are mapped to printable characters, and merges from `bpe_simple_vocab_16e6.txt.gz` (OpenAI's file)
are applied in rank order. A word's last symbol carries the end-of-word marker `</w>`.
"""
import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import regex as re
import torch

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")


@lru_cache()
def bytes_to_unicode():
    """Map every byte 0..255 to a printable unicode character (printable ASCII/Latin-1 map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    def __init__(self, vocab_file=VOCAB_FILE):
        merges = gzip.open(vocab_file).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}  # 49408 tokens
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                              re.IGNORECASE)
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Merge the characters of one word, lowest-ranked pair first, until no known pair is left."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        ids = []
        for token in re.findall(self.pat, clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


_tokenizer = None


def tokenize(texts, context_length=77, truncate=False):
    """Token ids (n, context_length) of one text or a list: <start> + BPE ids + <end>, zero-padded.

    A text longer than the context raises an error unless truncate=True, which cuts it and ends it with <end>.
    """
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    if isinstance(texts, str):
        texts = [texts]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [_tokenizer.sot] + _tokenizer.encode(text) + [_tokenizer.eot]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"input {text!r} is {len(ids)} tokens long, longer than the context length "
                                   f"{context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [_tokenizer.eot]
        result[i, : len(ids)] = torch.tensor(ids)
    return result
