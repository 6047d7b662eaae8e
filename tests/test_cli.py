"""The `sop` command line and the demo, run for real."""

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from sop.cli import main
from sop.quantize.baselines import fp8_e4m3_pot
from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.layout import named_layouts
from sop.quantize.blockwise import encode_layer
from sop.quantize.weights import minilm_linear_weights


def _not_json(constant):
    raise ValueError(f"{constant} is not JSON (RFC 8259 has no NaN or Infinity)")


def run_json(capsys, *argv):
    """The command's JSON output, parsed strictly: a bare NaN or Infinity fails."""
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out, parse_constant=_not_json)


def test_formats_json_lists_every_format_with_its_width(capsys):
    doc = run_json(capsys, "formats", "--json")
    widths = {f["name"]: f["bits"] for f in doc["element"] + doc["scale"]}
    assert widths["e2m1"] == 4 and widths["e2m3"] == 6 and widths["e4m3"] == 8
    assert widths["ue4m4"] == 8 and widths["ue3m3"] == 6 and widths["ue8m0"] == 8
    assert doc["hif"]["bits"] == 10
    assert {p["name"]: p["block_bpw"] for p in doc["points"]} == {"e2m3-ue4m4-g16": 6.5, "sop4-g16": 4.5}
    # what a board of the point reports in STATUS (docs/formats.md, "The format id", works sop4-g16's out)
    assert {p["name"]: p["format_id"] for p in doc["points"]} == {"e2m3-ue4m4-g16": 0x4C6DD1E6,
                                                                  "sop4-g16": 0xC5ABA8EA}
    assert {"nf4", "bof4", "bof4-s", "split87", "sh4", "dd4"} <= {c["name"] for c in doc["codebooks"]}


def test_codebook_json_of_a_lut_table(capsys):
    doc = run_json(capsys, "codebook", "nf4", "--json")
    assert doc["bits"] == 4 and len(doc["values"]) == 16 and len(doc["hif"]) == 16
    assert doc["values"][0] == -1.0 and doc["values"][7] == 0.0 and doc["values"][15] == 1.0


@pytest.mark.parametrize("name,bits,nans", [("e2m1", 4, 0), ("e2m3", 6, 0), ("e3m2", 6, 0),
                                            ("e4m3", 8, 2), ("e5m2", 8, 6)])
def test_codebook_json_of_an_element_format_is_the_decode_of_every_code(capsys, name, bits, nans):
    doc = run_json(capsys, "codebook", name, "--json")
    assert len(doc["values"]) == 2 ** bits and doc["values"].count(None) == nans
    if name == "e4m3":
        assert doc["values"][0x7E] == 448.0 and doc["values"][0x7F] is None
    if name == "e5m2":                                  # 0 11111 00 and 1 11111 00 are the infinities
        assert doc["values"][0x7C] == "inf" and doc["values"][0xFC] == "-inf"
        assert doc["values"][0x7B] == 57344.0


