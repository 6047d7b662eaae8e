"""cocotb testbench of the GEMV engine's Verilog (hdl/gemv.py ``GemvEngine``): a host driver, a ``y``
monitor and an in-order scoreboard against expected words computed from golden.

Run through sim/gemv_runner.py, which converts the engine to Verilog and writes
the plan (JSON, named by ``SOP_SIM_PLAN``): the engine's parameters (rebuilt
here as a ``GemvConfig`` for the payload layouts) and the jobs. Each layer of a
job carries its table writes, its layer registers, its ``w`` beats (blocks in
``golden.dot.tile_order``), its ``sparse`` beats (``gemv_config.sparse_beats``) and per
vector its ``x`` beats and the ``y`` words ``golden.dot.gemv`` gives: the bench
computes nothing, it drives beats and compares every ``y`` word bit for bit,
``value`` and ``last``.

* ``layers`` job: the layers back to back, as docs/dot.md section 8's host
  sequence says: a layer's tables and registers go into the inactive page once
  the previous layer has swapped in; its first vector's first ``x`` beat carries
  ``swap`` (no sooner than two cycles after the page's last write); each
  vector's ``x`` beats as soon as the vector before's are taken (the engine
  loads it into its other x page during that vector's pass, and holds a
  layer's first vector until the layer before is done); each vector's ``w``
  and ``sparse`` beats once its ``x`` is taken. After the job
  every owed word must come within a cycle bound, then nothing more may come,
  and ``status`` must read 0 (no vector loaded, no error bit).
* ``errors`` job: one small layer; vectors one beat too long, one too short,
  with a NaN and -NaN (BF16: and +-Inf) (after a block offered before any x: never taken,
  ``w_before_x``): while each is loaded ``status`` must hold
  ``x_loaded`` and its bit (``x_length``, ``x_nan``), after its pass the bit
  alone; ``clear`` must clear it. Their ``y`` words are counted (and ``last``
  checked), not compared; a good vector after them is compared, and again
  with its block offered from the cycle after its pass's last one on, no vector
  after it (never taken: ``HandshakeError``; ``w_before_x`` after the pass,
  compared). Then a layer
  word with 0 rows (``layer`` at once, cleared), and the layer again with
  sparse entries, one beyond its columns: ``sparse`` once the engine takes it
  (its ``y`` counted); and again with one beyond its rows (its tile's last row) instead.
* a ``layers`` job with ``timing`` (the plan's last, ``timing``): no idle input and
  no stall (nor a long one) while it runs; each measured layer's (``layers``) blocks
  must be taken one every ``block_cycles`` cycles from its first to its last, and the
  last ``y`` word must come ``latency`` (to ``latency + slack``) cycles after the last block
  (``check_timing``: a timing error each, beside the mismatches and status errors).

Random idle cycles on every input (``p_idle``: ``x``, ``w``, ``sparse``, ``load``,
``layer``) and random stalls on ``y.ready`` (``p_stall``) come from the plan's
``seed`` (printed; the runner's ``--seed`` reruns it), and so do two things more:

* **junk on idle payloads**: in a cycle in which an input's valid is low its payload
  becomes a fresh random word (all its bits) with the chance ``P_JUNK`` (0.5), else it
  keeps the one it had, as a real host (or AXI4-Stream) leaves a payload undefined
  while valid is low; the engine must ignore it. A beat offered is driven as it is,
  and a beat not taken is offered again unchanged (the payload is stable while valid
  is high and ready low).
* **long stalls of ``y``**: a cycle at least ``LONG_GAP`` (450) cycles after the last
  long stall ended starts one with the chance ``P_LONG_STALL`` (1/550): ``y.ready``
  low for 150 to 300 cycles (``LONG_STALL``, uniform), long enough that the value FIFO
  fills and holds the block dot unit's output even in the folded engine (a value every
  16 cycles, 8 entries). About one long stall per 1,200 cycles: 10 in gemv-sop4-g16's
  quick plan at seed 1 (minilm 5, corners 5, errors 0), 53 in the small-FPGA engine's.

**Paced layers** (a layer with ``paced``: the folded engine's; ``Pacer``): ``y`` held until the
engine stops, the layer's blocks spaced by a set number of empty stage-0 cycles, so that the front
end's skid is left holding the chunk the plan aims at; then ``y`` free for one word and held again,
as many stops as the layer says (``paced_stops`` in the summary).

Every wait is bounded: each job runs under ``with_timeout`` and its drain under a
cycle limit, the errors job's waits under a count, each a bound without long stalls
widened by ``with_long_stalls`` (the gap makes their share of any window at most
``LONG_STALL[1] / LONG_GAP`` plus two stalls). One clock loop calls the driver and the
monitor each cycle (in ReadOnly before the edge: the ``y`` word taken, the
handshakes, ``status`` when asked; after it: the next inputs and ``y.ready``, each
written only when it changes: the rng is drawn in a fixed order, so a seed reruns
the same cycles). The summary (words checked, counted, mismatches, status errors,
layers, sparse entries, cycles, long stalls and their cycles, junk payloads written,
and per job its cycles and long stalls) goes to ``SOP_SIM_REPORT``; the test fails on
any mismatch or status error.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import Event, ReadOnly, RisingEdge, with_timeout
from cocotb.types import Logic

from sop.golden.points import get_point
from sop.hdl import gemv_config
from sop.hdl.gemv_config import GemvConfig
from sop.sim import CLOCK_NS, MISMATCHES_LOGGED, QUIET_CYCLES, read_plan, write_report

ONE = Logic(1)                    # a 1-bit value read from the DUT is this object
X_LOADED = 1                      # status bit 0; the error bits follow in gemv_config.error_layout()'s order
ERROR_BITS = {name: 1 << (1 + field.offset) for name, field in gemv_config.error_layout()}
P_JUNK = 0.5                      # an input idle in a cycle: its payload becomes fresh junk with this chance
LONG_STALL = (150, 300)           # y.ready: a long stall's length in cycles (uniform, both ends included)
P_LONG_STALL = 1 / 550            # ... the chance that a cycle starts one, once LONG_GAP cycles have
LONG_GAP = 450                    # passed since the last one ended (LONG_GAP > LONG_STALL[1]: see with_long_stalls)
WAIT_CYCLES = 500                 # the errors job: a beat's (and a pass's) wait, long stalls not counted
PACED_STUCK = 64                  # a paced layer: y held until w.ready has been low this long (the engine stopped)


class HandshakeError(AssertionError):
    """A beat the engine took that it must not take (a block with no vector loaded): the host sequence
    stops there (sim/gemv_mutate.py counts it apart from the waits that run out)."""


def with_long_stalls(cycles: int) -> int:
    """A bound of ``cycles`` cycles of progress as a bound in cycles with ``y``'s long stalls in them. In
    any ``N`` consecutive cycles at most ``N // LONG_GAP + 2`` long stalls fall (each after the first
    waits ``LONG_GAP`` cycles after the one before has ended), so at least ``N - (N / LONG_GAP + 2)
    LONG_STALL[1]`` cycles are free of them: ``cycles`` or more for the ``N`` returned."""
    most, gap = LONG_STALL[1], LONG_GAP
    return -(-(cycles + 2 * most) * gap // (gap - most))


def engine_config(plan: dict) -> GemvConfig:
    point = get_point(plan["point"])
    return GemvConfig(plan["config"], point.layout, point.hif, **plan["engine"])


class Packer:
    """A stream payload (an amaranth ``StructLayout``) packed into the integer its Verilog port takes."""

    def __init__(self, layout):
        self.fields = {name: (field.offset, (1 << field.width) - 1) for name, field in layout}

    def __call__(self, **values) -> int:
        word = 0
        for name, value in values.items():
            offset, mask = self.fields[name]
            word |= (int(value) & mask) << offset
        return word


@dataclass
class HostCycle:
    """What the host offers in one cycle (packed payloads; None: valid low)."""
    load: int | None = None
    layer: int | None = None
    x: int | None = None
    w: int | None = None
    sparse: int | None = None
    clear: bool = False
    read_status: bool = False


@dataclass
class Reply:
    """What the edge took of a ``HostCycle``, and ``status`` before it (when asked)."""
    x: bool
    w: bool
    sparse: bool
    status: int | None
    w_ready: bool = False         # w.ready before the edge, a block offered or not (a paced layer's gaps)


IDLE = HostCycle()


class HostDriver:
    """Drives the engine's inputs one ``HostCycle`` a cycle from a generator that is sent, after each
    edge, the ``Reply``; ``done`` is set when the generator returns. An input idle in a cycle (valid
    low; also while no generator runs) gets a fresh random payload with the chance ``p_junk`` (from
    ``rng``), else keeps the one it had: a host's payload means nothing while valid is low. A beat
    offered is written as it is, and a beat not taken is offered again unchanged."""

    PORTS = ("load", "layer", "x", "w", "sparse")

    def __init__(self, dut, rng: np.random.Generator | None = None, p_junk: float = 0.0):
        self.dut, self.rng, self.p_junk = dut, rng, p_junk
        self.sequence = None
        self.fresh = False
        self.cycle = IDLE
        self.reply: Reply | None = None
        self.done = Event()
        self._driven: dict[str, int] = {}
        self._width = {port: len(getattr(dut, f"{port}__payload")) for port in self.PORTS}
        self.junk = 0                     # junk payloads written

    def _junk(self, port: str) -> int:
        width = self._width[port]
        return int.from_bytes(self.rng.bytes((width + 7) // 8), "little") & ((1 << width) - 1)

    def _put(self, name: str, value: int) -> None:
        if self._driven.get(name) != value:
            self._driven[name] = value
            getattr(self.dut, name).value = value

    def apply(self, cycle: HostCycle) -> None:
        self.cycle = cycle
        for port in self.PORTS:
            payload = getattr(cycle, port)
            if payload is not None:
                self._put(f"{port}__payload", payload)
            elif self.p_junk and self.rng.random() < self.p_junk:
                self._put(f"{port}__payload", self._junk(port))
                self.junk += 1
            self._put(f"{port}__valid", int(payload is not None))
        self._put("clear", int(cycle.clear))

    def start(self, sequence) -> None:
        self.sequence, self.fresh = sequence, True
        self.done.clear()

    def sample(self) -> None:
        """Before the edge: what it takes."""
        c, d = self.cycle, self.dut
        self.reply = Reply(c.x is not None and d.x__ready.value is ONE, c.w is not None and d.w__ready.value is ONE,
                           c.sparse is not None and d.sparse__ready.value is ONE,
                           int(d.status.value) if c.read_status else None, d.w__ready.value is ONE)

    def step(self) -> None:
        """After the edge: the generator's next cycle (none running: an idle one)."""
        if self.sequence is None:
            self.apply(IDLE)
            return
        try:
            cycle = next(self.sequence) if self.fresh else self.sequence.send(self.reply)
            self.fresh = False
        except StopIteration:
            self.sequence = None
            self.apply(IDLE)
            self.done.set()
            return
        self.apply(cycle)


