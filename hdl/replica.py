"""Register replication: copies of one register, each driving a part of its fanout.

At 64 lanes one register that feeds every lane (the pipeline enable, a block's
scale, the table write port) becomes a net with thousands of loads spread over
the die, and its routing limits the clock. The decoder therefore registers such
values once per lane or per group of lanes, and places each copy's loads beside it.

In hdl/, a **group** is this: the lanes one register copy serves (``LANES_PER_COPY``,
``groups``, hdl.beat_issue's ``groups`` port), and a **region** the lanes one copy
of the enable tree's first level serves. It is not golden's block size ``g``
(``BlockLayout.group``: the weights that share a block header), which hdl/ calls
the block (``lay.group``, ``CodebookMux(group=...)``).

Synthesis tools merge identical flip-flops. Every copy is made by ``replica``
and carries the wire attribute ``sop_replica``; a flow keeps those flip-flops
apart by marking their cells ``keep`` before optimizing. In yosys, right after
reading the design, ``YOSYS_KEEP`` (synth/flow/yosys_nextpnr.py and synth/flow/bitstream.py
run it before synthesis, sim/mutate.py and sim/gemv_mutate.py before mutating)::

    proc; select -set sop_replicas a:sop_replica %ci1:+[Q]; setattr -set keep 1 @sop_replicas

Without it the design still works; it only loses the copies (and some Fmax).
"""

from __future__ import annotations

from amaranth.hdl import Signal

ATTRIBUTE = "sop_replica"
YOSYS_KEEP = ("proc", f"select -set sop_replicas a:{ATTRIBUTE} %ci1:+[Q]",
              "setattr -set keep 1 @sop_replicas")
LANES_PER_COPY = 4  # a group: the lanes served by one copy of a per-block or write-port register
REGION = 8          # lanes served by one copy of the first level of the enable tree
LANES_PER_BUFFER = 2  # lanes served by one output buffer (and its copy of the buffer's state)


def replica(shape, *, name: str, init=None, reset_less: bool = False) -> Signal:
    """A register that is one of several identical copies (see the module docstring)."""
    return Signal(shape, name=name, init=init, reset_less=reset_less, attrs={ATTRIBUTE: 1})


def groups(lanes: int, size: int = LANES_PER_COPY) -> int:
    """Number of groups (register copies) of ``size`` lanes for ``lanes`` lanes."""
    return max(1, lanes // size)


def enable_levels(lanes: int) -> int:
    """Register levels from the enable decision to the lanes: a tree once one level spans too far."""
    return 1 if lanes <= REGION else 2
