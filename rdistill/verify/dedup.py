"""Dataset-level filters: n-gram decontamination against evaluation prompts, and exact and
near-duplicate removal (MinHash signatures, LSH buckets, estimated Jaccard).

Signatures are computed per row inside the parallel verification tasks; only the small
(id, key, signature) columns come back to the driver, which makes the keep/drop decisions in id
order so that reruns drop the same rows.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from typing import Iterable, Optional, Sequence

import numpy as np

from rdistill.prompts.text import words as split_words

SHINGLE = 5  # tokens per shingle for near-duplicate detection
NUM_PERM, BANDS = 128, 16  # 16 bands x 8 rows: pairs above ~0.7 Jaccard almost always meet
_PRIME = (1 << 31) - 1  # hashes and coefficients below 2^31 keep a*x+b inside uint64
_rng = np.random.default_rng(20250301)
_A = _rng.integers(1, _PRIME, NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, NUM_PERM, dtype=np.uint64)


def _h31(s: str) -> int:
    """A stable 31-bit hash (Python's hash() is salted per process; Ray workers must agree)."""
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _PRIME


class ContaminationIndex:
    """Token n-grams (lowercased words and punctuation marks) of evaluation prompts. A prompt is
    contaminated when it shares one n-gram with them; an evaluation prompt shorter than n counts
    as one n-gram of its own length, so short prompts are matched whole rather than never (and
    their final punctuation keeps 'adds 3 to x.' from matching inside 'adds 3 to x and then')."""

    def __init__(self, texts: Iterable[str], n: int):
        self.n = n
        self.grams: dict[int, set[str]] = defaultdict(set)  # length -> joined n-grams
        for t in texts:
            words = split_words(t)
            k = min(n, len(words))
            if k:
                self.grams[k].update(" ".join(words[i:i + k]) for i in range(len(words) - k + 1))
        self.grams = dict(self.grams)

    def __len__(self) -> int:
        return sum(len(g) for g in self.grams.values())

    def match(self, text: str) -> Optional[str]:
        """The first shared n-gram, or None."""
        words = split_words(text)
        for k, grams in self.grams.items():
            for i in range(len(words) - k + 1):
                g = " ".join(words[i:i + k])
                if g in grams:
                    return g
        return None


def exact_key(prompt: str, completion: str) -> str:
    """Same prompt and same answer up to case and whitespace."""
    norm = " ".join(f"{prompt}\x00{completion}".lower().split())
    return hashlib.sha1(norm.encode()).hexdigest()


def minhash(text: str) -> list[int]:
    """MinHash signature over token 5-shingles of a sample (prompt and answer together)."""
    toks = split_words(text)
    shingles = {" ".join(toks[i:i + SHINGLE]) for i in range(max(1, len(toks) - SHINGLE + 1))}
    x = np.array([_h31(s) for s in shingles], dtype=np.uint64)
    vals = (np.outer(_A, x) + _B[:, None]) % _PRIME  # a*x+b < 2^62: no overflow
    return vals.min(axis=1).astype(np.int64).tolist()


def jaccard_estimate(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def find_duplicates(ids: Sequence[str], keys: Sequence[str], sigs: Sequence[Sequence[int]],
                    threshold: float) -> dict[str, tuple[str, str]]:
    """{id: (reason, id it duplicates)} for the rows to drop. Rows are taken in id order; a row
    is dropped when its exact key was seen, or its estimated Jaccard with a kept row reaches
    `threshold`."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    seen: dict[str, str] = {}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    rows = NUM_PERM // BANDS
    out: dict[str, tuple[str, str]] = {}
    for i in order:
        if keys[i] in seen:
            out[ids[i]] = ("duplicate", seen[keys[i]])
            continue
        sig = np.asarray(sigs[i], dtype=np.int64)
        bands = [(b, sig[b * rows:(b + 1) * rows].tobytes()) for b in range(BANDS)]
        twin = None
        for band in bands:
            for j in buckets.get(band, ()):
                if jaccard_estimate(sig, sigs[j]) >= threshold:
                    twin = j
                    break
            if twin is not None:
                break
        if twin is not None:
            out[ids[i]] = ("near_duplicate", ids[twin])
            continue
        seen[keys[i]] = ids[i]
        for band in bands:
            buckets[band].append(i)
    return out
