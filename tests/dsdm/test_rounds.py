"""Which examples a later round's proxies train on (`round_subsets`)."""

import numpy as np
import pytest

from dsdm.datamodels import proxy_subsets, round_subsets


def test_a_later_round_trains_on_the_selection_plus_random_rest() -> None:
    previous = np.array([3, 17, 40, 41, 99])
    subsets = round_subsets(100, 3, 0.5, seed=7, previous=previous)
    first = proxy_subsets(100, 3, 0.5, seed=7)
    for subset, plain in zip(subsets, first, strict=True):
        assert len(subset) == len(plain) == 50  # the first round's size: the same cost
        assert np.array_equal(subset, np.unique(subset)) and set(previous) <= set(subset)
    rests = [frozenset(s) - set(previous) for s in subsets]
    assert len(set(rests)) == 3  # proxies differ in their random part
    again = round_subsets(100, 3, 0.5, seed=7, previous=previous[::-1])
    assert all(np.array_equal(a, b) for a, b in zip(subsets, again, strict=True))


def test_a_selection_larger_than_a_proxys_share_is_subsampled() -> None:
    previous = np.arange(0, 100, 2)  # 50 examples, a proxy takes 20
    for subset in round_subsets(100, 2, 0.2, seed=0, previous=previous):
        assert len(subset) == 20 and set(subset) <= set(previous)


@pytest.mark.parametrize(("previous", "message"), [
    (np.array([], dtype=np.int64), "empty"),
    (np.array([1, 1, 2]), "distinct"),
    (np.array([5, 100]), r"in \[0, 100\)"),
])
def test_a_bad_previous_selection_is_refused(previous: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        round_subsets(100, 2, 0.5, seed=0, previous=previous)
