"""golden.decoder: hand-worked cases, a float reference, BF16 rounding, and injected bugs caught."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_blocks, decode_layer, product_fields
from sop.golden.formats import get_format
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import BlockLayout, LayerStream, Sparse, named_layouts, pack_blocks, unpack_blocks
from sop.quantize.blockwise import encode_layer

SOP4 = named_layouts()["sop4-g16"]
FP6 = named_layouts()["e2m3-ue4m4-g16"]


def float_reference(s: LayerStream) -> np.ndarray:
    """The decoder written as plain float arithmetic, independently of product_fields."""
    headers, codes = unpack_blocks(s.layout, s.blocks)
    scale_code, sign, select = s.layout.split_header(headers)
    entry = s.hif.decode(s.luts[select[:, None], codes])
    scale = s.layout.scale.decode(scale_code) * 2.0 ** s.offset * np.where(sign == 1, -1.0, 1.0)
    out = (entry * scale[:, None]).reshape(s.rows, s.cols)
    flat = out.reshape(-1)
    flat[s.sparse.index.astype(np.int64)] += get_format("bf16").decode(s.sparse.value_bf16)
    return out


def random_stream(seed: int, layout: BlockLayout, rows=4, cols=64, offset=-3, n_sparse=0) -> LayerStream:
    rng = np.random.default_rng(seed)
    n = rows * cols // layout.group
    scale_codes = rng.integers(0, 1 << layout.scale.bits, n)
    finite = np.isfinite(layout.scale.values)
    scale_codes = np.where(finite[scale_codes], scale_codes, 1)
    headers = layout.make_header(scale_codes, rng.integers(0, 2, n) * layout.signed_scale,
                                 rng.integers(0, 2, n) * layout.select_bit)
    codes = rng.integers(0, 1 << layout.code_bits, (n, layout.group))
    luts = rng.integers(0, 1 << DEFAULT_HIF.bits, (layout.banks, 1 << layout.code_bits))
    idx = np.sort(rng.choice(rows * cols, n_sparse, replace=False)).astype(np.uint32)
    vals = get_format("bf16").encode(rng.standard_normal(n_sparse) * 0.01)
    return LayerStream(layout, DEFAULT_HIF, luts, offset, rows, cols,
                       pack_blocks(layout, headers, codes), Sparse(idx, vals))


def mismatches(decoded: np.ndarray, s: LayerStream) -> int:
    return int((decoded != float_reference(s)).sum())


def test_hand_worked_sop4_block():
    # bank B = NF4 (select 1); code 15 is NF4's +1.0 -> HIF 0.101.000000 (e = 5 = bias, m = 0)
    nf4, sh4 = get_codebook("nf4"), get_codebook("sh4")
    assert nf4.hif_codes[15] == 0b0_101_000000
    luts = np.stack([sh4.hif_codes, nf4.hif_codes])
    # scale UE3M3 code 0b011_010: (1 + 2/8) * 2^(3-3) = 1.25; sign 1; offset -3
    # value = -(1.0 * 1.25 * 2^-3) = -0.15625
    hdr = SOP4.make_header(0b011010, 1, 1)
    codes = np.full((1, 16), 15)
    codes[0, 1] = 7                                     # NF4 code 7 is 0.0 -> -0.0
    out = decode_blocks(DEFAULT_HIF, luts, SOP4, -3, [hdr], codes)
    assert out[0, 0] == -0.15625 and out[0, 1] == 0 and np.signbit(out[0, 1])
    sign, sig, exp, _ = product_fields(DEFAULT_HIF, luts, SOP4, -3, [hdr], codes)
    # integer datapath: HIF significand 1.000000b = 64, scale significand 1.010b = 10,
    # exponent (5 - 5 - 6) + (3 - 3 - 3) - 3 = -12: 640 * 2^-12 = 0.15625
    assert (sign[0, 0], sig[0, 0], exp[0, 0]) == (1, 640, -12)


def test_hand_worked_fp6_subnormals():
    # E2M3 code 1 = 0.125 (subnormal element); UE4M4 code 0x01 = subnormal 1/16 * 2^(1-7) = 2^-10
    luts = get_codebook("e2m3").hif_codes[None, :]
    out = decode_blocks(DEFAULT_HIF, luts, FP6, 0, [0x01], np.ones((1, 16), int))
    assert np.all(out == 2.0 ** -13)
    # scale code 0 is zero: the block decodes to zero whatever its codes
    assert np.all(decode_blocks(DEFAULT_HIF, luts, FP6, 5, [0x00], np.full((1, 16), 31)) == 0)


@pytest.mark.parametrize("layout", [SOP4, FP6, BlockLayout(4, 32, get_format("ue8m0")),
                                    BlockLayout(6, 8, get_format("ue4m3"), signed_scale=True)],
                         ids=["sop4", "fp6", "ue8m0-g32", "ue4m3-signed-g8"])
@pytest.mark.parametrize("seed", range(3))
def test_exact_output_equals_float_reference(layout, seed):
    s = random_stream(seed, layout, offset=[-3, 0, 7][seed], n_sparse=5)
    assert mismatches(decode_layer(s), s) == 0


def test_bf16_output_is_the_exact_value_rounded_once():
    s = random_stream(11, SOP4, rows=8, offset=-20)
    exact = decode_layer(s, "exact")
    # the oracle: ml_dtypes' RNE cast (exact products have < 24 bits, so float32 is exact too)
    expect = exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(decode_layer(s, "bf16"), expect)
    assert (decode_layer(s, "bf16") != exact).any()       # rounding actually happened


def test_bf16_subnormal_outputs():
    s = random_stream(12, FP6, offset=-130)
    out = decode_layer(s, "bf16")
    bf16 = get_format("bf16")
    np.testing.assert_array_equal(out, bf16.quantize(decode_layer(s, "exact")))
    tiny = (out != 0) & (np.abs(out) < 2.0 ** -126)
    assert tiny.any()                                     # subnormals are kept, not flushed


def test_nan_scale_code_decodes_to_nan():
    lay = BlockLayout(4, 32, get_format("ue8m0"))
    out = decode_blocks(DEFAULT_HIF, get_codebook("fp4").hif_codes[None], lay, 0, [255, 127],
                        np.ones((2, 32), int))
    assert np.isnan(out[0]).all() and np.all(out[1] == 0.5)


def test_sparse_residual_is_added_before_rounding():
    s = random_stream(13, SOP4, n_sparse=3)
    plain = dataclasses.replace(s, sparse=Sparse())
    diff = (decode_layer(s) - decode_layer(plain)).reshape(-1)
    expect = np.zeros_like(diff)
    expect[s.sparse.index] = get_format("bf16").decode(s.sparse.value_bf16)
    np.testing.assert_array_equal(diff, expect)


def test_a_dest_of_another_dtype_than_float64_or_float32_is_refused():
    # An outside probe: dest=float16 made a weight past 65504 Inf (numpy's cast), and dest=bfloat16 rounded
    # through float32 first (ml_dtypes' cast): a product on a BF16 tie plus a residual 2^-30 of it, whose
    # exact sum rounds up (out="bf16": 0.00872802734375), came back rounded down to the tie's even neighbour.
    big = np.full((1, 16), 70000.0)
    s16 = encode_layer(big, SOP4, [get_codebook("fp4"), get_codebook("nf4")])
    with pytest.raises(ValueError, match="dest is float16: decode_layer writes float64 or float32"):
        decode_layer(s16, dest=np.empty((1, 16), np.float16))
    luts = np.zeros((2, 16), np.int64)
    luts[0, 1] = 19                                  # HIF 19 x UE3M3 15 = 0.008697509765625, a BF16 tie
    codes = np.zeros((1, 16), np.int64)
    codes[0, 0] = 1
    tie = DEFAULT_HIF.values[19] * SOP4.scale.values[15]
    residual = Sparse(np.array([0], np.uint32), get_format("bf16").encode([tie * 2.0 ** -30]).astype(np.uint16))
    s = LayerStream(SOP4, DEFAULT_HIF, luts, 0, 1, 16, pack_blocks(SOP4, SOP4.make_header([15]), codes), residual)
    assert decode_layer(s, "bf16")[0, 0] == 0.00872802734375
    with pytest.raises(ValueError, match="dest is bfloat16"):
        decode_layer(s, dest=np.empty((1, 16), ml_dtypes.bfloat16))
    np.testing.assert_array_equal(decode_layer(s, dest=np.empty((1, 8))), decode_layer(s)[:, :8])


# -- the checker catches injected bugs ------------------------------------------------------

def test_reference_check_catches_a_flipped_lut_bit():
    s = random_stream(21, SOP4)
    broken_luts = s.luts.copy()
    broken_luts[1, 9] ^= 1 << 3                           # one mantissa bit of one entry of bank B
    assert mismatches(decode_layer(dataclasses.replace(s, luts=broken_luts)), s) > 0


def test_reference_check_catches_an_inverted_selection_bit():
    s = random_stream(22, SOP4)
    headers, codes = unpack_blocks(SOP4, s.blocks)
    flipped = headers ^ (1 << 7)
    broken = dataclasses.replace(s, blocks=pack_blocks(SOP4, flipped, codes))
    assert mismatches(decode_layer(broken), s) > 0


def test_bf16_check_catches_truncation_instead_of_rounding():
    s = random_stream(23, SOP4, rows=8, offset=-20)
    exact = decode_layer(s, "exact")
    truncated = (exact.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert (truncated != decode_layer(s, "bf16")).any()


# -- the encoder's streams decode as intended ----------------------------------------------------

def test_exactly_representable_weights_come_back_exactly():
    rng = np.random.default_rng(5)
    e2m3 = get_codebook("e2m3")
    w = e2m3.values[rng.integers(0, 64, (8, 64))] * 2.0 ** -6
    w[:, ::16] = 7.5 * 2.0 ** -6       # every block peaks at 7.5: its covering scale is 2^-6 exactly
    assert np.array_equal(decode_layer(encode_layer(w, FP6, [e2m3])), w)


def test_scale_search_never_loses_to_round_up():
    rng = np.random.default_rng(6)
    w = rng.standard_t(5, (32, 256)) * 0.05
    banks = [get_codebook("nf4"), get_codebook("sh4")]
    err = [((decode_layer(encode_layer(w, SOP4, banks, scale_search=k)) - w) ** 2).sum(axis=1)
           for k in (0, 1)]
    assert np.all(err[1] <= err[0]) and err[1].sum() < err[0].sum()


def test_encoder_refuses_bad_weights():
    w = np.zeros((2, 32))
    w[1, 5] = np.nan
    with pytest.raises(ValueError, match="row 1, column 5"):
        encode_layer(w, SOP4, [get_codebook("nf4")] * 2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        encode_layer(np.zeros((2, 24)), SOP4, [get_codebook("nf4")] * 2)
