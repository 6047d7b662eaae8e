"""The GEMV engine's cocotb regression (sim/gemv_runner.py, sim/tb_gemv.py): its fast subset.

Icarus on ``gemv-sop4-g16``'s Verilog with the quick plan (40 real MiniLM rows with real E4M3
activations, without and with sparse residuals, the corner layers back to back, the bad vectors):
every expected ``y`` word checked, none mismatched, the status bits as they should be. The checker
can fail: an engine whose table bank stores one bit of entry 5 flipped (tests/mutants.py) must be
reported (on the corner layers up to the one of every code), and so must a plan with one expected
word off by one bit, a NaN vector said to be good and a latency a cycle too long: those three are
planted in the quick plan's own run, each reported with the engine's right answer (one simulation
checks both); the bench's junk on idle payloads and long ``y`` stalls are checked without a
simulator. The small-FPGA engine (``gemv-sop4-g16-small``: folded to one MAC a cycle, the compact
adder, tiles of 4; the iCEBreaker's) runs the quick plan in Icarus here too. The BF16 engine's quick
plan in Verilator is a slow test of its own file (tests/test_cocotb_gemv_verilator.py, so that it
runs on the other worker; in Icarus it took 52 s here, over the suite's budget). Every engine's full
plan is `make sim`'s, in Icarus by default; the e2m3-ue4m4-g16 engine, whose Verilog differs from
sop4-g16's in parameters only (one bank, 6-bit codes, unsigned scales: tests/test_hdl_gemv.py runs
it in amaranth.sim, tests/test_verilog.py lints and compiles it), is left to `make sim` (its quick
plan here took 30 to 40 s).
"""

import re

import pytest

import mutants
from sop.hdl import gemv, gemv_config
from sop.sim import gemv_runner, tb_gemv

CONFIGS = gemv_config.gemv_configs()
SOP4 = CONFIGS["gemv-sop4-g16"]
SMALL = gemv_runner.small_engines()["gemv-sop4-g16-small"]


def break_plan(plan: dict) -> None:
    """Three bugs planted in the quick plan, each where the bench must find it: one bit of one
    expected word (the corners' cancellation-and-zero-blocks layer, vector 0, row 5), the first NaN
    vector of the errors job said to be good, and the engine's latency said a cycle longer. Nothing
    else changes: the bench drives the same beats in the same cycles as for the plan unbroken."""
    corners = next(job for job in plan["jobs"] if job.get("name") == "corners")
    layer = corners["layers"][3]
    assert layer["name"] == "cancellation-and-zero-blocks"
    layer["vectors"][0]["expect"][5] ^= 1                       # one bit of one word
    errors = next(job for job in plan["jobs"] if job["kind"] == "errors")
    assert errors["cases"][3]["error"] == "x_nan"
    errors["cases"][3]["error"] = None                          # the first NaN vector, said to be good
    timing = next(job for job in plan["jobs"] if job.get("name") == "timing")
    timing["timing"]["latency"] += 1                            # the engine's latency, said a cycle longer


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """sop4-g16's quick plan in Icarus, with ``break_plan``'s three bugs: one run (the Verilog, its
    build and the plan once) checks the engine on the whole plan and the checker on the three bugs,
    which were a second run of a part of the same plan on the same Verilog (10 s in the suite). Each
    planted bug is reported with what the engine really did, and that is what the plan unbroken
    expects (the tests below): so nothing else mismatching, no other status or timing error, is the
    unbroken plan's pass."""
    build = tmp_path_factory.mktemp("gemv-quick") / "build"
    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, build_dir=build, plan_edit=break_plan)
    print(gemv_runner.summary_line(s))
    return s, (build / "sim.log").read_text()


def status_errors(log: str) -> list[tuple[str, int, int]]:
    """(when, status read, status expected) of each status error the bench logged."""
    return [(m[1], int(m[2], 16), int(m[3], 16))
            for m in re.finditer(r"status (.+?): (0x[0-9a-f]+) \[[^]]*\], expected (0x[0-9a-f]+)", log)]


