"""A quantized GGUF model back as a GGUF file llama.cpp runs (`sop dequantize --gguf`).

``export_gguf(artifact, out)`` opens a ``.sopq`` artifact (quantize/artifact.py, every check of
``open_artifact``) made from a GGUF file, opens that GGUF (the file the artifact names, or ``model``;
its fingerprint must be the artifact's, as for the model folder export, quantize/hf_export.py), and
writes ``out``: the source GGUF with each quantized layer replaced by its decode, everything else as
the source holds it.

* **Metadata**: every key/value of the source, in its order, with its type and its bytes (a string
  is copied as its bytes, an array with its element type), ``general.alignment`` included and kept
  as the file's alignment. The one change is ``general.file_type`` (``file_type_of``): llama.cpp's
  ``llama_ftype`` says what "most" of the file is (``MOSTLY_Q4_1``: every matrix Q4_1, the 1-D norms
  F32); after the export the decoded layers are F32 or BF16 and the tensors the artifact does not
  hold keep their type. The key stays, in its place, where one type applies: ``0`` (``ALL_F32``)
  when every tensor is F32, ``32`` (``MOSTLY_BF16``) when every tensor of two or more dimensions is
  BF16; otherwise it is removed, and llama.cpp then guesses the type from the most common tensor type
  and prints it marked ``(guessed)`` (llama-model-loader.cpp; the value is only displayed, nothing
  is computed from it). A source without the key gets none.
* **Tensors**: every tensor of the source, in its order, under its name, with its shape. A tensor the
  artifact holds (a layer, or the experts of a fused ``ffn_*_exps`` tensor, one after another) is
  golden's decode of its record: ``dtype="float32"`` the exact value rounded once to float32 (what `sop
  dequantize` writes, ``Artifact.weights``), GGUF type F32; ``dtype="bfloat16"`` the exact value rounded
  once to BF16 (golden's decoder output ``"bf16"``, as ``--model-folder --dtype bfloat16``:
  ``hf_export.DECODER_OUTPUT`` and ``hf_export.bf16_bits``), GGUF type BF16. The artifact of a GGUF
  holds its layers under the GGUF's names, in the GGUF's orientation (numpy's ``(out, in)`` of
  ``ne = [in, out]``) and llama.cpp's row order (attn_q / attn_k permuted as llama.cpp's converter
  permutes them): written as they are. Every other tensor (embeddings, norms, a kept ``output``, a
  layer not in an artifact of some layers) is copied byte for byte with its type (a Q4_1 embedding
  stays Q4_1: it is the reference the layers were quantized beside).

Memory: the source is memory-mapped and copied a tensor at a time, the layers decoded one at a time,
so the peak is about one layer (float32) beside the source's metadata. The output is streamed to a
temporary file in its folder and renamed over ``out`` at the end (``golden.files.atomic_output``): an
error or an interrupt leaves ``out`` as it was. ``out`` may be none of the inputs (the artifact, the
source GGUF, any file the artifact records as its source) and must end in ``.gguf``.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

from sop.golden.files import OutputError, atomic_output, check_output
from sop.quantize.artifact import open_artifact, source_files, source_spec
from sop.quantize.hf_export import DECODER_OUTPUT, bf16_bits, check_dtype
from sop.quantize.inputs import boolean, on_command_line, option
from sop.quantize.layer_loop import layer_line, reporter
from sop.quantize.models import GGUF_SUFFIXES, NoLayerSelected, is_lm_head, model_inputs, open_model

FILE_TYPE = "general.file_type"
#: llama.cpp's ``llama_ftype`` (llama.h) of a file of one type: every tensor F32, every matrix BF16
ALL_F32, MOSTLY_BF16 = 0, 32
#: ``open_model``'s ``forward_of`` for a source that runs no forward pass (no transformers import)
NO_FORWARD = (None, None, "the GGUF export runs no forward pass")


def check_gguf_source(art) -> None:
    """A ValueError, saying what to use instead, for an artifact whose source is no GGUF file (a folder,
    a safetensors or torch file, a model held in memory)."""
    meta = art.meta.get("model", {})
    kind = meta.get("kind")
    if kind == "gguf":
        return
    what = "a model held in memory" if kind == "in-memory" else f"{meta.get('spec', 'a model')!r} ({kind})"
    this, folder, alone = (("--gguf", "--model-folder", "without --gguf") if on_command_line()
                           else ("export_gguf", "export_model_folder", "with dequantize"))
    raise ValueError(f"{art.path}: {this} writes a GGUF back from an artifact of a GGUF file; this one was "
                     f"quantized from {what}: write a transformers model folder with {folder}, or the decoded "
                     f"layers alone as safetensors {alone}")


def open_gguf_source(art, spec: str):
    """The source GGUF of ``art`` opened (``models.open_model``: every check of its reader), with the artifact's
    layers selected; a ValueError where it is another checkpoint (its fingerprint is not the artifact's: the
    file's name is in it, so a matching file is the GGUF itself)."""
    names = [e.name for e in art.layers]
    head = any(is_lm_head(n) or "embed" in n or "embd" in n for n in names)
    try:
        src = open_model(spec, include=sorted({glob.escape(e.stack[0] if e.stack else e.name) for e in art.layers}),
                         lm_head=head, routers=True, forward_of=NO_FORWARD)
        same = src.fingerprint() == art.meta["model"].get("fingerprint")
    except NoLayerSelected:                     # none of the artifact's layers: another checkpoint
        same = False
    if not same:
        raise ValueError(f"{art.path} was made from another checkpoint than {spec} (the model fingerprints "
                         f"differ); give the source with {option('model', '')}")
    return src


def file_type_of(types: list[tuple[int, int]]) -> int | None:
    """``general.file_type`` of a file whose tensors have these ``(GGML type, dimensions)`` (module
    docstring): ``ALL_F32``, ``MOSTLY_BF16`` or None (no single type applies: the key is removed)."""
    from gguf import GGMLQuantizationType as T

    if all(t == T.F32 for t, _ in types):
        return ALL_F32
    if all(t == T.BF16 for t, dims in types if dims >= 2):
        return MOSTLY_BF16
    return None


def _value(field, index: int):
    """One value of a gguf.ReaderField: a string as its bytes (copied as they are), a number as Python's."""
    from gguf import GGUFValueType

    part = field.parts[index]
    return bytes(part) if field.types[-1] == GGUFValueType.STRING else part.item()


def copy_metadata(writer, reader, path: Path, file_type: int | None) -> None:
    """Every key/value of the gguf.GGUFReader ``reader`` (of ``path``) into ``writer``, in order, with its
    type; ``general.file_type`` set to ``file_type``, or left out where it is None."""
    from gguf import GGUFValueType

    writer.kv_data[0].clear()                   # GGUFWriter starts with general.architecture: the source's order
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):             # the reader's pseudo-fields: version, counts
            continue
        vtype = field.types[0]
        if key == FILE_TYPE:
            if file_type is not None:
                writer.add_key_value(key, file_type, GGUFValueType.UINT32)
            continue
        if vtype != GGUFValueType.ARRAY:
            writer.add_key_value(key, _value(field, field.data[0]), vtype)
        elif len(field.types) > 2 and field.types[1] == GGUFValueType.ARRAY:
            raise ValueError(f"{path}: metadata key {key} is an array of arrays, which the GGUF export cannot "
                             f"copy (gguf's reader flattens it)")
        elif not field.data:                    # GGUFWriter refuses an empty array: its element type is kept
            raise ValueError(f"{path}: metadata key {key} is an empty array, which gguf's writer cannot write")
        else:
            writer.add_key_value(key, [_value(field, i) for i in field.data], vtype, sub_type=field.types[-1])