def test_a_reader_that_stops_early_gets_no_error(tmp_path):
    """`sop codebook bf16 | head -1`: the closed pipe ends the command quietly (exit 128 + SIGPIPE)."""
    proc = subprocess.Popen([sys.executable, "-m", "sop.cli", "codebook", "bf16"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"bf16: 16 bits")
    proc.stdout.close()                                    # 65536 lines still to print
    _, err = proc.communicate(timeout=60)
    assert err == b"" and proc.returncode == 128 + signal.SIGPIPE


def test_unknown_names_list_the_valid_ones(capsys):
    assert main(["codebook", "nf5"]) == 2
    err = capsys.readouterr().err
    assert "nf4" in err and "e2m3" in err
    assert "ue3m3" in err and "bf16" in err and "hif-e3m6b5" in err and "eNmM" in err   # the scale formats too


def test_codebook_prints_hif_and_says_which_int4_it_is(capsys):
    """The LUT's output format is printable; ``int4`` names two tables (formats.md sections 2 and 5):
    the codebook (sign-magnitude, -0 at code 8) wins, and says so; e2m1, the same table both ways,
    gets no note."""
    doc = run_json(capsys, "codebook", "hif-e3m6b5", "--json")
    assert doc["bits"] == 10 and doc["values"][1] == 2.0 ** -10 and doc["values"][511] == 7.9375
    doc = run_json(capsys, "codebook", "int4", "--json")
    assert doc["values"][8] == -0.0 and str(doc["values"][8]) == "-0.0" and "two's complement" in doc["note"]
    assert "note" not in run_json(capsys, "codebook", "e2m1", "--json")


def test_formats_lists_every_scale_format_of_the_docs_and_no_signed_one(capsys):
    """docs/formats.md section 3's table, row for row: every scale a block layout accepts (unsigned)."""
    doc = run_json(capsys, "formats", "--json")
    assert [f["name"] for f in doc["scale"]] == ["ue8m0", "ue4m3", "ue4m4", "ue5m3", "ue3m3", "ue2m4", "ue4m2",
                                                 "ue5m1"]
    assert not any(f["signed"] for f in doc["scale"])


def test_demo_runs_on_real_layers(capsys):
    assert main(["demo", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "e2m3-ue4m4-g16" in out and "sop4-g16" in out
    assert out.count("golden decode == quantizer reconstruction") == 2
    assert "0 mismatches" in out
    engine = re.search(r"layer 0, dot engine, bf16 activations: cosine to float mean ([0-9.]+)", out)
    assert engine and 0.99 < float(engine.group(1)) < 1, out[-600:]


def test_fp6_point_beats_fp8_pot_on_every_minilm_layer():
    """The headline, on the real weights: E2M3 + UE4M4, g16 (6.5 bpw) beats E4M3 with one
    power-of-two scale per layer (8.0 bpw) on every linear layer of all-MiniLM-L6-v2."""
    layout, e2m3 = named_layouts()["e2m3-ue4m4-g16"], get_codebook("e2m3")
    for name, w in minilm_linear_weights().items():
        w = w.astype(np.float64)
        fp6 = decode_layer(encode_layer(w, layout, [e2m3], name=name))
        fp8 = fp8_e4m3_pot(w).recon
        assert ((w - fp6) ** 2).sum() < ((w - fp8) ** 2).sum(), name


def test_formats_keeps_its_columns_in_line_for_long_point_names(capsys):
    """`sop formats` printed every column 12 wide: e2m3-ue4m4-g16 (14) and a user's long point name pushed
    their rows out of line (an outside walk of SOP_POINTS)."""
    from sop.golden.layout import BlockLayout
    from sop.golden.points import OperatingPoint, registered

    long = "a-point-of-my-own-with-a-long-name"
    with registered(OperatingPoint(long, BlockLayout(4, 16, "ue4m4"), "long", codebooks=("nf4",))):
        assert main(["formats"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index("operating points (golden/points.py)") + 1:]
    table = table[:table.index("")]
    assert len(table) == 4 and len({len(line) for line in table}) == 1, table
    assert table[0].split() == ["name", "code_bits", "group", "header_bits", "scale", "block_bpw", "lanes", "output"]
    quantizers = [line for line in out if " bpw   exact: " in line]
    assert len({line.index(" bpw ") for line in quantizers}) == 1 and any(long in q for q in quantizers)


def test_sop_eval_says_each_line_once_in_the_stream_it_belongs_to(tmp_path, capsys):
    """`sop eval` printed what was kept (``kept as they are: ...``), the calibration and each warning about
    the model on standard error as progress and again in its report on standard output: twice on a terminal.
    The report (standard output, a file when piped) says what was kept and the calibration; a warning is
    standard error's (at the start, under --quiet too) and the JSON's; no line is in both streams."""
    import torch
    from safetensors.torch import save_file

    # a gate with no experts beside it: --include-routers warns that there is no router
    save_file({"l.0.fc.weight": torch.ones(4, 16), "l.0.gate.weight": torch.ones(4, 16)},
              tmp_path / "m.safetensors")
    argv = ["eval", str(tmp_path / "m.safetensors"), "--format", "nf4-g64", "--no-calib", "--no-e2e",
            "--include-routers", "--json", str(tmp_path / "e.json")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    warning = "warning: --include-routers: the checkpoint has no MoE router"
    assert out.count("kept as they are: ") == 1 and out.count("calibration: calibration disabled") == 1, out
    assert "kept as they are" not in err and "calibration: " not in err, err
    assert err.count(warning) == 1 and warning not in out, (out, err)
    assert not set(out.splitlines()) & set(err.splitlines()) - {""}, (out, err)
    assert json.loads((tmp_path / "e.json").read_text())["source"]["notes"][0].startswith("--include-routers")
    assert main([*argv[:-2], "--quiet"]) == 0
    out_quiet, err = capsys.readouterr()
    assert err.startswith(warning) and err.count("\n") == 1
    assert out_quiet == out.replace(f"\n\nwrote {argv[-1]}\n", "\n")