class Scoreboard:
    """The ``y`` words owed, in order: (value or None: counted only, last, label); each word taken is
    compared at once with the next one owed."""

    def __init__(self, log):
        self.log = log
        self.owed: collections.deque = collections.deque()
        self.checked = self.counted = self.mismatches = self.seen = 0

    def expect(self, words, label: str) -> None:
        for row, value in enumerate(words):
            self.owed.append((value, row == len(words) - 1, f"{label} row {row}"))

    def compare(self, payload: int | None) -> None:
        index, self.seen = self.seen, self.seen + 1
        if not self.owed:
            self.error(f"y word {index}: {payload} came with nothing owed")
            return
        want, last, label = self.owed.popleft()
        if payload is None:
            self.error(f"y word {index} ({label}): X or Z bits")
            return
        value, got_last = payload & 0xFFFFFFFF, (payload >> 32) & 1
        if want is None:
            self.counted += 1
        else:
            self.checked += 1
        if (want is not None and value != want) or got_last != last:
            want_text = "any value" if want is None else f"{want:#010x}"
            self.error(f"y word {index} ({label}): got {value:#010x} last {got_last}, expected {want_text} "
                       f"last {int(last)}")

    def error(self, text: str) -> None:
        if self.mismatches < MISMATCHES_LOGGED:
            self.log.error(text)
        self.mismatches += 1

    def missing(self) -> None:
        if self.owed:
            self.error(f"{len(self.owed)} y words never came (the first: {self.owed[0][2]})")
            self.mismatches += len(self.owed) - 1
            self.owed.clear()


