"""A quantized GGUF model back as a GGUF file llama.cpp runs (`sop dequantize --gguf`).

``export_gguf(artifact, out)`` opens a ``.sopq`` artifact (quantize/artifact.py, every check of
``open_artifact``) made from a GGUF file, opens that GGUF (the file the artifact names, or ``model``;
its fingerprint must be the artifact's, as for the model folder export, quantize/hf_export.py), and
writes ``out``: the source GGUF with each quantized layer replaced by its decode, everything else as
the source holds it.

* **Metadata**: every key/value of the source, in its order, as the bytes the file holds (``metadata_bytes``:
  not re-packed by gguf's writer, which refuses an empty array and an array of arrays and would quiet a
  signaling NaN), in its byte order and GGUF version, ``general.alignment`` included and kept as the
  file's alignment. The one change is ``general.file_type`` (``file_type_of``): llama.cpp's
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

Memory: the source's header is parsed from its memory map; its tensors are read (``pread``) and copied a
chunk at a time, the layers decoded one at a time, so the peak is about one layer (float32) beside the
source's metadata. The source is checked unchanged (size, modification time, inode: the file the
fingerprint was taken of) before each tensor it gives and at the end; changed, truncated, it is one
line. The output is streamed to a temporary file in its folder and renamed over ``out`` at the end
(``golden.files.atomic_output``): an error or an interrupt leaves ``out`` as it was. ``out`` may be none
of the inputs (the artifact, the source GGUF, any file the artifact records as its source) and must end
in ``.gguf``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from sop.golden.files import atomic_output, check_output
from sop.quantize.artifact import named_as_written, open_artifact, source_files, source_selection, source_spec
from sop.quantize.checkpoint_files import CheckpointError
from sop.quantize.hf_export import DECODER_OUTPUT, bf16_bits, check_dtype
from sop.quantize.inputs import boolean, on_command_line, option
from sop.quantize.layer_loop import layer_line, reporter
from sop.quantize.models import GGUF_SUFFIXES, NoLayerSelected, model_inputs, open_model

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
                     f"quantized from {what}: write the decoded layers alone as safetensors {alone}, or, of a "
                     f"causal LM transformers runs, a model folder with {folder}")


def open_gguf_source(art, spec: str):
    """The source GGUF of ``art`` opened (``models.open_model``: every check of its reader), with the artifact's
    layers selected; a ValueError where it is another checkpoint (its fingerprint is not the artifact's: the
    file's name is in it, so a matching file is the GGUF itself)."""
    try:
        src = open_model(spec, **source_selection(art), forward_of=NO_FORWARD)
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


def _raw(parts) -> bytes:
    """Parts of a gguf.ReaderField as the file holds them (each is a view of the file, in its byte order): a
    key/value whole, however it nests, or some of a tensor info's fields."""
    return b"".join(bytes(p) for p in parts)


def _packed(value: int, like) -> bytes:
    """``value`` in the type and byte order of ``like``, a part of a gguf.ReaderField (a count, an offset, a
    tensor type, ``general.file_type``'s value)."""
    return np.array([value], dtype=like.dtype).tobytes()


def metadata_bytes(reader, file_type: int | None) -> tuple[bytes, int]:
    """(every key/value of the gguf.GGUFReader ``reader``, in order, as its file holds it, ``general.file_type``
    set to ``file_type`` in its own type or left out where it is None; how many). Copied as bytes, not
    re-packed: an array of arrays, an empty array, a string of any bytes, a NaN's payload are kept."""
    out, n = [], 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):             # the reader's pseudo-fields: version, counts
            continue
        if key == FILE_TYPE:
            if file_type is None:
                continue
            # name length, name, value type, value: only the value changes, in the key's type
            out.append(_raw(field.parts[:-1]) + _packed(file_type, field.parts[-1]))
        else:
            out.append(_raw(field.parts))
        n += 1
    return b"".join(out), n


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
    named_as_written(out, GGUF_SUFFIXES[0], "export_gguf()")      # every reader takes a model by its name's ending
    with Source(open_gguf_source(art, spec)) as source:
        plan = _plan(art, source.parsed)
        header, file_type = _header(source.parsed, plan, dtype)
        with atomic_output(out) as f:
            f.write(header)
            _write_tensors(f, source, art, plan, dtype, reporter(progress))
            size = f.tell()
    return {"path": str(out), "bytes": size, "layers": len(art.layers), "tensors": sum(1 for _, e in plan if e),
            "copied": sum(1 for _, e in plan if not e), "format": art.format, "dtype": dtype, "model": spec,
            "file_type": file_type}


