"""Text cleaning, tokenization, vocabulary and fixed-length encoding (NumPy + stdlib).

Used both by the `prepare` stage and at prediction time: `TextEncoder` bundles
everything needed to turn raw reviews into model input the same way training did.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

# Encoding pads every review to max_len ids: a larger max_len (say 1e12 in a hand-edited encoder.json)
# would only allocate memory, so MAX_LEN bounds it.
from .config import MAX_LEN, TRUNCATE_MODES

PAD = 0
UNK = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
# Curly apostrophes are common in reviews; without this "don’t" would split.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# Letters/digits (unicode, no underscore) with internal apostrophes kept, so
# negations like "don't" and "isn't" survive as single tokens; plus ! and ?.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[!?]")

S = TypeVar("S", bound=Sequence)


def clean(text: str) -> str:
    """Replace HTML tags (e.g. `<br />`) with spaces, unescape entities, lowercase."""
    text = _TAG.sub(" ", text)
    return html.unescape(text).translate(_APOSTROPHES).lower()


def tokenize(text: str) -> list[str]:
    """Split cleaned text into word tokens plus `!` and `?`; other punctuation dropped."""
    return _TOKEN.findall(clean(text))


class Vocabulary:
    """Token <-> id mapping with PAD=0 and UNK=1 reserved."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tokens[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.tokens: list[str] = tokens
        self._index = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str]], max_size: int | None = None, min_freq: int = 1
    ) -> Vocabulary:
        """Most frequent tokens first, ties alphabetical; `max_size` counts PAD and UNK."""
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size must be >= 2 (PAD and UNK), got {max_size}")
        counts: Counter[str] = Counter()
        for toks in token_lists:
            counts.update(toks)
        for special in (PAD_TOKEN, UNK_TOKEN):
            counts.pop(special, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls([PAD_TOKEN, UNK_TOKEN, *kept])

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], max_size: int | None = None, min_freq: int = 1
    ) -> Vocabulary:
        return cls.build((tokenize(t) for t in texts), max_size, min_freq)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def id(self, token: str) -> int:
        return self._index.get(token, UNK)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids as int32; unknown tokens map to UNK."""
        get = self._index.get
        return np.fromiter((get(t, UNK) for t in tokens), dtype=np.int32, count=len(tokens))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(d["tokens"])


def truncate(ids: S, max_len: int, mode: str = "head") -> S:
    """Cut a sequence to `max_len`: keep the head, the tail, or both ends.

    "both" keeps the first ceil(max_len/2) and last floor(max_len/2) items,
    since reviews often state the verdict at the start or the end.
    """
    if mode not in TRUNCATE_MODES:
        raise ValueError(f"truncate mode must be one of {', '.join(TRUNCATE_MODES)}, got {mode!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if len(ids) <= max_len:
        return ids
    if mode == "head":
        return ids[:max_len]
    if mode == "tail":
        return ids[len(ids) - max_len :]
    head = max_len - max_len // 2
    tail = max_len // 2
    front, back = ids[:head], ids[len(ids) - tail :]
    if isinstance(ids, np.ndarray):
        return np.concatenate([front, back])  # type: ignore[return-value]
    return front + back  # type: ignore[operator]


def pad_sequences(
    seqs: Sequence[np.ndarray], max_len: int, mode: str = "head"
) -> tuple[np.ndarray, np.ndarray]:
    """Truncate and right-pad id sequences into (N, max_len) int32 plus lengths.

    An empty sequence becomes [UNK] so every length is >= 1: recurrent models
    then always have a last valid step to read.
    """
    out = np.zeros((len(seqs), max_len), dtype=np.int32)
    lengths = np.empty(len(seqs), dtype=np.int32)
    for i, seq in enumerate(seqs):
        seq = truncate(seq, max_len, mode)
        if len(seq) == 0:
            seq = np.array([UNK], dtype=np.int32)
        out[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return out, lengths


def encode_texts(
    texts: Iterable[str], vocab: Vocabulary, max_len: int, mode: str = "head"
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize and encode raw texts into (ids (N, max_len) int32, lengths (N,) int32)."""
    return pad_sequences([vocab.encode(tokenize(t)) for t in texts], max_len, mode)


@dataclass
class TextEncoder:
    """Everything needed to encode raw text exactly as during training."""

    vocab: Vocabulary
    max_len: int
    truncate: str = "head"

    def __post_init__(self) -> None:
        if self.truncate not in TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {', '.join(TRUNCATE_MODES)}, got {self.truncate!r}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, (int, np.integer)):
            raise ValueError(f"max_len must be an integer, got {self.max_len!r}")
        if not 1 <= self.max_len <= MAX_LEN:
            raise ValueError(f"max_len must lie in [1, {MAX_LEN}], got {self.max_len}")

    def encode(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        return encode_texts(texts, self.vocab, self.max_len, self.truncate)

    def to_dict(self) -> dict:
        return {"tokens": list(self.vocab.tokens), "max_len": self.max_len, "truncate": self.truncate}

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoder:
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise ValueError("expected a mapping with a list of tokens")
        if not all(isinstance(t, str) for t in d["tokens"]):
            raise ValueError("tokens must be strings")
        return cls(Vocabulary(d["tokens"]), d.get("max_len"), d.get("truncate"))


def encoder_difference(a: dict, b: dict) -> str | None:
    """How two encoders (`TextEncoder.to_dict` dicts) differ, in a few words; None if they are equal.

    Token ids mean the same thing only under the same encoder: a model scored on ids from another
    vocabulary gives a wrong accuracy (or an IndexError).
    """
    if a == b:
        return None
    x, y = a.get("tokens") or [], b.get("tokens") or []
    if x != y:
        first = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        return f"vocabularies of {len(x)} and {len(y)} tokens, first different at id {first}"
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def encode_tokenized(docs: Iterable[list[str]], encoder: TextEncoder) -> tuple[dict[str, np.ndarray], dict]:
    """Encode tokenized documents as `encoder` does, and describe what the encoding lost.

    Returns arrays {ids (N, max_len) int32, lengths (N,) int32, raw_lengths (N,) int32: the length
    before truncation} and stats {oov_rate: share of the tokens that became UNK, truncated_fraction:
    share of the documents cut, length_percentiles: {p50, p90, p95, p99} of raw_lengths}.
    """
    seqs = [encoder.vocab.encode(t) for t in docs]
    raw = np.array([len(s) for s in seqs], dtype=np.int64)
    n_tokens, n_unk = int(raw.sum()), int(sum(int((s == UNK).sum()) for s in seqs))
    ids, lengths = pad_sequences(seqs, encoder.max_len, encoder.truncate)
    percentiles = np.percentile(raw, [50, 90, 95, 99]) if len(raw) else [0] * 4
    stats = {"oov_rate": n_unk / n_tokens if n_tokens else 0.0,
             "truncated_fraction": float((raw > encoder.max_len).mean()) if len(raw) else 0.0,
             "length_percentiles": {f"p{p}": float(v) for p, v in zip((50, 90, 95, 99), percentiles)}}
    return {"ids": ids, "lengths": lengths, "raw_lengths": raw.astype(np.int32)}, stats