def _plan(art, reader) -> list[tuple[object, list]]:
    """Each tensor of the source with the artifact's entries it is decoded from (``[]``: copied), checked
    against its shape; every layer of the artifact must be some tensor's."""
    by_tensor: dict[str, list] = {}
    for e in art.layers:
        by_tensor.setdefault(e.stack[0] if e.stack else e.name, []).append(e)
    plan = []
    for t in reader.tensors:
        entries = by_tensor.pop(t.name, [])
        if entries:
            first = entries[0]
            stored = tuple(first.shape[::-1] if first.transposed else first.shape)
            shape = (len(entries), *stored) if first.stack else stored
            if shape != tuple(int(d) for d in reversed(t.shape)):
                raise ValueError(f"{art.path}: layer {t.name} is {shape}, the source GGUF has it "
                                 f"{tuple(int(d) for d in reversed(t.shape))}")
        plan.append((t, entries))
    if by_tensor:
        raise ValueError(f"{art.path}: layer {next(iter(by_tensor))} is no tensor of the source GGUF")
    return plan


def _decoded(art, e, dtype: str) -> np.ndarray:
    """Layer ``e`` decoded by golden (``DECODER_OUTPUT[dtype]``) in the checkpoint's orientation: float32,
    or for ``bfloat16`` its BF16 bit patterns (uint16)."""
    w = art.weights(e, DECODER_OUTPUT[dtype])
    w = np.ascontiguousarray(w.T if e.transposed else w, dtype=np.float32)
    return bf16_bits(w).reshape(w.shape) if dtype == "bfloat16" else w


