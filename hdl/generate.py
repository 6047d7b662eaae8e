"""`make verilog`: Verilog and a JSON manifest for each named decoder configuration.

    python -m sop.hdl.generate [--out build/verilog] [--config NAME ...] [--lutram-depth D]

For configuration NAME it writes ``NAME.v`` (top module ``sop_decoder_<NAME>``
with ``_`` for ``-``) and ``NAME.json``: the parameters, every port with its
width and direction, the pipeline latency (and each component's share) and the
fields of an output lane word (docs/hardware.md explains every field). Files are
written atomically.

``--lutram-depth D`` builds each lane's table from ``D``-word memories
(hdl/lut_bank.py) instead of one block-RAM-shaped memory. What ``make synth``
measures on ECP5: 16 for 4-bit codes, 32 for 6-bit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Shape
from amaranth.lib import data, wiring

from sop.golden.files import write_atomic

from .config import DecoderConfig, named_configs
from .decoder import Decoder


def module_name(config: DecoderConfig) -> str:
    return "sop_decoder_" + config.name.replace("-", "_")


def ports(dut: wiring.Component) -> list[dict]:
    """Ports as Amaranth names them in the Verilog: clk, rst, then the signature's members."""
    out = [{"name": "clk", "width": 1, "direction": "input"},
           {"name": "rst", "width": 1, "direction": "input", "note": "synchronous, active high"}]
    for path, member in dut.signature.members.flatten():
        if not member.is_port:
            continue
        direction = "input" if member.flow == wiring.In else "output"
        out.append({"name": "__".join(str(p) for p in path),
                    "width": Shape.cast(member.shape).width, "direction": direction})
    return out


def lane_fields(config: DecoderConfig) -> list[dict]:
    """The fields of one output lane word, LSB first: BF16, or the exact product's sig, exp, sign."""
    shape = config.lane_layout
    if not isinstance(shape, data.StructLayout):
        return [{"name": config.output, "lsb": 0, "width": Shape.cast(shape).width, "signed": False}]
    return [{"name": name, "lsb": f.offset, "width": f.width, "signed": Shape.cast(f.shape).signed}
            for name, f in shape]


def manifest(config: DecoderConfig, dut: Decoder) -> dict:
    """The JSON manifest of ``dut`` (every field is explained in docs/hardware.md)."""
    return {"module": module_name(config), "parameters": config.describe(),
            "latency_cycles": dut.latency,
            "latency_stages": {"beat_issue": dut.issue.latency, "table_read": dut.lanes.read_latency,
                               "formatter": dut.lanes.formatters[0].latency,
                               "output": dut.output.latency},
            "ports": ports(dut),
            "lane_word_bits": Shape.cast(config.lane_layout).width, "lane_fields": lane_fields(config)}


def generate(config: DecoderConfig, out_dir: Path) -> tuple[Path, Path]:
    dut = Decoder(config)
    text = verilog.convert(dut, name=module_name(config), emit_src=False)
    doc = manifest(config, dut)
    v_path, j_path = out_dir / f"{config.name}.v", out_dir / f"{config.name}.json"
    write_atomic(v_path, text.encode())
    write_atomic(j_path, (json.dumps(doc, indent=1) + "\n").encode())
    return v_path, j_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("build/verilog"))
    p.add_argument("--config", action="append", help="a named configuration (default: all)")
    p.add_argument("--lutram-depth", type=int, default=0, metavar="D",
                   help="tables from D-word LUT RAM memories, one more cycle of latency (ECP5: 16 for "
                        "4-bit codes, 32 for 6-bit codes); "
                        "default 0: one memory per lane with a registered read (block RAM)")
    args = p.parse_args(argv)
    configs = named_configs()
    names = args.config or list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        print(f"unknown configuration(s) {unknown}; valid: {', '.join(configs)}", file=sys.stderr)
        return 2
    try:
        chosen = [replace(configs[n], lutram_depth=args.lutram_depth) for n in names]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for cfg in chosen:
        v, _ = generate(cfg, args.out)
        print(f"{v}  ({cfg.lanes} lanes" + (f", lutram depth {cfg.lutram_depth})" if cfg.lutram_depth else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
