"""golden.layout: bit-exact packing (hand-worked bytes), round trips (hypothesis), bad buffers."""

import dataclasses
import re
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sop.golden.files import crc32
from sop.golden.formats import get_format
from sop.golden.hif import DEFAULT_HIF
from sop.golden.hif import hif_format
from sop.golden.layout import (BlockLayout, LayerStream, LayoutError, Sparse, format_id, named_layouts,
                               pack_blocks, pack_layer, unpack_blocks, unpack_layer)

SOP4 = named_layouts()["sop4-g16"]
FP6 = named_layouts()["e2m3-ue4m4-g16"]


def test_named_layouts_cost_what_the_operating_points_say():
    assert SOP4.header_bits == 8 and SOP4.bpw == 4.5 and SOP4.banks == 2
    assert FP6.header_bits == 8 and FP6.bpw == 6.5 and FP6.banks == 1


def test_sop4_block_bytes_by_hand():
    # header: select=1 (bit 7), sign=0 (bit 6), scale code 5 (bits 0-5) -> 0b1000_0101
    hdr = SOP4.make_header(5, 0, 1)
    assert int(hdr) == 0x85
    data = pack_blocks(SOP4, [hdr], [np.arange(16)])
    # codes LSB first: code 0 in the low nibble of byte 1, code 1 in its high nibble, ...
    assert data == bytes([0x85, 0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])


def test_e2m3_block_bytes_by_hand():
    codes = np.zeros((1, 16), dtype=int)
    codes[0, :4] = [0b000001, 0b111111, 0b101010, 0b010101]
    data = pack_blocks(FP6, [0x7C], codes)
    assert len(data) == 13
    # bits 8..13 code 0 = 000001, bits 14..19 code 1 = 111111, bits 20..25 code 2 = 101010,
    # bits 26..31 code 3 = 010101:
    # byte1 = bits 8..15  = c0[0..5] + c1[0..1]        = 0b11_000001 = 0xC1
    # byte2 = bits 16..23 = c1[2..5] + c2[0..3]        = 0b1010_1111 = 0xAF
    # byte3 = bits 24..31 = c2[4..5] + c3[0..5]        = 0b010101_10 = 0x56
    assert data[:4] == bytes([0x7C, 0xC1, 0xAF, 0x56]) and data[4:] == bytes(9)


# -- the format id: what a decoder decodes (docs/formats.md, "The format id") -------------------------
def test_the_format_id_is_the_crc_of_the_documented_json():
    """Computed as docs/formats.md spells it, with zlib alone: another implementation gets the same number,
    in any process (the value is pinned: Python's salted hash() would differ from run to run)."""
    doc = ('{"code_bits":4,"group":16,'
           '"hif":{"bias":5,"bits":10,"ebits":3,"mbits":6,"signed":true,"specials":"finite"},'
           '"scale":{"bias":3,"bits":6,"ebits":3,"mbits":3,"signed":false,"specials":"finite"},'
           '"select_bit":true,"signed_scale":true}')
    assert format_id(SOP4, DEFAULT_HIF) == zlib.crc32(doc.encode("ascii")) == 0xC5ABA8EA


def test_the_format_id_is_equal_for_one_definition_and_differs_for_another():
    """Another name for the same scale, or another point of the layout with other tables: the same id (the
    tables come with LOAD). Same widths, another header (sop4-g16's code width, block, block bytes, banks
    and HIF width, but a selection bit and an unsigned UE3M4 scale), or any field changed: another id."""
    same = BlockLayout(4, 16, dataclasses.replace(get_format("ue3m3"), name="my-ue3m3"), True, True)
    assert format_id(same, hif_format(6)) == format_id(SOP4, DEFAULT_HIF)
    widths = BlockLayout(4, 16, get_format("ue3m4"), signed_scale=False, select_bit=True)
    assert (widths.block_bytes, widths.banks, widths.code_bits, widths.group) == (9, 2, 4, 16)
    others = [widths, BlockLayout(4, 16, get_format("ue3m3b4"), True, True),
              BlockLayout(4, 16, get_format("ue2m4"), True, True), BlockLayout(4, 32, "ue3m3", True, True),
              BlockLayout(4, 16, "ue4m4"), BlockLayout(6, 16, "ue4m4"), BlockLayout(4, 16, "ue4m3", True, False)]
    ids = {format_id(lay, DEFAULT_HIF) for lay in [SOP4, *others]}
    ids |= {format_id(SOP4, hif_format(6, bias=4)), format_id(SOP4, hif_format(5, ebits=4))}   # HIFs of 10 bits
    assert len(ids) == len(others) + 3


