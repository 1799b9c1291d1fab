"""The one interface the baselines share: pool in, one score per example out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class PoolData:
    """What a baseline may look at.

    texts: [N] decoded text of each pool example; target_texts: text of the target examples
    the selection is for (the `select` split only; the `eval` split never reaches selection);
    embeddings: [N, D] per-example vectors, only for methods that need them (SemDeDup).
    """

    texts: Sequence[str]
    target_texts: Sequence[str] = ()
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not len(self.texts):
            raise ValueError("the pool is empty")
        if self.embeddings is not None and self.embeddings.shape[0] != len(self.texts):
            raise ValueError(
                f"embeddings have {self.embeddings.shape[0]} rows for {len(self.texts)} texts"
            )


class BaselineMethod(ABC):
    """A selection method other than DsDm. Subclasses are pydantic configs plus `scores`."""

    name: ClassVar[str]

    @abstractmethod
    def scores(self, pool: PoolData) -> np.ndarray:
        """Scores [N] (float64, finite): larger means selected earlier."""
