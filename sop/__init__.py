"""SOP: Scaled Outer Product weight quantization, its golden model and its decoder hardware.

Subpackages: `sop.golden` (the bit-exact specification of every format),
`sop.quantize` (the quantizer), `sop.hdl` (Amaranth RTL), `sop.sim` (cocotb
regression), `sop.synth` (synthesis and boards).
"""

__version__ = "0.1.0"