def test_header_fields_split_back():
    lay = BlockLayout(4, 16, get_format("ue3m3"), signed_scale=True, select_bit=True)
    hdr = lay.make_header([0, 63, 17], [1, 0, 1], [0, 1, 1])
    assert [x.tolist() for x in lay.split_header(hdr)] == [[0, 63, 17], [1, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="select"):
        FP6.make_header(3, 0, 1)          # FP6 has no selection bit
    # a value that is no integer was truncated (scale code 1.7 packed as 1; an outside probe), as decode's
    # codes were; whole floats are taken, as an index would be
    with pytest.raises(ValueError, match=r"^header scale codes are integers, got 1.7 \(float64\)"):
        lay.make_header([1.7])
    with pytest.raises(ValueError, match=r"^header signs are integers, got 0.5"):
        lay.make_header([1], [0.5])
    assert lay.make_header(np.array([17.0]), 1.0, 1).tolist() == hdr[2:].tolist()
    with pytest.raises(ValueError, match=r"^headers are integers, got 1.5"):
        pack_blocks(lay, [1.5], np.zeros((1, 16), int))
    with pytest.raises(ValueError, match=r"^codes are integers, got 2.25"):
        pack_blocks(lay, [1], np.full((1, 16), 2.25))
    assert pack_blocks(lay, np.array([5.0]), np.ones((1, 16))) == pack_blocks(lay, [5], np.ones((1, 16), int))


LAYOUTS = [BlockLayout(k, g, get_format(s), sign, sel)
           for k in (4, 6) for g in (8, 16, 32, 64)
           for s, sign, sel in (("ue4m4", False, False), ("ue3m3", True, True), ("ue4m3", True, False),
                                ("ue4m3", False, True), ("ue8m0", False, False))]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), layout=st.sampled_from(LAYOUTS), n=st.integers(1, 12))
def test_unpack_inverts_pack(data, layout, n):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    headers = rng.integers(0, 1 << layout.header_bits, n)
    codes = rng.integers(0, 1 << layout.code_bits, (n, layout.group))
    h2, c2 = unpack_blocks(layout, pack_blocks(layout, headers, codes))
    np.testing.assert_array_equal(h2, headers)
    np.testing.assert_array_equal(c2, codes)


def random_stream(rng, layout: BlockLayout, rows=3, blocks_per_row=2, n_sparse=4) -> LayerStream:
    """A random valid stream: any header but a NaN scale code, any finite BF16 residual."""
    cols = blocks_per_row * layout.group
    n = rows * blocks_per_row
    finite_scales = np.flatnonzero(~np.isnan(layout.scale.values))
    headers = layout.make_header(rng.choice(finite_scales, n),
                                 rng.integers(0, 2, n) if layout.signed_scale else 0,
                                 rng.integers(0, 2, n) if layout.select_bit else 0)
    codes = rng.integers(0, 1 << layout.code_bits, (n, layout.group))
    luts = rng.integers(0, 1 << DEFAULT_HIF.bits, (layout.banks, 1 << layout.code_bits))
    idx = np.sort(rng.choice(rows * cols, size=min(n_sparse, rows * cols), replace=False)).astype(np.uint32)
    vals = rng.integers(0, 0xFF00, len(idx)).astype(np.uint16)          # sign, exponent < 0xFF, mantissa
    vals = np.where((vals >> 7 & 0xFF) == 0xFF, vals & 0x807F, vals).astype(np.uint16)
    return LayerStream(layout, DEFAULT_HIF, luts, int(rng.integers(-128, 128)), rows, cols,
                       pack_blocks(layout, headers, codes), Sparse(idx, vals))


def assert_same_stream(a: LayerStream, b: LayerStream):
    assert a.layout == b.layout and a.hif == b.hif and a.offset == b.offset
    assert (a.rows, a.cols, a.blocks) == (b.rows, b.cols, b.blocks)
    np.testing.assert_array_equal(a.luts, b.luts)
    np.testing.assert_array_equal(a.sparse.index, b.sparse.index)
    np.testing.assert_array_equal(a.sparse.value_bf16, b.sparse.value_bf16)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layout=st.sampled_from(LAYOUTS),
       rows=st.integers(1, 5), bpr=st.integers(1, 3), n_sparse=st.integers(0, 6))
def test_unpack_layer_inverts_pack_layer(seed, layout, rows, bpr, n_sparse):
    s = random_stream(np.random.default_rng(seed), layout, rows, bpr, n_sparse)
    assert_same_stream(unpack_layer(pack_layer(s)), s)


def test_every_truncation_is_refused():
    data = pack_layer(random_stream(np.random.default_rng(1), SOP4))
    for n in range(len(data)):
        with pytest.raises(LayoutError):
            unpack_layer(data[:n])


def test_every_single_bit_flip_is_refused():
    data = bytearray(pack_layer(random_stream(np.random.default_rng(2), FP6)))
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(LayoutError):
            unpack_layer(bytes(flipped))


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32(body))