class Pacer:
    """A ``paced`` layer's blocks and ``y`` (sim/gemv_runner.py, ``paced_gaps``: the folded engines'):
    ``y`` held from the first block offered; each block after the first offered only once ``w.ready``
    has been high in ``gap`` cycles with no block offered since the block before was taken (each an
    empty stage 0 on an enabled edge: ``gap`` bubbles in the chunk stream between blocks, however
    the engine stalls); a stop is ``w.ready`` low for ``PACED_STUCK`` cycles under the hold (more
    than a block's chunks: the engine has stopped, its value FIFO and block dot unit's output buffer
    full and the front end's skid holding a chunk). At a stop ``y`` goes free for one word (one value
    into the ring, one block more through the unit before it stops again: the next stop's chunk is
    the next block's) and is held again, ``stops`` times; then, or once the layer's blocks have all
    been taken, the layer's blocks come as any layer's, ``y`` free."""

    def __init__(self, tb: Testbench, paced: dict):
        self.tb, self.gap, self.stops = tb, paced["gap"], paced["stops"]
        self.active, self.bubbles, self.low, self.seen = True, 0, 0, None

    def offer(self, wp: int) -> bool:
        if wp == 0 and self.seen is None:
            self.tb.hold_y = True
        return wp == 0 or self.bubbles >= self.gap

    def after(self, offered: bool, reply: Reply, all_taken: bool) -> None:
        self.bubbles = 0 if reply.w else self.bubbles + (not offered and reply.w_ready)
        self.low = 0 if reply.w_ready else self.low + 1
        tb = self.tb
        if tb.hold_y and self.low >= PACED_STUCK:
            tb.hold_y, self.seen, self.stops = False, tb.scoreboard.seen, self.stops - 1
            tb.paced_stops += 1
        elif self.seen is not None and not tb.hold_y and tb.scoreboard.seen > self.seen and self.stops:
            tb.hold_y, self.low = True, 0
        if all_taken or (not self.stops and not tb.hold_y):
            tb.hold_y, self.active = False, False


