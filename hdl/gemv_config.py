"""GEMV engine configuration and interface: ``GemvConfig``, the named engines, the payloads of the
engine's ports and the host side's beats (docs/dot.md section 8).

Role: what an engine is built from and what crosses its ports, apart from the logic
(hdl.gemv ``GemvEngine``, the top, and its parts hdl.gemv_sequencer, hdl.gemv_x_buffer,
hdl.gemv_term), so that the board gateware, the AXI4-Stream shell, the benches and the host
tools can name an engine and encode its beats without building one (the role hdl.config has for
the decoder).

* ``GemvConfig``: the operating point's block layout and HIF, the activation format, the row tile,
  the largest layer, the RAMs' shapes, the folding for small FPGAs; an impossible combination is
  refused in its constructor with what to change. ``gemv_configs`` the named engines
  (``gemv-<point>``, ``gemv-sop4-g16-bf16``); ``small_fpga_config`` one folded for the smallest
  FPGAs (``SMALL_FPGA``); ``small_engines`` the registry of the folded ones by name, at MiniLM's size
  (``MINILM_COLS`` x ``MINILM_ROWS``): the simulated one and the iCEBreaker's.
* Payload layouts: of the ports (``x_layout``, ``layer_layout``, ``sparse_layout``,
  ``load_layout``, ``y_layout``, ``status_layout`` with ``error_layout``) and of what passes
  between the engine's parts (``tag_layout``, ``front_layout``, ``entry_layout``, ``table_word``).
* The host side: ``w_beats``, ``sparse_beats``, ``x_beats``, one pass's beats of a golden layer and
  vector, as the ports take them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from amaranth.hdl import unsigned
from amaranth.lib import data

from sop.golden import dot
from sop.golden.formats import FloatFormat
from sop.golden.layout import BlockLayout, LayerStream

from . import GEMV_ERRORS
from .block_dot import block_layout
from .block_dot_folded import chunk_layout
from .config import OFFSET_SHAPE
from .fp32_acc import STAGINGS, min_slots
from . import lut_bank
from .lut_bank import lutram_depth_problem, table_depth

#: The fewest rows a tile can have: one running sum per stage of the FP32 adder's loop (the full,
#: 16-stage adder's; ``GemvConfig.acc_adder`` "compact": ``min_slots("compact")``).
MIN_TILE = min_slots()
#: How the x buffer is built (``GemvConfig.x_ram``): ``memory``, a ``lib.memory`` read port and a
#: register after it (what yosys infers, and what amaranth.sim runs); ``dp16kd``, ECP5 DP16KD block
#: RAMs instantiated with their output register (``REGMODE_B = "OUTREG"``), the same behaviour: yosys
#: infers a DP16KD only without it, and then its 5.8 ns clock to output sets the clock.
X_RAMS = ("memory", "dp16kd")


@dataclass(frozen=True)
class GemvConfig:
    """One engine: the block layout and HIF of an operating point, the activation format, the row
    tile, the largest layer it takes, the table RAM's shape (hdl.lut_bank), and the block dot unit's
    products a cycle: ``dot_lanes`` 0 builds ``BlockDot`` (``g`` a cycle, a block a cycle), ``P < g``
    builds ``BlockDotFolded`` (hdl.block_dot_folded: a block every ``g / P`` cycles, with ``dot_tail``
    ``"pipelined"`` or ``"serial"``; E4M3 activations), for FPGAs too small for ``g`` lanes: the front
    end then folds too (hdl.gemv, "Folded"). ``acc_adder``: the row accumulator's FP32 adder,
    ``"full"`` (16 stages, ``tile`` >= 17) or ``"compact"`` (3 stages, ``tile`` >= 4; hdl.fp32_acc).
    ``sparse`` False builds no residual path (no term unit; a layer written with ``sparse`` set is the
    ``layer`` error and its entries are never taken): for the smallest FPGAs."""

    name: str
    layout: BlockLayout
    hif: FloatFormat
    act: str = "e4m3"
    tile: int = MIN_TILE
    max_cols: int = 16384
    max_rows: int = 65535
    lutram_depth: int = 0
    x_ram: str = "memory"
    dot_lanes: int = 0
    dot_tail: str = "pipelined"
    acc_adder: str = "full"
    sparse: bool = True

    def __post_init__(self):
        problems = []
        if self.x_ram not in X_RAMS:
            problems.append(f"x_ram must be one of {X_RAMS}, got {self.x_ram!r}")
        g = self.layout.group
        if self.acc_adder not in STAGINGS:
            problems.append(f"acc_adder must be one of {', '.join(map(repr, STAGINGS))}, got {self.acc_adder!r}")
        elif self.tile < min_slots(self.acc_adder):
            problems.append(f"tile must be at least {min_slots(self.acc_adder)} rows (the FP32 adder's loop), "
                            f"got {self.tile}")
        blocks = self.max_cols // g
        if self.max_cols % g or blocks < 1 or blocks & (blocks - 1):
            problems.append(f"max_cols must be {g} times a power of two, got {self.max_cols}")
        if self.max_rows < 1:
            problems.append(f"max_rows must be at least 1, got {self.max_rows}")
        why = lutram_depth_problem(self.lutram_depth, table_depth(self.layout.code_bits, self.layout.banks))
        if why:
            problems.append(why)
        if not isinstance(self.act, str) or self.act not in dot.ACT_FORMATS:
            problems.append(f"act must be one of {', '.join(map(repr, dot.ACT_FORMATS))}, got {self.act!r}")
        P = self.dot_lanes
        if P and (P < 0 or P & (P - 1) or P >= g):
            problems.append(f"dot_lanes must be 0 (the block dot unit's g = {g} lanes) or a power of two "
                            f"below {g} (a folded unit), got {P}")
        elif P and self.act != "e4m3":
            problems.append(f"a folded block dot unit (dot_lanes {P}) takes E4M3 activations only, got {self.act!r}")
        if self.dot_tail not in ("pipelined", "serial") or (self.dot_tail == "serial" and not P):
            problems.append(f"dot_tail must be 'pipelined', or 'serial' with dot_lanes set, got {self.dot_tail!r}")
        if problems:
            raise ValueError(f"engine config {self.name!r}: " + "; ".join(problems))

    @property
    def group(self) -> int:
        return self.layout.group

    @property
    def max_blocks(self) -> int:
        """Blocks per row (x words) the buffer holds."""
        return self.max_cols // self.layout.group

    @property
    def act_format(self) -> FloatFormat:
        return dot.act_format(self.act)

    @property
    def macs_per_cycle(self) -> int:
        """Products the block dot unit takes a cycle: ``g``, or ``dot_lanes`` when folded."""
        return self.dot_lanes or self.layout.group

    def describe(self) -> dict:
        lay = self.layout
        return {"name": self.name, "code_bits": lay.code_bits, "group": lay.group, "scale": lay.scale.name,
                "signed_scale": lay.signed_scale, "select_bit": lay.select_bit, "banks": lay.banks,
                "block_bits": lay.block_bits, "hif": self.hif.name, "act": self.act_format.name,
                "accumulator_bits": dot.accumulator(self.hif, self.act_format, lay.group).bits,
                "tile": self.tile, "max_cols": self.max_cols, "max_rows": self.max_rows,
                "lutram_depth": self.lutram_depth, "x_ram": self.x_ram, "macs_per_cycle": self.macs_per_cycle,
                **({"dot_lanes": self.dot_lanes, "dot_tail": self.dot_tail} if self.dot_lanes else {}),
                **({"acc_adder": self.acc_adder} if self.acc_adder != "full" else {}),
                **({} if self.sparse else {"sparse": False})}



#: What folds an engine for the smallest FPGAs (the iCEBreaker's iCE40UP5K at 12 MHz): one MAC a cycle
#: (the folded block dot unit with its serial tail, the front end in chunks) and the compact FP32 adder
#: with tiles of 4 rows (docs/dot.md 7.2); ``small_fpga_config`` applies it, ``small_engines`` names
#: the engines built with it.
SMALL_FPGA = (("dot_lanes", 1), ("dot_tail", "serial"), ("acc_adder", "compact"), ("tile", 4))
#: MiniLM's size, the largest layer of the small engines and of the boards' engines: its widest input
#: (1536) rounded up to ``g`` times a power of two, and its most rows (the intermediate layers).
MINILM_COLS, MINILM_ROWS = 2048, 1536
#: The names of ``small_engines``: the one simulated (with the residual path) and the iCEBreaker's.
SMALL_SIM, SMALL_ICEBREAKER = "gemv-sop4-g16-small", "gemv-sop4-g16-icebreaker"
#: sop4-g16's engine with BF16 activations (``gemv_configs``)
BF16_ENGINE = "gemv-sop4-g16-bf16"


def small_fpga_config(config: GemvConfig, **fields) -> GemvConfig:
    """``config`` folded for the smallest FPGAs (``SMALL_FPGA``), with ``fields`` changed too."""
    return replace(config, **dict(SMALL_FPGA), **fields)


#: the block size of every named engine: its verification plan (sim/gemv_runner.py, sim/gemv_layers.py:
#: corner, window and swap layers) is written for x beats of 16 activations
GEMV_GROUP = 16


def gemv_configs() -> dict[str, GemvConfig]:
    """The named engines: ``gemv-<point>`` for each operating point (golden.points.operating_points)
    with blocks of ``GEMV_GROUP``, with E4M3 activations, and ``gemv-sop4-g16-bf16`` (sop4-g16, BF16
    activations). A point of another block size has decoders but no named engine (`make verilog`
    built one whose testbench and plan did not fit its blocks: an outside probe)."""
    from sop.golden.points import get_point, operating_points

    configs = {f"gemv-{name}": GemvConfig(f"gemv-{name}", p.layout, p.hif) for name, p in operating_points().items()
               if p.layout.group == GEMV_GROUP}
    # the engines named here on purpose: a point named after one (sop4-g16-bf16) had its engine replaced
    # by the BF16 one, silently, or shared the small engines' names (an outside probe); golden/points.py
    # cannot see these names, so a clash is refused here, on every look-up (as quantize/schemes.py does)
    fixed = (BF16_ENGINE, SMALL_SIM, SMALL_ICEBREAKER)
    if clash := [n for n in fixed if n in configs]:
        raise ValueError(f"operating point(s) {', '.join(n.removeprefix('gemv-') for n in clash)}: its GEMV engine "
                         f"would be named like hdl/gemv_config.py's {', '.join(clash)}; register the point under "
                         f"another name")
    # and sop4-g16 with BF16 activations: the block dot unit's window and fallback (hdl.block_dot_bf16),
    # the term unit's rounding (ResidualTermBF16), x words of 16 bits an activation
    p = get_point("sop4-g16")
    configs[BF16_ENGINE] = GemvConfig(BF16_ENGINE, p.layout, p.hif, act="bf16")
    return configs


def small_engines() -> dict[str, GemvConfig]:
    """The engines folded for the smallest FPGAs (``SMALL_FPGA``), by name: sop4-g16 at MiniLM's size
    (``MINILM_COLS`` x ``MINILM_ROWS``). Everything that builds one looks it up here."""
    small = small_fpga_config(gemv_configs()["gemv-sop4-g16"], name=SMALL_SIM, max_cols=MINILM_COLS,
                              max_rows=MINILM_ROWS)
    return {
        # With the residual path (``sparse``), so that its folded term unit is checked: the one
        # sim/gemv_runner.py simulates (`make sim`), sim/gemv_mutate.py mutates and
        # bench/dot_vs_naive.py measures on iCE40 (``sop-engine-folded``).
        SMALL_SIM: small,
        # Without it: the iCEBreaker's GEMV core (synth/gateware/board.py, ``icebreaker-gemv``), where
        # the term unit and its entry queue do not fit the iCE40UP5K beside the rest.
        SMALL_ICEBREAKER: replace(small, name=SMALL_ICEBREAKER, sparse=False),
    }



# -- payloads ------------------------------------------------------------------------------------------------

def x_layout(config: GemvConfig) -> data.StructLayout:
    return data.StructLayout({"codes": data.ArrayLayout(unsigned(config.act_format.bits), config.group),
                              "last": unsigned(1), "swap": unsigned(1)})


def layer_layout(config: GemvConfig) -> data.StructLayout:
    """A layer's registers: its shape, offset, and ``sparse``: its tiles are followed by residual entries."""
    return data.StructLayout({"rows": unsigned(config.max_rows.bit_length()),
                              "blocks_per_row": unsigned(config.max_blocks.bit_length()), "offset": OFFSET_SHAPE,
                              "sparse": unsigned(1)})


