"""The vector files' text (sim/vectors.py) is written without a Python loop per value: each formatter
gives exactly what Python's own formatting of each number gives, line by line."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sop.sim.vectors import block_lines, decimal_lines, hex_lines

INT64 = st.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max)


@given(st.lists(st.tuples(st.integers(0, 1), INT64, st.integers(0, np.iinfo(np.int64).max)), max_size=40))
def test_decimal_lines_are_pythons_decimal(rows):
    cols = [np.array([r[j] for r in rows], dtype=np.int64) for j in range(3)]
    assert decimal_lines(*cols) == ("".join(f"{a} {b} {c}\n" for a, b, c in rows) or "\n")


def test_decimal_lines_at_the_digit_boundaries():
    edges = np.array([0, 1, -1, 9, 10, -10, 99, 100, 10**18 - 1, 10**18, np.iinfo(np.int64).min,
                      np.iinfo(np.int64).max], dtype=np.int64)
    assert decimal_lines(edges) == "".join(f"{v}\n" for v in edges.tolist())
    assert decimal_lines(np.zeros(3, np.int64), np.array([-5, 0, 7])) == "0 -5\n0 0\n0 7\n"


@given(st.integers(1, 80).flatmap(lambda bits: st.tuples(st.just(bits), st.lists(
    st.integers(0, 2**min(bits, 64) - 1), max_size=30))))       # past 64 bits: the digits above a uint64's are 0
def test_hex_lines_are_pythons_hex(case):
    bits, words = case
    assert hex_lines(np.array(words, dtype=np.uint64), bits) == \
        ("".join(f"{w:0{-(-bits // 4)}x}\n" for w in words) or "\n")


@given(st.integers(1, 20).flatmap(lambda n: st.tuples(st.just(n), st.binary(max_size=8 * n).map(
    lambda b: b[:len(b) // n * n]))))
def test_block_lines_are_each_blocks_bytes_most_significant_first(case):
    n, data = case
    assert block_lines(data, n) == ("".join(int.from_bytes(data[i:i + n], "little").to_bytes(n, "big").hex() + "\n"
                                            for i in range(0, len(data), n)) or "\n")