def test_inconsistent_stream_with_valid_checksum_is_refused():
    data = pack_layer(random_stream(np.random.default_rng(3), SOP4))[:-4]
    bad_k = data[:5] + bytes([5]) + data[6:]                      # code width 5
    with pytest.raises(LayoutError, match="code width 5"):
        unpack_layer(_recrc(bad_k))
    with pytest.raises(LayoutError, match="trailing"):
        unpack_layer(_recrc(data + b"\0"))
    with pytest.raises(LayoutError, match="version"):
        unpack_layer(_recrc(data[:4] + bytes([9]) + data[5:]))
    with pytest.raises(LayoutError, match="magic"):
        unpack_layer(b"XXXX" + data[4:])


@pytest.mark.parametrize("version, said", [(0, "an older sop"), (2, "a newer sop")])
def test_a_stream_of_another_version_is_named_so_not_a_checksum_mismatch(version, said):
    """Another version may lay out or check its bytes otherwise: its CRC, checked as this version's, was
    'checksum mismatch: the data is truncated or corrupted', for a stream that is merely of another version."""
    data = pack_layer(random_stream(np.random.default_rng(5), SOP4))
    other = data[:4] + bytes([version]) + data[5:]              # the CRC left as version 1's
    named = f"layer stream version {version}, written by {said} (this one reads version 1)"
    with pytest.raises(LayoutError, match="checksum mismatch: .*; or a " + re.escape(named)):
        unpack_layer(other)                 # (one damaged byte or another version: the line names both)
    with pytest.raises(LayoutError, match="^" + re.escape(named)) as err:
        unpack_layer(_recrc(other))         # its checksum whole: only the version
    assert "checksum" not in str(err.value)


def test_unpack_blocks_refuses_a_partial_block():
    with pytest.raises(LayoutError, match="whole number"):
        unpack_blocks(SOP4, bytes(10))


def test_invalid_layouts_and_streams_are_refused():
    with pytest.raises(ValueError, match="block size 12"):
        BlockLayout(4, 12, get_format("ue4m4"))
    with pytest.raises(ValueError, match="scale format e4m3 is signed: a block scale is an unsigned magnitude"):
        BlockLayout(4, 16, get_format("e4m3"))
    with pytest.raises(ValueError, match="whole bytes"):
        BlockLayout(4, 16, get_format("ue4m3"))            # 7-bit header + 64 bits
    # a scale given by its name is that format; anything else one TypeError (was an AttributeError on
    # `.signed`, a docs walkthrough)
    assert BlockLayout(4, 16, "ue4m4") == BlockLayout(4, 16, get_format("ue4m4"))
    with pytest.raises(TypeError, match="scale must be a format .* not int"):
        BlockLayout(4, 16, 8)
    with pytest.raises(ValueError, match="scale format e4m3 is signed"):
        BlockLayout(4, 16, "e4m3")
    s = random_stream(np.random.default_rng(4), SOP4)
    import dataclasses
    with pytest.raises(ValueError, match="multiple of the block size"):
        pack_layer(dataclasses.replace(s, cols=s.cols + 1))
    with pytest.raises(ValueError, match="offset"):
        pack_layer(dataclasses.replace(s, offset=200))
    with pytest.raises(ValueError, match="strictly increasing"):
        pack_layer(dataclasses.replace(s, sparse=Sparse(np.array([3, 3], np.uint32), np.zeros(2, np.uint16))))


def test_hand_check_catches_msb_first_packing():
    """The hand-worked bytes tell LSB-first from MSB-first packing (an injected bug)."""
    bits = np.concatenate([[1, 0, 1, 0, 0, 0, 0, 1],                      # 0x85 LSB first
                           ((np.arange(16)[:, None] >> np.arange(4)) & 1).ravel()])
    msb_first = np.packbits(bits.astype(np.uint8), bitorder="big").tobytes()
    assert msb_first != pack_blocks(SOP4, [0x85], [np.arange(16)])


# -- crafted streams with valid checksums: nothing may decode to a non-finite value -----------------------

UE8M0 = BlockLayout(4, 16, get_format("ue8m0"))                 # 0xFF is its NaN code


def test_a_nan_scale_code_is_refused_at_pack_and_at_unpack():
    s = random_stream(np.random.default_rng(5), UE8M0, rows=2, n_sparse=0)
    body = bytearray(pack_layer(s)[:-4])
    start = len(body) - len(s.blocks)                          # no sparse entries: the blocks end the body
    body[start + UE8M0.block_bytes] = 0xFF                     # block 1's scale code
    with pytest.raises(LayoutError, match="block 1: scale code 0xff is NaN in ue8m0"):
        unpack_layer(_recrc(bytes(body)))
    import dataclasses
    headers, codes = unpack_blocks(UE8M0, bytes(body[start:]))
    with pytest.raises(ValueError, match="NaN"):
        pack_layer(dataclasses.replace(s, blocks=pack_blocks(UE8M0, headers, codes)))


