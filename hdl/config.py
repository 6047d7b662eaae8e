"""Decoder configuration: the generator's parameters, their checks and derived widths.

A ``DecoderConfig`` names everything one decoder instance needs: lanes ``N``
(codes decoded per cycle), the golden ``BlockLayout`` (code width, block size,
header fields and scale format), the HIF format of the LUT entries and the
output format. Invalid combinations are refused here, at generation time, with
a message that says what to change.

Beats. The input stream carries whole blocks: one block per beat when
``N <= g`` (the decoder then spends ``g / N`` cycles on it), ``N / g`` blocks per
beat when ``N > g``. The beat's payload is those blocks exactly as
golden.layout packs them (LSB first), plus a ``swap`` flag (double-buffered
tables, see hdl/decoder.py).

Table RAM: ``lutram_depth`` 0 builds each lane's table as one memory with a
registered read (block RAM); a power of two ``D`` builds it from ``D``-word
memories, one more cycle of latency (LUT RAM, see hdl/lut_bank.py).

Pipeline (``pipeline``): ``"deep"`` (the default) is the one design built for
200 MHz on ECP5 and used on every FPGA: the pipeline enable a register decided
ahead, output skid buffers (hdl.output_buffer), a six-stage BF16 formatter
with register copies (hdl.hif_formatter). ``"shallow"`` builds the same
function for a low-Fmax LUT4 FPGA (iCE40 at 50 MHz): the consumer's ready
reaches the enables combinationally (no skid, no enable registers), a
four-stage formatter without the copies, and table memories that state their
no-collision contract to synthesis (hdl/lut_bank.py, ``no_rw_check``); fewer
LUT4 and flip-flops per lane, bit for bit the same outputs, a shorter latency.
No residual path (refused). ``"deep"`` (the default) is the 200 MHz ECP5 build:
the registered, replicated enable with its skid and the six-stage formatter.

Wide decoders (``wide``, derived, not a knob): a deep decoder of more than
``replica.REGION`` lanes without residuals registers its two inputs once per
region of ``REGION`` lanes before any logic (hdl.beat_issue: the ``blocks`` beat
in a register stage in front of stage 0; hdl.lanes: the table write in front of
the LUT word encoder, one encoder per region), so that no input net crosses the
die through logic in one cycle. Both paths get one cycle longer, so the host's
"write, then swap" rule is the same. Up to ``REGION`` lanes (every named
configuration but the 64-lane one) neither register is built.

Output lanes: ``"bf16"`` is 16 bits per lane; ``"exact"`` is the exact
product as golden.decoder.product_fields gives it, ``{sig, exp, sign}``.

Sparse residuals: ``residuals`` = R > 0 adds the residual path (hdl/residual.py,
docs/hardware.md "Sparse residuals"): a ``sparse`` input stream of entries
``{index, value, last}`` and R shared residual adders, each of which adds one
entry's BF16 value to the exact product of the lane it falls in before the one
BF16 rounding. At most R entries are applied per output beat at full speed; a
beat with more costs one more cycle per R entries. BF16 output only. R = 0 (the
default) builds no residual logic and no ``sparse``, ``layer_sparse`` or
``sparse_error`` port.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import signed, unsigned
from amaranth.lib import data

from sop.golden.decoder import decoder_problems
from sop.golden.points import RESIDUAL_SUFFIX   # a named configuration with the residual path: <name>-sp
from sop.golden.formats import FloatFormat
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import OFFSET_RANGE, BlockLayout

from . import lut_bank
from .lut_bank import lutram_depth_problem, table_depth

#: the per-layer offset's signal shape: golden.layout.OFFSET_RANGE, one signed byte
OFFSET_SHAPE = signed(OFFSET_RANGE[1].bit_length() + 1)

MAX_RESIDUALS = 4
SPARSE_INDEX_BITS = 32          # golden.layout's u32 flat index
PIPELINES = ("deep", "shallow")  # DecoderConfig.pipeline: 200 MHz ECP5 (default) / low-Fmax LUT4 FPGA


def variant_suffix(lutram_depth: int, pipeline: str = "deep") -> str:
    """What a generated module's name adds for a build other than the default one (block-RAM
    tables, the deep pipeline): ``_lutramD`` and ``_shallow``. Verilog module names (and the FuseSoC
    VLNVs made from them) are global, so the LUT-RAM or shallow build of a configuration can sit
    in one design, or one FuseSoC cores root, beside the default build of the same name."""
    return (f"_lutram{lutram_depth}" if lutram_depth else "") + ("_shallow" if pipeline == "shallow" else "")


def _float_exponent_range(fmt: FloatFormat) -> tuple[int, int]:
    """Range of the exponent X in value = sig * 2^X (golden.decoder's fields)."""
    emin = 1 if fmt.subnormals else 0
    return emin - fmt.bias - fmt.mbits, (1 << fmt.ebits) - 1 - fmt.bias - fmt.mbits


def signed_width(lo: int, hi: int) -> int:
    """The fewest bits of a two's-complement signal that holds every integer of ``[lo, hi]``
    (signed even where ``lo >= 0``, unlike ``Shape.cast(range(...))``: the exponent sums it sizes are)."""
    w = 1
    while not (-(1 << (w - 1)) <= lo and hi < (1 << (w - 1))):
        w += 1
    return w


@dataclass(frozen=True)
class DecoderConfig:
    name: str
    lanes: int
    layout: BlockLayout
    hif: FloatFormat = DEFAULT_HIF
    output: str = "bf16"
    lutram_depth: int = 0
    residuals: int = 0
    pipeline: str = "deep"

    def __post_init__(self):
        problems = decoder_problems(self.lanes, self.layout, self.hif, self.output)
        why = lutram_depth_problem(self.lutram_depth, self.table_depth)
        if why:
            problems.append(why)
        if not 0 <= self.residuals <= MAX_RESIDUALS:
            problems.append(f"residuals must be 0 (no residual path) .. {MAX_RESIDUALS} residual adders, "
                            f"got {self.residuals}")
        elif self.residuals and self.output != "bf16":
            problems.append("sparse residuals need the bf16 output (the exact output is the product's "
                            "fields; add the residual after it)")
        if self.pipeline not in PIPELINES:
            problems.append(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        elif self.shallow and self.residuals:
            problems.append("the shallow pipeline has no residual path (hdl/residual.py is timed against the "
                            "deep formatter and the enable's register levels): residuals must be 0")
        if problems:
            raise ValueError(f"decoder config {self.name!r}: " + "; ".join(problems))

    @property
    def shallow(self) -> bool:
        """Built for a low-Fmax LUT4 FPGA (``pipeline == "shallow"``, module docstring)."""
        return self.pipeline == "shallow"

    @property
    def wide(self) -> bool:
        """Inputs registered once per region of ``replica.REGION`` lanes (module docstring): the
        deep pipeline, more than ``REGION`` lanes, no residuals."""
        from .replica import REGION
        return not self.shallow and not self.residuals and self.lanes > REGION

    @property
    def regions(self) -> int:
        """Copies of the input registers: one per region of ``replica.REGION`` lanes where ``wide``, else 1."""
        from .replica import REGION
        return self.lanes // REGION if self.wide else 1

    # -- beats ---------------------------------------------------------------
    @property
    def blocks_per_beat(self) -> int:
        return max(1, self.lanes // self.layout.group)

    @property
    def beats_per_block(self) -> int:
        return max(1, self.layout.group // self.lanes)

    @property
    def beat_bits(self) -> int:
        return self.blocks_per_beat * self.layout.block_bits

    @property
    def table_depth(self) -> int:
        """Words in one lane's table RAM: 2 pages x banks x 2^code_bits."""
        return table_depth(self.layout.code_bits, self.layout.banks)

    # -- datapath widths -----------------------------------------------------
    @property
    def scale(self) -> FloatFormat:
        return self.layout.scale

    @property
    def sig_bits(self) -> int:
        """Width of the product significand: HIF significand times scale significand."""
        return (self.hif.mbits + 1) + (self.scale.mbits + 1)

    @property
    def exp_range(self) -> tuple[int, int]:
        hl, hh = _float_exponent_range(self.hif)
        sl, sh = _float_exponent_range(self.scale)
        return hl + sl + OFFSET_RANGE[0], hh + sh + OFFSET_RANGE[1]

    @property
    def exp_shape(self):
        return signed(signed_width(*self.exp_range))

    @property
    def lane_layout(self):
        if self.output == "bf16":
            return unsigned(16)
        return data.StructLayout({"sig": unsigned(self.sig_bits), "exp": self.exp_shape,
                                  "sign": unsigned(1)})

    @property
    def load_layout(self) -> data.StructLayout:
        """One LUT write (hdl.lut_bank.load_layout)."""
        return lut_bank.load_layout(self.layout.code_bits, self.hif.bits)

    @property
    def beat_layout(self) -> data.StructLayout:
        return data.StructLayout({"blocks": unsigned(self.beat_bits), "swap": unsigned(1)})

    @property
    def sparse_layout(self) -> data.StructLayout:
        """One sparse entry: flat index within the layer (``row * cols + col``), its BF16 value,
        and ``last``: the layer's last entry."""
        return data.StructLayout({"index": unsigned(SPARSE_INDEX_BITS), "value": unsigned(16),
                                  "last": unsigned(1)})

    def describe(self) -> dict:
        lay = self.layout
        out = {"name": self.name, "lanes": self.lanes, "code_bits": lay.code_bits, "group": lay.group,
               "header_bits": lay.header_bits, "scale": lay.scale.name,
               "signed_scale": lay.signed_scale, "select_bit": lay.select_bit, "banks": lay.banks,
               "hif": {"name": self.hif.name, "ebits": self.hif.ebits, "mbits": self.hif.mbits,
                       "bias": self.hif.bias},
               "output": self.output, "lutram_depth": self.lutram_depth, "blocks_per_beat": self.blocks_per_beat,
               "beats_per_block": self.beats_per_block, "beat_bits": self.beat_bits}
        if self.residuals:
            out["residuals"] = self.residuals
        if self.shallow:                    # absent for the default: the descriptions written before stay as they were
            out["pipeline"] = self.pipeline
        return out

    @classmethod
    def from_description(cls, d: dict) -> DecoderConfig:
        """The configuration ``describe()`` wrote (a sim plan carries it to the simulator's process)."""
        from sop.golden.formats import get_format
        from sop.golden.hif import hif_format

        layout = BlockLayout(d["code_bits"], d["group"], get_format(d["scale"]), d["signed_scale"],
                             d["select_bit"])
        hif = hif_format(d["hif"]["mbits"], d["hif"]["ebits"], d["hif"]["bias"])
        return cls(d["name"], d["lanes"], layout, hif, d["output"], d["lutram_depth"], d.get("residuals", 0),
                   d.get("pipeline", "deep"))


def named_configs() -> dict[str, DecoderConfig]:
    """The configurations `make verilog` writes: each operating point's, and its variants
    (golden/points.py, docs/hardware.md)."""
    from sop.golden.points import operating_points

    return {name: DecoderConfig(name, lanes, p.layout, p.hif, output)
            for p in operating_points().values() for name, (lanes, output) in p.configs().items()}


def residual_configs(residuals: int = 1) -> dict[str, DecoderConfig]:
    """Each named BF16 configuration of up to 8 lanes with the residual path: ``<name>-sp``
    (``residuals`` adders). Not in ``named_configs`` (so `make synth` and the lane sweep keep
    measuring the decoder without it); `make verilog` writes them with ``--residuals``, and
    `make sim` runs them with sparse layers."""
    from dataclasses import replace

    return {f"{name}-{RESIDUAL_SUFFIX}": replace(cfg, name=f"{name}-{RESIDUAL_SUFFIX}", residuals=residuals)
            for name, cfg in named_configs().items() if cfg.output == "bf16" and cfg.lanes <= 8}


def base_name(name: str) -> str:
    """The named configuration a residual configuration was made from (``sop4-g16-sp`` -> ``sop4-g16``)."""
    suffix = f"-{RESIDUAL_SUFFIX}"
    return name[:-len(suffix)] if name.endswith(suffix) else name
