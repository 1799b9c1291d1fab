"""Hashed word n-gram features shared by DSIR and the quality classifier.

Text is lower-cased and split into word and punctuation runs (the pattern ``\\w+|[^\\w\\s]+``,
as NLTK's WordPunct tokenizer does); unigrams and bigrams (within one text) are hashed into
``num_buckets`` buckets. The work is vectorised: polars splits all texts at once, each
distinct token is hashed once with blake2b (stable across processes, machines and library
versions), and bigram hashes are mixed from their unigrams' hashes in numpy.

The result is a flat list of (text index, bucket) pairs, one per n-gram occurrence, which is
all DSIR (bucket counts, per-text sums) and the classifier (bags of buckets) need; dense
[N, buckets] matrices are never built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

TOKEN_PATTERN = r"\w+|[^\w\s]+"
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class HashedNgrams:
    """Occurrences of hashed n-grams: ``text[i]`` holds n-gram bucket ``bucket[i]``.

    text: [M] int64 index into the input texts (non-decreasing); bucket: [M] int64 in
    [0, num_buckets); num_texts: N; num_buckets: B.
    """

    text: np.ndarray
    bucket: np.ndarray
    num_texts: int
    num_buckets: int

    def bucket_counts(self) -> np.ndarray:
        """[B] float64: how often each bucket occurs over all texts."""
        return np.bincount(self.bucket, minlength=self.num_buckets).astype(np.float64)

    def per_text_sum(self, values: np.ndarray) -> np.ndarray:
        """[N] float64: sum of ``values[bucket]`` over each text's n-grams (0 for none)."""
        return np.bincount(self.text, weights=values[self.bucket], minlength=self.num_texts)

    def lengths(self) -> np.ndarray:
        """[N] int64: n-gram occurrences per text."""
        return np.bincount(self.text, minlength=self.num_texts)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _token_hashes(tokens: pl.Series) -> np.ndarray:
    """[M] uint64 blake2b hash of each token, computed once per distinct token."""
    categorical = tokens.cast(pl.Categorical)
    codes = categorical.to_physical().to_numpy().astype(np.int64)
    distinct = categorical.unique().drop_nulls()
    lookup = np.zeros(int(codes.max()) + 1 if len(codes) else 1, dtype=np.uint64)
    for code, token in zip(distinct.to_physical().to_list(), distinct.cast(pl.String).to_list(),
                           strict=True):
        lookup[code] = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(),
                                      "little")
    return lookup[codes]


def hashed_ngrams(texts: Sequence[str], num_buckets: int = 10_000, n: int = 2) -> HashedNgrams:
    """Unigram (and, for n=2, bigram) buckets of every text. n is 1 or 2."""
    if n not in (1, 2):
        raise ValueError(f"n must be 1 (unigrams) or 2 (unigrams + bigrams), got {n}")
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
    frame = pl.DataFrame({"text": pl.Series(list(texts), dtype=pl.String)})
    tokens = (
        frame.with_row_index("doc")
        .select("doc", pl.col("text").str.to_lowercase().str.extract_all(TOKEN_PATTERN))
        .explode("text")
        .drop_nulls()
    )
    doc = tokens["doc"].to_numpy().astype(np.int64)
    hashes = _splitmix(_token_hashes(tokens["text"]))
    docs, hashed = [doc], [hashes]
    if n == 2 and len(doc) > 1:
        same = doc[1:] == doc[:-1]
        pair = _splitmix(hashes[:-1] * _MIX ^ hashes[1:] ^ _MIX)
        docs.append(doc[1:][same])
        hashed.append(pair[same])
    doc = np.concatenate(docs)
    bucket = (np.concatenate(hashed) % np.uint64(num_buckets)).astype(np.int64)
    order = np.argsort(doc, kind="stable")
    return HashedNgrams(doc[order], bucket[order], len(texts), num_buckets)