def _header(reader, plan: list, dtype: str) -> tuple[bytes, int | None]:
    """(the output's bytes before its tensor data: the source's header, metadata and tensor infos in its byte
    order and version, each decoded tensor's type and every offset anew, padded to the source's alignment;
    the output's ``general.file_type``, None where it has none)."""
    import gguf

    decoded = gguf.GGMLQuantizationType.F32 if dtype == "float32" else gguf.GGMLQuantizationType.BF16
    types = [(decoded if entries else t.tensor_type, len(t.shape)) for t, entries in plan]
    file_type = file_type_of(types) if reader.get_field(FILE_TYPE) is not None else None
    kv, n_kv = metadata_bytes(reader, file_type)
    fields = reader.fields
    # the magic is the bytes "GGUF" in either byte order; the version and the tensor count the source's
    head = [gguf.GGUF_MAGIC.to_bytes(4, "little"), _raw(fields["GGUF.version"].parts),
            _raw(fields["GGUF.tensor_count"].parts), _packed(n_kv, fields["GGUF.kv_count"].parts[0]), kv]
    align, offset = int(reader.alignment), 0
    for (t, entries), (kind, _) in zip(plan, types):
        name_dims, kind_part, offset_part = t.field.parts[:4], t.field.parts[4], t.field.parts[5]
        head += [_raw(name_dims), _packed(kind, kind_part), _packed(offset, offset_part)]
        offset += _padded(_nbytes(t, entries, dtype), align)
    head = b"".join(head)
    return head + bytes(_padded(len(head), align) - len(head)), file_type


def _padded(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align`` (GGUF pads the header and each tensor's data)."""
    return -(-n // align) * align


def _nbytes(t, entries: list, dtype: str) -> int:
    """The bytes of tensor ``t`` in the output: its own where it is copied, 4 or 2 a weight where decoded."""
    return int(t.n_bytes) if not entries else int(t.n_elements) * (4 if dtype == "float32" else 2)


class Source:
    """The source GGUF as the export copies from it, open for reading: ``copy(f, t)`` writes tensor ``t``'s bytes
    as the file holds them, refusing a file changed since the project's reader opened (and fingerprinted) it,
    so that what is copied is the checkpoint the artifact was made from."""

    def __init__(self, src):
        self.path = Path(src.files[0])
        self._reader = src._reader
        self.parsed = src._reader.parsed[os.path.realpath(self.path)]    # parsed once, by the project's reader
        self._file = None

    def __enter__(self) -> "Source":
        self._file = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def check(self, name: str) -> None:
        """A CheckpointError if the file is not the one opened (size, modification time, inode)."""
        self._reader._check_unchanged(self.path, name)

    def copy(self, f, t) -> None:
        """Tensor ``t``'s bytes (its type, the file's byte order) into ``f``, read with ``pread``, not through
        the memory map: a source truncated meanwhile is one line, where the map's page past the end killed
        the process (SIGBUS) and left its temporary file behind."""
        start, n = int(t.data_offset), int(t.n_bytes)
        self.check(t.name)
        for at in range(0, n, COPY_CHUNK):
            want = min(COPY_CHUNK, n - at)
            chunk = os.pread(self._file.fileno(), want, start + at)
            if len(chunk) != want:
                self.check(t.name)              # changed since it was opened: that line
                raise CheckpointError(self.path, f"tensor {t.name} cannot be read: the file ends at byte "
                                                 f"{start + at + len(chunk)}, inside its data")
            f.write(chunk)


#: bytes copied at a time from the source (an embedding may be gigabytes)
COPY_CHUNK = 1 << 24


def _write_tensors(f, source: Source, art, plan: list, dtype: str, say) -> None:
    """Each tensor's data into ``f`` after the header, padded to the source's alignment as the header's offsets
    say; one progress line a decoded layer; the source checked unchanged once every copy is made."""
    import gguf

    here = gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE
    swap, align = source.parsed.endianess != here, int(source.parsed.alignment)
    n, done = len(art.layers), 0
    for t, entries in plan:
        start = f.tell()
        if not entries:
            source.copy(f, t)
        for e in entries:                       # a layer, or a fused tensor's experts one after another
            t0 = time.perf_counter()
            w = _decoded(art, e, dtype)
            # f.write, not ndarray.tofile: tofile's OSError on a full disk has no errno ("N requested and 0
            # written"), so it was no "No space left on device" line naming the target (golden.files)
            f.write((w.byteswap() if swap else w).data)
            done += 1
            say(layer_line("dequantize", done, n, e.name, e.shape, time.perf_counter() - t0))
        f.write(bytes(_padded(f.tell() - start, align) - (f.tell() - start)))
    if plan:
        source.check(plan[-1][0].name)