class Testbench:
    def __init__(self, dut, cfg: GemvConfig, rng: np.random.Generator, p_idle: float, p_stall: float,
                 p_junk: float = P_JUNK, p_long_stall: float = P_LONG_STALL):
        self.dut, self.cfg, self.rng, self.p_idle, self.p_stall = dut, cfg, rng, p_idle, p_stall
        self.p_long_stall = p_long_stall
        self.pack_x, self.pack_load = Packer(gemv_config.x_layout(cfg)), Packer(gemv_config.load_layout(cfg))
        self.pack_layer, self.pack_sparse = Packer(gemv_config.layer_layout(cfg)), Packer(gemv_config.sparse_layout(cfg))
        self.driver = HostDriver(dut, rng, p_junk)
        self.scoreboard = Scoreboard(dut._log)
        self.y_ready = False
        self.always_ready = False
        self.hold_y = False                             # a paced layer's hold (layers_sequence)
        self.paced_stops = 0                            # ... and its stops
        self.cycles = self.status_errors = self.timing_errors = self.layers = self.entries = 0
        self.timing: dict | None = None                 # a timing job's bounds, while it runs
        self.w_cycles: dict[int, list[int]] = {}        # ... the cycle of each block taken (per measured
                                                        # layer), of each y word
        self.y_cycles: list[int] = []
        self.stall_left = self.stall_gap = 0            # the long stall's cycles left; cycles before the next may start
        self.long_stalls = self.long_stall_cycles = 0
        self.jobs: list[dict] = []                      # per job: name, cycles, long stalls started
        self._task = None

    # -- the clock loop ----------------------------------------------------------------------------------
    async def _clock(self) -> None:
        d, drv, sb = self.dut, self.driver, self.scoreboard
        while True:
            await ReadOnly()
            if self.y_ready and d.y__valid.value is ONE:
                try:
                    sb.compare(int(d.y__payload.value))
                except ValueError:
                    sb.compare(None)
                if self.timing is not None:
                    self.y_cycles.append(self.cycles)
            drv.sample()
            await RisingEdge(d.clk)
            self.cycles += 1
            drv.step()
            ready = self.next_y_ready()
            if ready != self.y_ready:
                d.y__ready.value = int(ready)
                self.y_ready = ready

    def next_y_ready(self) -> bool:
        """``y.ready`` for the next cycle: low in a long stall, else low with the chance ``p_stall``;
        high while ``always_ready`` (which ends a long stall). A cycle at least ``LONG_GAP`` cycles
        after the last long stall ended starts one with the chance ``p_long_stall``, of ``LONG_STALL``
        cycles (uniform)."""
        if self.always_ready:
            if self.stall_left:
                self.stall_left, self.stall_gap = 0, LONG_GAP
            return True
        if self.hold_y:
            return False
        if not self.stall_left:
            if self.stall_gap:
                self.stall_gap -= 1
            elif self.p_long_stall and self.rng.random() < self.p_long_stall:
                self.stall_left = int(self.rng.integers(LONG_STALL[0], LONG_STALL[1] + 1))
                self.long_stalls += 1
        if self.stall_left:
            self.stall_left -= 1
            self.long_stall_cycles += 1
            if not self.stall_left:
                self.stall_gap = LONG_GAP
            return False
        return self.rng.random() >= self.p_stall

    def start(self) -> None:
        self._task = cocotb.start_soon(self._clock())

    def stop(self) -> None:
        self._task.cancel()

    # -- host sequences ----------------------------------------------------------------------------------
    def writes(self, layer: dict) -> list[HostCycle]:
        rows, bpr, offset, sparse = layer["layer"]
        return [HostCycle(load=self.pack_load(bank=b, addr=a, data=v)) for b, a, v in layer["loads"]] + \
            [HostCycle(layer=self.pack_layer(rows=rows, blocks_per_row=bpr, offset=offset, sparse=sparse))]

    def x_cycle(self, beats: list[int], k: int, swap: bool) -> HostCycle:
        return HostCycle(x=self.pack_x(codes=beats[k], last=int(k == len(beats) - 1), swap=int(swap)))

    def entry(self, row: int, col: int, value: int, last: int) -> int:
        return self.pack_sparse(row=row, col=col, value=value, last=last)

    def offered(self) -> bool:
        return self.rng.random() >= self.p_idle

    def layers_sequence(self, layers: list[dict], max_cycles: int):
        """The layers back to back: the next layer's writes once the current one has swapped in; each
        vector's x (the layer's first with ``swap``, two cycles after its last write at the soonest)
        as soon as the vector before's x is taken (the engine holds it while both x pages hold a
        vector, and a layer's first vector until no vector is loaded), its w and sparse beats once
        its x is taken, with random idle cycles on each; a ``paced`` layer's first vector's blocks as
        its ``Pacer`` lets them go."""
        writes = [self.writes(layer) for layer in layers]
        vectors = [(li, v) for li, layer in enumerate(layers) for v in range(len(layer["vectors"]))]
        load_layer, load_pos, swapped, loads_done_at = 0, 0, -1, {}
        xv = xp = wv = wp = sp = 0
        cycle = 0
        pacers: dict[int, Pacer] = {}
        while wv < len(vectors):
            assert cycle < max_cycles, f"the host sequence ran past {max_cycles} cycles (vector {wv} of {len(vectors)})"
            write = None
            if load_layer < len(layers) and swapped >= load_layer - 1 and self.offered():
                write = writes[load_layer][load_pos]
            c = HostCycle(load=write.load, layer=write.layer) if write is not None else HostCycle()
            if xv < len(vectors):
                li, vec = vectors[xv]
                xs = layers[li]["vectors"][vec]["x"]
                ready_to_swap = vec > 0 or loads_done_at.get(li, max_cycles) <= cycle
                if ready_to_swap and self.offered():
                    c.x = self.x_cycle(xs, xp, vec == 0 and xp == 0).x
            lw = vectors[wv][0]
            ws, ss = layers[lw]["w"], layers[lw]["sparse"]
            pacer = None
            if xv > wv and wp < len(ws) and "paced" in layers[lw] and vectors[wv][1] == 0:
                if lw not in pacers:
                    pacers[lw] = Pacer(self, layers[lw]["paced"])
                pacer = pacers[lw]
            if pacer is not None and pacer.active:
                if pacer.offer(wp):
                    c.w = ws[wp]
            elif xv > wv and wp < len(ws) and self.offered():
                c.w = ws[wp]
            if xv > wv and sp < len(ss) and self.offered():
                row, col, value, last = ss[sp]
                c.sparse = self.entry(*ss[sp])
            reply = yield c
            cycle += 1
            if write is not None:
                load_pos += 1
                if load_pos == len(writes[load_layer]):
                    loads_done_at[load_layer] = cycle + 1
                    load_layer, load_pos = load_layer + 1, 0
            if reply.x:
                li, vec = vectors[xv]
                swapped = li if vec == 0 and xp == 0 else swapped
                xp += 1
                if xp == len(layers[li]["vectors"][vec]["x"]):
                    xv, xp = xv + 1, 0
            if pacer is not None and pacer.active:
                pacer.after(c.w is not None, reply, wp + reply.w == len(ws))
            wp += reply.w
            sp += reply.sparse
            if reply.w and self.timing is not None and vectors[wv][0] in self.timing["layers"]:
                self.w_cycles.setdefault(vectors[wv][0], []).append(self.cycles - 1)     # the edge that took it
            if wp == len(ws) and sp == len(ss):
                wv, wp, sp = wv + 1, 0, 0

    def check_status(self, status: int, want: int, when: str) -> None:
        if status != want:
            names = [n for n, bit in ERROR_BITS.items() if status & bit] + (["x_loaded"] if status & X_LOADED else [])
            self.dut._log.error(f"status {when}: {status:#x} {names}, expected {want:#x}")
            self.status_errors += 1

    def read_status(self):
        """A generator step: one idle cycle, ``status`` read before its edge."""
        reply = yield HostCycle(read_status=True)
        return reply.status

    def errors_sequence(self, job: dict, max_wait: int):
        """The layer's writes, then each case: blocks offered before any x (``w_before_x``, then
        ``clear``), or its own tables and layer word if it has them (a layer word
        alone: ``status`` with its bit, ``clear``, ``status`` 0), its x beats (the first with swap in
        the first case and a case with its own layer), ``status`` with its error bit while loaded
        (``sparse`` is flagged later, when its entry is taken, and a case's ``after_pass`` block after
        the pass), its blocks and entries, with ``after_pass`` its first block offered from the cycle
        after its last on until ``status`` has shown no vector loaded for that many cycles (never
        taken: ``HandshakeError``), ``status`` after the pass, ``clear``, ``status`` 0. A case with its
        own layer word may bring its own blocks (``w``) and row count (``rows``: its words counted)."""
        for c in self.writes(job):
            yield c
        for _ in range(3):
            yield IDLE
        first_x = next(i for i, case in enumerate(job["cases"]) if "x" in case)
        for i, case in enumerate(job["cases"]):
            bit = ERROR_BITS[case["error"]] if case["error"] else 0
            if "offer" in case:            # a block offered with no vector loaded: never taken, flagged
                for _ in range(case["offer"]):
                    if (yield HostCycle(w=job["w"][0])).w:
                        raise HandshakeError(f"errors case {i}: a block taken before any x")
                yield IDLE
                self.check_status((yield from self.read_status()), bit, f"errors case {i}, block before x")
                yield HostCycle(clear=True)
                self.check_status((yield from self.read_status()), 0, f"errors case {i}, after clear")
                continue
            if "layer" in case:            # a layer word (and tables) into the inactive page; its x swaps them in
                for c in self.writes({"loads": case.get("loads", []), "layer": case["layer"]}):
                    yield c
                if "x" not in case:        # a bad word alone: flagged (two cycles on), then cleared
                    yield IDLE
                    self.check_status((yield from self.read_status()), bit, f"errors case {i}, layer word")
                    yield HostCycle(clear=True)
                    self.check_status((yield from self.read_status()), 0, f"errors case {i}, after clear")
                    continue
                yield IDLE
            for k in range(len(case["x"])):
                for _ in range(max_wait):
                    if (yield self.x_cycle(case["x"], k, (i == first_x or "layer" in case) and k == 0)).x:
                        break
                else:
                    raise AssertionError(f"errors case {i}: x beat {k} not taken in {max_wait} cycles")
            yield IDLE
            # a bad sparse entry is flagged when the engine takes it, after the blocks: not yet; nor a
            # block offered after the pass
            loaded_bit = 0 if case["error"] == "sparse" or "after_pass" in case else bit
            self.check_status((yield from self.read_status()), X_LOADED | loaded_bit,
                              f"errors case {i}, vector loaded")
            ws, ss, wp, sp = case.get("w", job["w"]), case.get("sparse", []), 0, 0     # (a case's own layer's)
            for _ in range(max_wait * (len(ws) + len(ss))):
                if wp == len(ws) and sp == len(ss):
                    break
                reply = yield HostCycle(w=ws[wp] if wp < len(ws) else None,
                                        sparse=self.entry(*ss[sp]) if sp < len(ss) else None)
                wp, sp = wp + reply.w, sp + reply.sparse
            else:
                raise AssertionError(f"errors case {i}: {wp} of {len(ws)} blocks, {sp} of {len(ss)} entries "
                                     f"taken in {max_wait} cycles each")
            # a block offered from the cycle after the pass's last one on, with no vector after it, until
            # status has shown no vector loaded for ``after_pass`` cycles: the pass frees its x page once
            # its last block leaves stage 0 (later under a stall of y), and from then on nothing is
            # loaded (the sequencer's x_held count: one that frees the page a cycle late takes the block)
            if "after_pass" in case:
                free = 0
                for _ in range(max_wait):
                    reply = yield HostCycle(w=ws[0], read_status=True)
                    if reply.w:
                        raise HandshakeError(f"errors case {i}: a block taken after the pass, no vector loaded")
                    free = 0 if reply.status & X_LOADED else free + 1
                    if free == case["after_pass"]:
                        break
                else:
                    raise AssertionError(f"errors case {i}: the pass not done in {max_wait} cycles")
            for _ in range(max_wait):
                status = yield from self.read_status()
                if not status & X_LOADED:
                    break
            self.check_status(status, bit, f"errors case {i}, after the pass")
            yield HostCycle(clear=True)
            self.check_status((yield from self.read_status()), 0, f"errors case {i}, after clear")

    def check_timing(self, timing: dict) -> None:
        """A ``timing`` job's cycles against hdl/gemv.py's throughput and latency: each measured layer's
        blocks taken one every ``block_cycles`` cycles, back to back from its first to its last, and
        the last ``y`` word ``latency`` cycles (to ``latency + slack``) after the last block."""
        log = self.scoreboard.log                        # (the mutation bench keeps the first error)
        for li in timing["layers"]:
            gaps = sorted(set(np.diff(self.w_cycles.get(li, [])).tolist()))
            if gaps != [timing["block_cycles"]]:
                log.error(f"the timing job's layer {li}: blocks taken {gaps} cycles apart, "
                          f"not every {timing['block_cycles']}")
                self.timing_errors += 1
        last_w = self.w_cycles.get(timing["layers"][-1])
        last = self.y_cycles[-1] - last_w[-1] if self.y_cycles and last_w else None
        lo, hi = timing["latency"], timing["latency"] + timing["slack"]
        if last is None or not lo <= last <= hi:
            log.error(f"the timing job's last y word {last} cycles after its last block, not {lo}"
                      f"{f' to {hi}' if hi > lo else ''} (the engine's latency)")
            self.timing_errors += 1

    # -- jobs ------------------------------------------------------------------------------------------
    async def run(self, job: dict) -> None:
        sb = self.scoreboard
        timing, idle = job.get("timing"), (self.p_idle, self.p_stall)
        if timing is not None:                          # no idle input, no stall, no long stall
            self.p_idle = self.p_stall = 0.0
            self.always_ready = True
            self.timing, self.w_cycles, self.y_cycles = timing, {}, []
        if job["kind"] == "layers":
            layers = job["layers"]
            beats = sum(len(layer["loads"]) + len(v["x"]) + len(layer["w"]) + len(layer["sparse"])
                        for layer in layers for v in layer["vectors"])
            for layer in layers:
                for i, v in enumerate(layer["vectors"]):
                    sb.expect(v["expect"], f"{layer['name']} vector {i}")
            self.layers += len(layers)
            self.entries += sum(layer["entries"] for layer in layers)
            # a bound far above the stalls' cost: every beat waits less than 20 cycles on average,
            # beside the long stalls
            max_cycles = with_long_stalls(20 * beats + 200 * len(layers) + 2000)
            self.driver.start(self.layers_sequence(layers, max_cycles))
        else:
            for i, case in enumerate(job["cases"]):
                if "x" in case:
                    sb.expect(case.get("expect") or [None] * case.get("rows", job["rows"]),
                              f"errors case {i} ({case['error']})")
            self.layers += 1
            blocks = sum(len(case.get("w", job["w"])) for case in job["cases"])
            max_cycles = with_long_stalls(200 * (len(job["loads"]) + blocks + 100))
            self.driver.start(self.errors_sequence(job, with_long_stalls(WAIT_CYCLES)))
        start, stalls = self.cycles, self.long_stalls
        await with_timeout(self.driver.done.wait(), max_cycles * CLOCK_NS, "ns")
        limit = self.cycles + with_long_stalls(100 * len(sb.owed) + 2000)
        while sb.owed and self.cycles < limit:
            await RisingEdge(self.dut.clk)
        sb.missing()
        self.always_ready = True
        for _ in range(QUIET_CYCLES):
            await RisingEdge(self.dut.clk)
        self.always_ready = False
        if timing is not None:
            self.check_timing(timing)
            self.timing = None
            self.p_idle, self.p_stall = idle
        await ReadOnly()
        self.check_status(int(self.dut.status.value), 0, f"after the {job.get('name', job['kind'])} job")
        await RisingEdge(self.dut.clk)
        self.jobs.append({"name": job.get("name", job["kind"]), "cycles": self.cycles - start,
                          "long_stalls": self.long_stalls - stalls})


