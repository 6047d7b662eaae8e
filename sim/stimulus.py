"""Stimulus shared by the amaranth.sim tests and the cocotb regression: layers, the host's cycles, coverage.

A ``Layer`` is one layer's worth of decoder input (LUT images, per-layer
offset, block headers and codes); its expected output comes from
hdl.reference, i.e. from golden/ only. ``random_layer`` draws one,
``corner_layer`` covers every code x bank x sign at the scale codes' extremes,
``from_stream`` takes a real quantized layer.

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

from collections.abc import Generator
from dataclasses import dataclass
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

    def writes(self):
        """The host's load sequence: every LUT word, then the offset."""
        out = [("lut", b, a, int(self.luts[b, a])) for b in range(self.luts.shape[0])
               for a in range(self.luts.shape[1])]
        return out + [("offset", self.offset)]

    def expected(self, cfg: DecoderConfig) -> list[list[int]]:
        return reference.expected_beats(cfg, self.luts, self.offset, self.headers, self.codes)


def pad_to_beats(cfg: DecoderConfig, headers, codes):
    """Repeat the last block so the layer fills whole input beats (N > g)."""
    extra = -len(headers) % cfg.blocks_per_beat
    if extra:
        headers = np.concatenate([headers, np.repeat(headers[-1:], extra)])
        codes = np.concatenate([codes, np.repeat(codes[-1:], extra, axis=0)])
    return headers, codes


def from_stream(cfg: DecoderConfig, stream: LayerStream, name: str = "") -> Layer:
    headers, codes = pad_to_beats(cfg, *unpack_blocks(stream.layout, stream.blocks))
    return Layer(np.asarray(stream.luts, dtype=np.int64), stream.offset, headers, codes, name)


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

    ``write``: ``("lut", bank, addr, hif_code)`` or ``("offset", value)``, into the inactive page,
    this cycle only; ``beat``: the input beat offered (``blocks.valid``), its packed blocks as an
    integer (hdl.reference.input_beats), with ``swap``; ``reset``: the synchronous reset, high
    for this cycle.
    """
    write: tuple | None = None
    beat: int | None = None
    swap: bool = False
    reset: bool = False


def host_sequence(cfg: DecoderConfig, layers: list[Layer], rng, *, p_idle: float = 0.0,
                  cut_after: int | None = None) -> Generator[HostCycle, bool | None, None]:
    """The host's cycles for ``layers``; send back whether each cycle's beat was taken.

    Use: ``cycle = next(seq)``, then per clock cycle drive ``cycle``, let the edge pass and
    ``cycle = seq.send(taken)`` (``taken``: the beat offered was accepted at that edge) until
    ``StopIteration``. ``rng`` is anything with ``random()`` (``random.Random``, a numpy
    ``Generator``); it draws the idle cycles.

    1. ``layers[0]``'s tables and offset, one write a cycle (``Layer.writes``);
    2. each layer's beats, the first with ``swap``; before each beat, idle cycles while
       ``rng.random() < p_idle``; a beat is offered until taken. Once a layer's swap beat is
       taken, the next layer's writes go out one a beat beside the stream (into the page the
       stream does not read: docs/hardware.md's rule); those still pending when the layer ends
       go out before the next layer's swap beat;
    3. with ``cut_after``, the first layer stops after that many beats (or after
       ``4 * cut_after * beats_per_block`` cycles without a beat taken), then one reset cycle
       with the last beat still offered, then the other layers from a fresh load. Output
       owed for the cut layer is lost: a consumer holds its output stalled until the reset.
    """
    pending = list(layers[0].writes()) if layers else []
    last = HostCycle()
    for li, layer in enumerate(layers):
        cut = cut_after is not None and li == 0
        for w in pending:                          # the tables must be in before their swap beat
            yield HostCycle(write=w)
        pending = []
        beats = reference.input_beats(cfg, layer.headers, layer.codes)
        budget = 4 * cut_after * cfg.beats_per_block if cut else None
        for bi, beat in enumerate(beats[:cut_after] if cut else beats):
            while rng.random() < p_idle:
                yield HostCycle()
            last = HostCycle(write=pending.pop(0) if pending else None, beat=beat, swap=bi == 0)
            taken = yield last
            while not taken and (budget is None or budget > 1):
                budget = None if budget is None else budget - 1
                last = HostCycle(beat=beat, swap=bi == 0)
                taken = yield last
            if not taken:                          # the cut layer's budget ran out
                break
            if bi == 0 and li + 1 < len(layers) and not cut:
                pending = list(layers[li + 1].writes())
        if cut:
            yield HostCycle(beat=last.beat, swap=last.swap, reset=True)
            pending = list(layers[1].writes()) if len(layers) > 1 else []


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
                layers.append(Layer(v.luts, v.offset, *pad_to_beats(cfg, v.headers, v.codes), v.name))
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
