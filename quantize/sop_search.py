"""The SOP search: the FP6 point and the 4.5 bpw SOP4 point, per layer, into golden layer streams.

``quantize_fp6(w, act_ms)`` -> ``e2m3-ue4m4-g16``: E2M3 codes, UE4M4 block scales
with the per-layer power-of-two offset, 6.5 bpw. Per block the scale code is
searched among the covering code and ``scale_search`` neighbours each side (not
only rounded up from the block maximum), keeping the lowest activation-weighted
squared error.

``quantize_sop4(w, act_ms)`` -> ``sop4-g16``: 8-bit header (selection bit, scale
sign, UE3M3 scale) + 16 x 4-bit codes, 4.5 bpw plus the two LUT images and the
offset. Per layer it tries every pair of codebooks drawn from the fixed tables
``FIXED_4BIT`` and the layer's fitted DD4 (quantize.dd4); per block, both tables
of the pair, both scale signs and the covering scale code +- ``scale_search``,
keeping the lowest activation-weighted squared error
``sum_j a_j^2 (w_j - q_j)^2``; per layer, the pair with the highest ACos wins:

    ACos = <W diag(a), Q diag(a)> / (|W diag(a)| |Q diag(a)|),  a_j = sqrt(act_ms_j)

(flattened; ``a = 1`` without calibration). The search is exhaustive over the
pairs and exact, with no pruning: a pair's per-block choice is the minimum of the
two tables' own best candidates (evaluated at the pair's offset, the larger of the
two tables' offsets), so each table is evaluated once per offset it needs and
every pair is then scored from the per-block errors and the per-block terms of
ACos. The winning pair's stream is bit for bit what ``blockwise.encode_layer``
gives for that pair (a test checks it). An ACos tie goes to the earlier pair
(``FIXED_4BIT`` order, DD4 pairs last).

Memory: the pairs are scored in one pass over the layer (``score_pairs``), batch
by batch of blocks: every table is evaluated on the batch (per-block numbers that depend on
the block alone: ``evaluate_bank``'s bits, on any ``--device``), each pair takes its
per-block minimum, and the pair's sums of ``wq``, ``qq`` and error are numpy's
pairwise sums of the whole layer reproduced segment by segment (``StreamSums``):
every score is the bits ``np.sum`` of whole-layer arrays gives. Kept per layer:
each evaluation's candidate index (1 byte per block), each pair's choice of bank
(1 bit per block) and, for the DD4 pairs scored after the fit, each fixed
table's per-block error and ``qq`` at the offset DD4 most likely needs (that of
a table ending at -1 and +1; another offset is evaluated again).

DD4 is fitted after the fixed pairs are scored: as bank B next to the best fixed
pair's bank A, starting from that pair's bank B, so that its Lloyd iterations
descend the error of a pair that is already the best fixed one (quantize.dd4);
then every pair with DD4 is scored like the others. docs/sop.md has the
measurements behind these choices.

Both return ``QuantResult(recon, bits, choice, stream)`` where ``recon`` equals
``golden.decoder.decode_layer(stream)`` bit for bit (computed by the encoder from
the exact products, which the tests compare with the golden decode of the
packed and unpacked stream), and ``bits = stream.bits`` (blocks, LUT images,
offset byte, sparse entries).
"""

from __future__ import annotations

import itertools

import numpy as np

from sop.golden.codebooks import FIXED_4BIT, get_codebook
from sop.golden.layout import BlockLayout
from sop.golden.points import OperatingPoint, get_point

from . import device
from .blockwise import (BankEvaluator, Prepared, assemble, bank_offset, choose_offset, encode, prepare,
                        run_chunks)
from .dd4 import fit_dd4
from .metrics import cosine
from .result import QuantResult
from .sparse import add_sparse

FP6 = "e2m3-ue4m4-g16"
SOP4 = "sop4-g16"


def quantize_point(w, point: OperatingPoint, act_ms=None, name: str = "layer", **kw) -> QuantResult:
    """Any operating point (golden/points.py), by its ``search``: ``"blockwise"`` encodes
    with the point's fixed tables (``quantize_blockwise``), ``"pair"`` runs the SOP pair
    search (``quantize_sop4``) on the point's layout."""
    if point.search == "pair":
        return quantize_sop4(w, act_ms, name=name, layout=point.layout, **kw)
    return quantize_blockwise(w, point, act_ms, name=name, **kw)


def quantize_blockwise(w, point: OperatingPoint, act_ms=None, scale_search: int = 2,
                       name: str = "layer") -> QuantResult:
    """A point with fixed tables: the block encoder with the activation-weighted scale search."""
    # the tables in the point's HIF: the HIF its decoder is built for (hdl.config.named_configs)
    enc = encode(w, point.layout, [get_codebook(c, point.hif) for c in point.codebooks], scale_search, name, act_ms)
    return QuantResult(enc.recon, enc.stream.bits, point.name, enc.stream,
                       extra={"error": enc.error, "scale_search": scale_search})


