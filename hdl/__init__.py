"""The Amaranth hardware: the LUT decoder (implements golden.decoder), its sparse-residual path and
AXI4-Stream shell, the GEMV engine (implements golden.dot) and its shell, the naive dot path it is
measured against, their configurations and the Verilog generator (`make verilog`).

* the decoder: ``config`` (``DecoderConfig``, the named configurations), ``decoder`` (the top) and
  its parts (``beat_issue``, ``block_fields``, ``scale_decoder``, ``codebook_mux``, ``lanes`` with
  ``lut_bank``, ``lut_word``, ``hif_formatter``, ``arith``; ``pipeline``, ``replica``,
  ``output_buffer``), ``residual`` (the sparse-residual path, with its parts ``sparse_merge`` and
  ``residual_adder``), ``axis`` (its AXI4-Stream shell), ``reference`` (the expected output
  beats);
* the GEMV engine: ``gemv_config`` (``GemvConfig``, the named and the small engines, the port
  payloads), ``gemv`` (the top) and its parts (``gemv_sequencer``, ``gemv_x_buffer``,
  ``gemv_term``, ``block_dot`` with ``block_dot_bf16`` and ``block_dot_folded``, ``fp32_acc``),
  ``gemv_axis`` (its AXI4-Stream shell); ``naive_dot``, the naive path;
* ``generate``: Verilog, manifests, testbenches and FuseSoC cores of every named design.

Every ``wiring.Component`` here has ``latency`` (cycles from an input taken to its output valid;
0 when combinational) and ``model`` (its bit-exact reference), tests/test_hdl_contract.py.

The names of the sticky error bits are defined here, in plain Python, so that the board host
(synth/wire.py) imports them without Amaranth; the hardware builds its error layouts from them.
"""

from sop import imported_as_subpackage

imported_as_subpackage(__name__)

#: The decoder's sticky sparse error bits, LSB first: hdl.sparse_merge's ``ERRORS`` and
#: ``error_layout`` (the decoder's ``sparse_error`` port), synth/wire.py's SPARSE_STATUS reply.
SPARSE_ERRORS = ("order", "past_layer", "no_layer", "not_finite")
#: The GEMV engine's sticky error bits, LSB first: hdl.gemv_config's ``error_layout`` (its status
#: port, after ``x_loaded``), synth/wire.py's GEMV_STATUS reply.
GEMV_ERRORS = ("w_before_x", "x_length", "x_nan", "layer", "sparse")
