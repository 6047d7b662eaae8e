"""The `sop` command line.

    sop formats [--json]          every element, scale and output format, HIF and codebook, with widths
    sop codebook NAME [--json]    the values of a codebook or element format, and its LUT image in HIF
    sop demo [--layers N]         encode the built-in model (all-MiniLM-L6-v2) into the golden block
                                  layout, decode it with the golden model, print the error per format
    sop eval MODEL --format F [--format F ...] [--budget B] [--json FILE] [--jobs N] [--device D]
                                  quantize a model's linear layers in each format, print and write the
                                  errors (quantize/evaluate.py has the JSON schema); MODEL is a
                                  safetensors / torch / GGUF file, a HF folder, `minilm` or `smollm2`;
                                  --jobs N: N layers at once in worker processes (quantize/jobs.py);
                                  --device numpy|cpu|cuda[:N]: where the SOP search runs, the same
                                  bits on each (quantize/device.py)
    sop vectors MODEL --format F [--layer NAME ...] --out DIR [--rows N]
                                  real quantized layers as test vectors for the RTL (docs/vectors.md)
    sop quantize MODEL --format F --out FILE.sopq [--budget B] [--jobs N] [--device D]
                                  write the quantized artifact (quantize/artifact.py has the container)
    sop dequantize FILE.sopq --out W.safetensors [--model-folder|--gguf [--dtype float32|bfloat16]]
                                  decode every layer through the golden decoder into float32 safetensors
                                  (--model-folder: a whole causal-LM folder transformers loads; --gguf,
                                  an artifact of a GGUF: that GGUF with the layers decoded, for llama.cpp)
    sop gemv FILE.sopq --layer NAME --x X.npy [--x-format bf16|e4m3] --out Y.npy
                                  y = W x of one quantized layer by the golden dot-product engine
                                  (golden/dot.py, docs/dot.md): X (in,) or (batch, in) float32 whose
                                  values the activation format holds exactly; Y (out,) or (batch, out)
    sop report FILE.json [--out STEM] [--bpw-tol T]
                                  markdown table and SQNR-vs-bpw plot (PNG) of a `sop eval --json` file
    sop board --port PORT MODEL|FILE.sopq --format F [--layer NAME] [--baud B] [--timeout S] [--rows N]
              [--gemv [--x X.npy]]
                                  one quantized layer through an FPGA board's decoder over its serial
                                  port (a stored layer's sparse residuals too: the board adds them),
                                  checked against golden/ (synth/host/bringup.py); --gemv: the layer's
                                  y = W x on the board's GEMV engine (the ULX3S core, or the
                                  iCEBreaker's GEMV-only core icebreaker-gemv, which has no decoder nor
                                  residual path; sparse residuals included on the ULX3S) with a real
                                  MiniLM activation vector,
                                  bit-exact against golden/dot.py, its error against float64 and the
                                  throughput (synth/host/gemv_bringup.py); exit 0 when the board's result matches,
                                  1 on a mismatch or a board that does not answer, 2 on a usage error
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from sop.launch import INTERRUPTED_STARTING

try:                    # the imports (numpy's) take a few tenths of a second: a Ctrl-C in them is one line too
    from sop.argtypes import ToolParser, as_typed, in_file, layer_name, number, positive, serial_port
    from sop.golden.dot import ACT_FORMATS
    from sop.golden.files import (EMPTY_FOLDER_NAME, OutputError, check_output, input_file, interrupted,
                                  nearest_existing, signals_as_interrupts, write_atomic)
    from sop.golden.codebooks import codebook_names, get_codebook
    from sop.golden.formats import (ELEMENT_FORMATS, FORMATS, OUTPUT_FORMATS, SCALE_FORMATS, FloatFormat,
                                    UnknownFormat, get_format)
    from sop.golden.hif import DEFAULT_HIF
    from sop.golden.points import board_points, operating_points, vector_points
    from sop.quantize.calib import DEFAULT_CACHE, MAX_CALIB_TEXT_BYTES, CalibSize
    from sop.quantize.causal_lm import DEFAULT_E2E_WINDOWS
    from sop.quantize.hf_export import DTYPES
    from sop.quantize.inputs import NAN_POLICIES, command_line
    from sop.quantize.jobs import WorkerError
    from sop.quantize.memory import release_freed_memory
    from sop.quantize.models import model_inputs
    from sop.synth.wire import DEFAULT_BAUD
    from sop.terminal import finish_output, one_line, os_error_text, prepare_streams, reader_gone
    from sop.user_points import refused_at_start
except KeyboardInterrupt:
    print(INTERRUPTED_STARTING, file=sys.stderr)
    raise SystemExit(128 + signal.SIGINT) from None


def _describe(fmt) -> dict:
    d = {"name": fmt.name, "bits": fmt.bits, "signed": fmt.signed, "max": fmt.max,
         "min_positive": fmt.min_positive}
    if isinstance(fmt, FloatFormat):
        d.update(ebits=fmt.ebits, mbits=fmt.mbits, bias=fmt.bias, specials=fmt.specials)
    else:
        d["kind"] = "two's complement integer"
    return d


def formats_doc() -> dict:
    return {
        "element": [_describe(f) for f in ELEMENT_FORMATS.values()],
        "scale": [_describe(f) for f in SCALE_FORMATS.values()],
        "output": [_describe(f) for f in OUTPUT_FORMATS.values()] + [
            {"name": "exact", "bits": None, "note": "the exact product, sign/significand/exponent"}],
        "hif": _describe(DEFAULT_HIF),
        "codebooks": [{"name": n, "bits": get_codebook(n).bits} for n in codebook_names() if n != "dd4"]
                     + [{"name": "dd4", "bits": 4, "note": "fitted per layer"}],
        "points": [p.describe() for p in operating_points().values()],
        "quantizers": _quantizers(),
    }


def _quantizers() -> list[dict]:
    """Every `sop eval --format` name with its bits per weight (quantize/schemes.py)."""
    from sop.quantize.schemes import quant_formats

    return [f.describe() for f in quant_formats().values()]


def codebook_doc(name: str) -> dict:
    """Values in code order (null for NaN, the strings "inf" and "-inf" for the infinities: JSON has
    no number for them) and, for the tables a LUT holds, their HIF codes."""
    import numpy as np

    key = name.lower()
    note = None
    if key in codebook_names():
        cb = get_codebook(key)          # dd4 raises: it has no fixed table
        values, hif = cb.values, cb.hif_codes.tolist()
        if key in FORMATS and not np.array_equal(values, FORMATS[key].values, equal_nan=True):
            # int4: the codebook is sign-magnitude (-0 at code 8), the element format two's complement
            note = (f"{key} is also an element format ({_describe(FORMATS[key]).get('kind', 'a float')}, "
                    f"`sop formats --json`); this is the codebook")
    elif key == DEFAULT_HIF.name:
        values, hif = DEFAULT_HIF.values, None
    else:
        try:
            fmt = get_format(key)
        except UnknownFormat:
            raise ValueError(f"unknown codebook or format {name!r}; codebooks: {', '.join(codebook_names())}; "
                             f"formats: {', '.join(FORMATS)}, {DEFAULT_HIF.name}, or any eNmM, ueNmM, "
                             f"eNmMbB (docs/formats.md, section 2)") from None
        values, hif = fmt.values, None  # a number format, not a LUT table
    doc = {"name": key, "bits": int(math.log2(len(values))),
           "values": [None if math.isnan(v) else float(v) if math.isfinite(v) else f"{v:g}" for v in values],
           "hif": hif, "hif_format": DEFAULT_HIF.name}
    if note:
        doc["note"] = note
    return doc


def _print_table(rows: list[dict], keys: list[str]) -> None:
    """``rows`` in right-aligned columns, each as wide as its widest entry (12 at least): a point named
    longer than 12 (``e2m3-ue4m4-g16``, a user's own) pushed its row's columns out of line."""
    widths = [max([12, len(k)] + [len(str(r.get(k, ""))) for r in rows]) for k in keys]
    print("  ".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(f"{str(r.get(k, '')):>{w}}" for k, w in zip(keys, widths)))


def cmd_formats(args) -> int:
    doc = formats_doc()
    if args.json:
        print(json.dumps(doc, indent=1, allow_nan=False))
        return 0
    for section in ("element", "scale", "output"):
        print(f"\n{section} formats")
        _print_table(doc[section], ["name", "bits", "ebits", "mbits", "bias", "specials", "max"])
    print(f"\nHIF (LUT output): {doc['hif']['name']}, {doc['hif']['bits']} bits")
    print("codebooks: " + ", ".join(f"{c['name']}({c['bits']}b)" for c in doc["codebooks"]))
    print("\noperating points (golden/points.py)")
    _print_table(doc["points"], ["name", "code_bits", "group", "header_bits", "scale", "block_bpw", "lanes",
                                 "output"])
    print("\nquantizer formats (sop eval --format)")
    width = max(len(q["bpw_formula"]) for q in doc["quantizers"])       # the longest formula sets the column
    names = max([16] + [len(q["name"]) for q in doc["quantizers"]])     # and the longest name (a user's point)
    for q in doc["quantizers"]:
        bpw = "-" if q["bpw"] is None else f"{q['bpw']:g}"
        print(f"  {q['name']:<{names}} {bpw:>6} bpw   exact: {q['bpw_formula']:<{width}}  {q['description']}")
    return 0


def cmd_codebook(args) -> int:
    doc = codebook_doc(args.name)
    if args.json:
        print(json.dumps(doc, indent=1, allow_nan=False))
    else:
        print(f"{doc['name']}: {doc['bits']} bits, LUT format {doc['hif_format']}")
        if "note" in doc:
            print(f"note: {doc['note']}")
        for code, v in enumerate(doc["values"]):
            h = doc["hif"][code] if doc["hif"] is not None else "-"
            print(f"  {code:3d}  {v!s:>24}  hif {h}")
    return 0


def cmd_demo(args) -> int:
    from sop import demo

    return demo.run(limit=args.layers)


def _search_settings(args):
    """``--device`` and ``SOP_LAYER_TIMEOUT`` checked before any work (one error line each);
    the context the search runs in."""
    from sop.quantize import device, jobs

    dev = device.check(args.device)
    if args.jobs > 1:
        jobs.limit_override()
    return device.use(dev)


def _refuse_report_name(path: str) -> None:
    """``--json X.md`` (or ``.png``) wrote JSON under the name of one of `sop report`'s outputs: `sop report
    X.md` then refuses to write its table over its input, and anything else reading X.md takes JSON for
    markdown. Refused before any work, as `sop report --out X.md` is."""
    from sop.quantize.report import REPORT_SUFFIXES

    given = Path(path)
    if given.suffix.lower() in REPORT_SUFFIXES:
        raise OutputError(f"--json {path}: `sop eval` writes JSON, and `sop report` writes its table and plot as "
                          f"{given.with_suffix('.md').name} and {given.with_suffix('.png').name}; "
                          f"give {given.with_suffix('.json')}")


def cmd_eval(args) -> int:
    from sop.quantize import evaluate

    settings = _search_settings(args)
    if args.json is not None:                   # --json '' is refused, not taken for no --json
        check_output(args.json, model_inputs(args.model), option="--json")
        _refuse_report_name(args.json)
    _check_calibration(args, args.json)
    _check_eval_text(args, args.json)
    with settings:
        doc = evaluate.evaluate(args.model, args.format, budget=args.budget, include=args.include,
                                exclude=args.exclude, calibrate=not args.no_calib, e2e=not args.no_e2e,
                                nan_policy=args.nan_policy, n_calib=_calib_size(args),
                                cache_dir=args.cache_dir, progress=not args.quiet,
                                lm_head=args.include_lm_head, routers=args.include_routers,
                                e2e_windows=args.e2e_windows, jobs=args.jobs, calib_text=args.calib_text,
                                eval_text=args.eval_text)
    try:
        if args.json is not None:               # the file before the table: a reader gone (`| head`) cannot cost it
            evaluate.write_json(args.json, doc)
    finally:                                    # and one that cannot be written (a full disk) costs no table
        print(evaluate.format_table(doc))
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return 0


def cmd_vectors(args) -> int:
    from sop.sim.vectors import make_vectors

    check_output(args.out, model_inputs(args.model), folder=True)
    _not_the_model_folder(args.out, args.model)
    path = make_vectors(args.model, args.format, args.layer, args.out, rows=args.rows, lm_head=args.include_lm_head)
    print(f"wrote {path}")
    return 0


def _not_the_model_folder(out, model) -> None:
    """Refuse an output folder that is the source model's own folder (a folder model), as `sop dequantize
    --model-folder` does: `sop vectors` wrote its 5 files a layer there, and its `.txt` and `.json` files became
    the model's configuration files (hashed into every later `.sopq`'s record of them, and a change to them a
    warning of the model folder export)."""
    if not os.path.isdir(model):
        return
    try:
        same = os.path.samefile(out, model)
    except OSError:                                     # an output folder still to be made is no model folder
        same = False
    if same:
        raise OutputError(f"{out}: the output folder is the source model's folder ({model}); refusing to write "
                          f"into the model (choose another --out)")


def cmd_quantize(args) -> int:
    import time

    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import budget_choices_line

    settings = _search_settings(args)
    check_output(args.out, model_inputs(args.model))
    _check_calibration(args, args.out)
    t0 = time.time()
    with settings:
        info = quantize_model(args.model, args.format, args.out, budget=args.budget, include=args.include,
                              exclude=args.exclude, calibrate=not args.no_calib, nan_policy=args.nan_policy,
                              n_calib=_calib_size(args), cache_dir=args.cache_dir, progress=not args.quiet,
                              jobs=args.jobs, lm_head=args.include_lm_head, routers=args.include_routers,
                              calib_text=args.calib_text)
    layers = f"{info['layers']} layer{'s' if info['layers'] != 1 else ''}"
    print(f"wrote {info['path']}: {info['format']}, {layers}, {info['weights']:,} weights, "
          f"{info['bpw']:.4f} bpw, SQNR {info['sqnr_db']:.2f} dB, {info['bytes']:,} bytes "
          f"({time.time() - t0:.1f} s)")
    if info["budget"] is not None:               # what the knapsack chose, in sop eval's words
        print(budget_choices_line(info["format"], info["budget"], info["choices"]))
    if "f32" in info["records"]:
        print("note: layers without a golden layer stream (baseline formats) are stored decoded, as float32")
    return 0


#: `sop dequantize`'s output switches, each with where its output is named instead
_OUTPUT_SWITCHES = {"--model-folder": "the folder to write is --out DIR",
                    "--gguf": "the file to write is --out OUT.gguf"}


def _model_folder_hint(argv: list[str], message: str) -> str:
    """`sop dequantize A.sopq --model-folder DIR` reads as the folder given: it said only that --out is
    required (DIR unused), then, with an --out, that DIR is an unrecognized argument (`--model-folder=DIR`:
    an ignored explicit argument); `--gguf OUT.gguf` alike."""
    for switch, instead in _OUTPUT_SWITCHES.items():
        hint = f"{switch} takes no value: {instead}"
        if message.startswith(f"argument {switch}: ignored explicit argument"):
            return hint
        if switch not in argv:
            continue
        after = argv[argv.index(switch) + 1:]
        valued = bool(after) and not after[0].startswith("-") and after[0] in message.split(": ", 1)[-1].split()
        if message.startswith("the following arguments are required:") and "--out" in message \
                or message.startswith("unrecognized arguments:") and valued:
            return hint
    return ""


def cmd_dequantize(args) -> int:
    import time

    from sop.quantize.artifact import dequantize

    if args.gguf and args.model_folder:
        raise ValueError("--gguf and --model-folder are two outputs: give one (--gguf: a GGUF file llama.cpp runs, "
                         "--model-folder: a transformers folder)")
    if args.gguf:
        from sop.quantize.gguf_export import export_gguf

        check_output(args.out, [args.file])                 # and against the source GGUF, once it is known
        t0 = time.time()
        info = export_gguf(args.file, args.out, model=args.model, progress=not args.quiet,
                           dtype=args.dtype or "float32")
        n, tensors = info["layers"], info["tensors"]
        print(f"wrote {info['path']}: a GGUF file of {tensors} decoded tensor{'s' if tensors != 1 else ''} in "
              f"{info['dtype']} ({n} quantized layer{'s' if n != 1 else ''}, {info['format']}) and {info['copied']} "
              f"copied from {info['model']}, {info['bytes']:,} bytes ({time.time() - t0:.1f} s)")
        return 0
    if args.model_folder:
        from sop.quantize.hf_export import export_model_folder

        check_output(args.out, [args.file], folder=True)    # and against the source model, once it is known
        t0 = time.time()
        info = export_model_folder(args.file, args.out, model=args.model, progress=not args.quiet,
                                   dtype=args.dtype or "float32")
        for warning in info["warnings"]:                    # printed even when quiet: no progress
            print(one_line(f"warning: {warning}"), file=sys.stderr)
        n, rest = info["layers"], info["reference_layers"]
        others = f"; its other {rest} linear weights, not in the artifact, are the reference's" if rest else ""
        print(f"wrote {info['path']}: a transformers model folder in {info['dtype']} ({', '.join(info['files'])}), "
              f"{n} quantized layer{'s' if n != 1 else ''} ({info['format']}) over the reference {info['model']}"
              f"{others} ({time.time() - t0:.1f} s)")
        return 0
    for given, flag in ((args.model, "--model"), (args.dtype, "--dtype")):
        if given is not None:
            raise ValueError(f"{flag} applies with --model-folder only, or with --gguf")
    check_output(args.out, [args.file])
    t0 = time.time()
    info = dequantize(args.file, args.out, progress=not args.quiet)
    fused = f" ({info['layers']} layers)" if info["tensors"] != info["layers"] else ""
    plural = "s" if info["tensors"] != 1 else ""
    print(f"wrote {info['path']}: {info['tensors']} float32 tensor{plural}{fused}, {info['weights']:,} weights "
          f"({info['format']}, {time.time() - t0:.1f} s)")
    return 0


def _artifact_layer(art, name: str):
    """The entry of layer ``name``; a ValueError naming a few valid layers otherwise."""
    for e in art.layers:
        if e.name == name:
            return e
    raise ValueError(f"--layer {name!r} is not a layer of {art.path}; its layers: {art.some_layer_names()}")


NPY_MAGIC = b"\x93NUMPY"                # the .npy format's first bytes (an .npz is a zip: "PK")


def _load_vectors(path: Path, cols: int, layer: str):
    """X from a .npy file: a 1-D (in,) or 2-D (batch, in) float32 array, anything else refused."""
    import numpy as np

    input_file(path, "--x file")
    with open(path, "rb") as f:             # numpy takes any other file for a pickle: "contains pickled data"
        magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC and not magic.startswith(b"PK"):
        raise ValueError(f"{path}: not a .npy array (no .npy header; write one with numpy.save)")
    try:        # mapped, not read: a header claiming more data than the file holds is refused, not allocated
        x = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        if "mmap length is greater than file size" in str(err):
            raise ValueError(f"{path}: truncated .npy file: its header claims more data than the file "
                             f"holds") from None
        raise ValueError(f"{path}: not a .npy array: {_one_line(err)}") from None
    if not isinstance(x, np.ndarray):                    # an .npz archive
        x.close()
        raise ValueError(f"{path}: an .npz archive, not one .npy array")
    if x.dtype.kind != "f" or x.dtype.itemsize != 4:
        raise ValueError(f"{path}: X must be float32, got {x.dtype}")
    if x.ndim not in (1, 2) or x.size == 0:
        raise ValueError(f"{path}: X must be a nonempty 1-D (in,) or 2-D (batch, in) array, got shape {x.shape}")
    if x.shape[-1] != cols:
        raise ValueError(f"{path}: X has {x.shape[-1]} entries per vector; layer {layer} takes {cols} "
                         f"(its input width)")
    return np.array(x, dtype=np.float32)                 # read, in native byte order


def _npy_not_named_as_a_model(out) -> None:
    """Refuse a ``sop gemv --out`` named as a checkpoint or an artifact (``Y.safetensors``, ``Y.sopq``): it wrote
    the .npy there, which every model reader takes by its name's ending (a damaged checkpoint or artifact), as
    `sop quantize` and `sop dequantize` refuse an output named as the other's (quantize/artifact.py,
    ``named_as_written``). Another name is kept: ``numpy.load`` reads a .npy by its contents."""
    from sop.quantize.models import ARTIFACT_SUFFIX, CHECKPOINT_SUFFIXES

    suffix = Path(out).suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES + (ARTIFACT_SUFFIX,):
        raise OutputError(f"{out}: `sop gemv` writes a .npy array, and every model reader takes a {suffix} file for "
                          f"{'a checkpoint' if suffix in CHECKPOINT_SUFFIXES else 'an artifact'}; name it "
                          f"{Path(out).with_suffix('.npy')}")


def cmd_gemv(args) -> int:
    import io

    import numpy as np

    from sop.golden.dot import activation_codes, gemv
    from sop.quantize.artifact import open_artifact

    check_output(args.out, [args.file, args.x])
    _npy_not_named_as_a_model(args.out)
    art = open_artifact(args.file)
    entry = _artifact_layer(art, args.layer)
    stream = art.stream(entry)
    if stream is None:
        raise ValueError(f"layer {entry.name} of {args.file} is stored decoded as float32 (a baseline layer "
                         f"of {art.format}), not as a golden layer stream: sop gemv runs SOP layers only")
    rows, cols = entry.shape
    x = _load_vectors(args.x, cols, entry.name)
    try:
        activation_codes(x, args.x_format)
    except ValueError as err:
        raise ValueError(f"{args.x}: {err}") from None
    # the stream's padding columns (cols up to a whole block) get +0 activations: they add exactly 0
    pad = np.zeros((*x.shape[:-1], stream.cols - cols), np.float32)
    y = gemv(stream, np.concatenate([x, pad], axis=-1), args.x_format)
    buf = io.BytesIO()
    np.save(buf, y)
    write_atomic(args.out, buf.getvalue())
    vectors = 1 if x.ndim == 1 else x.shape[0]
    print(f"wrote {args.out}: y = W x of {entry.name} ({rows} x {cols}, {art.format}), {vectors} "
          f"{args.x_format} vector{'s' if vectors > 1 else ''}, float32 {tuple(y.shape)}")
    return 0


def cmd_report(args) -> int:
    from sop.quantize.report import output_paths, report

    for out in output_paths(args.json, args.out):
        check_output(out, [args.json])
    info = report(args.json, stem=args.out, bpw_tol=args.bpw_tol)
    print(info["markdown"], end="")
    print(f"\nwrote {info['md']} and {info['png']}")
    return 0


def _calib_size(args):
    """The calibration text size of eval/quantize: sentences (BERT), windows x tokens (causal LMs)."""

    return CalibSize(args.calib_sentences, args.calib_seqs, args.seq_len)


def _check_calibration(args, out=None) -> None:
    """A calibration count or cache folder that cannot work is refused before any work, and so is a
    cache folder that is, or lies under, the output file ``out`` (made by the calibration, it was
    found in the output's place after the whole run). A ``--calib-text`` file is checked here too (as
    ``calib.with_calib_text`` checks it again when it reads it), against the output ``out`` as well."""
    from sop.quantize.calib import calib_text_file, calib_text_used, calibration_sentences

    if not args.no_calib:
        calibration_sentences(args.calib_sentences)       # ValueError naming --calib-sentences
    if args.calib_text is not None:                       # --no-calib refused; the model's files, the output
        calib_text_used(args.calib_text, not args.no_calib)
        calib_text_file(args.calib_text, args.model, (out,))
    if not args.cache_dir and not args.no_calib:         # pathlib's '.': the cache went into the working folder
        raise OutputError(f"--cache-dir {EMPTY_FOLDER_NAME}")
    there = nearest_existing(Path(args.cache_dir))       # the folder, or the parent it would be made in
    if not there.is_dir():
        raise OutputError(f"--cache-dir {args.cache_dir}: {there} exists and is not a folder")
    if out is not None and not args.no_calib:
        cache, target = Path(os.path.realpath(args.cache_dir)), Path(os.path.realpath(out))
        if target == cache or target in cache.parents:
            raise OutputError(f"{out}: the calibration cache folder (--cache-dir {args.cache_dir}) would be made "
                              f"in the output's place; give another --cache-dir")


def _check_eval_text(args, out=None) -> None:
    """An ``--eval-text`` file is refused before any work as a ``--calib-text`` one is (with ``--no-e2e``, one of
    the model's files, the output ``out``), as ``calib.with_eval_text`` refuses it again when it reads it."""
    from sop.quantize.calib import calib_text_file, eval_text_used

    if args.eval_text is not None:
        eval_text_used(args.eval_text, not args.no_e2e)
        calib_text_file(args.eval_text, args.model, (out,), "eval_text")


def cmd_board(args) -> int:
    from sop.synth.host import bringup

    if args.gemv:
        return _board_gemv(args)
    if args.x is not None:
        raise ValueError("--x (an activation vector) goes with --gemv")
    # the layer first: a wrong model or layer name, or a bad sparse table, is reported without
    # touching the port
    name, stream, width = bringup.model_layer(args.model, args.format, args.layer, args.rows)
    bringup.check_sparse(stream, name)
    return _on_board(args, lambda transport: bringup.run_board(transport, stream, args.format, name=name,
                                                               timeout=args.timeout, width=width))


def _on_board(args, run) -> int:
    """``run(transport)`` on the board's serial port, its result printed: 0 when it is OK, 1 on a
    mismatch or a board failure (one ``sop board:`` line)."""
    from sop.synth.host import bringup, client

    transport = client.SerialTransport(args.port, args.baud)
    try:
        result = run(transport)
    except bringup.BOARD_FAILURES as err:
        print(f"sop board: {err}", file=sys.stderr)
        return 1
    finally:
        transport.close()
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def _board_gemv(args) -> int:
    """``sop board --gemv``: one layer's y = W x on the board's GEMV engine (synth/host/gemv_bringup.py)."""
    from sop.golden.dot import activation_codes
    from sop.synth.host import gemv_bringup

    # the layer and x first: a wrong layer, a bad sparse table or a bad vector is reported without the port
    name, stream, width = gemv_bringup.gemv_layer_stream(args.model, args.format, args.layer, args.rows)
    if args.x is not None:                  # the host's checks: a float32 .npy of the layer's width
        x, source = _load_vectors(args.x, width, name), str(args.x)
        if x.ndim != 1:
            raise ValueError(f"{args.x}: the board takes one vector (in,), got shape {x.shape}")
    else:
        x, source = gemv_bringup.layer_activation(name, width)
    try:
        codes = activation_codes(x, "e4m3")
    except ValueError as err:               # a value E4M3 does not hold: said of the file it came from
        raise ValueError(f"{source}: {err}") from None
    codes = gemv_bringup.padded_x(codes, stream.cols)      # +0 on the padding columns, as `sop gemv`
    gemv_bringup.check_x(codes, stream.cols)
    return _on_board(args, lambda transport: gemv_bringup.run_gemv(transport, stream, codes, args.format, name=name,
                                                                   x_source=source, timeout=args.timeout,
                                                                   width=width))


#: The longest wait for one board reply (`sop board --timeout`): a wait is always bounded.
MAX_REPLY_TIMEOUT = 3600.0


def _model_options(p) -> None:
    """The options ``eval`` and ``quantize`` share: what is quantized, how it is calibrated, where the search
    runs. Their defaults are the library's (quantize/calib.py, quantize/evaluate.py)."""
    size = CalibSize()
    p.add_argument("--budget", type=positive(float), default=None,
                   help="average bits per weight for sop-budget")
    p.add_argument("--include", action="append", type=as_typed, metavar="GLOB",
                   help="only layers matching (repeatable)")
    p.add_argument("--exclude", action="append", type=as_typed, metavar="GLOB",
                   help="skip layers matching (repeatable)")
    p.add_argument("--nan-policy", choices=NAN_POLICIES, default=NAN_POLICIES[0],
                   help="a NaN/Inf weight is an error (default) or is replaced by 0")
    p.add_argument("--no-calib", action="store_true", help="skip calibration: an unweighted search and error")
    p.add_argument("--calib-sentences", type=positive(int), default=size.sentences,
                   help=f"calibration sentences of a sentence encoder (default {size.sentences})")
    p.add_argument("--calib-seqs", type=positive(int), default=size.seqs,
                   help=f"causal LMs: calibration windows (default {size.seqs})")
    p.add_argument("--seq-len", type=number(int, 4, inclusive=True), default=size.seq_len,
                   help=f"causal LMs: tokens per calibration (and `sop eval`'s held-out) window "
                        f"(default {size.seq_len})")
    p.add_argument("--calib-text", metavar="FILE", default=None,
                   help=f"causal LMs: calibrate on this UTF-8 text file (at most {MAX_CALIB_TEXT_BYTES >> 20} MiB), "
                        "its windows cut as the built-in text's; the end-to-end check keeps the built-in held-out text "
                        "(sop eval: unless --eval-text)")
    p.add_argument("--include-lm-head", action="store_true",
                   help="quantize the output head too (kept by default, as the embeddings)")
    p.add_argument("--include-routers", action="store_true",
                   help="quantize the MoE routers too (kept by default: they choose which experts run)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help=f"calibration cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--device", default="numpy", metavar="D",
                   help="where the SOP search runs: numpy (default), cpu (torch on the CPU), cuda or cuda:N "
                        "(torch on a GPU); the same output bits on every device")
    p.add_argument("--jobs", type=positive(int), default=1, metavar="N",
                   help="quantize N layers at once in worker processes, one core each (default 1; at most "
                        "one per usable CPU: a larger N is lowered to it; the same results; peak memory about N "
                        "times one layer's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `sop` command line: its parser and each command's own (which names its errors)."""
    p = _Parser(prog="sop", description="SOP weight quantization: golden model, "
                                "quantizer and decoder hardware")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    f = sub.add_parser("formats", help="list every format, codebook and operating point")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_formats)
    c = sub.add_parser("codebook", help="values and LUT image of a codebook or element format")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_codebook)
    d = sub.add_parser("demo", help="encode and decode the built-in model, print the error per format")
    d.add_argument("--layers", type=positive(int), default=None,
                   help="a short run: the first N layers, the simulated configuration's Verilog only, "
                        "layer 0 through the dot engine")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help="quantize a model in each format and measure the error")
    e.add_argument("model", help="a .safetensors / .bin / .pt / .gguf file, a HF folder, 'minilm' or 'smollm2'")
    e.add_argument("--format", action="append", required=True, metavar="F",
                   help="a format name (repeat for several); `sop formats` lists them")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON (atomically)")
    e.add_argument("--no-e2e", action="store_true", help="skip the end-to-end check")
    e.add_argument("--e2e-windows", type=positive(int), default=DEFAULT_E2E_WINDOWS,
                   help=f"causal LMs: held-out windows for perplexity/KLD/top-1 "
                        f"(default {DEFAULT_E2E_WINDOWS})")
    e.add_argument("--eval-text", metavar="FILE", default=None,
                   help=f"causal LMs: measure perplexity/KLD/top-1 on this UTF-8 text file (at most "
                        f"{MAX_CALIB_TEXT_BYTES >> 20} MiB) instead of the built-in held-out text, its "
                        f"--e2e-windows x --seq-len windows cut as the built-in text's")
    _model_options(e)
    e.set_defaults(func=cmd_eval)
    v = sub.add_parser("vectors", help="write real quantized layers as RTL test vectors")
    v.add_argument("model", help="a model (a file, a HF folder, 'minilm' or 'smollm2') or a .sopq artifact (its "
                                 "stored layers, sparse residuals included; docs/vectors.md)")
    v.add_argument("--format", required=True, choices=vector_points())
    v.add_argument("--layer", action="append", type=layer_name, metavar="NAME",
                   help="a linear layer (repeatable; default all)")
    v.add_argument("--include-lm-head", action="store_true",
                   help="the output head is a linear layer too (kept by default, as in `sop quantize`; a model only: a "
                        ".sopq artifact's layers are those it stores)")
    v.add_argument("--out", required=True, help="the vector directory")
    v.add_argument("--rows", type=positive(int), default=None,
                   help="only the first N rows of each layer (a model's quantized as a layer of their own; "
                        "docs/vectors.md)")
    v.set_defaults(func=cmd_vectors)
    q = sub.add_parser("quantize", help="quantize a model into a .sopq artifact (golden layer streams)")
    q.add_argument("model", help="a .safetensors / .bin / .pt / .gguf file, a HF folder, 'minilm' or 'smollm2'")
    q.add_argument("--format", required=True, metavar="F", help="a format name; `sop formats` lists them")
    q.add_argument("--out", required=True, help="the .sopq artifact to write (atomically)")
    _model_options(q)
    q.set_defaults(func=cmd_quantize)
    dq = sub.add_parser("dequantize", help="decode a .sopq artifact into float32 safetensors")
    dq.add_argument("file", type=in_file, help="the .sopq artifact")
    dq.add_argument("--out", required=True,
                    help="the .safetensors file to write (atomically); with --model-folder, a folder; with --gguf, "
                         "a .gguf file")
    dq.add_argument("--model-folder", action="store_true",
                    help="write a whole model folder transformers loads: the reference causal LM with every "
                         "quantized layer decoded into it (config, safetensors in --dtype, tokenizer)")
    dq.add_argument("--gguf", action="store_true",
                    help="write a GGUF file llama.cpp runs (an artifact of a GGUF only): the source GGUF with every "
                         "quantized layer decoded into it in --dtype, every other tensor and the metadata as stored")
    dq.add_argument("--model", default=None, metavar="MODEL",
                    help="with --model-folder or --gguf: the source model (default: the one the artifact names; its "
                         "fingerprint must match)")
    dq.add_argument("--dtype", default=None, choices=DTYPES,
                    help="with --model-folder or --gguf: the type of the decoded weights (default float32; bfloat16: "
                         "half the size, each quantized weight the exact decode rounded once to BF16)")
    dq.add_argument("--quiet", action="store_true", help="no progress lines")
    dq.set_defaults(func=cmd_dequantize)
    dq.hint = _model_folder_hint
    gm = sub.add_parser("gemv", help="y = W x of one quantized layer by the golden dot-product engine")
    gm.add_argument("file", type=in_file, help="the .sopq artifact")
    # each option once (ToolParser.options_once): `--layer A --layer B` ran B alone (sop vectors takes several)
    gm.add_argument("--layer", required=True, type=layer_name, metavar="NAME",
                    help="the layer (its name in the artifact)")
    gm.add_argument("--x", required=True, type=in_file, metavar="X.npy",
                    help="activations: a float32 .npy array, (in,) or (batch, in), every value held exactly "
                         "by --x-format")
    gm.add_argument("--x-format", choices=list(ACT_FORMATS), default="bf16",
                    help="the activation format (default bf16)")
    gm.add_argument("--out", required=True, metavar="Y.npy",
                    help="the float32 .npy result to write (atomically): (out,) or (batch, out)")
    gm.set_defaults(func=cmd_gemv)
    r = sub.add_parser("report", help="markdown table and SQNR-vs-bpw plot of a `sop eval --json` file")
    r.add_argument("json", type=in_file, help="the `sop eval --json` output")
    r.add_argument("--out", default=None, metavar="STEM",
                   help="write STEM.md and STEM.png (default: next to the JSON, same name)")
    r.add_argument("--bpw-tol", type=number(float, 0, inclusive=True), default=0.01, metavar="T",
                   help="bit costs within T bpw count as equal on the Pareto front (default 0.01)")
    r.set_defaults(func=cmd_report)
    b = sub.add_parser("board", help="check one quantized layer through an FPGA board over its serial port")
    b.add_argument("--port", required=True, type=serial_port, help="the board's serial port (for example /dev/ttyUSB1)")
    b.add_argument("model", help="a model path, 'minilm', or a .sopq artifact (`sop quantize`; its stored "
                                 "layer, sparse residual entries included)")
    b.add_argument("--format", required=True, choices=board_points(),
                   help="the format of the board's decoder or GEMV engine (the boards of synth/gateware/board.py: "
                        "sop4-g16)")
    b.add_argument("--layer", type=layer_name, metavar="NAME", default=None,
                   help="a linear layer (default: a model's first; an artifact's first in --format's layout with "
                        "sparse entries, else its first in that layout)")
    b.add_argument("--baud", type=positive(int), default=DEFAULT_BAUD, help=f"baud rate (default {DEFAULT_BAUD})")
    b.add_argument("--timeout", type=positive(float, MAX_REPLY_TIMEOUT), default=1.0, metavar="S",
                   help=f"seconds to wait for each reply (default 1, at most {MAX_REPLY_TIMEOUT:g})")
    b.add_argument("--rows", type=positive(int), default=None,
                   help="only the first N rows of the layer (a model's quantized as a layer of their own; "
                        "docs/vectors.md)")
    b.add_argument("--x", type=in_file, default=None, metavar="X.npy",
                   help="with --gemv: the activation vector, (in,) float values E4M3 holds exactly (default: "
                        "MiniLM's real input to the layer for a token of a sentence, rounded to E4M3)")
    b.add_argument("--gemv", action="store_true",
                   help="y = W x of the layer on the board's GEMV engine (the ULX3S core, or the iCEBreaker's "
                        "GEMV-only core icebreaker-gemv: without --gemv a board without a decoder is refused) with a "
                        "real MiniLM activation vector, bit-exact against golden/dot.py, its error against float64 "
                        "and the throughput; a layer's sparse residuals too (the ULX3S's engine adds them; the "
                        "iCEBreaker's has no residual path and refuses such a layer)")
    b.set_defaults(func=cmd_board)
    return p, sub.choices


def main(argv: list[str] | None = None) -> int:
    release_freed_memory()              # the peak-memory figures of docs/benchmarks.md assume it
    try:
        os.getcwd()
    except FileNotFoundError:           # else torch's MKL stops the process with a FATAL line, no sop: line
        print("sop: error: the current folder was removed; change to an existing folder and run again",
              file=sys.stderr)
        return 2
    if (refused := refused_at_start("sop")) is not None:     # the user's own points first: the parsers list them
        return refused
    p, commands = _parser()
    args, extra = p.parse_known_args(argv)
    if extra:                                 # named by the command's own parser: `see sop eval --help`
        commands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    with signals_as_interrupts(), command_line():       # a refusal names --budget, not Python's budget=
        try:
            return args.func(args)
        except KeyboardInterrupt as sig:
            return interrupted("sop", sig)      # every file is written whole or not at all
        except BrokenPipeError:                          # `sop codebook bf16 | head`: the reader is done
            return reader_gone()
        except (ValueError, OSError) as err:
            print(f"sop: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except WorkerError as err:                       # a --jobs worker died (killed for memory?)
            print(f"sop: error: {_one_line(err)}", file=sys.stderr)
            return 1
        except MemoryError:
            print("sop: error: out of memory (docs/benchmarks.md gives the peak per command)",
                  file=sys.stderr)
            return 1
        except Exception as err:                         # noqa: BLE001 - the last resort, said to be a bug
            if os.environ.get("SOP_DEBUG"):
                raise
            print(f"sop: internal error: {type(err).__name__}: {_one_line(err)}. This is a bug in sop, not "
                  f"in your input: please report it with the command line (run it again with "
                  f"SOP_DEBUG=1 for the traceback)", file=sys.stderr)
            return 70                                    # EX_SOFTWARE


class _Parser(ToolParser):
    """The tools' one-line usage error, as every ``sop`` error starts: ``sop: error: [sop CMD: ]...``; every
    option of one value of every command refused when given twice (``ToolParser.options_once``)."""

    options_once = True

    def error_line(self, message: str) -> str:
        where = "" if self.prog == "sop" else f"{self.prog}: "          # `sop: error: sop: ...` said it twice
        return f"sop: error: {where}{message} (see {self.prog} --help)"


def _one_line(err: BaseException) -> str:
    """An exception as one terminal line (sop.terminal); an OSError as ``path: reason``."""
    return one_line(os_error_text(err) if isinstance(err, OSError) else str(err) or type(err).__name__)


def entry() -> None:
    """The ``sop`` console script: ``main``, then an exit that a late Ctrl-C cannot turn into a traceback.

    Once ``main`` has returned, the command's files are written. A SIGINT while Python shut down (torch's
    and weakref's atexit callbacks, a few tenths of a second) printed an ``Exception ignored in atexit
    callback`` traceback and kept exit 0: from here on SIGINT has its default action, the process ends at
    once as interrupted (exit 128 + 2 to the shell), with no traceback and no file lost. Standard output is
    flushed after that (a flush blocked on a full pipe is interruptible like the rest); a reader gone by
    then is ``main``'s broken pipe, exit 141 and no message, a failed write (``> /dev/full``) one line, exit
    2 (``sop.terminal.finish_output``; argparse's ``--help`` too). A Ctrl-C outside ``main``'s own handler
    (while the command line is parsed, or as ``main`` returns) is its one line, exit 130. The standard
    streams are made safe first (``sop.terminal.prepare_streams``: closed ones, an ASCII locale)."""
    code = prepare_streams("sop")
    if code is not None:
        sys.exit(code)
    try:
        try:
            code = main()
        except SystemExit as stop:                  # argparse's --help and usage errors: flushed below too
            if stop.code is not None and not isinstance(stop.code, int):
                raise
            code = stop.code or 0
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print("sop: interrupted (SIGINT); no partial file was left", file=sys.stderr)
        code = 128 + signal.SIGINT
    sys.exit(finish_output("sop", code))


if __name__ == "__main__":
    entry()
