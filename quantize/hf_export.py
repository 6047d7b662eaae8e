"""A quantized causal LM as a model folder that ``transformers`` loads (`sop dequantize --model-folder`).

``export_model_folder(artifact, out)`` opens a ``.sopq`` artifact (quantize/artifact.py, every
check of ``open_artifact``), opens the source model it names (or ``model``; its fingerprint must
be the artifact's; configuration or tokenizer files changed since are a warning in the result's
``warnings``; an artifact written from a model held in memory, ``in_memory.quantize_module``, names
no source and has no fingerprint: ``model`` is needed, and a warning says that nothing checks it),
runs that model through quantize/causal_lm.py, decodes every layer of the artifact
(``Artifact.weights``: the golden decoder for layer streams) into it in place of the reference, and
writes the whole model as a ``transformers`` folder: ``config.json``, ``generation_config.json``
(the source's as transformers reads it: one it cannot read is refused before any output,
``causal_lm.check_generation_config``, never replaced by a default one), ``model.safetensors``
(sharded where transformers shards) and the tokenizer files. Every tensor
that was not quantized (embeddings, norms, a kept ``lm_head``) is the reference's: for a GGUF
source that is the GGUF dequantized to float32, and so are the linear weights an artifact of some
layers (``sop quantize --include``) does not hold: the result's ``reference_layers`` counts them.

``dtype`` (``--dtype``) is the type of the safetensors, ``DTYPES``: ``"float32"`` (each quantized weight
golden's exact decode rounded once to float32, ``Artifact.weights``) or ``"bfloat16"``, half the size: each
quantized weight golden's exact decode rounded once to BF16 (the decoder's ``"bf16"`` output, what the
hardware's bf16-output configurations emit: to nearest, ties to even, saturating; never float32 first,
which would round twice), and every other parameter the reference's float32 value rounded to BF16 by the
same rule (``golden.formats.FORMATS["bf16"]``; a NaN or an infinity stays one; a persistent float buffer
that is no parameter stays float32); ``config.json`` then
says ``"dtype": "bfloat16"``, which transformers loads as such. But the parameters transformers keeps in
float32 when it loads the model in bfloat16 (``float32_kept``: a model class's ``_keep_in_fp32_modules_strict``,
a DeepSeek-V3 or GLM-4-MoE router's ``gate.weight``) stay float32, as transformers' own bfloat16 folder of the
model holds them: the reference's values, or a quantized one's (a router under ``--include-routers``) golden's
exact decode rounded once to float32 (rounded to BF16 first, they would load as float32 with BF16's precision
alone). The folder is
written all or nothing (``golden.files.atomic_files``): an error or an interrupt at any point
leaves every file there as it was. No file written may be an input (the artifact, a file of the
source model), and the output folder may not be the source model's folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

import numpy as np

from sop.golden.files import OutputError, check_output
from sop.golden.formats import bf16_codes_of_float32, bf16_codes_of_float64
from sop.quantize.artifact import open_artifact, source_selection, source_spec
from sop.quantize.inputs import NAN_POLICIES, boolean, on_command_line, option
from sop.quantize.layer_loop import layer_line, reporter
from sop.quantize.models import (AUX_SUFFIXES, FILTERED, NoLayerSelected, builtin_path, model_inputs,
                                 open_model)


def _same_folder(a, b) -> bool:
    try:
        return os.path.samefile(os.path.realpath(a), b)
    except OSError:                 # a folder still to be made is no existing folder
        return False


def _aux_changes(spec, then: dict | None, now: dict[str, str], artifact) -> list[str]:
    """One warning naming the configuration and tokenizer files (``AUX_SUFFIXES`` beside the weights)
    that changed, appeared or went since sop quantize read them; none for an artifact without the record.
    An artifact that records none (sop quantize was given a weights file alone, and read none) has nothing
    to compare: the warning says the folder takes ``spec``'s, not that each of them is new."""
    if then is None:
        return []
    if not then:
        return [f"{artifact} records no configuration or tokenizer file (sop quantize read none: it was given "
                f"the weights alone, and quantized without them); the folder is exported with those of {spec}: "
                f"{', '.join(sorted(now))}"] if now else []
    changed = sorted(n for n in set(then) | set(now) if then.get(n) != now.get(n))
    if not changed:
        return []
    what = ", ".join(f"{n} ({'changed' if n in then and n in now else 'new' if n in now else 'gone'})"
                     for n in changed[:5]) + (f", and {len(changed) - 5} more" if len(changed) > 5 else "")
    return [f"{spec}: files beside the weights ({', '.join(AUX_SUFFIXES)}) differ from those sop quantize read "
            f"for {artifact}: {what}; the folder is exported with the current ones"]


