"""Target/pool contamination check on normalised word n-grams.

Selection is scored on target tasks, so a target prompt or continuation that also occurs in
the candidate pool would reward memorisation instead of transfer. Texts are normalised to
lowercase word tokens (runs of letters/digits; punctuation, markup symbols and whitespace are
ignored), which catches copies that differ only in case, spacing or formatting.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_N = 13
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Overlap:
    """Target text ``target_index`` shares ``ngram`` with pool text ``pool_index``."""

    target_index: int
    pool_index: int
    ngram: str


def normalised_words(text: str) -> list[str]:
    """Lowercased word tokens; underscores count as separators."""
    return _WORD.findall(text.lower().replace("_", " "))


def ngrams(text: str, n: int = DEFAULT_N) -> set[tuple[str, ...]]:
    """All word n-grams of ``text`` (empty when it has fewer than ``n`` words)."""
    words = normalised_words(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def find_overlaps(
    pool_texts: Iterable[str], target_texts: Iterable[str], n: int = DEFAULT_N
) -> list[Overlap]:
    """Every (target, pool document) pair sharing a word n-gram, with the first shared n-gram.

    The small side (targets) is indexed and the pool is streamed, so the pool may be a
    generator over a large crawl. Targets shorter than ``n`` words cannot overlap.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    index: dict[tuple[str, ...], list[int]] = {}
    for target_index, text in enumerate(target_texts):
        for gram in ngrams(text, n):
            index.setdefault(gram, []).append(target_index)
    if not index:
        return []
    first_words = {gram[0] for gram in index}
    found: dict[tuple[int, int], str] = {}
    for pool_index, text in enumerate(pool_texts):
        words = normalised_words(text)
        for i in range(len(words) - n + 1):
            if words[i] not in first_words:
                continue
            hits = index.get(tuple(words[i : i + n]))
            if hits:
                for target_index in hits:
                    found.setdefault((target_index, pool_index), " ".join(words[i : i + n]))
    return [Overlap(t, p, gram) for (t, p), gram in sorted(found.items())]


def leaked_target_ids(target_ids: Sequence[str], target_texts: Iterable[str],
                      pool_texts: Iterable[str], n: int = DEFAULT_N) -> list[str]:
    """Sorted ids of the targets that share a word n-gram with any pool text (streamed)."""
    return sorted({target_ids[o.target_index] for o in find_overlaps(pool_texts, target_texts, n)})
