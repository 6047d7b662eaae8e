"""The operating points: the one registry every layer of the project reads.

An *operating point* is a hardware format the decoder reads and the quantizer
writes: a golden ``BlockLayout`` (code width, block size, header fields, scale
format), the HIF format of its LUT entries, how the quantizer fills it, the
decoder's default lanes and output, and which tools support it. One row here
is all it takes to add a point; everything else derives from this table:

==========================  ===========================================================
reader                      what it takes from a point
==========================  ===========================================================
golden.layout.named_layouts ``layout`` by name
hdl.config.named_configs    one ``DecoderConfig`` per point (``lanes``, ``output``,
                            ``hif``) plus one per ``variants`` entry: `make verilog`,
                            `make synth`, `make sim`
quantize.schemes            a ``--format`` of kind ``"sop"``; ``search`` picks the
                            quantizer (``"blockwise"``: golden's block encoder with the
                            ``codebooks`` tables and the activation-weighted scale
                            search; ``"pair"``: the SOP codebook-pair search)
sim.vectors, `sop vectors`  points with ``vectors``
sim.runner (`make sim`)     every named configuration; a point's own configuration gets
                            the full plan, a variant the medium one; vectors from the
                            configuration's point; ``--lutram-ecp5``: each point's own
                            with ECP5's LUT RAM tables
synth bring-up, `sop board` points with ``board``
hdl.gemv_config             a GEMV engine ``gemv-<point>`` for each point with blocks of
                            16 (``GEMV_GROUP``; one named like a built-in engine refused)
`sop formats`               every row, as ``points``
==========================  ===========================================================

A few tools name points on purpose (docs/formats.md lists them: sop-budget's
options, the BF16 GEMV engine, the board cores, the measured mutation score and Fmax: section 7,
"Operating points: the one registry").

``register(point)`` adds a row at run time (a test or a script does this; its own
tables come from ``golden.codebooks.register_codebook``); ``registered(point)`` does
it for the length of a ``with`` block. A row is checked when it is made (its name,
its tables, each configuration against ``golden.decoder.decoder_problems``, the
decoder's rule), so a point that cannot be quantized or built is never registered.
Run-time rows reach the process's --jobs workers (quantize/jobs.py) and its sim
testbenches (sim/__init__.py) through ``registrations`` and ``adopt``; a command line started afresh
(`sop`, the ``python -m`` tools) through a JSON file that ``SOP_POINTS`` names (``register_file``).
The table is data only: golden/ stays free of the quantizer and of Amaranth.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .codebooks import distinct_problem, get_codebook, name_problem
from .decoder import decoder_problems
from .formats import FloatFormat, get_format
from .hif import DEFAULT_HIF, hif_format
from .layout import BlockLayout, format_id

#: How the quantizer fills a point (quantize/schemes.py maps each to a function).
SEARCHES = ("blockwise", "pair")
#: The names the tools derive from a configuration's (``<config>-sp``, ``<config>-sp2``: the residual
#: path, hdl/config.py; ``gemv-<point>``: an engine, hdl/gemv_config.py; ``board-<board>``: a board core)
#: share build/verilog and its module names with the points': a point named so would be replaced by
#: (or replace) the derived design of another, silently. So do the module names' endings (hdl/generate.py:
#: ``_axis``, a shell; ``_lutramD`` and ``_shallow``, hdl.config.variant_suffix; ``_rR`` after ``-sp``, R
#: adders) and the sim runner's build folders (``<config>-lutramD``, ``<config>-axis``): a point
#: ``sop4-g16-axis`` was module ``sop_decoder_sop4_g16_axis``, sop4-g16's shell (an outside probe).
#: ``RESIDUAL_SUFFIX`` is hdl/config.py's.
RESIDUAL_SUFFIX = "sp"
_DERIVED = re.compile(rf"-{RESIDUAL_SUFFIX}\d*(-r\d+)?$|-(axis|shallow|lutram\d+)$|^(gemv|board)-")
#: the endings and prefixes ``_DERIVED`` refuses, as its refusal lists them
_DERIVED_NAMES = (f"-{RESIDUAL_SUFFIX}, -{RESIDUAL_SUFFIX}N, -{RESIDUAL_SUFFIX}-rR, -axis, -shallow, -lutramD, "
                  f"gemv-, board-")
#: The 6-bit scale magnitude of the SOP4 header, chosen by bench/header_sqnr.py.
SOP4_SCALE = "ue3m3"


@dataclass(frozen=True)
class Variant:
    """A further named decoder configuration of a point: ``<point>-<suffix>``."""

    suffix: str
    lanes: int | None = None            # None: the point's
    output: str | None = None


@dataclass(frozen=True)
class OperatingPoint:
    name: str
    layout: BlockLayout
    description: str
    search: str = "blockwise"           # one of SEARCHES
    codebooks: tuple[str, ...] = ()     # the LUT tables of a "blockwise" point, one per bank
    hif: FloatFormat = DEFAULT_HIF
    lanes: int = 8                      # the named configuration's lanes
    output: str = "bf16"                # and its output
    variants: tuple[Variant, ...] = ()
    vectors: bool = True                # `sop vectors` and the sim regression's real layers
    board: bool = True                  # `sop board` and the bring-up
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        problems = [why for why in [name_problem("operating point", self.name)] if why]
        if self.search not in SEARCHES:
            problems.append(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.search == "blockwise":
            problems += self._table_problems()
        if self.search == "pair":
            if not (self.layout.select_bit and self.layout.code_bits == 4):
                problems.append("the pair search needs 4-bit codes and a selection bit")
            # the search draws its tables (FIXED_4BIT, DD4) in the default HIF: another HIF here would
            # build a decoder for one HIF and write streams in the other
            if self.hif != DEFAULT_HIF:
                problems.append(f"the pair search writes {DEFAULT_HIF.name} tables; hif must be that, "
                                f"got {getattr(self.hif, 'name', self.hif)!r}")
            if self.codebooks:
                problems.append("a pair point's tables are the search's (golden.codebooks.FIXED_4BIT and DD4): "
                                f"codebooks must be empty, got {self.codebooks!r}")
        suffixes = [v.suffix for v in self.variants]
        if len(set(suffixes)) != len(suffixes) or "" in suffixes:
            problems.append(f"variant suffixes must be distinct and nonempty, got {suffixes}")
        problems += [why for v in self.variants if v.suffix and (why := name_problem("variant suffix", v.suffix))]
        if not problems:        # every configuration must be one the decoder can be built as (hdl/config.py)
            problems += [f"configuration {cfg}: a name the tools derive ({_DERIVED_NAMES}) for another design"
                         for cfg in self.configs() if _DERIVED.search(cfg)]
            for cfg, (lanes, output) in self.configs().items():
                where = "" if cfg == self.name else f"configuration {cfg}: "
                problems += [where + why for why in decoder_problems(lanes, self.layout, self.hif, output)]
        if problems:
            raise ValueError(f"operating point {self.name!r}: " + "; ".join(problems))

    def _table_problems(self) -> list[str]:
        """A blockwise point's ``codebooks``: one table per bank, each a defined table (a fixed one, or
        one of golden.codebooks.register_codebook) of the layout's code width, held in the point's HIF
        with distinct entries. Checked here so that a point that cannot be quantized is never registered."""
        if isinstance(self.codebooks, str) or not all(isinstance(c, str) for c in self.codebooks):
            got = (repr(self.codebooks) if isinstance(self.codebooks, str) else
                   ", ".join(repr(c) if isinstance(c, str) else f"a {type(c).__name__}" for c in self.codebooks))
            return [f"codebooks must be a tuple of table names (golden.codebooks.register_codebook names "
                    f"a table of your own), got {got}"]
        if len(self.codebooks) != self.layout.banks:
            return [f"a blockwise point names one codebook per LUT bank ({self.layout.banks}), "
                    f"got {len(self.codebooks)}"]
        problems = []
        for name in self.codebooks:
            try:
                cb = get_codebook(name, self.hif)
            except ValueError as err:
                problems.append(str(err))
                continue
            if cb.bits != self.layout.code_bits:
                problems.append(f"codebook {name} has {len(cb.raw)} entries, {cb.bits}-bit codes; the layout's "
                                f"codes are {self.layout.code_bits}-bit ({1 << self.layout.code_bits} entries)")
            elif why := distinct_problem(cb):
                problems.append(why)
        return problems

    @property
    def bpw(self) -> float:
        """Bits per weight of the blocks (the per-layer LUT images and offset come on top)."""
        return self.layout.bpw

    @property
    def format_id(self) -> int:
        """What its decoder decodes (golden.layout.format_id): the id a board built for it reports in STATUS."""
        return format_id(self.layout, self.hif)

    def configs(self) -> dict[str, tuple[int, str]]:
        """Named decoder configurations of this point: name -> (lanes, output)."""
        out = {self.name: (self.lanes, self.output)}
        for v in self.variants:
            out[f"{self.name}-{v.suffix}"] = (v.lanes or self.lanes, v.output or self.output)
        return out

    def describe(self) -> dict:
        lay = self.layout
        return {"name": self.name, "description": self.description, "code_bits": lay.code_bits,
                "group": lay.group, "header_bits": lay.header_bits, "scale": lay.scale.name,
                "signed_scale": lay.signed_scale, "select_bit": lay.select_bit, "banks": lay.banks,
                "block_bpw": lay.bpw, "hif": self.hif.name, "search": self.search,
                "codebooks": list(self.codebooks), "lanes": self.lanes, "output": self.output,
                "configs": list(self.configs()), "vectors": self.vectors, "board": self.board,
                "format_id": self.format_id}


_POINTS: dict[str, OperatingPoint] = {}


def point_spec(point: OperatingPoint) -> dict:
    """``point`` as JSON data (``point_from_spec`` reads it back, equal): how a run-time point travels
    to a process that did not register it, a simulator's testbench (sim/__init__.py). ``notes`` stays."""
    def fmt(f: FloatFormat) -> dict:
        return dataclasses.asdict(f)

    lay = point.layout
    spec = {"name": point.name, "description": point.description, "search": point.search,
            "layout": {"code_bits": lay.code_bits, "group": lay.group, "scale": fmt(lay.scale),
                       "signed_scale": lay.signed_scale, "select_bit": lay.select_bit},
            "codebooks": list(point.codebooks), "hif": fmt(point.hif), "lanes": point.lanes, "output": point.output,
            "variants": [dataclasses.asdict(v) for v in point.variants], "vectors": point.vectors, "board": point.board}
    # JSON's own types: a point a script made with numpy's (a FloatFormat's bits=np.int64(6)) is equal to
    # its spec read back, which point_from_spec's type checks refused (its --jobs workers, its sim)
    return json.loads(json.dumps(spec, default=_python_scalar))


