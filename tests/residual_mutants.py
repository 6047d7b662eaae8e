"""Deliberately broken parts of the residual path, to show that each checker catches a real bug.

Used by tests/test_hdl_residual.py and tests/test_hdl_sparse_decoder.py: an adder that
rounds ties away from zero, one that drops the bits shifted out of the smaller operand
(no sticky bit), a merge that never holds (more than R entries in a chunk: the extra ones
are applied a chunk late, or not at all), a merge whose error bits are not sticky, and a
path that puts an adder's result in the neighbouring lane.
"""

from sop.hdl.residual import ResidualPath
from sop.hdl.residual_adder import ResidualAdder
from sop.hdl.sparse_merge import SparseMerge


class AdderTiesAway(ResidualAdder):
    """BF16 ties of the sum round away from zero instead of to even."""

    @staticmethod
    def round_up(r0, guard, sticky):
        return guard


class AdderNoJam(ResidualAdder):
    """The bits shifted out of the smaller operand are dropped, not jammed into its LSB."""

    jam = False


class NeverHold(SparseMerge):
    """The merge never presents a chunk again: a chunk with more than R entries loses some."""

    def hold_rule(self, hold_next):
        return 0


class ForgetfulErrors(SparseMerge):
    """The error bits are set for one cycle only (not sticky)."""

    sticky = False


class NeighbourLane(ResidualPath):
    """An adder's result goes to the lane after its entry's lane."""

    lane_offset = 1


def path_with(adder):
    """A ResidualPath whose adders are ``adder``."""

    class Path(ResidualPath):
        adder_cls = adder

    Path.__name__ = f"PathWith{adder.__name__}"
    return Path