def sparse_layout(config: GemvConfig) -> data.StructLayout:
    """One residual entry (``golden.dot.tile_residuals``): its row in the layer, its column, its BF16
    value, and ``last``: the row's last entry."""
    return data.StructLayout({"row": unsigned(config.max_rows.bit_length()), "col": range(config.max_cols),
                              "value": unsigned(16), "last": unsigned(1)})


def load_layout(config: GemvConfig) -> data.StructLayout:
    """One LUT write: the decoder's load word (hdl.lut_bank.load_layout)."""
    return lut_bank.load_layout(config.layout.code_bits, config.hif.bits)


def table_word(config: GemvConfig) -> data.StructLayout:
    """A LUT word as the table RAM holds it: the HIF code itself (hdl.lut_word's exact form)."""
    return data.StructLayout({"hif": unsigned(config.hif.bits)})


def y_layout() -> data.StructLayout:
    return data.StructLayout({"value": unsigned(32), "last": unsigned(1)})


def error_layout() -> data.StructLayout:
    """The sticky error bits, LSB first: one per name of hdl's ``GEMV_ERRORS`` (synth/wire.py reads it too)."""
    return data.StructLayout({name: unsigned(1) for name in GEMV_ERRORS})


def status_layout() -> data.StructLayout:
    return data.StructLayout({"x_loaded": unsigned(1), "errors": error_layout()})


