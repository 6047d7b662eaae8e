"""``vectors.json`` spells out the block scale's float format (``layout.scale_format``: bits, sign, E, M, bias,
specials) beside its name, so that a testbench decodes a block's scale code from the index alone: it named
the format only (``"scale": "ue3m3"``), and an integrator had to look E, M and the bias up in
docs/formats.md (an integrator's walk). The fields are golden's format's; an edited one is refused."""

import json
from fractions import Fraction

import numpy as np
import pytest

from sop.golden.formats import SCALE_FORMATS
from sop.golden.layout import BlockLayout, LayerStream, pack_blocks
from sop.golden.points import operating_points
from sop.hdl.config import named_configs, residual_configs
from sop.sim import vectors as V

FIELDS = ("bits", "signed", "ebits", "mbits", "bias", "specials")


def _used_layouts() -> dict[str, tuple]:
    """Each scale format a named configuration or an operating point (the quantizer's points) uses, with a
    layout and HIF of one that uses it."""
    used = {}
    for owner in (*operating_points().values(), *named_configs().values(), *residual_configs().values()):
        used.setdefault(owner.layout.scale.name, (owner.layout, owner.hif))
    return used


def _other_layouts(hif) -> dict[str, tuple]:
    """The other scale formats the decoder takes (every code a number), each in a layout of 8-bit headers."""
    others = {}
    for name, fmt in SCALE_FORMATS.items():
        spare = 8 - fmt.bits                       # header bits beside the scale: the sign, then the selection
        if np.isfinite(fmt.values).all():
            others[name] = (BlockLayout(4, 16, name, spare >= 1, spare >= 2), hif)
    return others


USED = _used_layouts()
ALL = {**_other_layouts(next(iter(USED.values()))[1]), **USED}


def _written_index(folder, layout: BlockLayout, hif) -> dict:
    """The ``vectors.json`` of a small layer of ``layout`` and ``hif`` (random headers, codes and tables)."""
    rng = np.random.default_rng(layout.scale.bits)
    blocks = pack_blocks(layout, rng.integers(0, 1 << layout.header_bits, 4),
                         rng.integers(0, 1 << layout.code_bits, (4, layout.group)))
    luts = rng.integers(0, 1 << hif.bits, (layout.banks, 1 << layout.code_bits))
    V.write_vectors(folder, {"w": LayerStream(layout, hif, luts, 0, 2, 2 * layout.group, blocks)})
    return json.loads((folder / "vectors.json").read_text())


def _value_from_fields(code: int, f: dict) -> Fraction:
    """A scale code's value from the index's fields alone, from first principles (docs/formats.md): an
    unsigned float of E exponent and M mantissa bits, ``(1 + m/2^M) * 2^(e - bias)``, subnormal
    ``(m/2^M) * 2^(1 - bias)`` where e = 0; every code a number ("finite", the decoder's scales)."""
    assert f["specials"] == "finite" and f["signed"] is False and f["bits"] == f["ebits"] + f["mbits"], f
    e, m = code >> f["mbits"], code & ((1 << f["mbits"]) - 1)
    frac = Fraction(m, 1 << f["mbits"])
    return frac * Fraction(2) ** (1 - f["bias"]) if e == 0 else (1 + frac) * Fraction(2) ** (e - f["bias"])


def test_the_named_configurations_and_points_scales_are_the_ones_checked():
    """The configurations and points use ue3m3 and ue4m4 today; a new point's scale joins the test by itself."""
    assert {"ue3m3", "ue4m4"} <= set(USED), USED


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_index_spells_out_the_scale_format_as_golden_defines_it(tmp_path, name):
    """``scale_format`` holds golden's format's fields, ``scale`` still its name (old readers), and the fields
    alone decode every scale code to golden's table value."""
    layout, hif = ALL[name]
    lay_doc = _written_index(tmp_path / "v", layout, hif)["layout"]
    fmt = SCALE_FORMATS[name]
    assert lay_doc["scale"] == name
    assert lay_doc["scale_format"] == {k: getattr(fmt, k) for k in FIELDS}
    assert list(lay_doc["scale_format"]) == list(FIELDS)              # the order docs/vectors.md shows
    for code in range(1 << fmt.bits):
        assert float(_value_from_fields(code, lay_doc["scale_format"])) == fmt.values[code], (name, code)
    assert len(V.read_vectors(tmp_path / "v")) == 1


@pytest.mark.parametrize("edit, said", [
    (lambda f: f.update(bias=4), "'bias': 4"),
    (lambda f: f.update(ebits=4), "'ebits': 4"),
    (lambda f: f.update(signed=0), "'signed': 0"),                # false, not 0: JSON's types
    (lambda f: f.update(bias=3.0), "'bias': 3.0"),
    (lambda f: f.pop("specials"), "'bias': 3}"),
])
def test_an_index_whose_scale_format_contradicts_its_scale_is_refused(tmp_path, edit, said):
    """A testbench decodes the scale by ``scale_format``: one edited alone would have checked the hardware
    against another format than the blocks are in."""
    layout, hif = USED["ue3m3"]
    doc = _written_index(tmp_path / "v", layout, hif)
    edit(doc["layout"]["scale_format"])
    (tmp_path / "v" / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(V.VectorError) as refused:
        V.read_vectors(tmp_path / "v")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'v' / 'vectors.json'}: field 'layout.scale_format' is {{"), message
    assert said in message and message.endswith(
        "; the layout's scale ue3m3 is {'bits': 6, 'signed': False, 'ebits': 3, 'mbits': 3, 'bias': 3, "
        "'specials': 'finite'}"), message


def test_a_set_written_before_the_field_still_reads(tmp_path):
    """Sets written before ``scale_format`` (2026-12-08) have none: read as before, the scale by its name."""
    layout, hif = USED["ue3m3"]
    doc = _written_index(tmp_path / "v", layout, hif)
    del doc["layout"]["scale_format"]
    (tmp_path / "v" / "vectors.json").write_text(json.dumps(doc))
    (layer,) = V.read_vectors(tmp_path / "v")
    assert layer.layout == layout