def test_quick_regression_icarus(quick_run):
    """Every word of the plan checked and every status and timing check passed, but for the three
    bugs ``break_plan`` planted (each reported as the engine's right answer: the test below)."""
    s, log = quick_run
    assert s["mismatches"] == 1 and s["timing_errors"] == 1 and s["failed_tests"] == 1   # the planted ones
    assert [when for when, _, _ in status_errors(log)] == ["errors case 3, vector loaded",
                                                          "errors case 3, after the pass"]
    assert s["status_errors"] == 2
    # 18 bad vectors of 3 rows, 2 bad entries' of 3, the two-tile case's (a tile and one row)
    assert s["checked"] == s["expected"] > 250 and s["counted"] == 3 * 20 + SOP4.tile + 1
    assert s["entries"] > 550 and s["layers"] == 40          # terms-alone, swap-RxC, tall-*, near-nan-x, ... included
    assert [job["name"] for job in s["jobs"]] == ["minilm", "corners", "errors", "timing"]   # timing: 2 layers


def test_a_wrong_expected_word_and_a_wrong_status_are_reported(quick_run):
    """The three planted bugs reported, each with the engine's own answer, which is the unbroken
    plan's: the golden word (the planted one with its bit back), the NaN vector's ``x_nan`` bit while
    it is loaded and after its pass, the engine's latency of 47 cycles (docs/dot.md)."""
    s, log = quick_run
    m = re.search(r"\(cancellation-and-zero-blocks vector 0 row 5\): got (0x[0-9a-f]{8}) last (\d), "
                  r"expected (0x[0-9a-f]{8}) last (\d)", log)
    assert m and int(m[1], 16) == int(m[3], 16) ^ 1 and m[2] == m[4] == "0", log[-3000:]
    nan = tb_gemv.ERROR_BITS["x_nan"]
    assert status_errors(log) == [("errors case 3, vector loaded", tb_gemv.X_LOADED | nan, tb_gemv.X_LOADED),
                                  ("errors case 3, after the pass", nan, 0)]
    assert "the timing job's last y word 47 cycles after its last block, not 48" in log
    assert not gemv_runner.passed(s)


def test_small_fpga_engine_quick_regression_icarus(tmp_path):
    """The folded engine's Verilog (a chunk of one code a cycle, one table copy, the compact adder)
    under the same plan: real MiniLM rows with and without sparse residuals, the corners, the bad
    vectors, the ``paced-*`` layers (its front end's skid left holding a block's last chunk, then the
    one before); about 87,000 cycles (a block every 16)."""
    assert (SMALL.dot_lanes, SMALL.acc_adder, SMALL.tile, SMALL.sparse) == (1, "compact", 4, True)
    s = gemv_runner.run(SMALL, "icarus", quick=True, seed=1, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] == s["expected"] > 450 and s["entries"] > 550 and s["layers"] == 42


def keep(plan: dict, *names: str, layers: int | None = None) -> None:
    """Only the plan's jobs ``names`` (a shorter run for the injected bugs), and of the corner
    layers only the first ``layers``."""
    plan["jobs"] = [job for job in plan["jobs"] if job.get("name") in names]
    for job in plan["jobs"]:
        if job.get("name") == "corners" and layers is not None:
            job["layers"] = job["layers"][:layers]


def test_a_broken_engine_is_reported(tmp_path):
    """Entry 5 of every table stored with a bit flipped: mismatches, word by word. The corner layers up
    to the one of every code in every bank (entry 5 of each table read, with both signs: 36 mismatches
    at seed 1); the 26 after it (6,000 of the corners' 7,500 cycles) read the same tables and add
    nothing to the finding."""
    verilog = gemv_runner.build_verilog(SOP4, tmp_path / "rtl", gemv.GemvEngine(SOP4, bank=mutants.FlippedLutBit))

    def corners_to_every_code(plan):
        keep(plan, "corners", layers=5)
        assert plan["jobs"][0]["layers"][-1]["name"] == "every-code-bank-sign"

    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, verilog=verilog, build_dir=tmp_path / "build",
                        plan_edit=corners_to_every_code)
    print(gemv_runner.summary_line(s))
    assert s["mismatches"] > 0 and s["failed_tests"] == 1 and not gemv_runner.passed(s)
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "expected 0x" in log                                   # reported word by word, with its layer and row