def quantize_fp6(w, act_ms=None, scale_search: int = 2, name: str = "layer") -> QuantResult:
    """The FP6 point ``e2m3-ue4m4-g16``; see the module docstring."""
    return quantize_blockwise(w, get_point(FP6), act_ms, scale_search, name)


#: Blocks per batch of the pair search (every table's evaluation of one batch is held at once).
BATCH_BLOCKS = 1 << 14
#: Largest node of numpy's pairwise-summation tree that the pair search sums in one call.
SEGMENT_BLOCKS = 1 << 13


def _pairwise_plan(n: int, most: int = SEGMENT_BLOCKS) -> tuple[list[tuple[int, int]], object]:
    """numpy's pairwise summation of ``n`` contiguous float64 (``np.sum``), cut into segments.

    ``np.sum(x)`` of a contiguous array is ``0.0 + pw(x)`` where ``pw`` adds runs of at most
    128 with 8 accumulators and, above 128, splits ``n`` at ``n2 = n // 2 - (n // 2) % 8`` and
    adds ``pw(left) + pw(right)``. Descending that recursion until a node has at most ``most``
    (>= 128) elements gives segments whose ``np.sum`` is their ``pw`` (up to the sign of a zero,
    which the final ``0.0 +`` removes) and a tree of nested (left, right) segment indices that
    combines them in numpy's order: the sum is the same bits as ``np.sum`` of the whole."""
    segs: list[tuple[int, int]] = []

    def build(start: int, m: int):
        if m <= most:
            segs.append((start, start + m))
            return len(segs) - 1
        n2 = m // 2
        n2 -= n2 % 8
        return (build(start, n2), build(start + n2, m - n2))

    return segs, build(0, n)


class StreamSums:
    """``np.sum`` of each row of a (Q, n) float64 array, bit for bit, fed in column batches."""

    def __init__(self, q: int, n: int, most: int = SEGMENT_BLOCKS):
        self.segs, self.tree = _pairwise_plan(n, max(128, most))
        self.sums = np.zeros((len(self.segs), q))
        self.parts: list[tuple[int, np.ndarray]] = []    # (first column, columns) not yet summed
        self.end = 0                 # columns pushed so far
        self.next = 0                # the first segment not yet summed

    def push(self, vals: np.ndarray) -> None:
        """Columns ``end:end + vals.shape[1]``; every segment they complete is summed. A segment
        within one batch is summed in place; one across batches from a copy of its own columns
        (at most ``most``), so no batch is copied whole."""
        if vals.shape[1]:
            self.parts.append((self.end, vals))
            self.end += vals.shape[1]
        while self.next < len(self.segs) and self.segs[self.next][1] <= self.end:
            a, b = self.segs[self.next]
            cols = [p[:, max(a, s) - s:min(b, s + p.shape[1]) - s] for s, p in self.parts
                    if s < b and a < s + p.shape[1]]
            self.sums[self.next] = np.sum(cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1), axis=1)
            self.next += 1
            # a batch whose columns are all summed is let go
            while self.parts and self.parts[0][0] + self.parts[0][1].shape[1] <= b:
                self.parts.pop(0)

    def total(self) -> np.ndarray:
        self.push(np.zeros((self.sums.shape[1], 0)))
        if self.next != len(self.segs):
            raise RuntimeError("pair search: blocks missing from the sums")

        def value(node):
            return self.sums[node] if isinstance(node, int) else value(node[0]) + value(node[1])

        return 0.0 + value(self.tree)


class _Source:
    """One (table, offset) of the pair search: evaluated in the stream, or given (kept arrays)."""

    def __init__(self, ev: BankEvaluator, keep: bool = False):
        self.ev, self.keep = ev, keep
        shape = ev.prep.blocks.shape[:2]
        self.k = np.empty(shape, dtype=np.uint8)     # the candidate of each block (C <= 255)
        kept = np.empty((2,) + shape) if keep else None      # one allocation: freed as one
        self.err, self.qq = (kept[0], kept[1]) if keep else (None, None)
        self.evaluated = False


