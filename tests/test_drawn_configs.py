"""The generator's claim, kept true: any documented configuration decodes bit-exact.

docs/hardware.md says the generator takes any code width (4, 6), block size
(8 to 64), lane count (a power of two up to 64 dividing or multiple of the
block size), header (one or two bytes: an all-finite unsigned scale format,
E 1..8 with any bias from 0 to 2^E - 1, with or without a sign bit and a
selection bit), HIF widths (E 1..5, M 0..10, any bias hif_format takes), output
(``bf16``, ``exact``) and ``lutram_depth``. Hypothesis
draws configurations from that space; each is built and two random layers
(the second loaded while the first streams, a table swap between them) are
streamed through it in amaranth.sim with random input idles and output stalls,
and compared with golden/ (hdl.reference) word for word.

Bounded: a fixed, derandomized set of examples (``EXAMPLES``), each a few
hundred cycles, so that the file stays well under a minute on one core in
`make test`; with ``SOP_FUZZ=1`` (as `make fuzz` sets it) it draws 50 times as
many, new ones each run: ``SOP_FUZZ=1 pytest tests/test_drawn_configs.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hdl_harness import random_layer, run_decoder
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sop.golden.formats import get_format
from sop.golden.hif import hif_format
from sop.golden.layout import CODE_BITS, GROUP_SIZES, OFFSET_RANGE, BlockLayout
from sop.golden.decoder import MAX_LANES, OUTPUTS
from sop.hdl.config import DecoderConfig
from sop.hdl.decoder import Decoder

LONG = os.environ.get("SOP_FUZZ") == "1"
EXAMPLES = 14


@st.composite
def decoder_configs(draw) -> DecoderConfig:
    """A configuration from the documented space (docs/hardware.md, Parameters)."""
    k, g = draw(st.sampled_from(CODE_BITS)), draw(st.sampled_from(GROUP_SIZES))
    signed_scale, select_bit = draw(st.booleans()), draw(st.booleans())
    # a block is whole bytes: g * k is, so the header is one byte (or two)
    header = draw(st.sampled_from((8, 8, 8, 16)))
    scale_bits = header - signed_scale - select_bit
    e = draw(st.integers(1, min(8, scale_bits)))
    bias = draw(st.integers(0, (1 << e) - 1))
    scale = get_format(f"ue{e}m{scale_bits - e}b{bias}")
    layout = BlockLayout(k, g, scale, signed_scale=signed_scale, select_bit=select_bit)
    he = draw(st.integers(1, 5))
    hif = hif_format(draw(st.integers(0, 10)), he, draw(st.integers(0, (1 << he) - 1)))
    lanes = 1 << draw(st.integers(0, MAX_LANES.bit_length() - 1))
    depth = 2 * layout.banks << k
    lutram = draw(st.sampled_from([0, 0] + [1 << i for i in range(1, depth.bit_length() - 1)]))
    return DecoderConfig("drawn", lanes, layout, hif, draw(st.sampled_from(OUTPUTS)), lutram)


def _cfg(lanes, k, g, scale, signed_scale, select_bit, hif, output, lutram=0):
    return DecoderConfig("edge", lanes, BlockLayout(k, g, get_format(scale), signed_scale, select_bit), hif, output,
                         lutram)


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES * (50 if LONG else 1), deadline=None, derandomize=not LONG, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=decoder_configs(), seed=st.integers(0, 2**16), offset=st.sampled_from([*OFFSET_RANGE, None, None]))
# the edges of the space, always: a 1-bit HIF significand (M = 0) under a 1-bit scale significand,
# a 16-bit header with a wide scale significand (a 4-level multiplier), 64 lanes over blocks of 8
@example(cfg=_cfg(4, 4, 8, "ue7m0b63", False, True, hif_format(0, 1, 0), "bf16", 2), seed=1, offset=None)
@example(cfg=_cfg(2, 6, 64, "ue4m11b3", True, False, hif_format(10, 5, 31), "bf16"), seed=2, offset=-128)
@example(cfg=_cfg(64, 4, 8, "ue3m3", True, True, hif_format(6), "exact", 16), seed=3, offset=127)
def test_drawn_configuration_decodes_like_golden(cfg, seed, offset):
    dut = Decoder(cfg)
    assert dut.latency == dut.issue.latency + dut.lanes.latency + dut.output.latency
    rng = np.random.default_rng(seed)
    # about four output beats' worth of blocks per layer, whole input beats
    n_blocks = cfg.blocks_per_beat * max(1, 4 * cfg.lanes // (cfg.layout.group * cfg.blocks_per_beat))
    layers = [random_layer(cfg, rng, n_blocks=max(n_blocks, 2), offset=offset) for _ in range(2)]
    want = [beat for layer in layers for beat in layer.expected(cfg)]
    assert run_decoder(cfg, layers, seed=seed, p_idle=0.2, p_stall=0.3, dut=dut) == want