def test_a_sequencer_that_frees_the_x_page_late_is_reported(tmp_path):
    """A sequencer whose ``x_loaded`` stays high for a cycle after a pass frees the only loaded x page
    (``mutants.LateFreedPage``; the mutation run's survivor 107 of gemv-sop4-g16): the errors job
    offers the good vector's block from the cycle after its pass's last block on, with no vector
    after it, and the engine takes it there: the bench stops on that beat (``HandshakeError``). The
    errors job alone, about 1,100 cycles."""
    verilog = gemv_runner.build_verilog(SOP4, tmp_path / "rtl", gemv.GemvEngine(SOP4, sequencer=mutants.LateFreedPage))
    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, verilog=verilog, build_dir=tmp_path / "build",
                        plan_edit=lambda plan: keep(plan, "errors"))
    print(gemv_runner.summary_line(s))
    assert s["failed_tests"] == 1 and not gemv_runner.passed(s)
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "a block taken after the pass, no vector loaded" in log, log[-3000:]


def test_a_sequencer_that_misses_an_entry_below_its_tiles_first_row_is_reported(tmp_path):
    """A sequencer whose ``sparse`` bit lacks the compare of an entry's row with its tile's first row
    (``mutants.EntryBelowTileUnflagged``): the errors job's last case, a layer of two tiles whose one
    bad entry (among the second tile's) has the first tile's last row, must have ``sparse`` on
    ``status`` after its pass, and that one read is reported. The errors job alone."""
    verilog = gemv_runner.build_verilog(SOP4, tmp_path / "rtl",
                                        gemv.GemvEngine(SOP4, sequencer=mutants.EntryBelowTileUnflagged))
    plans = []
    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, verilog=verilog, build_dir=tmp_path / "build",
                        plan_edit=lambda plan: (keep(plan, "errors"), plans.append(plan)))
    print(gemv_runner.summary_line(s))
    last = len(plans[0]["jobs"][0]["cases"]) - 1
    assert s["status_errors"] == 1 and s["mismatches"] == 0 and not gemv_runner.passed(s)
    log = (tmp_path / "build" / "sim.log").read_text()
    sparse = tb_gemv.ERROR_BITS["sparse"]
    assert f"status errors case {last}, after the pass: 0x0 [], expected {sparse:#x}" in log, log[-3000:]


@pytest.mark.parametrize("mutant, layer", [(mutants.SkidSlotFlip, "paced-last-chunk"),
                                           (mutants.SkidSignSet, "paced-chunk-before-last")])
def test_a_folded_front_end_whose_skid_changes_a_blocks_last_chunks_is_reported(tmp_path, mutant, layer):
    """The folded engine's front end with its skid changing the chunk it hands on (tests/mutants.py): the
    tag's slot bit 0 XORed with its ``first`` (the tags FIFO reads a block's last chunk's), or the
    block's sign set (the unit reads the chunk's before the last). Each is reported by the ``paced``
    layer that leaves that chunk in the skid (its blocks spaced by ``gemv_runner.paced_gaps``, ``y``
    held), a ``y`` word of it wrong, and not by the other: the gaps put the chunk they name there and
    no other. Every plan before passed both (docs/gemv-mutation.md). The two layers alone."""
    verilog = gemv_runner.build_verilog(SMALL, tmp_path / "rtl", mutant(SMALL))
    counts = {}
    for name in ("paced-last-chunk", "paced-chunk-before-last"):
        def paced_alone(plan, name=name):
            keep(plan, "corners")
            plan["jobs"][0]["layers"] = [lay for lay in plan["jobs"][0]["layers"] if lay["name"] == name]
            assert len(plan["jobs"][0]["layers"]) == 1

        s = gemv_runner.run(SMALL, "icarus", quick=True, seed=1, verilog=verilog, build_dir=tmp_path / name,
                            plan_edit=paced_alone)
        print(gemv_runner.summary_line(s))
        counts[name] = s["mismatches"]
        assert s["status_errors"] == 0
        if name == layer:
            assert s["mismatches"] > 0 and not gemv_runner.passed(s)
            assert f"({name} vector 0 row" in (tmp_path / name / "sim.log").read_text()
        else:
            assert gemv_runner.passed(s), counts