def score_pairs(prep: Prepared, sources: list[_Source], pairs: list[tuple[int, int]]):
    """(ACos, weighted error) of every pair of sources, and per pair the blocks that take bank B.

    Works batch by batch of blocks: every source not yet evaluated is evaluated on the batch
    (the per-block results are ``evaluate_bank``'s bits; a table at a second offset takes the
    first one's results on the blocks where its candidates are the same scales and searches the
    others, ``BankEvaluator.reuse``); a pair's per-block choice is the better of its two banks (A on a tie, as
    ``merge_banks``); the sums of the chosen ``wq``, ``qq`` and error are numpy's pairwise
    sums over the whole layer (``StreamSums``), so every score is what ``np.sum`` of the
    whole-layer arrays gives. The choices are kept as bits (``np.packbits``)."""
    fresh = [s for s in sources if not s.evaluated]
    rows, bpr = prep.blocks.shape[:2]
    n = rows * bpr
    cand = {s.ev.candidates for s in sources}
    if len(cand) != 1:
        raise ValueError("every source of a pair search needs the same candidates")
    chunks = prep.eval_chunks(cand.pop())
    batches, cur, size = [], [], 0
    for sl in chunks:
        cur.append(sl)
        size += (sl.stop - sl.start) * bpr
        if size >= BATCH_BLOCKS:
            batches.append(cur)
            cur, size = [], 0
    if cur:
        batches.append(cur)
    sums = StreamSums(3 * len(pairs), n)
    masks: list[list[tuple[np.ndarray, int]]] = [[] for _ in pairs]
    for batch in batches:
        r0, r1 = batch[0].start, batch[-1].stop
        nb = (r1 - r0) * bpr
        # per source (wq, qq, err) of the batch's blocks, in the order a pair's sums take them;
        # the chunks write err and qq in place
        stacks = {id(s): np.empty((3, r1 - r0, bpr)) for s in fresh}
        local = {i: (st[2], st[1]) for i, st in stacks.items()}

        def work(sl):
            loc = slice(sl.start - r0, sl.stop - r0)
            done: dict = {}                  # twin key -> (evaluator, its results) on these rows
            for s in fresh:
                twin = done.get(s.ev.twin_key)
                # the same table at another offset: its results where the scales are the same
                got = None if twin is None or device.on_torch() else s.ev.reuse(twin[0], twin[1], sl)
                if got is None:
                    got = s.ev.chunk(sl)[:3]
                    done.setdefault(s.ev.twin_key, (s.ev, got))
                err, qq, k = got
                local[id(s)][0][loc], local[id(s)][1][loc] = err, qq
                s.k[sl] = k
                if s.keep:
                    s.err[sl], s.qq[sl] = err, qq

        for s in fresh:
            s.ev.prime(r0, r1)
        run_chunks(work, batch)
        rs = slice(r0, r1)
        ww = prep.ww[rs]
        vals = {}
        for s in sources:
            st = stacks.get(id(s))
            if st is None:                                          # kept from an earlier scoring
                st = np.empty((3, r1 - r0, bpr))
                st[2], st[1] = s.err[rs], s.qq[rs]
            np.add(ww, st[1], out=st[0])                            # BankEval.wq, block by block:
            st[0] -= st[2]                                          # (ww + qq - err) / 2
            st[0] /= 2
            vals[id(s)] = st
        out = np.empty((3 * len(pairs), nb))
        for p, (ia, ib) in enumerate(pairs):
            ea, eb = vals[id(sources[ia])], vals[id(sources[ib])]
            use_b = eb[2] < ea[2]                                   # bank A wins a tie, as in encode_layer
            dst = out[3 * p:3 * p + 3].reshape(ea.shape)            # wq, qq, err of the chosen bank
            np.copyto(dst, ea)
            np.copyto(dst, eb, where=use_b)
            masks[p].append((np.packbits(use_b.reshape(-1)), nb))
        vals = local = stacks = None       # this batch's arrays go before the next one
        sums.push(out)
        del out
    for s in fresh:
        s.evaluated = True
    prep._batch_idx.clear()
    tot = sums.total()
    ww = float(prep.ww.sum())
    # the cosine does not see the error weights' scale; the error is given back at the caller's (Inf past
    # float64's range: the sop-budget knapsack, which adds errors at that scale, refuses it)
    with np.errstate(over="ignore"):
        scores = [(cosine(float(tot[3 * p]), ww, float(tot[3 * p + 1])), float(np.ldexp(tot[3 * p + 2], prep.a_exp)))
                  for p in range(len(pairs))]
    return scores, masks


def unpack_select(prep: Prepared, mask: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The (rows, bpr) 0/1 bank selection from ``score_pairs``' packed bits."""
    parts = [np.unpackbits(m, count=c) for m, c in mask]
    sel = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return sel.reshape(prep.blocks.shape[:2])


def default_pairs(names) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2))


