"""Layer maps of every depth operation, against the published recipes (no model involved)."""

from __future__ import annotations

import pytest

from splice.errors import SpliceError
from splice.surgery import layermaps


def test_solar_32_layers_m8_is_solar_10_7b():
    # SOLAR 10.7B: Mistral-7B's 32 layers, the first copy without its last 8, the second
    # without its first 8 -> 48 layers
    m = layermaps.solar(32, 8)
    assert m == list(range(24)) + list(range(8, 32)) and len(m) == 48
    assert layermaps.repeats(m) == list(range(24, 40))  # second copies of layers 8..23
    assert layermaps.format_ranges(m) == "0-23, 8-31"


def test_yi_9b_map():
    # Yi-9B: Yi-6B's 32 layers with layers 12-27 (16 of them) duplicated in place -> 48
    m = layermaps.duplicate(32, 12, 28)
    assert m == list(range(28)) + list(range(12, 32)) and len(m) == 48
    assert layermaps.repeats(m) == list(range(28, 44))


def test_llama_pro_expand_after_every_fourth_block():
    layers, new = layermaps.expand(32, 8)
    assert layermaps.expand_after(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert len(layers) == 40 and new == [4, 9, 14, 19, 24, 29, 34, 39]
    assert all(layers[j] == layers[j - 1] for j in new)  # each a copy of the block before it
    # uneven counts are spread evenly too, and never twice after one layer
    assert layermaps.expand_after(10, 3) == [2, 5, 9]
    assert layermaps.expand_after(4, 4) == [0, 1, 2, 3]


def test_parse_ranges_and_indices():
    assert layermaps.parse_ranges("0:24,8:32", 32) == list(range(24)) + list(range(8, 32))
    assert layermaps.parse_ranges("0:2, 1, 3", 4) == [0, 1, 1, 3]
    assert layermaps.parse_indices("7,3,4", 8) == [3, 4, 7]
    assert layermaps.parse_range("1:3", 4) == (1, 3)
    assert layermaps.without(4, [1, 2]) == [0, 3]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: layermaps.solar(32, 0), "--solar 0: M must be between 1 and 31"),
        (lambda: layermaps.solar(32, 32), "--solar 32: M must be between 1 and 31"),
        (lambda: layermaps.solar(32, -3), "--solar -3"),
        (lambda: layermaps.parse_range("3:3", 8), "need 0 <= A < B <= 8"),
        (lambda: layermaps.parse_range("5:9", 8), "need 0 <= A < B <= 8"),
        (lambda: layermaps.parse_range("5", 8), "expected A:B"),
        (lambda: layermaps.expand(8, 9), "--expand 9: N must be between 1 and 8"),
        (lambda: layermaps.expand(8, 0), "--expand 0"),
        (lambda: layermaps.parse_ranges("0:4,6:9", 8), "6:9 is out of range"),
        (lambda: layermaps.parse_ranges("a:b", 8), "is not A:B"),
        (lambda: layermaps.parse_indices("1,8", 8), "layer 8 is out of range"),
        (lambda: layermaps.parse_indices("-1", 8), "layer -1 is out of range"),
        (lambda: layermaps.parse_indices("1,1", 8), "layer 1 is given twice"),
        (lambda: layermaps.parse_indices("x", 8), "not a comma-separated list"),
        (lambda: layermaps.without(3, [0, 1, 2]), "leaves none (remove at most 2)"),
    ],
)
def test_bad_indices_are_one_line(call, message):
    with pytest.raises(SpliceError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)
