"""The `sop` command line.

    sop formats [--json]          every element, scale and output format, HIF and codebook, with widths
    sop codebook NAME [--json]    the values of a codebook or element format, and its LUT image in HIF
    sop demo                      encode the built-in model (all-MiniLM-L6-v2) into the golden block
                                  layout, decode it with the golden model, print the error per format
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from sop.golden.codebooks import codebook_names, get_codebook
from sop.golden.formats import ELEMENT_FORMATS, OUTPUT_FORMATS, SCALE_FORMATS, FloatFormat, get_format
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import named_layouts


def _describe(fmt) -> dict:
    d = {"name": fmt.name, "bits": fmt.bits, "signed": fmt.signed, "max": fmt.max,
         "min_positive": fmt.min_positive}
    if isinstance(fmt, FloatFormat):
        d.update(ebits=fmt.ebits, mbits=fmt.mbits, bias=fmt.bias, specials=fmt.specials)
    else:
        d["kind"] = "two's complement integer"
    return d


def formats_doc() -> dict:
    layouts = named_layouts()
    return {
        "element": [_describe(f) for f in ELEMENT_FORMATS.values()],
        "scale": [_describe(f) for f in SCALE_FORMATS.values()],
        "output": [_describe(f) for f in OUTPUT_FORMATS.values()] + [
            {"name": "exact", "bits": None, "note": "the exact product, sign/significand/exponent"}],
        "hif": _describe(DEFAULT_HIF),
        "codebooks": [{"name": n, "bits": get_codebook(n).bits} for n in codebook_names() if n != "dd4"]
                     + [{"name": "dd4", "bits": 4, "note": "fitted per layer"}],
        "layouts": [{"name": n, "code_bits": l.code_bits, "group": l.group, "header_bits": l.header_bits,
                     "scale": l.scale.name, "signed_scale": l.signed_scale, "select_bit": l.select_bit,
                     "block_bpw": l.bpw} for n, l in layouts.items()],
    }


def codebook_doc(name: str) -> dict:
    """Values in code order (null for NaN) and, for the tables a LUT holds, their HIF codes."""
    key = name.lower()
    if key in codebook_names():
        cb = get_codebook(key)          # dd4 raises: it has no fixed table
        values, hif = cb.values, cb.hif_codes.tolist()
    else:
        try:
            fmt = get_format(key)
        except ValueError:
            raise ValueError(f"unknown codebook or format {name!r}; codebooks: "
                             f"{', '.join(codebook_names())}; formats: "
                             f"{', '.join(ELEMENT_FORMATS)}") from None
        values, hif = fmt.values, None  # a number format, not a LUT table
    return {"name": key, "bits": int(math.log2(len(values))),
            "values": [None if math.isnan(v) else float(v) for v in values],
            "hif": hif, "hif_format": DEFAULT_HIF.name}


def _print_table(rows: list[dict], keys: list[str]) -> None:
    print("  ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print("  ".join(f"{str(r.get(k, '')):>12}" for k in keys))


def cmd_formats(args) -> int:
    doc = formats_doc()
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    for section in ("element", "scale", "output"):
        print(f"\n{section} formats")
        _print_table(doc[section], ["name", "bits", "ebits", "mbits", "bias", "specials", "max"])
    print(f"\nHIF (LUT output): {doc['hif']['name']}, {doc['hif']['bits']} bits")
    print("codebooks: " + ", ".join(f"{c['name']}({c['bits']}b)" for c in doc["codebooks"]))
    print("\nlayouts")
    _print_table(doc["layouts"], ["name", "code_bits", "group", "header_bits", "scale", "block_bpw"])
    return 0


def cmd_codebook(args) -> int:
    doc = codebook_doc(args.name)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"{doc['name']}: {doc['bits']} bits, LUT format {doc['hif_format']}")
        for code, v in enumerate(doc["values"]):
            h = doc["hif"][code] if doc["hif"] is not None else "-"
            print(f"  {code:3d}  {v!s:>24}  hif {h}")
    return 0


def cmd_demo(args) -> int:
    from sop import demo

    return demo.run(limit=args.layers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sop", description="SOP weight quantization: golden model, "
                                "quantizer and decoder hardware")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("formats", help="list every format, codebook and layout")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_formats)
    c = sub.add_parser("codebook", help="values and LUT image of a codebook or element format")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_codebook)
    d = sub.add_parser("demo", help="encode and decode the built-in model, print the error per format")
    d.add_argument("--layers", type=int, default=None, help="only the first N layers")
    d.set_defaults(func=cmd_demo)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"sop: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