def quantize_sop4(w, act_ms=None, pairs=None, dd4: bool = True, sparse_k: int = 0,
                  scale_search: int = 1, name: str = "layer", dd4_options: dict | None = None,
                  layout: BlockLayout | None = None) -> QuantResult:
    """The SOP4 point ``sop4-g16`` with the per-layer pair search; see the module docstring.

    ``pairs``: the (bank A, bank B) codebook names to try (default: every pair of
    ``FIXED_4BIT`` + ``"dd4"``). ``sparse_k``: keep that many largest
    activation-weighted residuals as sparse entries (quantize.sparse). ``layout``:
    another 4-bit layout with a selection bit (default the point's).
    """
    layout = layout or get_point(SOP4).layout
    prep = prepare(w, layout, act_ms, name)
    names = list(FIXED_4BIT) + (["dd4"] if dd4 else [])
    pairs = default_pairs(names) if pairs is None else [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("no codebook pair to search")
    for a, b in pairs:
        if a == b:
            raise ValueError(f"pair ({a}, {b}) uses one table twice")
    used = {n for p in pairs for n in p}
    books = {n: get_codebook(n) for n in sorted(used - {"dd4"})}
    offsets = {n: bank_offset(prep, cb) for n, cb in books.items()}
    sources: dict[tuple[str, int], _Source] = {}
    with_dd4 = {n for p in pairs if "dd4" in p for n in p} - {"dd4"}
    # The DD4 pairs come after the fixed ones, at max(offset of X, offset of DD4); DD4 ends at
    # +1 and near -1, so its offset is most likely that of a table ending at -1 and +1 (the
    # offset of NF4): each such X is kept whole from the fixed pairs at that offset, to be
    # scored against DD4 without a second evaluation (any other is evaluated again).
    guess = choose_offset(layout, max(max(float(prep.bmax[sl].max()), -float(prep.bmin[sl].min()), 0.0)
                                      for sl in prep.chunks_for(1))) if prep.bmax.size else 0
    keep_at = {n: max(offsets[n], guess) for n in with_dd4 if n in offsets}

    def source(name, off, keep=False):
        if (name, off) not in sources:
            ev = BankEvaluator(prep, books[name], off, scale_search, cached=False)
            sources[(name, off)] = _Source(ev, keep)
        return sources[(name, off)]

    scores = {}
    best = None

    def score(group):
        # every pair of the group at once, in one pass over the layer; then in order, as before
        nonlocal best
        if not group:
            return
        keys = [(n, max(offsets[a], offsets[b])) for a, b in group for n in (a, b)]
        srcs = [source(n, off, keep=keep_at.get(n) == off) for n, off in keys]
        order = list(dict.fromkeys(id(s) for s in srcs))
        uniq = [next(s for s in srcs if id(s) == i) for i in order]
        for s in uniq:
            if s.evaluated and not s.keep:       # scored before and not kept: evaluate it again
                s.evaluated = False
                if s.k is None:
                    s.k = np.empty(prep.blocks.shape[:2], dtype=np.uint8)
        idx = [order.index(id(s)) for s in srcs]
        res, masks = score_pairs(prep, uniq, [(idx[2 * i], idx[2 * i + 1]) for i in range(len(group))])
        for (a, b), (cos, err), mask, i in zip(group, res, masks, range(len(group))):
            scores[f"{a}+{b}"] = (cos, err)
            if best is None or cos > best[0]:
                best = (cos, (a, b), (keys[2 * i], keys[2 * i + 1]), mask, err)

    score([p for p in pairs if "dd4" not in p])
    if best is not None:                   # of the fixed tables' choices, only the best pair's can win
        for key, src in sources.items():
            if not src.keep and key not in best[2]:
                src.k = None
    if "dd4" in used:
        opts = dict(dd4_options or {})
        if best is not None and "partner" not in opts:
            # Fit DD4 to complement the best fixed pair's bank A, starting from its bank B:
            # the Lloyd iterations then descend that pair's error (quantize.dd4).
            a, b = best[1]
            opts.setdefault("partner", books[a])
            opts.setdefault("init", books[b].values)
        books["dd4"] = fit_dd4(None, layout=layout, prep=prep, **opts)
        offsets["dd4"] = bank_offset(prep, books["dd4"])
        score([p for p in pairs if "dd4" in p])
    cos, (a, b), (ka, kb), mask, err = best
    best = None
    select = unpack_select(prep, mask)
    ea, eb = (sources[key].ev.from_choices(sources[key].k) for key in (ka, kb))
    sources.clear()                        # only the winning pair's choices are needed now
    enc = assemble(prep, [ea, eb], select=select)
    stream, recon = enc.stream, enc.recon
    if sparse_k:
        stream, recon = add_sparse(stream, prep.w, recon, sparse_k, act_ms)
    # the winning pair's error sum is the encoded layer's (the same blocks, the same np.sum)
    extra = {"acos": cos, "error": err, "pairs": scores,
             "share_b": float(enc.select.mean()), "sparse": len(stream.sparse)}
    if "dd4" in books:
        extra["dd4"] = books["dd4"].values.copy()
    return QuantResult(recon, stream.bits, f"{a}+{b}", stream, extra=extra)