def test_the_bench_drives_junk_while_idle_and_long_stalls_of_y_within_its_bounds():
    """sim/tb_gemv.py's two stresses without a simulator: an idle input's payload turns to junk (valid
    low) while an offered beat is driven as it is; and ``y.ready``'s long stalls are 150 to 300
    cycles, at least ``LONG_GAP`` apart, so that every window of ``with_long_stalls(n)`` cycles has
    ``n`` free of them (the bench's timeouts), about one per 1,200 cycles, the same for the same seed."""
    from types import SimpleNamespace

    import numpy as np

    class Port:
        def __init__(self, width):
            self.width, self.value = width, 0

        def __len__(self):
            return self.width

    names = [f"{p}__{k}" for p in tb_gemv.HostDriver.PORTS for k in ("payload", "valid")] + ["clear"]
    dut = SimpleNamespace(**{n: Port(72 if n.endswith("payload") else 1) for n in names})
    drv = tb_gemv.HostDriver(dut, np.random.default_rng(1), tb_gemv.P_JUNK)
    drv.apply(tb_gemv.HostCycle(w=0x123))
    assert (dut.w__payload.value, dut.w__valid.value) == (0x123, 1)
    seen = set()
    for _ in range(40):
        drv.apply(tb_gemv.IDLE)
        assert dut.w__valid.value == 0
        seen.add(dut.w__payload.value)
    assert len(seen) > 10 and max(seen) >> 64 and drv.junk > 5 * 40 * 0.3
    drv.apply(tb_gemv.HostCycle(w=0x123))
    assert (dut.w__payload.value, dut.w__valid.value) == (0x123, 1)

    def stalls(seed, n=300_000):
        tb = SimpleNamespace(always_ready=False, hold_y=False, stall_left=0, stall_gap=0, long_stalls=0,
                             long_stall_cycles=0, p_long_stall=tb_gemv.P_LONG_STALL, p_stall=0.3,
                             rng=np.random.default_rng(seed))
        long = []
        for _ in range(n):
            before = tb.long_stall_cycles
            ready = tb_gemv.Testbench.next_y_ready(tb)
            long.append(tb.long_stall_cycles > before)
            assert not (long[-1] and ready)                          # a long stall's cycle is a stall
        return np.array(long), tb

    long, tb = stalls(1)
    step = np.diff(np.concatenate([[0], long.astype(int), [0]]))
    starts, ends = np.flatnonzero(step == 1), np.flatnonzero(step == -1)
    lengths, gaps = ends - starts, starts[1:] - ends[:-1]
    assert lengths.min() >= tb_gemv.LONG_STALL[0] and lengths[:-1].max() <= tb_gemv.LONG_STALL[1]
    assert gaps.min() >= tb_gemv.LONG_GAP
    assert 200 < tb.long_stalls < 300 and long.sum() == tb.long_stall_cycles
    free = np.concatenate([[0], np.cumsum(~long)])
    for n in (100, 500, 2000, 10_000):
        window = tb_gemv.with_long_stalls(n)
        assert (free[window:] - free[:-window]).min() >= n
    assert (stalls(1, 20_000)[0] == long[:20_000]).all()                  # a seed reruns it