def tag_layout(config: GemvConfig) -> data.StructLayout:
    """What a block (or a residual term) carries to the row accumulator: its row's slot, first / last
    value of the row, last value of the pass."""
    return data.StructLayout({"slot": range(config.tile), "first": unsigned(1), "last": unsigned(1),
                              "end": unsigned(1)})


def front_layout(config: GemvConfig) -> data.StructLayout:
    """What the front end hands the block dot unit: the block (``block_dot.block_layout``), or with a
    folded unit one chunk of it (``block_dot_folded.chunk_layout``), its tag, padding to a whole number
    of lanes (the front end's output buffers split it by lane)."""
    if config.dot_lanes:
        block = chunk_layout(config.hif, config.act_format, config.layout, config.dot_lanes)
    else:
        block = block_layout(config.hif, config.act_format, config.layout)
    used = block.size + tag_layout(config).size
    pad = -used % config.macs_per_cycle          # (none where it would be 0 bits: Verilog's [-1:0])
    return data.StructLayout({"block": block, "tag": tag_layout(config), **({"pad": unsigned(pad)} if pad else {})})


def entry_layout(config: GemvConfig) -> data.StructLayout:
    """A residual entry as the term unit takes it: its column, BF16 value and tag."""
    return data.StructLayout({"col": range(config.max_cols), "value": unsigned(16), "tag": tag_layout(config)})