@cocotb.test()
async def gemv_regression(dut):
    plan = read_plan()
    cfg = engine_config(plan)
    seed = plan["seed"]
    dut._log.info(f"engine {cfg.name}, plan {plan['size']}, seed {seed} (rerun: gemv_runner --seed {seed})")
    tb = Testbench(dut, cfg, np.random.default_rng([seed, 1]), plan["p_idle"], plan["p_stall"])
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    for port in HostDriver.PORTS:
        getattr(dut, f"{port}__payload").value = 0
    tb.driver.apply(IDLE)
    dut.y__ready.value = 0
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    tb.start()
    t0 = time.time()
    for job in plan["jobs"]:
        await tb.run(job)
    tb.stop()
    sb = tb.scoreboard
    summary = {"config": cfg.name, "seed": seed, "checked": sb.checked, "counted": sb.counted,
               "mismatches": sb.mismatches, "status_errors": tb.status_errors, "timing_errors": tb.timing_errors,
               "layers": tb.layers, "entries": tb.entries, "cycles": tb.cycles, "long_stalls": tb.long_stalls,
               "long_stall_cycles": tb.long_stall_cycles, "paced_stops": tb.paced_stops, "junk": tb.driver.junk,
               "jobs": tb.jobs,
               "seconds": time.time() - t0}
    write_report(summary)
    dut._log.info(f"{cfg.name}: {sb.checked} words checked, {sb.counted} counted, {sb.mismatches} mismatches, "
                  f"{tb.status_errors} status errors, {tb.timing_errors} timing errors, {tb.cycles} cycles "
                  f"({tb.long_stalls} long stalls of y, "
                  f"{tb.long_stall_cycles} cycles; {tb.driver.junk} junk payloads); jobs {tb.jobs}")
    assert sb.mismatches == 0 and tb.status_errors == 0 and tb.timing_errors == 0, \
        f"{sb.mismatches} mismatches, {tb.status_errors} status errors, {tb.timing_errors} timing errors"
