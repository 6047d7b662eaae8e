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


def imported_as_subpackage(name: str) -> None:
    """Refuse the checkout's ``name``/ folder imported as a package of its own (``import golden``): it would be a
    second tree of sop's modules, whose classes are not those ``sop.<name>`` returns (each subpackage calls this)."""
    if not name.startswith("sop."):
        raise ImportError(f"import sop.{name}, not {name}: the checkout's {name}/ is the sop package's, and "
                          f"imported apart its classes are not those sop.{name} returns")