def _python_scalar(x):
    """A numpy scalar as the Python number or bool it holds (``point_spec``'s JSON); anything else a
    TypeError, as json's own."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")


def point_digest(point: OperatingPoint) -> str:
    """Eight hex digits of ``point``'s definition, its tables' values included: what a cache of its
    outputs is keyed by (sim/runner.py's vectors), not the name alone, which a table registered again
    with other values keeps (the old vectors then went on being simulated: an outside probe)."""
    tables = {c: [float(v) for v in get_codebook(c, point.hif).raw] for c in point.codebooks}
    doc = json.dumps({"point": point_spec(point), "tables": tables}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:8]


#: the fields of a spec (``point_spec``), of its ``layout`` and of a ``variants`` entry
_SPEC_FIELDS = {f.name for f in dataclasses.fields(OperatingPoint)} - {"notes"}
_LAYOUT_FIELDS = {f.name for f in dataclasses.fields(BlockLayout)}
_VARIANT_FIELDS = {f.name for f in dataclasses.fields(Variant)}


def _format_from_spec(f, what: str) -> FloatFormat:
    """A format of a spec: a name as `sop formats` spells it, or ``point_spec``'s JSON object."""
    if isinstance(f, str):
        return get_format(f)
    if not isinstance(f, dict):
        raise ValueError(f"{what} must be a format's name (for example ue4m4) or a JSON object, got {f!r}")
    _fields_problem(f, {g.name for g in dataclasses.fields(FloatFormat)}, "a format", f"{what}: ",
                    required=("name", "bits"))
    _types_problem(f, _FORMAT_TYPES, f"{what}: ")
    return FloatFormat(**f)


def _hif_from_spec(f) -> FloatFormat:
    """A spec's ``hif``: a HIF (golden.hif.hif_format: a signed float whose every code is a number, E
    1..5, M 0..10, bias 0 .. 2^E - 1), by name (``hif-e3m8b5`` as `sop formats` spells it, or ``e3m8b5``)
    or as ``point_spec`` writes it. A name is the HIF ``hif_format`` names, as a stream read back names it:
    ``e3m8b5`` is that format under another name, which a point and its artifacts' streams then differed in."""
    if isinstance(f, str) and (m := re.fullmatch(r"hif-e(\d+)m(\d+)b(\d+)", f)):
        return hif_format(int(m[2]), int(m[1]), int(m[3]))
    fmt = _format_from_spec(f, "hif")
    if not (isinstance(fmt, FloatFormat) and fmt.signed and fmt.specials == "finite"):
        raise ValueError(f"hif {fmt.name} is not a HIF: a LUT entry is a signed float whose every code is a "
                         f"number (docs/hif.md), for example {DEFAULT_HIF.name}")
    hif = hif_format(fmt.mbits, fmt.ebits, fmt.bias)
    return hif if isinstance(f, str) else fmt           # (point_spec's object: the point's own, read back equal)


def _fields_problem(d: dict, allowed, kind: str, where: str = "", required=()) -> None:
    """A ValueError for a JSON object ``d`` (``kind``: ``a point``, ``a layout``, ...; ``where``: the
    message's start) with a field ``allowed`` lacks (a misspelt one) or without a ``required`` one:
    Python's ``__init__() got an unexpected keyword argument`` named no file's field."""
    if unknown := sorted(set(d) - set(allowed), key=str):
        raise ValueError(f"{where}unknown field(s) {', '.join(map(str, unknown))}; {kind} has "
                         f"{', '.join(sorted(allowed))}")
    if missing := [k for k in required if k not in d]:
        raise ValueError(f"{where}no {', '.join(repr(k) for k in missing)} field")


#: The JSON type of each field of a spec (``_SPEC_TYPES``, and a point's ``lanes``, ``decoder_problems``'s),
#: of its ``layout`` and of a format given as an object (``point_spec``'s, ``_FORMAT_TYPES``) and of a
#: ``variants`` entry: ``"vectors": "false"`` was a point with vectors (a string is true), ``"code_bits":
#: "4"`` refused as ``code width 4 not supported``, ``"signed_scale": "true"`` as ``invalid literal for
#: int()``; a format's ``"ebits": "4"`` as ``unsupported operand type(s) for +``, its ``"bias": "7"`` or
#: ``"name": 5`` taken; a variant's ``"suffix": ["x1"]`` as ``unhashable type: 'list'``, its ``"suffix":
#: null`` taken (a configuration ``<point>-None``).
_SPEC_TYPES = {"code_bits": int, "group": int, "signed_scale": bool, "select_bit": bool, "vectors": bool,
               "board": bool, "description": str}
_FORMAT_TYPES = {"name": str, "bits": int, "signed": bool, "ebits": int, "mbits": int, "bias": int, "specials": str}
_VARIANT_TYPES = {"suffix": str, "lanes": (int, type(None)), "output": (str, type(None))}
#: how a refusal names a JSON type
_JSON_TYPE_NAMES = {int: "an integer", bool: "true or false", str: "a string", type(None): "null"}


def _types_problem(d: dict, types: dict, what: str) -> None:
    """A ValueError for a field of ``d`` (a spec, its layout, a format, a variant) not of its JSON type in
    ``types`` (a type, or a tuple of them: ``None`` for null), named as ``WHAT FIELD must be ..., got ...``.
    The type itself, not ``isinstance``: JSON's true is no integer, and 1 no true."""
    for key, kinds in types.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key in d and type(d[key]) not in kinds:
            raise ValueError(f"{what}{key} must be {' or '.join(_JSON_TYPE_NAMES[k] for k in kinds)}, "
                             f"got {d[key]!r}")


def point_from_spec(d: dict) -> OperatingPoint:
    """The point of a ``point_spec``; in a spec written by hand (``register_file``) a format (the scale,
    the HIF) may be a name, as ``sop formats`` spells it, and every field but ``name``, ``layout``
    (``code_bits``, ``group``, ``scale``) and ``description`` may be left out for OperatingPoint's default.
    A spec that names no point is one ValueError: a field misspelt or missing, of another JSON type."""
    if not isinstance(d, dict):
        raise ValueError(f"a point is a JSON object, got {d!r}")
    _fields_problem(d, _SPEC_FIELDS, "a point", required=("name", "layout", "description"))
    for key, kind in (("layout", dict), ("codebooks", list), ("variants", list)):
        if key in d and not isinstance(d[key], kind):
            raise ValueError(f"{key} must be a JSON {'object' if kind is dict else 'list'}, got {d[key]!r}")
    _types_problem(d, _SPEC_TYPES, "")
    # (OperatingPoint's own refusal is a Python caller's: ``got a NoneType``)
    if bad := next(((i, c) for i, c in enumerate(d.get("codebooks", ())) if not isinstance(c, str)), None):
        raise ValueError(f"codebooks: entry {bad[0]} must be a string (a table's name), got {bad[1]!r}")
    lay = d["layout"]
    _fields_problem(lay, _LAYOUT_FIELDS, "a layout", "layout: ", required=("code_bits", "group", "scale"))
    _types_problem(lay, _SPEC_TYPES, "layout: ")
    for i, v in enumerate(d.get("variants", ())):
        if not isinstance(v, dict):
            raise ValueError(f"variant {i}: a JSON object {{\"suffix\": ..., \"lanes\": ..., \"output\": ...}}, "
                             f"got {v!r}")
        where = f"variant {v['suffix'] if isinstance(v.get('suffix'), str) else i!r}: "
        _fields_problem(v, _VARIANT_FIELDS, "a variant", where, required=("suffix",))
        _types_problem(v, _VARIANT_TYPES, where)
    kw = {k: d[k] for k in ("search", "lanes", "output", "vectors", "board") if k in d}
    kw |= {"codebooks": tuple(d["codebooks"])} if "codebooks" in d else {}
    kw |= {"hif": _hif_from_spec(d["hif"])} if "hif" in d else {}
    kw |= {"variants": tuple(Variant(**v) for v in d["variants"])} if "variants" in d else {}
    return OperatingPoint(d["name"], BlockLayout(**{**lay, "scale": _format_from_spec(lay["scale"], "scale")}),
                          d["description"], **kw)


def register(point: OperatingPoint) -> OperatingPoint:
    """Add ``point`` to the registry; a name (or a configuration name) already taken is refused."""
    taken = {c for p in _POINTS.values() for c in p.configs()}
    if clash := sorted(taken & set(point.configs())):
        raise ValueError(f"operating point {point.name!r}: name(s) already registered: {', '.join(clash)}")
    _POINTS[point.name] = point
    return point


@contextlib.contextmanager
def registered(point: OperatingPoint) -> Iterator[OperatingPoint]:
    """``point`` is in the registry for the length of the block."""
    register(point)
    try:
        yield point
    finally:
        del _POINTS[point.name]


def registrations() -> dict:
    """This process's run-time tables (golden.codebooks.register_codebook: name -> raw values) and its
    points (``point_spec``), as JSON data: what ``adopt`` registers in a process started from the modules
    as imported, a --jobs worker (quantize/jobs.py) or a simulator's testbench (sim/__init__.py)."""
    from .codebooks import registered_codebooks

    return {"codebooks": {n: list(v) for n, v in registered_codebooks().items()},
            "points": [point_spec(p) for p in _POINTS.values()]}


def adopt(regs: dict) -> None:
    """Register whatever this process lacks of another's ``registrations()``: the tables first, which
    a point's check reads."""
    from .codebooks import codebook_names, register_codebook

    for name, raw in regs["codebooks"].items():
        if name not in codebook_names():
            register_codebook(name, raw)
    for spec in regs["points"]:
        if spec["name"] not in _POINTS:
            register(point_from_spec(spec))


#: The environment variable naming a JSON file of the user's own tables and points, registered by every
#: command line before it runs (`sop`, the `python -m` tools, and so `make verilog`, `make sim`):
#: ``register_file``, called through sop.user_points by sop.cli and sop.terminal.run_command.
POINTS_FILE_ENV = "SOP_POINTS"

#: the files registered in this process, each as (its real path, its text): a file edited since is another
_FILES_REGISTERED: set[tuple[str, str]] = set()


class _NotPointsJSON(ValueError):
    """What json.load reads and a points file may not hold (``_json_object``, ``_json_constant``)."""


def _json_object(pairs: list) -> dict:
    """A JSON object of the file, refused where a key comes twice: json.load kept the last, so that a
    second table or field of one name replaced the first without a word."""
    d = dict(pairs)
    if len(d) != len(pairs):
        twice = sorted(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
        raise _NotPointsJSON(f"{', '.join(map(repr, twice))} given twice in one JSON object; a name is "
                             f"given once (the last was taken, without a word)")
    return d


def _json_constant(word: str):
    """NaN, Infinity, -Infinity: Python's json reads them; JSON has no such number, and no table entry,
    block size or lanes can be one."""
    raise _NotPointsJSON(f"{word} in the file: not a JSON number, and no table entry or field can be one")


def register_file(path) -> list[str]:
    """Register the tables and operating points of the JSON file ``path``: ``{"codebooks": {NAME:
    [values, ...]}, "points": [SPEC, ...]}``, a SPEC as ``point_from_spec`` reads it (``registrations()``
    writes such a file from the points a script registered). Each is checked as ``register_codebook`` and
    ``register`` check them (a name taken, a table or point the decoder cannot take), in one ValueError
    naming the file, and then none of the file's is registered; a point (or table) the registry holds as the
    file defines it (a built-in point; the file's own, registered before and the file edited since) is taken
    as it is; the file's same text registered before in this process is not registered again. Returns the
    points' names (docs/quantizer.md, "Your own table and operating point")."""
    from .codebooks import _REGISTERED as tables_registered
    from .codebooks import Codebook, register_codebook

    where = f"{POINTS_FILE_ENV}={path}" if os.environ.get(POINTS_FILE_ENV) == str(path) else str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:         # (-sig: a byte-order mark an editor wrote)
            text = f.read()
        doc = json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
    except OSError as err:
        raise ValueError(f"{where}: {err.strerror}") from None
    except _NotPointsJSON as err:
        raise ValueError(f"{where}: {err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not a JSON file ({err})") from None
    # the same file's text again (`sop` and run_command both register SOP_POINTS's) is not registered again
    # (its tables' names are taken); a file edited since is read as it is now (keyed by its path alone, a
    # point added was returned by name and never registered, and a file made a list since was a traceback)
    if (key := (os.path.realpath(path), text)) in _FILES_REGISTERED:
        return [d["name"] for d in doc.get("points", [])]
    tables, specs = (doc.get("codebooks", {}), doc.get("points", [])) if isinstance(doc, dict) else (None, None)
    if isinstance(doc, dict) and (unknown := sorted(set(doc) - {"codebooks", "points"})):
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a file of tables and points has "
                         f"codebooks, points (docs/quantizer.md)")
    if not (isinstance(doc, dict) and isinstance(tables, dict)
            and isinstance(specs, list) and all(isinstance(d, dict) for d in specs)):
        raise ValueError(f"{where}: not a file of tables and points: a JSON object {{\"codebooks\": {{NAME: "
                         f"[values]}}, \"points\": [POINT, ...]}} (docs/quantizer.md)")
    # a file named to register something: one that holds nothing (``{}``, an editor's unsaved buffer, the
    # wrong file) registered nothing without a word, and the point it was meant to hold was then an unknown
    # format; registrations() never writes such a file (it holds the built-in points)
    if not tables and not specs:
        raise ValueError(f"{where}: holds no tables or points: nothing to register; a file of tables and points "
                         f"is {{\"codebooks\": {{NAME: [values]}}, \"points\": [POINT, ...]}} (docs/quantizer.md)")
    for name, values in tables.items():
        # a JSON type register_codebook reads as another (true as 1) or refuses in numpy's words
        if not isinstance(values, list):
            raise ValueError(f"{where}: codebook {name}: its entries must be a JSON list of numbers, got {values!r}")
        if bad := next(((i, v) for i, v in enumerate(values) if type(v) not in (int, float)), None):
            raise ValueError(f"{where}: codebook {name}: entry {bad[0]} must be a number, got {bad[1]!r}")
    # all or nothing: a file refused at its third point left its tables and two points registered in the
    # process (a script's register_file, fixed and called again, was refused: name already registered)
    before_points, before_tables = set(_POINTS), set(tables_registered)
    try:
        for name, values in tables.items():
            try:
                # a table the file registered before as it defines it now (the file edited since: a point
                # added) is taken as it is, as a point is below; one of other values under its name is refused
                if name not in tables_registered or not np.array_equal(tables_registered[name],
                                                                       Codebook.from_values(name, values).raw):
                    register_codebook(name, values)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        names = []
        for i, d in enumerate(specs):
            name = d.get("name", i)
            what = f"{where}: point {name!r}"
            if name in names:
                raise ValueError(f"{what}: named twice in the file")
            try:
                point = point_from_spec(d)
                # one the registry holds as it is (a built-in point: registrations() writes them all) is
                # the file's too, as adopt takes it; a point of another definition under its name is refused
                names.append(point.name if _POINTS.get(point.name) == point else register(point).name)
            except (TypeError, ValueError) as err:
                why = str(err).removeprefix(f"operating point {name!r}: ")   # (it named the point already)
                raise ValueError(f"{what}: {why}") from None
    except ValueError:
        for p in set(_POINTS) - before_points:
            del _POINTS[p]
        for t in set(tables_registered) - before_tables:
            del tables_registered[t]
        get_codebook.cache_clear()
        raise
    _FILES_REGISTERED.add(key)
    return names


def own_point_hint() -> str:
    """The end of a refusal of an unknown format or configuration where ``SOP_POINTS`` names no file: a
    point of the user's own, from a script or an artifact made with the file, is known only with it."""
    if os.environ.get(POINTS_FILE_ENV):
        return ""
    return f"; a point of your own: name its file in {POINTS_FILE_ENV} (docs/quantizer.md)"


def operating_points() -> dict[str, OperatingPoint]:
    """Every point, by name, in registration order."""
    return dict(_POINTS)


def get_point(name: str) -> OperatingPoint:
    try:
        return _POINTS[name]
    except KeyError:
        raise ValueError(f"unknown operating point {name!r}; valid: {', '.join(_POINTS)}") from None


def vector_points() -> list[str]:
    return [n for n, p in _POINTS.items() if p.vectors]


def board_points() -> list[str]:
    return [n for n, p in _POINTS.items() if p.board]


def config_point(config: str) -> tuple[OperatingPoint, bool]:
    """(the point of the named decoder configuration ``config``, whether it is the point's own)."""
    for p in _POINTS.values():
        if config in p.configs():
            return p, config == p.name
    raise ValueError(f"unknown decoder configuration {config!r}")


# -- the project's points -------------------------------------------------------------------------

register(OperatingPoint(
    "sop4-g16", BlockLayout(4, 16, get_format(SOP4_SCALE), signed_scale=True, select_bit=True),
    "SOP 4-bit: a codebook pair per layer, selection bit + sign + UE3M3 scale per block of 16 (4.5 bpw)",
    search="pair",
    variants=(Variant("x1", lanes=1), Variant("exact", output="exact"), Variant("x64", lanes=64))))
register(OperatingPoint(
    "e2m3-ue4m4-g16", BlockLayout(6, 16, get_format("ue4m4")),
    "the SOP paper's FP6 point (arXiv 2605.14929): E2M3 codes, UE4M4 block scale, block 16 (6.5 bpw); "
    "a 64-entry LUT holding the E2M3 table",
    codebooks=("e2m3",)))
