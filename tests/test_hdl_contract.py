"""Every hardware block under sop.hdl states its latency and carries its bit-exact reference.

Each ``wiring.Component`` subclass defined in a module of sop.hdl has, on the class, ``latency``
(a class attribute or a property: cycles from an input taken to its output valid, 0 for a
combinational block) and ``model`` (its bit-exact reference), both written in the class body, so
that a reader of the class sees them. The convention: the reference is a function of the module,
defined above the class (``module.model``, or a name of its own where the module has several), and
the top of the class body, beside ``latency``, says ``model = staticmethod(model)`` (with a comment
where the function lives in another module); where the reference needs the instance's configuration
(or the class's: hdl.gemv_term's ``ACT``), ``model`` is a method (a class method) at the top of the
body whose one line calls the module's function with it (hdl.gemv, hdl.gemv_axis, hdl.naive_dot).
Never ``Cls.model = ...`` after the class. The walk finds the classes itself, so a new block without
them fails here; the checks are shown to fail on a block that lacks them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

import sop.hdl

#: Blocks exempt from the contract, each with the reason. None today: every block has a latency and a
#: meaningful model (the shells and tops model their whole stream, the controls their cycle rule).
EXEMPT: dict[str, str] = {}


def components(package=sop.hdl) -> dict[str, type]:
    """Every ``wiring.Component`` subclass defined in a module of ``package``, by qualified name."""
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, wiring.Component) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def missing(cls: type) -> list[str]:
    """What of the contract ``cls`` lacks: ``latency`` as an int >= 0 or a property of the class,
    ``model`` as a function, static method or class method of it (an attribute set only in
    ``__init__`` is not the class's, and does not count)."""
    out = []
    latency = inspect.getattr_static(cls, "latency", None)
    if not (isinstance(latency, property) or (type(latency) is int and latency >= 0)):
        out.append("latency")
    model = inspect.getattr_static(cls, "model", None)
    if not (inspect.isfunction(model) or isinstance(model, (staticmethod, classmethod))):
        out.append("model")
    return out


def stated_in_class(cls: type) -> bool:
    """Whether the class that has ``model`` (``cls`` or a base) says so in its body: ``model = ...`` or
    ``def model(``, not ``Cls.model = ...`` set from outside after the class."""
    owner = next((c for c in cls.__mro__ if "model" in vars(c)), None)
    if owner is None:
        return False
    source = inspect.getsource(owner)
    body = " " * (len(source) - len(source.lstrip(" ")) + 4)          # the class body's indentation
    return re.search(rf"^{body}(model = |def model\()", source, re.M) is not None


def test_the_walk_finds_the_blocks_of_every_part():
    found = components()
    assert {"sop.hdl.decoder.Decoder", "sop.hdl.codebook_mux.CodebookMux", "sop.hdl.scale_decoder.ScaleDecoder",
            "sop.hdl.lut_word.LutWordEncoder", "sop.hdl.output_buffer.OutputBuffer", "sop.hdl.residual.ResidualPath",
            "sop.hdl.axis.AxisTop", "sop.hdl.gemv.GemvEngine", "sop.hdl.block_dot_bf16.BlockDotBF16",
            "sop.hdl.gemv_axis.GemvAxisTop", "sop.hdl.naive_dot.NaiveDot", "sop.hdl.sparse_merge.SparseMerge",
            "sop.hdl.residual_adder.ResidualAdder"} <= set(found)
    assert len(found) >= 30, sorted(found)


def test_every_component_has_latency_and_model():
    lacking = {name: what for name, cls in components().items() if (what := missing(cls)) and name not in EXEMPT}
    assert lacking == {}
    assert set(EXEMPT) <= set(components()), "an exemption names a block that no longer exists"


def test_every_model_is_written_in_its_class_body():
    outside = sorted(name for name, cls in components().items() if name not in EXEMPT and not stated_in_class(cls))
    assert outside == []


def test_the_combinational_blocks_and_the_fixed_ones_state_their_cycles():
    """The class constants: 0 for the combinational blocks (their docstrings' "latency 0"), the
    x buffer's read and the sequencer's issue register."""
    fixed = {name: inspect.getattr_static(cls, "latency") for name, cls in components().items()
             if type(inspect.getattr_static(cls, "latency", None)) is int}
    assert fixed == {"sop.hdl.codebook_mux.CodebookMux": 0, "sop.hdl.scale_decoder.ScaleDecoder": 0,
                     "sop.hdl.lut_word.LutWordEncoder": 0, "sop.hdl.output_buffer.OutputBuffer": 0,
                     "sop.hdl.gemv_x_buffer.XBuffer": 2, "sop.hdl.gemv_sequencer.BlockSequencer": 1}


def test_the_check_fails_on_a_block_without_them():
    class Bare(wiring.Component):
        a: In(1)
        y: Out(1)

        def elaborate(self, platform):
            return Module()

    class InstanceOnly(Bare):
        def __init__(self):
            self.latency = 1                          # on the instance only: not the class's
            super().__init__()

    class Complete(Bare):
        latency = 0

        @staticmethod
        def model(a):
            return a

    class Patched(Bare):
        latency = 0

    Patched.model = staticmethod(lambda a: a)         # set after the class: the class body does not say it

    assert missing(Bare) == missing(InstanceOnly) == ["latency", "model"]
    assert missing(Complete) == [] == missing(Patched)
    assert stated_in_class(Complete) and not stated_in_class(Patched) and not stated_in_class(Bare)
    for bad in (True, -1, 1.0):                       # a flag, a negative or a fraction of a cycle is no latency
        assert missing(type("Odd", (Complete,), {"latency": bad})) == ["latency"]
