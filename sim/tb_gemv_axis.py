"""cocotb testbench of the GEMV engine's AXI4-Stream shell (hdl/gemv_axis.py, ``gemv-<point>_axis.v``), and its runner.

    python -m sop.sim.tb_gemv_axis [--config NAME ...] [--sim icarus|verilator] [--quick] [--seed N]

Runner (``run``, ``main``): converts ``GemvAxisTop`` (hdl.generate's
``generate_gemv_axis``, under ``build/sim/<sim>/<config>-axis/rtl/``), writes
the plan (``plan.json``) and runs this module's test on it with sim/runner.py's
``simulate`` (cocotb's runner, Icarus or Verilator). The plan's layers are real:
MiniLM's layer-0 query quantized to the engine's operating point and its real
inputs in the BERT forward pass of a sentence rounded to the engine's activation format, E4M3 or BF16
(sim/gemv_layers.py's ``minilm_layers`` and ``minilm_activations``):

* quick (`make test`): its first 40 rows for two tokens, the same rows with 2 %
  sparse residuals for one token, the plain rows again for one token (three
  page swaps);
* full (`make sim`): all 384 rows for two tokens, the 40 rows with residuals for
  two tokens, the 40 plain rows for one.

Contract: every expected word is ``golden.dot.gemv`` (``gemv_axis.vector_y``),
computed in the runner; the bench only sends packets and compares bytes.

Bench (``gemv_axis_regression``)::

    AxiStreamSource s_axis_load   ─▶ ┐
    AxiStreamSource s_axis_x      ─▶ │
    AxiStreamSource s_axis_w      ─▶ DUT ─▶ m_axis_y ─▶ AxiStreamSink ─▶ per vector: bytes == golden's
    AxiStreamSource s_axis_sparse ─▶ ┘   └─▶ ProtocolMonitor (sim/tb_axis.py: held beats, TVALID never X)

* Every packet of every layer is queued at once on its stream (a load packet
  per layer; per vector an x packet, a w packet and, for a layer with entries,
  a sparse packet): the shell's sequencing alone keeps the pages and the
  vectors apart.
* The sources pause at random (TVALID gaps, ``p_idle``), the sink too (TREADY
  low, ``p_stall``), drawn from the plan's ``seed`` (``--seed``).
* Each output packet (beats up to TLAST) must be the vector's words exactly: a
  misplaced TLAST gives a packet of the wrong length ("TLAST misplaced"), a wrong
  word is logged with its layer, vector and row.
* ``status`` must read 0 at the end (no vector loaded, no error bit).

Summary (``SOP_SIM_REPORT``): words checked, mismatches, protocol errors,
``status``, layers, sparse entries, stalled cycles, cycles, seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, with_timeout
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource

from sop import toolenv
from sop.hdl import axis, gemv_axis
from sop.hdl.gemv_config import GemvConfig
from sop.quantize.weights import QUERY_LAYER
from sop.sim import CLOCK_NS, MISMATCHES_LOGGED, read_plan, write_report
from sop.sim.tb_axis import monitor_out_of_reset, pauses

INPUTS = ("s_axis_load", "s_axis_x", "s_axis_w", "s_axis_sparse")
#: (rows of the plain layer, its tokens; tokens of the 40 rows with residuals; tokens of the 40 plain rows)
SIZES = {"quick": (40, [1, 2], [3], [4]), "full": (None, [2, 7], [3, 5], [4])}


# -- the plan (host side, golden only) -------------------------------------------------------------------
def layer_entry(cfg: GemvConfig, name: str, layer, vectors) -> dict:
    """One layer's packets (beats ``[tdata, tlast]``) and each vector's expected words."""
    y = gemv_axis.vector_y(cfg, layer, vectors)
    return {"name": name, "rows": layer.rows, "load": gemv_axis.load_beats(cfg, layer, len(vectors)),
            "w": gemv_axis.w_beats(cfg, layer), "sparse": gemv_axis.sparse_beats(cfg, layer),
            "entries": len(layer.sparse),
            "vectors": [{"x": gemv_axis.x_beats(cfg, v), "expect": [int(w) for w in yv]} for v, yv in zip(vectors, y)]}


def plan_for(cfg: GemvConfig, size: str) -> dict:
    from sop.sim import gemv_layers, gemv_runner

    point = gemv_runner.point_of(cfg)
    rows, plain_tokens, sparse_tokens, last_tokens = SIZES[size]
    x = gemv_layers.minilm_activations(cfg.act)
    plain, sparse = gemv_layers.minilm_layers(point, rows)
    head = plain if rows == 40 else gemv_layers.minilm_layers(point, 40)[0]
    q = QUERY_LAYER
    layers = [layer_entry(cfg, f"{q}[:{plain.rows}]", plain, x[plain_tokens]),
              layer_entry(cfg, f"{q}[:40]+2%sparse", sparse, x[sparse_tokens]),
              layer_entry(cfg, f"{q}[:40]", head, x[last_tokens])]
    return {"config": cfg.name, "point": point, "size": size, "p_idle": 0.3, "p_stall": 0.3,
            "engine": {"tile": cfg.tile, "max_cols": cfg.max_cols, "max_rows": cfg.max_rows,
                       "lutram_depth": cfg.lutram_depth, "act": cfg.act},
            "layers": layers}


def expected_words(plan: dict) -> int:
    return sum(len(v["expect"]) for layer in plan["layers"] for v in layer["vectors"])


# -- the bench -------------------------------------------------------------------------------------------
class Scoreboard:
    """Each output packet against its vector's words."""

    def __init__(self, log):
        self.log = log
        self.checked = self.mismatches = self.packets = 0

    def compare(self, got: bytes, want: list[int], label: str) -> None:
        self.packets += 1
        if len(got) != 4 * len(want):
            self.error(f"{label}: packet of {len(got) // 4} words, expected {len(want)} (TLAST misplaced)")
        words = np.frombuffer(got[:4 * (len(got) // 4)], "<u4")
        for row, (g, w) in enumerate(zip(words, want)):
            self.checked += 1
            if int(g) != w:
                self.error(f"{label} row {row}: got {int(g):#010x}, expected {w:#010x}")
        self.mismatches += abs(len(words) - len(want))

    def error(self, text: str) -> None:
        if self.mismatches < MISMATCHES_LOGGED:
            self.log.error(text)
        self.mismatches += 1


@cocotb.test()
async def gemv_axis_regression(dut):
    plan = read_plan()
    cfg = engine_config(plan)
    seed = plan["seed"]
    dut._log.info(f"{cfg.name} AXI4-Stream shell, plan {plan['size']}, random seed {seed} (rerun: --seed {seed})")
    rng = np.random.default_rng(seed)
    widths = gemv_axis.widths(cfg)
    Clock(dut.aclk, CLOCK_NS, unit="ns").start()
    dut.aresetn.value = 0
    dut.clear.value = 0
    sources = {name: AxiStreamSource(AxiStreamBus.from_prefix(dut, name), dut.aclk, dut.aresetn,
                                     reset_active_level=False) for name in INPUTS}
    sink = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_axis_y"), dut.aclk, dut.aresetn, reset_active_level=False)
    for bfm in (*sources.values(), sink):
        bfm.log.setLevel("WARNING")                       # one line per frame otherwise
        bfm.set_pause_generator(pauses(rng, plan["p_stall"] if bfm is sink else plan["p_idle"]))
    monitor = await monitor_out_of_reset(dut, "m_axis_y")

    async def send(name: str, beats) -> None:
        if beats:
            await sources[name].send(AxiStreamFrame(axis.to_bytes(beats, widths[name])))

    t0 = time.time()
    for layer in plan["layers"]:                           # every packet queued at once
        await send("s_axis_load", layer["load"])
        for v in layer["vectors"]:
            await send("s_axis_x", v["x"])
            await send("s_axis_w", layer["w"])
            await send("s_axis_sparse", layer["sparse"])
    sb = Scoreboard(dut._log)
    for layer in plan["layers"]:
        for i, v in enumerate(layer["vectors"]):
            label = f"{layer['name']} vector {i}"
            budget_ns = CLOCK_NS * (4 * (len(layer["w"]) + len(layer["sparse"]) + len(layer["load"])) + 2000)
            try:
                frame = await with_timeout(sink.recv(), budget_ns, "ns")
            except TimeoutError:
                sb.error(f"{label}: no output packet within {budget_ns} ns")
                sb.mismatches += len(v["expect"]) - 1
                break
            sb.compare(bytes(frame.tdata), v["expect"], label)
    for _ in range(12):                                   # nothing more may come
        await RisingEdge(dut.aclk)
    if not sink.empty():
        sb.error(f"{sink.count()} output packets nobody owed")
    await ReadOnly()
    status = int(dut.status.value) if dut.status.value.is_resolvable else -1
    if status != 0:
        dut._log.error(f"status {status:#x} at the end (x_loaded, then the error bits from bit 1), expected 0")
    summary = {"config": cfg.name, "seed": seed, "checked": sb.checked, "mismatches": sb.mismatches,
               "packets": sb.packets, "protocol_errors": monitor.errors, "status": status,
               "layers": len(plan["layers"]), "entries": sum(layer["entries"] for layer in plan["layers"]),
               "stalled_cycles": monitor.stalls, "cycles": monitor.cycles, "seconds": time.time() - t0}
    write_report(summary)
    dut._log.info(summary_line(summary))
    assert sb.mismatches == 0 and monitor.errors == 0 and status == 0, \
        f"{sb.mismatches} mismatches, {monitor.errors} protocol errors, status {status:#x}"


def engine_config(plan: dict) -> GemvConfig:
    from sop.golden.points import get_point

    point = get_point(plan["point"])
    return GemvConfig(plan["config"], point.layout, point.hif, **plan["engine"])


# -- the runner ------------------------------------------------------------------------------------------
def run(cfg: GemvConfig, sim: str = "icarus", *, quick: bool = False, seed: int | None = None,
        verilog: Path | None = None, build_dir: Path | None = None, plan_edit=None, waves: bool = False) -> dict:
    """Build the shell of ``cfg`` and run the bench; the summary. ``verilog`` replaces the generated
    design and ``plan_edit(plan)`` changes the plan (tests inject bugs with them)."""
    from sop.hdl.generate import generate_gemv_axis
    from sop.sim.runner import check_simulator, held_build_folder, simulate

    size = "quick" if quick else "full"
    build_dir = Path(build_dir or toolenv.build_root() / "sim" / sim / f"{cfg.name}-axis").resolve()
    check_simulator(sim, build_dir)
    with held_build_folder(build_dir):               # (a second run there is refused: sim/runner.py)
        if verilog is None:
            verilog = generate_gemv_axis(cfg, build_dir / "rtl")["verilog"]
        plan = plan_for(cfg, size)
        if plan_edit is not None:
            plan_edit(plan)
        summary = simulate(cfg, sim, Path(verilog), gemv_axis.module_name(cfg), "sop.sim.tb_gemv_axis", plan,
                           size, build_dir, seed=seed, waves=waves)
    summary["expected"] = expected_words(plan)
    return summary


def summary_line(s: dict) -> str:
    where = f"[{s['sim']}, {s.get('plan')}] " if "sim" in s else ""
    took = f", {s['wall_seconds']:.1f} s" if "wall_seconds" in s else ""
    return (f"{s['config']} AXI4-Stream {where}{s.get('checked', 0)} y words checked in {s.get('packets', 0)} "
            f"packets of {s.get('layers', 0)} layers ({s.get('entries', 0)} sparse entries), {s['mismatches']} "
            f"mismatches, {s.get('protocol_errors')} protocol errors, status {s.get('status')} "
            f"(seed {s.get('seed')}, {s.get('cycles', 0)} cycles{took})")


def passed(s: dict) -> bool:
    return (s["mismatches"] == 0 and s["failed_tests"] == 0 and s.get("protocol_errors") == 0
            and s.get("status") == 0 and s.get("checked") == s.get("expected"))


def main(argv=None) -> int:
    from sop.sim.gemv_runner import cli

    return cli(argv, "python -m sop.sim.tb_gemv_axis", __doc__.splitlines()[0], run, summary_line, passed)


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.sim.tb_gemv_axis", main)
