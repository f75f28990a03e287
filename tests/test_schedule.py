"""The one learning-rate schedule (zoo builds and heal): warm-up, then cosine to a floor."""

import itertools

import pytest

from splice.schedule import lr_at


def test_warmup_then_cosine_to_the_floor():
    lrs = [lr_at(s, 100, 2.0, 10) for s in range(101)]
    assert lrs[:10] == pytest.approx([0.2 * (s + 1) for s in range(10)])
    assert lrs[10] == pytest.approx(2.0)  # the peak, right after warm-up
    assert lrs[55] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way down the cosine
    assert lrs[100] == pytest.approx(0.2)  # floor * lr
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # never rises after warm-up
    assert lr_at(0, 5, 1.0, 0) == pytest.approx(1.0)  # no warm-up