def _other_model_error(art, meta: dict, spec: str, names: list[str]) -> ValueError:
    """The error of a model that holds none of the artifact's layers (the selection's "no linear layer
    selected ... check --include/--exclude" named options the user never gave): its fingerprint is not the
    artifact's (the model opened whole), else the first layer it lacks (an artifact that records none)."""
    fp = meta.get("fingerprint")
    if fp and open_model(spec, routers=True).fingerprint() != fp:
        return ValueError(f"{art.path} was made from another checkpoint than {spec} (the model fingerprints "
                          f"differ); give the source with {option('model', '')}")
    return ValueError(f"{art.path}: layer {names[0]} is no linear layer of {spec}")


#: the types ``dtype`` (``--dtype``) writes the model in, the default first (module docstring)
DTYPES = ("float32", "bfloat16")
#: golden's decoder output of each: the exact value rounded once to float32, or to BF16
DECODER_OUTPUT = {"float32": "exact", "bfloat16": "bf16"}
#: values rounded to BF16 at a time: the rounding's float64 and index temporaries stay a few tens of MB
BF16_CHUNK = 1 << 20


def check_dtype(dtype, written: str = "the model folder") -> str:
    """``dtype`` if it is one of ``DTYPES`` (a string), else a ValueError naming it as its caller gave it and
    what is ``written`` in that type (the model folder, the GGUF file)."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{option('dtype', repr(dtype))}: {written} is written in "
                         f"{' or '.join(map(repr, DTYPES))}")
    return dtype


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The BF16 bit patterns (uint16) of float values ``x`` rounded once to BF16 by golden's rule
    (``FORMATS["bf16"].encode``, whose codes are the bit patterns: to nearest, ties to even, saturating,
    subnormals kept). A NaN stays a (quiet) NaN and an infinity one of its sign: golden rounds finite values
    (a NaN it refuses), and a reference tensor transformers loaded with one keeps it, as float32 does."""
    x = np.asarray(x)
    x = x.reshape(-1) if x.dtype == np.float32 else np.asarray(x, dtype=np.float64).reshape(-1)
    # float32 (every tensor of a model transformers loaded in float32) and float64: the table's codes, on the bits
    encode = bf16_codes_of_float32 if x.dtype == np.float32 else bf16_codes_of_float64
    bits = np.empty(x.shape, dtype=np.uint16)
    for i in range(0, len(x), BF16_CHUNK):
        part = x[i:i + BF16_CHUNK]
        finite = np.isfinite(part)
        sign = np.where(np.signbit(part), 0x8000, 0).astype(np.uint16)
        out = np.where(np.isnan(part), np.uint16(0x7FC0), sign | np.uint16(0x7F80)).astype(np.uint16)
        out[finite] = encode(part[finite])
        bits[i:i + BF16_CHUNK] = out
    return bits


def _bf16_of_array(a: np.ndarray):
    """A float numpy array rounded to a ``torch.bfloat16`` tensor of its shape (``bf16_bits``)."""
    import torch

    return torch.from_numpy(bf16_bits(a).view(np.int16)).view(torch.bfloat16).reshape(a.shape)


def _bf16_tensor(t):
    """A float torch tensor rounded to a ``torch.bfloat16`` one of its shape (``bf16_bits``)."""
    return _bf16_of_array(t.detach().cpu().numpy())


def float32_kept(model):
    """Whether a parameter name of ``model`` is one transformers keeps in float32 when it loads the model in
    bfloat16 (a function of the name): its dtype plan for bfloat16 (``_get_dtype_plan``, what
    ``from_pretrained`` follows: the class's ``_keep_in_fp32_modules_strict``, a DeepSeek-V3 router's
    ``['e_score_correction_bias', 'gate.weight']``; ``_keep_in_fp32_modules``, GPT-OSS's norms, is for float16
    alone), each pattern searched in the name as transformers' loading does (``*`` any text, the rest a regular
    expression: ``gate.weight`` is found in ``model.layers.1.mlp.gate.weight``)."""
    import torch

    plan = (model._get_dtype_plan(torch.bfloat16) if hasattr(model, "_get_dtype_plan")
            else dict.fromkeys(getattr(model, "_keep_in_fp32_modules_strict", None) or (), torch.float32))
    patterns = [p for p, d in plan.items() if d == torch.float32]
    if not patterns:
        return lambda name: False
    found = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return lambda name: found.search(name) is not None