# -- the host side ---------------------------------------------------------------------------------------------

def w_beats(config: GemvConfig, layer: LayerStream) -> list[int]:
    """The ``w`` beats of one pass: the layer's blocks in ``tile_order``, each as an integer (LSB first)."""
    nb = layer.layout.block_bytes
    raw = dot.tiled_blocks(layer, config.tile)
    return [int.from_bytes(raw[i:i + nb], "little") for i in range(0, len(raw), nb)]


def sparse_beats(config: GemvConfig, layer: LayerStream) -> list[dict[str, int]]:
    """The ``sparse`` beats of one pass (a layer with residual entries): each tile's entries in
    ``golden.dot.tile_residuals``' order, tile after tile; the engine takes a tile's after its blocks."""
    return [{"row": int(r), "col": int(c), "value": int(v), "last": int(k)}
            for t in dot.tile_residuals(layer, config.tile)
            for r, c, v, k in zip(t["row"], t["col"], t["value"], t["last"])]


def x_beats(config: GemvConfig, codes) -> list[int]:
    """The ``codes`` fields of one vector's ``x`` beats (``g`` codes of ``config.act`` each), as integers."""
    g, bits = config.group, config.act_format.bits
    words = np.asarray(codes, np.int64).reshape(-1, g)
    return [sum(int(c) << (j * bits) for j, c in enumerate(w)) for w in words]

