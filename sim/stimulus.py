"""Stimulus shared by the amaranth.sim tests and the cocotb regression: layers, the host's cycles, coverage.

A ``Layer`` is one layer's worth of decoder input (LUT images, per-layer
offset, block headers and codes, and its sparse entries, if any); its expected
output comes from hdl.reference (hdl.residual.expected_words with entries),
i.e. from golden/ only. ``random_layer`` draws one, ``corner_layer`` covers
every code x bank x sign at the scale codes' extremes, ``from_stream`` takes a
real quantized layer (its sparse entries too), ``with_sparse`` gives a layer
entries of a chosen pattern (for a decoder with the residual path).

``host_sequence`` is the one host-sequence driver: a generator of what the
host drives in each clock cycle (``HostCycle``: a table or offset write into
the inactive page, the input beat offered and its swap flag, reset), from
layers and a seeded RNG; the consumer sends back whether the beat offered in
that cycle was taken. The cocotb bench (sim/tb_decoder.py) and the
amaranth.sim harness (tests/hdl_harness.py) only turn its cycles into their
simulator's signal writes.

``plan_jobs`` turns a sim plan (sim/runner.py) into the layers of each job,
the same in the simulator's process and in a test that checks its report.
``Coverage`` measures which (code, bank, sign, scale-exponent) bins a set of
blocks exercises; ``coverage`` does it for layers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sop.golden.codebooks import get_codebook
from sop.golden.layout import LayerStream, unpack_blocks
from sop.hdl import reference
from sop.hdl.config import DecoderConfig


@dataclass
class Layer:
    luts: np.ndarray            # (banks, 2**k) HIF codes
    offset: int
    headers: np.ndarray         # (n,)
    codes: np.ndarray           # (n, g)
    name: str = ""
    #: sparse entries: flat indices (strictly increasing, within the blocks) and BF16 codes
    sparse_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sparse_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def has_sparse(self) -> bool:
        return len(self.sparse_index) > 0

    def writes(self):
        """The host's load sequence: every LUT word, then the offset with the layer's sparse flag
        (``layer_sparse``, which a decoder without residuals does not have)."""
        out = [("lut", b, a, int(self.luts[b, a])) for b in range(self.luts.shape[0])
               for a in range(self.luts.shape[1])]
        return out + [("offset", self.offset, int(self.has_sparse))]

    def entries(self) -> list[tuple[int, int, int]]:
        """The sparse stream of the layer: ``(index, value, last)``."""
        n = len(self.sparse_index)
        return [(int(i), int(v), int(k == n - 1)) for k, (i, v) in enumerate(zip(self.sparse_index, self.sparse_values))]

    def expected(self, cfg: DecoderConfig) -> list[list[int]]:
        if not self.has_sparse:
            return reference.expected_beats(cfg, self.luts, self.offset, self.headers, self.codes)
        from sop.hdl.residual import expected_words
        words = expected_words(cfg, self.luts, self.offset, self.headers, self.codes, self.sparse_index,
                               self.sparse_values)
        return [[int(w) for w in words[i:i + cfg.lanes]] for i in range(0, len(words), cfg.lanes)]


def pad_to_beats(cfg: DecoderConfig, headers, codes):
    """Repeat the last block so the layer fills whole input beats (N > g)."""
    extra = -len(headers) % cfg.blocks_per_beat
    if extra:
        headers = np.concatenate([headers, np.repeat(headers[-1:], extra)])
        codes = np.concatenate([codes, np.repeat(codes[-1:], extra, axis=0)])
    return headers, codes


def from_stream(cfg: DecoderConfig, stream: LayerStream, name: str = "") -> Layer:
    headers, codes = pad_to_beats(cfg, *unpack_blocks(stream.layout, stream.blocks))
    return Layer(np.asarray(stream.luts, dtype=np.int64), stream.offset, headers, codes, name,
                 np.asarray(stream.sparse.index, dtype=np.int64), np.asarray(stream.sparse.value_bf16, dtype=np.int64))


def random_layer(cfg: DecoderConfig, rng: np.random.Generator, n_blocks: int, offset=None,
                 luts=None) -> Layer:
    lay = cfg.layout
    scale_codes = rng.integers(0, 1 << lay.scale.bits, n_blocks)
    headers = lay.make_header(scale_codes, rng.integers(0, 2, n_blocks) * lay.signed_scale,
                              rng.integers(0, 2, n_blocks) * lay.select_bit)
    codes = rng.integers(0, 1 << lay.code_bits, (n_blocks, lay.group))
    if luts is None:
        luts = rng.integers(0, 1 << cfg.hif.bits, (lay.banks, 1 << lay.code_bits))
    if offset is None:
        offset = int(rng.integers(-40, 20))
    headers, codes = pad_to_beats(cfg, headers, codes)
    return Layer(np.asarray(luts, dtype=np.int64), offset, headers, codes, "random")


SPARSE_PATTERNS = ("random", "burst", "boundaries", "ends", "swap", "values")


def with_sparse(cfg: DecoderConfig, layer: Layer, rng: np.random.Generator, pattern: str = "random",
                density: float = 0.05) -> Layer:
    """``layer`` with sparse entries (golden's residuals, decoded by golden through
    ``Layer.expected``). ``pattern``:

    * ``random``: each value an entry with probability ``density``, random BF16 values;
    * ``burst``: whole output beats of entries (``lanes`` in one beat), with random entries at
      ``density`` between them;
    * ``boundaries``: the first and last value of every block and of every output beat;
    * ``ends``: the layer's first and last value, and the swap beat's (the first beat) every value;
    * ``swap``: only in the first output beat (the beat that swaps the tables);
    * ``values``: residuals that cancel the product (to +0), flip its sign, push it past the
      BF16 maximum (saturation) or break a BF16 tie 60 binades down, on random values."""
    from sop.golden.decoder import decode_blocks
    from sop.golden.formats import get_format

    bf16 = get_format("bf16")
    N, g = cfg.lanes, cfg.layout.group
    n = layer.codes.size
    if pattern == "random":
        idx = np.flatnonzero(rng.random(n) < density)
    elif pattern == "burst":
        beats = rng.choice(max(1, n // N), max(1, n // N // 8), replace=False)
        idx = np.union1d((beats[:, None] * N + np.arange(N)).ravel(), np.flatnonzero(rng.random(n) < density))
    elif pattern == "boundaries":
        idx = np.union1d(np.union1d(np.arange(0, n, g), np.arange(g - 1, n, g)),
                         np.union1d(np.arange(0, n, N), np.arange(N - 1, n, N)))
    elif pattern == "ends":
        idx = np.union1d(np.arange(min(N, n)), [n - 1])
    elif pattern == "swap":
        idx = np.arange(min(N, n))
    elif pattern == "values":
        idx = np.flatnonzero(rng.random(n) < max(density, 0.25))
    else:
        raise ValueError(f"unknown sparse pattern {pattern!r}; valid: {', '.join(SPARSE_PATTERNS)}")
    idx = np.unique(idx[(idx >= 0) & (idx < n)]).astype(np.int64)
    if len(idx) == 0:
        idx = np.array([int(rng.integers(0, n))])
    p = decode_blocks(cfg.hif, layer.luts, cfg.layout, layer.offset, layer.headers, layer.codes, "exact").ravel()[idx]
    r = rng.standard_normal(len(idx)) * np.where(p == 0, 2.0 ** rng.integers(-20, 0, len(idx)), np.abs(p))
    if pattern == "values":
        kind = rng.integers(0, 4, len(idx))
        mag = np.where(p == 0, 1.0, np.abs(p))
        r = np.select([kind == 0, kind == 1, kind == 2],
                      [np.where(bf16.quantize(-p) == -p, -p, bf16.quantize(-p)),      # cancel
                       -3.0 * p,                                                        # flip
                       np.sign(p + 0.5) * bf16.max],                                    # saturate
                      np.ldexp(rng.choice([-1.0, 1.0], len(idx)), np.frexp(mag)[1] - 61))   # tie breakers
    values = bf16.encode(np.clip(r, -bf16.max, bf16.max)).astype(np.int64)
    return replace(layer, sparse_index=idx, sparse_values=values, name=f"{layer.name}+sparse-{pattern}")


def corner_layer(cfg: DecoderConfig, offset: int) -> Layer:
    """Every code, both banks, both signs, the scale codes at both extremes (zero included)."""
    lay = cfg.layout
    n_codes = 1 << lay.code_bits
    rows = np.arange(n_codes).reshape(-1, lay.group) if n_codes >= lay.group else \
        np.resize(np.arange(n_codes), (1, lay.group))
    headers, codes = [], []
    for sc in (0, 1, (1 << lay.scale.bits) - 2, (1 << lay.scale.bits) - 1):
        for sign in ((0, 1) if lay.signed_scale else (0,)):
            for sel in ((0, 1) if lay.select_bit else (0,)):
                for row in rows:
                    headers.append(int(lay.make_header(sc, sign, sel)))
                    codes.append(row)
    if lay.code_bits == 6:
        luts = get_codebook("e2m3").hif_codes[None, :]
    else:
        luts = np.stack([get_codebook("nf4").hif_codes, get_codebook("sh4").hif_codes])[:lay.banks]
    headers, codes = pad_to_beats(cfg, np.array(headers), np.array(codes))
    return Layer(np.asarray(luts, dtype=np.int64), offset, headers, codes, f"corners{offset:+d}")


class Coverage:
    """Bins hit over code x bank x sign x scale-exponent field, accumulated block by block."""

    def __init__(self, cfg: DecoderConfig):
        lay = self.layout = cfg.layout
        n_sign = 2 if lay.signed_scale else 1
        self.hit = np.zeros((1 << lay.code_bits, lay.banks, n_sign, 1 << lay.scale.ebits), dtype=bool)

    def add(self, headers, codes) -> None:
        lay = self.layout
        headers, codes = np.asarray(headers, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        scale_code, sign, select = lay.split_header(headers)
        e = scale_code >> lay.scale.mbits
        like = np.zeros_like(codes)
        self.hit[codes, select[:, None] + like, sign[:, None] + like, e[:, None] + like] = True

    @property
    def counts(self) -> tuple[int, int]:
        """(bins hit, bins in all)."""
        return int(self.hit.sum()), self.hit.size

    def bitmap(self) -> str:
        """The bins hit as a hex string (bit i: bin i in C order), for a report a test compares."""
        return np.packbits(self.hit.ravel(), bitorder="little").tobytes().hex()


def coverage(cfg: DecoderConfig, layers: list[Layer]) -> tuple[int, int]:
    """(bins hit, bins in all) over code x bank x sign x scale-exponent field."""
    cov = Coverage(cfg)
    for layer in layers:
        cov.add(layer.headers, layer.codes)
    return cov.counts


# -- the host's cycles ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HostCycle:
    """What the host drives in one clock cycle (all else idle).

    ``write``: ``("lut", bank, addr, hif_code)`` or ``("offset", value, layer_sparse)``, into the
    inactive page, this cycle only; ``beat``: the input beat offered (``blocks.valid``), its packed
    blocks as an integer (hdl.reference.input_beats), with ``swap``; ``reset``: the synchronous
    reset, high for this cycle; ``entry``: the sparse entry offered (``sparse.valid``),
    ``(index, value, last)``.
    """
    write: tuple | None = None
    beat: int | None = None
    swap: bool = False
    reset: bool = False
    entry: tuple | None = None


def host_sequence(cfg: DecoderConfig, layers: list[Layer], rng, *, p_idle: float = 0.0,
                  cut_after: int | None = None) -> Generator[HostCycle, bool | tuple | None, None]:
    """The host's cycles for ``layers``; send back whether each cycle's beat was taken.

    Use: ``cycle = next(seq)``, then per clock cycle drive ``cycle``, let the edge pass and
    ``cycle = seq.send(taken)`` (``taken``: the beat offered was accepted at that edge; with
    sparse entries ``(taken, entry_taken)``, the second whether ``cycle.entry`` was) until
    ``StopIteration``. ``rng`` is anything with ``random()`` (``random.Random``, a numpy
    ``Generator``); it draws the idle cycles.

    1. ``layers[0]``'s tables and offset, one write a cycle (``Layer.writes``);
    2. each layer's beats, the first with ``swap``; before each beat, idle cycles while
       ``rng.random() < p_idle``; a beat is offered until taken. Once a layer's swap beat is
       taken, the next layer's writes go out one a beat beside the stream (into the page the
       stream does not read: docs/hardware.md's rule); those still pending when the layer ends
       go out before the next layer's swap beat;
    3. a layer's sparse entries (``Layer.entries``) go on the sparse stream from the cycle
       after its swap beat was taken, in order, beside its beats, an entry offered until
       taken, idle cycles between them while ``rng.random() < p_idle``; after the last beat
       the host stays until every entry has been taken;
    4. with ``cut_after``, the first layer stops after that many beats (or after
       ``4 * cut_after * beats_per_block`` cycles without a beat taken), then one reset cycle
       with the last beat still offered, then the other layers from a fresh load. Output
       owed for the cut layer is lost: a consumer holds its output stalled until the reset.
    """
    queue: deque = deque()               # sparse entries to offer, in order
    offered = [None]                     # the entry offered and not yet taken

    def emit(cycle: HostCycle):
        if offered[0] is None and queue and not rng.random() < p_idle:
            offered[0] = queue[0]
        if offered[0] is not None:
            cycle = replace(cycle, entry=offered[0])
        reply = yield cycle
        taken, entry_taken = reply if isinstance(reply, tuple) else (reply, False)
        if offered[0] is not None and entry_taken:
            queue.popleft()
            offered[0] = None
        return taken

    pending = list(layers[0].writes()) if layers else []
    last = HostCycle()
    for li, layer in enumerate(layers):
        cut = cut_after is not None and li == 0
        for w in pending:                          # the tables must be in before their swap beat
            yield from emit(HostCycle(write=w))
        pending = []
        beats = reference.input_beats(cfg, layer.headers, layer.codes)
        budget = 4 * cut_after * cfg.beats_per_block if cut else None
        for bi, beat in enumerate(beats[:cut_after] if cut else beats):
            while rng.random() < p_idle:
                yield from emit(HostCycle())
            last = HostCycle(write=pending.pop(0) if pending else None, beat=beat, swap=bi == 0)
            taken = yield from emit(last)
            while not taken and (budget is None or budget > 1):
                budget = None if budget is None else budget - 1
                last = HostCycle(beat=beat, swap=bi == 0)
                taken = yield from emit(last)
            if not taken:                          # the cut layer's budget ran out
                break
            if bi == 0:
                queue.extend(layer.entries())
                if li + 1 < len(layers) and not cut:
                    pending = list(layers[li + 1].writes())
        if cut:
            yield HostCycle(beat=last.beat, swap=last.swap, reset=True)
            queue.clear()
            offered[0] = None
            pending = list(layers[1].writes()) if len(layers) > 1 else []
    idle = 0
    while queue and idle < 1000:                   # the last entries (a decoder that takes none: stop)
        n = len(queue)
        yield from emit(HostCycle())
        idle = 0 if len(queue) < n else idle + 1


# -- a sim plan's jobs -----------------------------------------------------------------------------
@dataclass
class Job:
    """One job of a plan: its layers, streamed back to back; ``cut_after``: the reset job."""
    kind: str
    layers: list[Layer]
    cut_after: int | None = None

    @property
    def checked(self) -> list[Layer]:
        """The layers whose output is compared (a cut layer's is lost to the reset)."""
        return self.layers[1:] if self.cut_after is not None else self.layers


RESET_JOB = {"first": 16, "second": 8, "cut_after": 5}      # blocks of the two layers, beats before reset


def seeded_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(content, timing) generators of one seed: the layers drawn do not depend on the idles and
    stalls a simulation draws, so a test can rebuild them from the seed alone."""
    content, timing = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(content), np.random.default_rng(timing)


def plan_jobs(cfg: DecoderConfig, plan: dict, rng: np.random.Generator) -> list[Job]:
    """The jobs of a sim plan (sim/runner.py ``plan_for``) with their layers, drawn from ``rng``."""
    from sop.sim.vectors import read_vectors

    jobs = []
    for job in plan["jobs"]:
        kind = job["kind"]
        if kind == "vectors":
            layers = []
            for v in read_vectors(Path(job["dir"])):
                if v.layout != cfg.layout or v.hif != cfg.hif:
                    raise ValueError(f"{job['dir']}: vectors are for another layout/HIF than {cfg.name}")
                if len(v.sparse_index) and not cfg.residuals:
                    raise ValueError(f"{job['dir']}: layer {v.name} has sparse residuals; {cfg.name} has no "
                                     f"residual path (a configuration with residuals: {cfg.name}-sp)")
                layers.append(Layer(v.luts, v.offset, *pad_to_beats(cfg, v.headers, v.codes), v.name,
                                    v.sparse_index, v.sparse_values))
            jobs.append(Job(kind, layers))
        elif kind == "sparse":
            # every pattern of entries (with_sparse), a layer without entries between two
            layers = []
            for i, pattern in enumerate(SPARSE_PATTERNS):
                layers.append(with_sparse(cfg, random_layer(cfg, rng, job.get("blocks", 16)), rng, pattern,
                                          job.get("density", 0.05)))
                if i % 2:
                    layers.append(random_layer(cfg, rng, max(1, job.get("blocks", 16) // 4)))
            jobs.append(Job(kind, layers))
        elif kind == "random":
            jobs.append(Job(kind, [random_layer(cfg, rng, job.get("blocks", 32))
                                   for _ in range(job.get("layers", 3))]))
        elif kind == "corners":
            jobs.append(Job(kind, [corner_layer(cfg, off) for off in (-128, 0, 127)]))
        elif kind == "reset":
            first = random_layer(cfg, rng, RESET_JOB["first"])
            second = random_layer(cfg, rng, RESET_JOB["second"])
            jobs.append(Job(kind, [first, second], RESET_JOB["cut_after"]))
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    return jobs
