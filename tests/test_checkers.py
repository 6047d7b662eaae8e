"""The regressions' scoreboards (sim/tb_decoder.py, sim/tb_axis.py, sim/tb_gemv.py) on hand-made beats,
without a simulator: every way an output can be wrong counts as a mismatch, lane by lane or word by word.
An outside mutation run of the checkers found these unchecked by the broken designs the cocotb tests run
(each of those is also wrong elsewhere, so a checker that missed one kind of error still failed them): an
output beat with nothing owed, the last beat never coming, a beat with X bits, a wrong first beat, a
packet whose TLAST comes a beat early, a y word whose last bit alone is wrong, an extra y word, the last
y word missing."""

import logging

import numpy as np

from sop.hdl import axis
from sop.hdl.config import named_configs
from sop.sim import tb_axis, tb_decoder, tb_gemv

CFG = named_configs()["sop4-g16"]                    # 8 lanes of 16 bits
LOG = logging.getLogger("checkers")
BLOCKS = (np.zeros(1, np.int64), np.zeros((1, 16), np.int64))     # the (headers, codes) a beat came from


def _decoder_board(owed: list[int]):
    sb = tb_decoder.Scoreboard(CFG, LOG)
    sb.expect(owed, BLOCKS)
    return sb


def test_the_decoders_scoreboard_counts_every_kind_of_wrong_output():
    right, one_lane_off = 0x1111_2222_3333_4444_5555_6666_7777_8888, 0x1111_2222_3333_4444_5555_6666_7777_8889
    sb = _decoder_board([right])
    sb.compare(right)
    assert (sb.checked, sb.mismatches) == (8, 0)
    sb.compare(right)                                    # nothing owed: an extra beat, every lane wrong
    assert sb.mismatches == 8
    sb = _decoder_board([right, right])
    sb.compare(one_lane_off)                             # the first beat, one lane wrong
    assert sb.mismatches == 1
    sb.missing()                                         # the last beat never came
    assert sb.mismatches == 1 + 8 and not sb.owed
    sb = _decoder_board([right])
    sb.compare(None)                                     # X or Z bits
    assert sb.mismatches == 8


def test_the_axi_scoreboard_counts_the_beats_a_misplaced_tlast_cuts_off():
    sb = tb_axis.Scoreboard(CFG, LOG)
    beats = [(i + 1, int(i == 2)) for i in range(3)]
    data = axis.to_bytes(beats, axis.widths(CFG)["m_axis"])
    sb.compare(data, beats, "l0")
    assert (sb.checked, sb.mismatches) == (24, 0)
    short = data[:2 * len(data) // 3]                    # TLAST on beat 1: the first two beats are right
    sb.compare(short, beats, "l1")
    assert sb.mismatches == 8                            # the lost beat's 8 lanes
    sb.compare(data + data[:len(data) // 3], beats, "l2")   # one beat too many
    assert sb.mismatches == 16


def test_the_gemv_scoreboard_counts_a_wrong_last_bit_an_extra_and_a_missing_word():
    sb = tb_gemv.Scoreboard(LOG)
    sb.expect([0x3F80_0000, 0x4000_0000], "pass")
    sb.compare(0x3F80_0000 | 1 << 32)                    # the right value with last set on row 0
    assert sb.mismatches == 1
    sb.compare(0x4000_0000 | 1 << 32)
    sb.compare(0x4000_0000 | 1 << 32)                    # nothing owed
    assert (sb.checked, sb.mismatches) == (2, 2)
    sb.expect([1, 2], "next")
    sb.compare(1)
    sb.missing()                                         # the pass's last word never came
    assert sb.mismatches == 3 and not sb.owed