def _put_layers_bf16(runner, layers, float32: set) -> None:
    """Each ``(name, w)`` of ``layers`` (decoded ``(out, in)`` weights, BF16 values held in float32, or for the
    layers in ``float32``, those of a parameter ``_in_bfloat16`` keeps float32, golden's exact decode rounded to
    float32) into ``runner``'s model, one layer at a time: where and as ``CausalLM.substituted`` puts a layer
    (``module_weight``, ``place``), as a BF16 tensor of the bits ``_in_bfloat16`` would make of it (a float32
    one for a kept layer), so that a float32 layer is released before the next is decoded. ``_in_bfloat16``'s
    exit restores the reference: it replaces every parameter's data, and a fused parameter written here is its
    copy. Not through ``substituted``: it holds every layer given to it in float32 until it exits."""
    import torch

    for name, w in layers:
        w = np.ascontiguousarray(runner.module_weight(name, np.asarray(w)), dtype=np.float32)
        new = torch.from_numpy(w) if name in float32 else _bf16_of_array(w)
        runner.place(name, new)                 # a fused parameter's rows: into its copy, the bits as they are
        del w, new                              # not held while the next layer is decoded


@contextlib.contextmanager
def _in_bfloat16(model, kept):
    """Within the block every floating parameter of ``model`` is BF16 (``_bf16_tensor`` of its value), so that
    transformers' ``save_pretrained`` writes BF16 tensors and ``"dtype": "bfloat16"``, but for those whose name
    ``kept`` (``float32_kept``): a float32 copy (the reference's data survives a fused parameter's rows written
    into it); the float32 values and the config's dtype are restored after, whatever happens (the model is
    cached on its ModelSource)."""
    saved = [(n, p, p.data) for n, p in model.named_parameters() if p.is_floating_point()]   # a tied one once
    dtype = getattr(model.config, "dtype", None)
    try:
        for name, param, data in saved:
            param.data = data.clone() if kept(name) else _bf16_tensor(data)
        yield model
    finally:
        for _, param, data in saved:
            param.data = data
        model.config.dtype = dtype


#: what an export holds beside the float32 model (the reference, kept to restore it), by ``dtype``:
#: ``_export_memory``'s bytes as a refusal names them
EXPORT_HOLDS = {"float32": "the decoded layers in float32",
                "bfloat16": "a BF16 copy of the model and one decoded layer at a time"}
#: bytes a weight of the one layer the bfloat16 export decodes at a time: its float32 decode, a float32 copy
#: in the module's layout (a transposed or converted one: GPT-2's Conv1D, a GGUF's attention) and its BF16 bits
BF16_LAYER_BYTES = 4 + 4 + 2


def _export_memory(art, src, dtype: str) -> int:
    """Bytes an export holds beside the float32 model (``EXPORT_HOLDS``). float32: every decoded layer
    (4 bytes a weight), all substituted at once. bfloat16: the BF16 copy of the model (2 bytes a parameter,
    half the float32 model's ``memory_needed``; the decoded layers go into it), and the one layer being
    decoded (``BF16_LAYER_BYTES`` a weight of the largest: each is released once it is in the BF16 model,
    where the export held every decoded layer in float32 until it saved, 4 bytes a quantized weight)."""
    sizes = [e.shape[0] * e.shape[1] for e in art.layers]
    if dtype == "float32":
        return 4 * sum(sizes)
    from sop.quantize import causal_lm

    return causal_lm.memory_needed(src) // 2 + BF16_LAYER_BYTES * max(sizes, default=0)


def _decoded_layers(art, src, spec: str, dtype: str, say, float32=frozenset()):
    """(name, decoded weights) of every layer of ``art``, one at a time, in ``dtype``'s decoder output
    (``DECODER_OUTPUT``, float32 arrays; the layers named in ``float32``: the exact decode rounded to float32);
    a layer whose shape is not ``src``'s is a ValueError; one line a decoded layer said by ``say``, as
    `sop dequantize` without --model-folder (--quiet, progress=False: none)."""
    n = len(art.layers)
    for i, e in enumerate(art.layers, 1):
        if tuple(e.shape) != tuple(src.layer(e.name).shape):
            raise ValueError(f"{art.path}: layer {e.name} is {tuple(e.shape)}, {spec} has it "
                             f"{tuple(src.layer(e.name).shape)}")
        t0 = time.perf_counter()
        w = art.weights(e, DECODER_OUTPUT["float32" if e.name in float32 else dtype])
        say(layer_line("dequantize", i, n, e.name, e.shape, time.perf_counter() - t0))
        yield e.name, w
        del w                                   # not held while the next layer is decoded