@pytest.mark.parametrize("bf16", [0x7F80, 0xFF80, 0x7FC1])          # +Inf, -Inf, NaN
def test_a_non_finite_residual_is_refused(bf16):
    s = random_stream(np.random.default_rng(6), SOP4, n_sparse=2)
    body = bytearray(pack_layer(s)[:-4])
    body[-2:] = bf16.to_bytes(2, "little")                       # the last sparse value
    with pytest.raises(LayoutError, match="sparse value 1 .* is not finite"):
        unpack_layer(_recrc(bytes(body)))


@pytest.mark.parametrize("bit", range(2, 8))
def test_a_reserved_flag_bit_is_refused(bit):
    """Byte 7 holds the signed-scale and selection flags (bits 0, 1); the others are reserved: a stream
    setting one is not this format (a bit flip there is caught by the CRC first, so this recomputes it)."""
    data = bytearray(pack_layer(random_stream(np.random.default_rng(8), SOP4))[:-4])
    assert data[7] == 0b11                                          # SOP4: signed scale and selection bit
    data[7] |= 1 << bit
    with pytest.raises(LayoutError, match=r"set reserved bits"):
        unpack_layer(_recrc(bytes(data)))


@pytest.mark.parametrize("bias", [-1, 8, 127, -128])
def test_a_hif_bias_outside_the_documented_range_is_refused(bias):
    data = pack_layer(random_stream(np.random.default_rng(7), SOP4))[:-4]
    at = 4 + 4 + 1 + len(SOP4.scale.name) + 2                  # magic, k g flags version, name, E, M
    assert struct.unpack_from("<b", data, at)[0] == DEFAULT_HIF.bias
    bad = data[:at] + struct.pack("<b", bias) + data[at + 1:]
    with pytest.raises(LayoutError, match=f"HIF bias {bias} out of range"):
        unpack_layer(_recrc(bad))


@pytest.mark.parametrize("scale_code, offset, want32", [((2047 << 4) | 15, 127, -3.4028234663852886e38),
                                                        (15, -128, -0.0)])
def test_a_scale_format_past_float64s_range_decodes_saturated_or_to_a_signed_zero(scale_code, offset, want32):
    """ue11m4b1060 (get_format takes it) under offset +-127 puts products past 2^1024 or below 2^-1074: the
    float32 file output was -Inf (a finite weight never becomes Inf); it saturates, as BF16 does, and a
    value below every float32 is -0. The exact output holds the largest float64 (or float64's rounding)."""
    from sop.golden.decoder import FLOAT64_MAX, decode_layer

    lay = BlockLayout(4, 16, get_format("ue11m4b1060"), signed_scale=True)
    luts = np.zeros((1, 16), np.int64)
    luts[0, 1] = 5 << 6                                          # HIF 1.0
    blocks = pack_blocks(lay, lay.make_header(np.array([scale_code]), np.array([1])), np.ones((1, 16), np.int64))
    s = unpack_layer(pack_layer(LayerStream(lay, DEFAULT_HIF, luts, offset, 1, 16, blocks)))
    f32 = decode_layer(s, dest=np.empty((1, 16), np.float32))
    assert (f32 == want32).all() and np.signbit(f32).all()
    bf16 = decode_layer(s, "bf16")
    assert (bf16 == (-get_format("bf16").max if want32 else 0.0)).all() and np.signbit(bf16).all()
    exact = decode_layer(s)
    assert np.isfinite(exact).all() and np.signbit(exact).all() and (exact == -FLOAT64_MAX).all() == bool(want32)


def test_the_largest_valid_stream_decodes_to_finite_values():
    """Every documented extreme at once (largest HIF, largest scale, offset 127, largest residual)
    decodes to finite values in every output: float64 holds 2^(2 + 15 + 127 + 8) easily."""
    from sop.golden.decoder import decode_layer
    from sop.golden.hif import hif_format

    lay = BlockLayout(4, 16, get_format("ue4m4"))
    hif = hif_format(10, 5, 0)                                  # E5 bias 0: the widest HIF range
    blocks = pack_blocks(lay, [(1 << 8) - 1], [np.arange(16)])
    s = LayerStream(lay, hif, np.full((1, 16), (1 << hif.bits) // 2 - 1), 127, 1, 16, blocks,
                    Sparse(np.array([3], np.uint32), np.array([0x7F7F], np.uint16)))
    s = unpack_layer(pack_layer(s))
    for out in ("exact", "bf16"):
        assert np.isfinite(decode_layer(s, out)).all()