def export_gguf(artifact, out, model: str | None = None, progress: bool = True, dtype: str = "float32") -> dict:
    """Write the GGUF file ``out`` from the artifact of a GGUF ``artifact`` (module docstring); the result
    says what was written."""
    progress = boolean("progress", progress)
    dtype = check_dtype(dtype, "the GGUF file")
    art = open_artifact(artifact)
    check_gguf_source(art)
    spec = source_spec(art, model)
    check_output(out, [art.path, *source_files(art), *model_inputs(spec)], option=option("out"))
    if Path(out).suffix.lower() not in GGUF_SUFFIXES:      # every reader takes a model by its name's ending
        raise OutputError(f"{out}: the output is a GGUF file, which every reader takes by its name's ending; "
                          f"name it {out}{GGUF_SUFFIXES[0]}")
    src = open_gguf_source(art, spec)
    path = Path(src.files[0])
    reader = src._reader.parsed[os.path.realpath(path)]    # parsed once, by the project's reader
    plan = _plan(art, reader)
    writer, file_type = _gguf_writer(reader, path, plan, dtype)
    with atomic_output(out) as f:
        _write(f, writer, art, plan, dtype, reporter(progress))
        size = f.tell()
    return {"path": str(out), "bytes": size, "layers": len(art.layers), "tensors": sum(1 for _, e in plan if e),
            "copied": sum(1 for _, e in plan if not e), "format": art.format, "dtype": dtype, "model": spec,
            "file_type": file_type}


def _gguf_writer(reader, path: Path, plan: list, dtype: str):
    """(a gguf.GGUFWriter holding the source's metadata and the output's tensor infos, in the source's byte
    order and alignment; the output's ``general.file_type``, None where it has none)."""
    import gguf

    decoded = gguf.GGMLQuantizationType.F32 if dtype == "float32" else gguf.GGMLQuantizationType.BF16
    types = [(decoded if entries else t.tensor_type, len(t.shape)) for t, entries in plan]
    file_type = file_type_of(types) if reader.get_field(FILE_TYPE) is not None else None
    writer = gguf.GGUFWriter(None, "", endianess=reader.endianess)     # no file yet: _write gives it one
    writer.data_alignment = int(reader.alignment)
    copy_metadata(writer, reader, path, file_type)
    for (t, entries), (kind, _) in zip(plan, types):
        shape = tuple(int(d) for d in reversed(t.shape))
        nbytes = int(t.n_bytes) if not entries else int(np.prod(shape)) * (4 if dtype == "float32" else 2)
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
    return writer, file_type


def _write(f, writer, art, plan: list, dtype: str, say) -> None:
    """The GGUF into the open file ``f``: the writer's header, metadata and tensor infos, then each tensor,
    padded to the alignment as the infos' offsets say; one progress line a decoded layer."""
    import gguf

    writer.fout, writer.state = [f], gguf.gguf_writer.WriterState.EMPTY     # open_output_file's two steps
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_padding(f, f.tell())
    swap = writer.endianess != (gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE)
    n, done = len(art.layers), 0
    for t, entries in plan:
        start = f.tell()
        # f.write, not ndarray.tofile: tofile's OSError on a full disk has no errno ("N requested and 0
        # written"), so it was no "No space left on device" line naming the target (golden.files)
        if not entries:                         # the source's bytes, as stored (its byte order)
            f.write(np.ascontiguousarray(t.data).data)
        for e in entries:                       # a layer, or a fused tensor's experts one after another
            t0 = time.perf_counter()
            w = _decoded(art, e, dtype)
            f.write((w.byteswap() if swap else w).data)
            done += 1
            say(layer_line("dequantize", done, n, e.name, e.shape, time.perf_counter() - t0))
        writer.write_padding(f, f.tell() - start)
    writer.fout = None                          # the file is atomic_output's, closed by it