def export_model_folder(artifact, out, model: str | None = None, progress: bool = True,
                        dtype: str = "float32") -> dict:
    from sop.quantize import causal_lm

    progress = boolean("progress", progress)
    dtype = check_dtype(dtype)
    art = open_artifact(artifact)
    meta = art.meta.get("model", {})
    spec = source_spec(art, model)
    names = [e.name for e in art.layers]
    try:
        src = open_model(spec, **source_selection(art))
    except NoLayerSelected:
        # none of the artifact's layers is in this model: another checkpoint (the user gave no --include)
        raise _other_model_error(art, meta, spec, names) from None
    # the forward pass reads the quantized layers as sop quantize did (their decoded weights replace them)
    policy = art.meta.get("nan_policy")
    src.nan_policy = policy if policy in NAN_POLICIES else "error"
    inputs = model_inputs(spec)
    check_output(out, [art.path, *inputs], folder=True, option=option("out"))
    folder = builtin_path(spec) or Path(spec)
    if folder.is_dir() and _same_folder(out, folder):   # a folder model: its config, its tokenizer
        raise OutputError(f"{out}: the output folder is the source model's folder ({spec}); refusing to "
                          f"write over the model (choose another {option('out')})")
    fp = meta.get("fingerprint")
    if fp and src.fingerprint() != fp:
        raise ValueError(f"{art.path} was made from another checkpoint than {spec} (the model fingerprints "
                         f"differ); give the source with {option('model', '')}")
    if meta.get("kind") == "in-memory":      # quantize_module(..., out=): no source to check against
        warnings = [f"{art.path} was quantized from a model held in memory ({meta.get('class', 'a model')}): "
                    f"nothing checks that {spec} is that model; every tensor it did not quantize comes from {spec}"]
    else:
        warnings = _aux_changes(spec, meta.get("aux_files"), src.aux_files(), art.path)
    missing = sorted(set(names) - {lay.name for lay in src.layers})
    if missing:
        raise ValueError(f"{art.path}: layer {missing[0]} is no linear layer of {spec}")
    if src.forward != "causal-lm":
        # a weights file given alone (sop quantize M/model.safetensors): its folder is the model that runs
        alone = os.path.isfile(spec) and src.kind != "gguf" and (Path(spec).parent / "config.json").is_file()
        parent = str(Path(spec).parent) if on_command_line() else repr(str(Path(spec).parent))
        why = (f"a weights file alone: give its folder with {option('model', parent)}" if alone
               else src.forward_note or f"a {src.forward} model")
        raise ValueError(f"{spec}: {'--model-folder' if on_command_line() else 'export_model_folder'} needs a "
                         f"causal LM that transformers runs ({why})")
    causal_lm.check_memory(src, extra=_export_memory(art, src, dtype),
                           purpose=causal_lm.EXPORT if on_command_line() else causal_lm.PYTHON_EXPORT,
                           beside=EXPORT_HOLDS[dtype])
    runner = causal_lm.load(src)
    save, say = dict(inputs=[art.path, *inputs], out_option=option("out")), reporter(progress)
    if dtype == "bfloat16":
        kept = float32_kept(runner.model)
        float32 = {name for name in names if kept(runner.param_name(name))}
        decoded = _decoded_layers(art, src, spec, dtype, say, float32)
        # each layer into the BF16 model as it is decoded: one decoded layer in float32 at a time, not all
        with _in_bfloat16(runner.model, kept):
            _put_layers_bf16(runner, decoded, float32)
            files = runner.save_folder(Path(out), None, **save)
    else:
        files = runner.save_folder(Path(out), dict(_decoded_layers(art, src, spec, dtype, say)), **save)
    # an artifact of some layers (sop quantize --include) makes a working model whose other linear
    # weights are the reference's: said, so a partial artifact is not taken for the quantized model
    return {"path": str(out), "files": [f.name for f in files], "layers": len(art.layers), "format": art.format,
            "dtype": dtype,
            "model": spec, "warnings": warnings, "reference_layers": src.kept().get(FILTERED, 0)}
