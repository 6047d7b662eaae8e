"""`make sim` for the GEMV engine: its cocotb regression (sim/tb_gemv.py) in Icarus or Verilator.

    python -m sop.sim.gemv_runner [--config NAME ...] [--sim icarus|verilator] [--quick] [--seed N]

For each named engine (hdl.gemv.gemv_configs: ``gemv-sop4-g16``,
``gemv-e2m3-ue4m4-g16``) it converts ``GemvEngine`` to Verilog under
``build/sim/<sim>/<config>/rtl/`` (as named: up to 16384 columns and 65535 rows;
one Verilator waiver, ``SIM_WAIVERS``), writes the plan (``plan.json``: the layers'
beats and every expected ``y`` word) and runs sim/tb_gemv.py on it with
cocotb's runner (sim/runner.py's build and test step, ``simulate``).

Contract: every expected word is ``golden.dot.gemv`` of the layer and the
vector, computed here; the bench only drives beats and compares words. The
plan (``plan_for``; its random layers, and the bench's idles and stalls, drawn
from ``--seed``, else from a new seed each run, printed: ``--seed`` reruns it):

* ``minilm``: MiniLM's layer-0 query quantized to the configuration's operating
  point, with real activations (that layer's inputs in the BERT forward pass of a
  sentence, quantize/e2e.py, rounded to E4M3; cached under build/vectors/). Quick:
  its first 40 rows (two tiles and a partial one) for one token, then the same rows
  with 2 % sparse residuals (quantize/sparse.py); full: all 384 rows for two
  tokens, then 40 rows with residuals for two tokens.
* ``corners`` (layers back to back, a table swap before each): the largest
  magnitudes (every table entry the largest HIF value, the largest scale, x = +-448,
  at offsets 0 and 127: saturation) and the smallest (offset -128, subnormal x);
  cancellation to exactly zero inside a block and across blocks (tables holding
  ``v`` and ``-v``, +-0 entries; with a signed scale, blocks that differ only by the
  sign bit); zero blocks and a zero vector; subnormal, +-0 and +-448 activations; a
  random layer over every code, both banks and signs; a single row; random layers
  with sparse residuals (terms that saturate or go subnormal) and a partial last tile.
* ``errors``: a vector one beat too long, one too short, then one vector for each
  lane of a beat with an E4M3 NaN there (+NaN and -NaN in turn: each lane's
  detector alone) (``x_length``, ``x_nan`` must be set while it is loaded, clear
  after ``clear``; their ``y`` words are counted, not compared), then a good
  vector (compared) and a clear status.

The bench drives random idle cycles on ``x``, ``w``, ``sparse``, ``load`` and
``layer`` and random stalls on ``y`` (``p_idle``, ``p_stall``). One summary line
per configuration: words checked, mismatches. Exit status 1 on any mismatch,
status error, failed test or expected word not checked; 2 on a bad argument or a
missing simulator.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from sop import toolenv
from sop.golden import dot
from sop.golden.layout import LayerStream, Sparse, pack_blocks
from sop.golden.points import get_point
from sop.hdl import gemv
from sop.hdl.gemv import GemvConfig
from sop.sim.runner import SIMULATORS, SimulatorMissing, check_simulator, simulate

E4M3 = dot.ACT_FORMATS["e4m3"]
BF16 = dot.FORMATS["bf16"]
QUERY = "encoder.layer.0.attention.self.query.weight"
SENTENCE = "The quick brown fox jumps over the lazy dog."
#: E4M3 codes the corner vectors draw from: +-0, subnormals, the smallest normal, +-448 (the largest)
SPECIAL_CODES = [0x00, 0x80, 0x01, 0x81, 0x02, 0x05, 0x87, 0x07, 0x08, 0x88, 0x7E, 0xFE]
SIZES = {"quick": {"rows": 40, "tokens": [1], "sparse_tokens": [3]},
         "full": {"rows": None, "tokens": [2, 7], "sparse_tokens": [3, 5]}}


# -- layers and activations (host side, golden only) ---------------------------------------------------------

def point_of(cfg: GemvConfig) -> str:
    """The operating point whose layout and HIF the engine takes."""
    from sop.golden.points import operating_points

    return next(name for name, p in operating_points().items() if (p.layout, p.hif) == (cfg.layout, cfg.hif))


def minilm_activations() -> np.ndarray:
    """E4M3 codes (tokens, 384) of the query layer's inputs in the BERT forward pass of ``SENTENCE``
    (quantize/e2e.py's hook, the calibration's forward), cached under build/vectors/."""
    path = toolenv.build_root() / "vectors" / "gemv-minilm-query-x-e4m3.npy"
    if not path.is_file():
        from sop.golden.files import write_atomic
        from sop.quantize.e2e import Bert
        from sop.quantize.models import minilm_folder

        seen = []
        Bert(minilm_folder()).embed([SENTENCE], hook=lambda name, x: seen.append(x) if name == QUERY else None)
        codes = E4M3.encode(np.clip(seen[0], -E4M3.max, E4M3.max)).astype(np.uint8)
        buf = io.BytesIO()
        np.save(buf, codes)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())
    return np.load(path).astype(np.int64)


def minilm_layers(point: str, rows: int | None) -> tuple[LayerStream, LayerStream]:
    """The query layer's first ``rows`` rows (all with None) quantized to ``point``, and its first 40
    rows with sparse residuals at 2 % (the knapsack's SOP4 density)."""
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.sparse import add_sparse
    from sop.quantize.weights import minilm_linear_weights

    w = minilm_linear_weights()[QUERY].astype(np.float32)
    fmt = get_quant_format(point)
    plain = fmt.quantize(w if rows is None else w[:rows]).stream
    head = w[:40]
    res = fmt.quantize(head)
    return plain, add_sparse(res.stream, head, res.recon, int(0.02 * head.size))[0]


def make_layer(point: str, luts, offset: int, rows: int, headers, codes, sparse: Sparse | None = None) -> LayerStream:
    p = get_point(point)
    lay = p.layout
    blocks = pack_blocks(lay, np.asarray(headers, np.int64), np.asarray(codes, np.int64).reshape(-1, lay.group))
    return LayerStream(lay, p.hif, np.asarray(luts, np.int64), offset, rows, len(headers) * lay.group // rows, blocks,
                       sparse or Sparse(np.zeros(0, np.uint32), np.zeros(0, np.uint16)))


def random_layer(point: str, rows: int, cols: int, rng, offset: int | None = None) -> LayerStream:
    """Random tables (HIF codes of both signs, +-0), headers over every scale, sign and bank, codes."""
    lay, hif = get_point(point).layout, get_point(point).hif
    n = rows * cols // lay.group
    luts = rng.integers(0, 1 << hif.bits, (lay.banks, 1 << lay.code_bits))
    luts[:, 0] = 0
    headers = lay.make_header(rng.integers(0, 1 << lay.scale.bits, n),
                              rng.integers(0, 2, n) if lay.signed_scale else 0,
                              rng.integers(0, 2, n) if lay.select_bit else 0)
    off = int(rng.integers(-20, 21)) if offset is None else offset
    return make_layer(point, luts, off, rows, headers, rng.integers(0, 1 << lay.code_bits, (n, lay.group)))


def with_residuals(layer: LayerStream, rng, n: int) -> LayerStream:
    """``layer`` with ``n`` entries at random places, BF16 values that are tiny, plain or huge (terms
    that go subnormal, are exact, or saturate)."""
    index = np.sort(rng.choice(layer.rows * layer.cols, n, replace=False)).astype(np.uint32)
    mag = np.exp2(rng.choice([-132, -8, 121], n) + rng.uniform(0, 6.9, n))
    value = BF16.encode(BF16.quantize(mag * rng.choice([-1, 1], n))).astype(np.uint16)
    return LayerStream(layer.layout, layer.hif, layer.luts, layer.offset, layer.rows, layer.cols, layer.blocks,
                       Sparse(index, value))


def extreme_layer(point: str, largest: bool, offset: int, rows: int = 4, cols: int = 64) -> LayerStream:
    """Every table entry the largest (or smallest nonzero) HIF magnitude, both signs by bank or code,
    every scale the largest (or smallest nonzero): rows 0 and 1 all positive, then all negative
    (the block sign, or the negative entries), then alternating."""
    p = get_point(point)
    lay, hif = p.layout, p.hif
    sign_bit = 1 << (hif.bits - 1)
    mag = sign_bit - 1 if largest else 1
    half = 1 << (lay.code_bits - 1)
    table = np.array([mag] * half + [mag | sign_bit] * half)          # codes of the upper half negative
    luts = np.tile(table, (lay.banks, 1))
    n_blocks = cols // lay.group
    scale = (1 << lay.scale.bits) - 1 if largest else 1
    headers, codes = [], []
    for r in range(rows):
        for b in range(n_blocks):
            negative = r in (1, 2) or (r == 3 and b % 2)
            sign = int(negative and lay.signed_scale and r == 1)
            code = half + (b % half) if negative and not sign else b % half
            headers.append(int(lay.make_header(scale, sign if lay.signed_scale else 0, b % 2 if lay.select_bit else 0)))
            codes.append([code] * lay.group)
    return make_layer(point, luts, offset, rows, headers, codes)


def cancelling_layer(point: str, rng, rows: int = 22, cols: int = 64) -> LayerStream:
    """Tables with ``t[i + half] = -t[i]`` (and a -0 entry): row 0 cancels inside each block (codes
    ``i, i + half`` in pairs; with the paired x of ``paired_vector`` each pair sums to 0), row 1
    across blocks (block ``2k + 1`` the negatives of block ``2k``), row 2 by the block sign (signed
    scales), row 3 all zero codes; the rest random; 22 rows: a full tile and a partial one."""
    p = get_point(point)
    lay, hif = p.layout, p.hif
    half = 1 << (lay.code_bits - 1)
    sign_bit = 1 << (hif.bits - 1)
    luts = np.zeros((lay.banks, 1 << lay.code_bits), np.int64)
    for b in range(lay.banks):
        pos = rng.integers(1, sign_bit, half)
        pos[0] = 0
        luts[b, :half], luts[b, half:] = pos, pos | sign_bit
    n_blocks = cols // lay.group
    scales = rng.integers(1, 1 << lay.scale.bits, n_blocks)
    selects = rng.integers(0, 2, n_blocks) if lay.select_bit else np.zeros(n_blocks, np.int64)
    headers, codes = [], []
    for r in range(rows):
        for b in range(n_blocks):
            pair = b - b % 2                     # block b and its partner share scale and bank
            base = np.random.default_rng(1000 * r + pair).integers(0, half, lay.group)
            sign = 0
            if r == 0:
                base = base.reshape(-1, 2)[:, :1].repeat(2, 1).reshape(-1)
                c = base + half * (np.arange(lay.group) % 2)
            elif r == 1:
                c = base + half * (b % 2)
            elif r == 2 and lay.signed_scale:
                c, sign = base, b % 2
            elif r == 3:
                c = np.zeros(lay.group, np.int64)
            else:
                c = rng.integers(0, 1 << lay.code_bits, lay.group)
                sign = int(rng.integers(0, 2)) if lay.signed_scale else 0
            headers.append(int(lay.make_header(scales[pair], sign, selects[pair])))
            codes.append(c)
    return make_layer(point, luts, int(rng.integers(-10, 11)), rows, headers, codes)


def paired_vector(rng, cols: int, g: int) -> np.ndarray:
    """E4M3 codes whose block ``2k + 1`` repeats block ``2k`` and whose columns come in equal pairs."""
    pairs = rng.integers(0, 0x7F, (cols // (2 * g), g // 2)) | (rng.integers(0, 2, (cols // (2 * g), g // 2)) << 7)
    block = pairs.repeat(2, axis=1)
    return block.repeat(2, axis=0).reshape(-1)


def special_vector(rng, cols: int) -> np.ndarray:
    """E4M3 codes from ``SPECIAL_CODES`` (subnormals, +-0, +-448), a quarter of them random finite."""
    x = rng.choice(SPECIAL_CODES, cols)
    other = rng.random(cols) < 0.25
    x[other] = rng.integers(0, 0x7F, other.sum()) | (rng.integers(0, 2, other.sum()) << 7)
    return x


def corner_layers(point: str, rng) -> list[tuple[str, LayerStream, list[np.ndarray]]]:
    """(name, layer, E4M3 code vectors) of the corner cases, streamed back to back."""
    g = get_point(point).layout.group
    ones = np.full(64, 0x7E)
    mixed = np.where(np.arange(64) % 3 == 0, 0xFE, 0x7E)
    cancel = cancelling_layer(point, rng)
    out = [("largest-offset0", extreme_layer(point, True, 0), [ones, mixed]),
           ("largest-offset127", extreme_layer(point, True, 127), [ones]),
           ("smallest-offset-128", extreme_layer(point, False, -128), [np.full(64, 0x01), special_vector(rng, 64)]),
           ("cancellation-and-zero-blocks", cancel, [paired_vector(rng, 64, g), np.zeros(64, np.int64)]),
           ("every-code-bank-sign", random_layer(point, 17, 16 << get_point(point).layout.code_bits, rng),
            [special_vector(rng, 16 << get_point(point).layout.code_bits)]),
           ("one-row", random_layer(point, 1, 48, rng), [special_vector(rng, 48)]),
           ("sparse-40-rows", with_residuals(random_layer(point, 40, 32, rng), rng, 60),
            [special_vector(rng, 32), rng.integers(0, 0x7F, 32)]),
           ("plain-after-sparse", random_layer(point, 18, 32, rng), [rng.integers(0, 0x7F, 32)])]
    return out


# -- the plan --------------------------------------------------------------------------------------------------

def layer_entry(cfg: GemvConfig, name: str, layer: LayerStream, vectors) -> dict:
    """A layer as the bench drives it: table writes, layer registers, ``w`` and ``sparse`` beats, and
    per vector its ``x`` beats and the expected ``y`` words (golden.dot.gemv)."""
    lay = layer.layout
    vectors = [np.asarray(v, np.int64) for v in vectors]
    x = E4M3.decode(np.stack(vectors)).astype(np.float32)
    y = gemv.model(cfg, layer, x).view(np.uint32)
    return {"name": name, "rows": layer.rows,
            "loads": [[b, a, int(layer.luts[b][a])] for b in range(lay.banks) for a in range(1 << lay.code_bits)],
            "layer": [layer.rows, layer.cols // lay.group, layer.offset, int(len(layer.sparse) > 0)],
            "w": gemv.w_beats(cfg, layer),
            "sparse": [[e["row"], e["col"], e["value"], e["last"]] for e in gemv.sparse_beats(cfg, layer)]
            if len(layer.sparse) else [],
            "entries": int(len(layer.sparse)),
            "vectors": [{"x": gemv.x_beats(cfg, v), "expect": [int(w) for w in yv]} for v, yv in zip(vectors, y)]}


def error_job(cfg: GemvConfig, point: str, rng) -> dict:
    """A 3-row, 2-block layer; a block offered before any vector; vectors too long, too short, with a
    NaN in each lane of a beat (one vector a lane, +NaN and -NaN in turn: every lane's detector must
    fire on its own; their ``y`` counted, not compared), then a good one with 448 (compared); a layer
    word with no rows; the layer with a sparse entry beyond its columns."""
    layer = random_layer(point, 3, 2 * cfg.group, rng, offset=0)
    good = rng.integers(0, 0x7F, 2 * cfg.group)
    good[5] = 0x7E
    entry = layer_entry(cfg, "errors", layer, [good])
    beats = entry["vectors"][0]["x"]
    nans = [beats[1] & ~(0xFF << 8 * k) | (0x7F | (k & 1) << 7) << 8 * k for k in range(cfg.group)]
    cases = [("x_length", beats + [beats[0]]), ("x_length", beats[:1])] + [("x_nan", [beats[0], n]) for n in nans]
    entry["cases"] = [{"error": "w_before_x", "offer": 5}] + [{"error": e, "x": x} for e, x in cases] + \
        [{"error": None, **entry["vectors"][0]}]
    # the layer registers: a layer word with no rows (nothing else is sent)
    entry["cases"].append({"error": "layer", "layer": [0, *entry["layer"][1:]]})
    # the sparse side: the same layer with entries, one moved beyond the layer's columns: its tables
    # and layer word into the inactive page, its x swaps them in, then the blocks and the entries
    # (its y counted)
    sparse = layer_entry(cfg, "errors+sparse", with_residuals(layer, rng, 4), [good])
    bad = sparse["sparse"][1]
    bad[1] = layer.cols + cfg.group * int(rng.integers(0, 4))
    entry["cases"].append({"error": "sparse", "loads": sparse["loads"], "layer": sparse["layer"], "x": beats,
                           "sparse": sparse["sparse"]})
    return {"kind": "errors", **entry}


def plan_for(cfg: GemvConfig, size: str, seed: int) -> dict:
    point = point_of(cfg)
    rng = np.random.default_rng(seed)
    s = SIZES[size]
    x = minilm_activations()
    plain, sparse = minilm_layers(point, s["rows"])
    minilm = [layer_entry(cfg, f"{QUERY}[:{plain.rows}]", plain, x[s["tokens"]]),
              layer_entry(cfg, f"{QUERY}[:40]+2%sparse", sparse, x[s["sparse_tokens"]])]
    corners = [layer_entry(cfg, name, layer, v) for name, layer, v in corner_layers(point, rng)]
    return {"config": cfg.name, "point": point, "seed": seed, "engine": {"tile": cfg.tile, "max_cols": cfg.max_cols,
                                                            "max_rows": cfg.max_rows, "lutram_depth": cfg.lutram_depth},
            "size": size, "p_idle": 0.25, "p_stall": 0.3,
            "jobs": [{"kind": "layers", "name": "minilm", "layers": minilm},
                     {"kind": "layers", "name": "corners", "layers": corners}, error_job(cfg, point, rng)]}


def expected_words(plan: dict) -> int:
    """The ``y`` words the plan's bench compares."""
    n = 0
    for job in plan["jobs"]:
        if job["kind"] == "layers":
            n += sum(len(v["expect"]) for layer in job["layers"] for v in layer["vectors"])
        else:
            n += sum(len(c.get("expect") or []) for c in job["cases"] if c["error"] is None)
    return n


#: Verilator warnings the engine's Verilog raises beyond hdl/lint.vlt's, waived in the file for the
#: simulation only: CMPCONST, the sequencer's ``layer.rows > max_rows`` check, constant when
#: ``max_rows`` is the largest value of the ``rows`` field (65535 in the named engines).
SIM_WAIVERS = "/* verilator lint_off CMPCONST */\n"


def build_verilog(cfg: GemvConfig, out_dir: Path, engine=None) -> Path:
    """``engine`` (default ``GemvEngine(cfg)``) as Verilog, module ``gemv.module_name(cfg)``, with
    ``SIM_WAIVERS`` in front."""
    from amaranth.back import verilog

    from sop.golden.files import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gemv.module_name(cfg)}.v"
    text = verilog.convert(engine or gemv.GemvEngine(cfg), name=gemv.module_name(cfg), emit_src=False)
    write_atomic(path, (SIM_WAIVERS + text).encode())
    return path


def run(cfg: GemvConfig, sim: str = "icarus", *, quick: bool = False, seed: int | None = None,
        verilog: Path | None = None, build_dir: Path | None = None, plan_edit=None, waves: bool = False) -> dict:
    """Build and run the regression of ``cfg``; the summary (words checked, mismatches, failed tests,
    seconds). ``verilog`` replaces the generated design and ``plan_edit(plan)`` changes the plan
    (tests inject bugs with them)."""
    check_simulator(sim)
    size = "quick" if quick else "full"
    build_dir = Path(build_dir or toolenv.build_root() / "sim" / sim / cfg.name).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    if verilog is None:
        verilog = build_verilog(cfg, build_dir / "rtl")
    seed = secrets.randbelow(1 << 31) if seed is None else seed
    plan = plan_for(cfg, size, seed)
    if plan_edit is not None:
        plan_edit(plan)
    summary = simulate(cfg, sim, Path(verilog), gemv.module_name(cfg), "sop.sim.tb_gemv", plan, size, build_dir,
                        seed=seed, waves=waves)
    summary.update(seed=seed, expected=expected_words(plan))
    return summary


def summary_line(s: dict) -> str:
    return (f"{s['config']} [{s['sim']}, {s.get('plan')}]: {s.get('checked', 0)} words checked "
            f"({s.get('counted', 0)} more counted after a bad vector, {s.get('entries', 0)} sparse entries, "
            f"{s.get('layers', 0)} layers), {s['mismatches']} mismatches, {s.get('status_errors', 0)} status errors "
            f"(seed {s.get('seed')}, {s.get('cycles', 0)} cycles, {s['wall_seconds']:.1f} s)")


def passed(s: dict) -> bool:
    return (s["mismatches"] == 0 and s["failed_tests"] == 0 and s.get("status_errors") == 0
            and s.get("checked") == s.get("expected"))


def cli(argv, description: str, run_one, line, ok) -> int:
    """The command line of an engine bench (this runner's and sim.tb_gemv_axis's): ``run_one(cfg, sim,
    quick=, seed=, waves=)`` for each named engine chosen, ``line(summary)`` printed, exit 0 when
    ``ok(summary)`` for all, 2 when the simulator is missing."""
    configs = gemv.gemv_configs()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", action="append", choices=list(configs), help="a named engine (default: all)")
    p.add_argument("--sim", default=os.environ.get("SIM", "icarus"), choices=list(SIMULATORS))
    p.add_argument("--quick", action="store_true", help="the fast subset (make test)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    waves = os.environ.get("WAVES", "0") not in ("", "0")
    results = []
    try:
        for name in args.config or list(configs):
            results.append(run_one(configs[name], args.sim, quick=args.quick, seed=args.seed, waves=waves))
            print(line(results[-1]), flush=True)
    except SimulatorMissing as err:
        print(f"sop sim: {err}", file=sys.stderr)
        return 2
    print("\n".join(["", "summary:"] + [line(s) for s in results]))
    return 0 if all(ok(s) for s in results) else 1


def main(argv=None) -> int:
    return cli(argv, __doc__.splitlines()[0], run, summary_line, passed)


if __name__ == "__main__":
    sys.exit(main())
