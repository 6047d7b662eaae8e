"""The decoder as a transaction-level model on golden/: table writes, offsets, beats with swap, reset.

``DecoderModel(cfg)`` is what the cocotb bench's input monitor feeds
(sim/tb_decoder.py): it keeps the two pages of tables and offsets and the
page pointer as docs/hardware.md describes them, and turns each input beat
the decoder accepts into the output beats it owes, as packed integers (the
bit patterns of ``values.payload``). Every value comes from golden/ through
hdl.reference.lane_words; nothing here re-implements a number format.

Transactions, in the order of one clock edge:

* ``beat(blocks, swap)``: a ``blocks`` handshake; ``swap`` makes this beat and
  those after it read the other page. Returns the beat's output beats.
* ``write(bank, addr, code)`` / ``set_offset(value)``: a table write or an
  offset write into the page that was inactive when the edge came: a write in
  the cycle of a swap beat does not reach that beat (the table read comes
  first: hdl/decoder.py), so ``beat`` is applied before the writes of the
  same edge.
* ``reset()``: the page pointer back to page 0 (tables and offsets keep
  their contents, as LUT RAM does; the host loads both before its first
  swap beat anyway).
* with sparse residuals (``cfg.residuals``): ``set_offset(value, layer_sparse)``
  also writes the page's flag, and ``entry(index, value)`` is a sparse entry
  the decoder took. A beat of a layer with entries owes output beats whose
  values depend on entries that may come after it: ``beat`` returns them as
  functions, which the scoreboard calls when the output arrives (by then the
  decoder has taken every entry of that beat: it holds a chunk until it has).
  Their values are golden's, the layer's residuals added to the exact products
  (hdl.residual.expected_words).

The lane words of a page are tabulated once, for every header and code (each
code of a block decodes on its own: golden.decoder), in one golden call
when a beat first reads the page after it was written; a beat then costs a
table look-up. (Layouts whose header and code space is too large for a table
fall back to one golden call per beat.)
"""

from __future__ import annotations

import numpy as np

from sop.golden.layout import unpack_blocks
from sop.hdl import reference
from sop.hdl.config import DecoderConfig

TABLE_LIMIT = 1 << 20            # header x code entries of a page's table


class DecoderModel:
    def __init__(self, cfg: DecoderConfig):
        self.cfg = cfg
        lay = cfg.layout
        self.luts = np.zeros((2, lay.banks, 1 << lay.code_bits), dtype=np.int64)
        self.offsets = [0, 0]
        self.active = 0
        self._tables: list[np.ndarray | None] = [None, None]
        self.lane_bits = reference.lane_word_bits(cfg)
        self.beat_bytes = cfg.blocks_per_beat * lay.block_bytes
        self.tabulate = (1 << (lay.header_bits + lay.code_bits)) <= TABLE_LIMIT
        self.last: tuple[np.ndarray, np.ndarray] | None = None     # (headers, codes) of the last beat
        self.layer_sparse = [0, 0]          # per page: the layer has sparse entries
        self.entries: dict[int, int] = {}   # the current layer's entries taken so far: index -> BF16
        self.position = 0                   # the current layer's values before the next beat

    # -- transactions ----------------------------------------------------------------------
    def reset(self) -> None:
        self.active = 0

    def write(self, bank: int, addr: int, code: int) -> None:
        page = 1 - self.active
        self.luts[page, bank, addr] = code
        self._tables[page] = None

    def set_offset(self, value: int, layer_sparse: int = 0) -> None:
        page = 1 - self.active
        value &= 0xFF
        self.offsets[page] = value - 256 if value >= 128 else value
        self.layer_sparse[page] = int(layer_sparse)
        self._tables[page] = None

    def entry(self, index: int, value: int) -> None:
        self.entries[int(index)] = int(value)

    def beat(self, blocks: int, swap: bool) -> list:
        """The output beats (packed lane words, lane 0 in the low bits) of one input beat;
        its (headers, codes) are left in ``last``. In a layer with sparse entries each is a
        function that computes it from the entries taken by then."""
        if swap:
            self.active ^= 1
            self.entries, self.position = {}, 0
        headers, codes = self.last = self.blocks_of(blocks)
        page, start = self.active, self.position
        self.position += codes.size
        if self.layer_sparse[page]:
            # this layer's own entries (a swap starts a new dict; an owed beat is often computed
            # after the next layer has begun)
            n, w, entries = self.cfg.lanes, self.lane_bits, self.entries
            luts, offset = self.luts[page].copy(), self.offsets[page]     # the page may be reloaded by then
            return [lambda j=j: self._sparse_beat(luts, offset, entries, headers, codes, start, j, n, w)
                    for j in range(0, codes.size, n)]
        if self.tabulate:
            words = self._table(page)[headers[:, None], codes].ravel()
        else:
            words = reference.lane_words(self.cfg, self.luts[page], self.offsets[page], headers, codes)
        n, w = self.cfg.lanes, self.lane_bits
        return [sum(int(v) << (i * w) for i, v in enumerate(words[j:j + n])) for j in range(0, len(words), n)]

    def _sparse_beat(self, luts, offset, entries, headers, codes, start, j, n, w) -> int:
        from sop.hdl.residual import expected_words

        hit = {i - start: v for i, v in entries.items() if start <= i < start + codes.size}
        idx = np.array(sorted(hit), dtype=np.int64)
        if not len(idx):      # the layer's residual is +0 here: -0 products become +0
            idx, hit = np.array([0]), {0: 0}
        words = expected_words(self.cfg, luts, offset, headers, codes, idx, [hit[i] for i in idx.tolist()])
        return sum(int(v) << (i * w) for i, v in enumerate(words[j:j + n]))

    # -- helpers -----------------------------------------------------------------------------
    def blocks_of(self, blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """(headers, codes) of one input beat's packed blocks."""
        return unpack_blocks(self.cfg.layout, int(blocks).to_bytes(self.beat_bytes, "little"))

    def _table(self, page: int) -> np.ndarray:
        """The lane word of every (header, code) on ``page``: one golden call, kept until a write."""
        if self._tables[page] is None:
            lay = self.cfg.layout
            n_codes, g = 1 << lay.code_bits, lay.group
            per = -(-n_codes // g)                              # blocks holding every code once
            codes = np.resize(np.arange(n_codes), (per, g))     # (the last block padded by wrapping)
            headers = np.arange(1 << lay.header_bits)
            words = reference.lane_words(self.cfg, self.luts[page], self.offsets[page],
                                         np.repeat(headers, per), np.tile(codes, (len(headers), 1)))
            table = np.zeros((len(headers), n_codes), dtype=np.int64)
            table[:, codes.ravel()] = np.asarray(words, dtype=np.int64).reshape(len(headers), per * g)
            self._tables[page] = table
        return self._tables[page]
