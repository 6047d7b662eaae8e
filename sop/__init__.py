"""SOP: Scaled Outer Product weight quantization, its golden model and its decoder hardware.

Subpackages: `sop.golden` (the bit-exact specification of every format),
`sop.quantize` (the quantizer), `sop.hdl` (Amaranth RTL), `sop.sim` (cocotb
regression), `sop.synth` (synthesis and boards).

In the checkout, sop/golden, sop/quantize, sop/hdl, sop/sim and sop/synth are
symlinks to the top-level folders of those names, so the checkout is itself
this package tree (for Python, pyright and setuptools alike); a wheel holds
real files. Data files are read with importlib.resources, and generated files
go under ``build/`` in the working directory (``sop.toolenv.build_root()``).
"""

__version__ = "0.1.0"
