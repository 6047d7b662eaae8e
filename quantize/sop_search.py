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

from sop.golden.codebooks import FIXED_4BIT, Codebook, get_codebook
from sop.golden.layout import named_layouts

from .blockwise import BankEval, Prepared, assemble, bank_offset, encode, evaluate_bank, prepare
from .dd4 import fit_dd4
from .result import QuantResult
from .sparse import add_sparse

FP6 = "e2m3-ue4m4-g16"
SOP4 = "sop4-g16"


def quantize_fp6(w, act_ms=None, scale_search: int = 2, name: str = "layer") -> QuantResult:
    """The FP6 point ``e2m3-ue4m4-g16``; see the module docstring."""
    enc = encode(w, named_layouts()[FP6], [get_codebook("e2m3")], scale_search, name, act_ms)
    return QuantResult(enc.recon, enc.stream.bits, FP6, enc.stream,
                       extra={"error": enc.error, "scale_search": scale_search})


def acos(ww: float, wq: float, qq: float) -> float:
    """Cosine from its three sums; two zero matrices are identical (1), a zero against a nonzero 0."""
    if ww <= 0 or qq <= 0:
        return 1.0 if ww <= 0 and qq <= 0 else 0.0
    return float(wq / np.sqrt(ww * qq))


class PairSearch:
    """Evaluations of every table at every offset a pair needs, shared across pairs."""

    def __init__(self, prep: Prepared, books: dict[str, Codebook], scale_search: int):
        self.prep, self.books, self.scale_search = prep, books, scale_search
        self.offsets = {n: bank_offset(prep, cb) for n, cb in books.items()}
        self._cache: dict[tuple[str, int], BankEval] = {}
        self.ww = float(prep.ww.sum())

    def add_book(self, name: str, cb: Codebook) -> None:
        self.books[name] = cb
        self.offsets[name] = bank_offset(self.prep, cb)

    def eval(self, name: str, offset: int) -> BankEval:
        key = (name, offset)
        if key not in self._cache:
            self._cache[key] = evaluate_bank(self.prep, self.books[name], offset, self.scale_search)
        return self._cache[key]

    def pair(self, a: str, b: str) -> tuple[float, float, BankEval, BankEval]:
        """(ACos, weighted error, bank A eval, bank B eval) of the pair, blocks choosing the better."""
        off = max(self.offsets[a], self.offsets[b])
        ea, eb = self.eval(a, off), self.eval(b, off)
        use_b = eb.err < ea.err                           # bank A wins a tie, as in encode_layer
        wq = float(np.where(use_b, eb.wq, ea.wq).sum())
        qq = float(np.where(use_b, eb.qq, ea.qq).sum())
        err = float(np.where(use_b, eb.err, ea.err).sum())
        return acos(self.ww, wq, qq), err, ea, eb


def default_pairs(names) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2))


def quantize_sop4(w, act_ms=None, pairs=None, dd4: bool = True, sparse_k: int = 0,
                  scale_search: int = 1, name: str = "layer", dd4_options: dict | None = None) -> QuantResult:
    """The SOP4 point ``sop4-g16`` with the per-layer pair search; see the module docstring.

    ``pairs``: the (bank A, bank B) codebook names to try (default: every pair of
    ``FIXED_4BIT`` + ``"dd4"``). ``sparse_k``: keep that many largest
    activation-weighted residuals as sparse entries (quantize.sparse).
    """
    layout = named_layouts()[SOP4]
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
    search = PairSearch(prep, books, scale_search)
    scores = {}
    best = None

    def score(group):
        nonlocal best
        for a, b in group:
            cos, err, ea, eb = search.pair(a, b)
            scores[f"{a}+{b}"] = (cos, err)
            if best is None or cos > best[0]:
                best = (cos, (a, b), ea, eb)

    score([p for p in pairs if "dd4" not in p])
    if "dd4" in used:
        opts = dict(dd4_options or {})
        if best is not None and "partner" not in opts:
            # Fit DD4 to complement the best fixed pair's bank A, starting from its bank B:
            # the Lloyd iterations then descend that pair's error (quantize.dd4).
            a, b = best[1]
            opts.setdefault("partner", books[a])
            opts.setdefault("init", books[b].values)
        books["dd4"] = fit_dd4(None, layout=layout, prep=prep, **opts)
        search.add_book("dd4", books["dd4"])
        score([p for p in pairs if "dd4" in p])
    cos, (a, b), ea, eb = best
    enc = assemble(prep, [ea, eb])
    stream, recon = enc.stream, enc.recon
    if sparse_k:
        stream, recon = add_sparse(stream, prep.w, recon, sparse_k, act_ms)
    extra = {"acos": cos, "error": enc.error, "pairs": scores,
             "share_b": float(enc.select.mean()), "sparse": len(stream.sparse)}
    if "dd4" in books:
        extra["dd4"] = books["dd4"].values.copy()
    return QuantResult(recon, stream.bits, f"{a}+{b}", stream, extra=extra)
