"""A torch model held in memory, quantized in place: the entry point for a script that has the model.

``quantize_module(model, fmt, batches)`` does for a ``torch.nn.Module`` what ``sop quantize``
does for a checkpoint on disk, with the same rules and the same bits:

* **layers**: every ``torch.nn.Linear``, transformers ``Conv1D`` (GPT-2 style, weight stored ``(in, out)``:
  quantized as its transpose) and, with ``routers=True``, MoE router (``causal_lm._is_router``, or named as
  one: ``models.router_weights``; a ``UserWarning`` when the model has none), named ``<module>.weight`` as
  the model names its parameters (transformers renames some checkpoint tensors on loading: GPT-NeoX's
  ``embed_out`` is ``lm_head``, Mixtral's ``block_sparse_moe`` is ``mlp``), selected by the file path's
  rules (quantize/models.py: ``linear_reason``, ``include`` / ``exclude`` globs, the output head kept
  unless ``lm_head``, the routers unless ``routers``). A head whose weight is an ``nn.Embedding``'s (a tied
  head, whatever its name: ``lm_head``, BERT's ``cls.predictions.decoder``; the same Parameter, or another
  over the same memory seen the same way, ``_view``) is kept with it, or with ``lm_head=True`` quantized once under the
  first embedding's name, as on disk. A weight several linear modules apply is one layer. A
  transformers experts module's fused ``(experts, rows, in)`` parameters are split as ``save_pretrained``
  writes them, one layer per expert matrix (``_expert_conversions``: Mixtral's ``gate_up_proj`` is each
  expert's ``w1`` over its ``w3``), named ``<experts module>.<expert>.<its name on disk>``
  (``model.layers.0.mlp.experts.3.w1.weight``): the tensors the disk path quantizes; a fused parameter
  that no conversion splits (stored fused on disk too: GraniteMoE's, GPT-OSS's ``(experts, in, out)``)
  is one layer per expert, ``<parameter>[<expert>]`` (``_stacked_experts``). Kept, each
  with its reason in ``kept``: every other parameter of two or more dimensions (embeddings, FP8 weights and
  experts, Llama 4's fused experts, convolutions), weights that are views of another tensor's memory (writing one
  would change the other) or whose elements share memory (an ``expand``ed weight), ``nn.MultiheadAttention``'s
  weights (it applies them without calling a module, so no hook sees their input) and a weight computed at each
  call (a parametrization such as ``weight_norm``: writing it would change nothing). A weight on the meta
  device, or a lazy module's not yet initialized, is refused.
* **calibration**: with ``batches`` (an iterable of batches, each a mapping of model keywords such as
  a tokenizer's output, a tuple of positional inputs or one tensor), the model runs once on each in
  ``eval`` mode under ``torch.inference_mode`` (every submodule's mode is restored after), and each
  layer's ``act_ms`` is the mean square of its input per input column, in float64, over every token
  that reached it through any module applying its weight, as calibration on disk computes it
  (quantize/causal_lm.py ``collect_stats``; the same windows in the same batches give the same bits).
  A position whose mask is 0 is left out (docs/quantizer.md section 2's "every non-padding token"):
  a mapping batch's ``attention_mask``, and in an encoder-decoder model the encoder's for the
  encoder's layers and for a layer that takes the encoder's output itself or a transposed view of it
  (cross-attention's key and value; FSMT's, sequence first), ``decoder_attention_mask`` for the
  rest, matched to each layer's input (``_positions``); a tuple's or a tensor's batch counts every
  position. A batch the model cannot run is a ValueError
  naming it (``_run``). An expert's matrix takes the
  tokens that reach its experts module, a token the router sent elsewhere a zero input, as on disk
  (``causal_lm._expert_hook``). A layer no token reached (its module not called, or called on no row,
  an expert no token was routed to) gets one token of ones (``1/tokens`` in every column) and is
  listed in ``unreached``. A non-finite statistic is refused naming the layer, and batches that reach
  no layer are refused, as is a parameter or buffer on the meta device that the forward pass would read
  (``_meta_tensor``: the layers after it would take in uninitialized memory). Without ``batches`` every layer
  is unweighted.
* **quantization**: ``schemes.get_quant_format(fmt)``: a per-layer format quantizes each layer
  alone, ``sop-budget`` chooses over every layer at once under ``budget`` bits per weight.
* **write back**: each weight gets its reconstruction cast to the parameter's own dtype and device
  (round to nearest: float32 holds the SOP points' values and the MX and FP8 baselines' exactly,
  not those of int8, NVFP4, IF4, NF4 or of sparse entries; BF16 and float16 round in general).
  Every layer is quantized and cast before the first is written: a bad input (a weight with a NaN is
  named before calibration runs) or a reconstruction that the parameter's dtype cannot hold (float16
  past 65504) raises ``ValueError`` naming the layer and leaves the parameters untouched (a buffer the
  forward pass updates itself, such as dynamic RoPE's, is as the last batch left it). A float32
  parameter takes the float32 output rule (``golden.formats.to_float32``, as ``sop dequantize`` writes
  the layer): a value past float32's largest, 2^128 from a weight near it, saturates. Peak memory
  is therefore the model, the cast copy of its quantized layers, one layer quantized as on disk (its
  matrix as the disk path reads it, ``_Layer.matrix``: float32 from a float32, bfloat16 or float16
  parameter, a float32 one on the CPU not copied; the format's working set and reconstruction;
  ``sop-budget`` reads each layer twice, as on disk; with ``out`` the matrix is held until the layer's
  record is written, for its error statistics), and the packed stream of every SOP layer, which the
  result keeps (its bits: about bpw / 8 bytes a weight). On one bf16 layer that is at most the disk
  path's peak, or with ``out`` about 2 bytes a weight (the layer's cast copy) above it (docs/benchmarks.md,
  "Memory").

The result (``InMemoryResult``) holds for each layer what it stores (``LayerRecord``: ``bits``,
``bpw``, ``choice``, a SOP point's golden ``stream``; the reconstruction is the model's weight now),
the statistics, what was kept and why, and for ``sop-budget`` the knapsack's ``BudgetResult``.
The layers are taken in the disk path's order (their names on disk, ``_saved_names``, naturally sorted),
so that ``sop-budget`` breaks exact ties as it does there. With ``out`` the layers also go into a
``.sopq`` file: the one ``artifact.quantize_model`` writes for the same model saved (each layer under
its name on disk, the same records, bits, choices and error summary); its header records no spec and
no fingerprint (``sop dequantize --model-folder`` needs ``--model``), the model's class, the batches'
tokens, and the files the model was loaded from (``_source_files``: no output replaces them). The
target is refused before any work as the commands refuse one (a folder, a non-regular file, one of
those files, a layer name a ``.sopq`` cannot hold), and the file is written (atomically) before the
model: a refused or failed write leaves both as they were. The parameters are written with SIGINT,
SIGTERM and SIGHUP held (``golden.files.signals_held``): the model is quantized whole or not at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Real
from pathlib import Path

import numpy as np

from sop.golden.files import signals_held
from sop.golden.formats import to_float32
from sop.golden.layout import LayerStream

from .blockwise import narrow_weights
from .causal_lm import (_BMM_EXPERTS, _EXPERT_INPUT, Target, _expert_hook, _is_linear, _is_router, _raised_in_sop,
                        experts_transposed, fused_expert_params)
from .checkpoint_files import describe_error
from .fp8_scales import FP8_DTYPES
from .inputs import boolean, option
from .knapsack import LazyLayers, budget_report, check_budget_shapes
from .models import (NO_ROUTER, _natural_key, _selected, expert_layer_name, folder_inputs, fused_experts_layout,
                     globs, is_expert_stack, linear_reason, router_weights, unmatched_globs)
from .schemes import get_quant_format


@dataclass(frozen=True)
class LayerRecord:
    """What one layer stores (its reconstruction is in the model now)."""

    shape: tuple[int, int]                          # (out, in)
    bits: int                                       # every stored bit (QuantResult.bits)
    choice: str                                     # the format's choice (QuantResult.choice)
    stream: LayerStream | None                      # the golden layer stream of a SOP point

    @property
    def bpw(self) -> float:
        return self.bits / (self.shape[0] * self.shape[1])


@dataclass
class InMemoryResult:
    layers: dict[str, LayerRecord]                  # layer name -> what it stores, in the checkpoint path's
    #                                                 order (the names on disk, ``_saved_names``, naturally sorted)
    act_ms: dict[str, np.ndarray] | None            # layer name -> input mean squares (None: unweighted)
    kept: dict[str, str] = field(default_factory=dict)     # a parameter left as it is -> why
    budget: object | None = None                    # sop-budget: the knapsack's BudgetResult (its results
    #                                                 consumed as written: each layer's record is in layers)
    tokens: int = 0                                 # calibration tokens (activation_stats says how counted)
    unreached: list[str] = field(default_factory=list)     # layers no calibration token reached (1/tokens)

    @property
    def bits(self) -> int:
        return sum(r.bits for r in self.layers.values())

    @property
    def bpw(self) -> float:
        weights = sum(r.shape[0] * r.shape[1] for r in self.layers.values())
        return self.bits / weights if weights else 0.0


_MHA = ("nn.MultiheadAttention's: it applies its weights without calling a module, so no hook sees their "
        "input (no statistic)")
_ROUTER = "a MoE router: kept (routers=True quantizes it), as on disk"
_TIED = "a head tied to the input embedding {}: kept (lm_head=True quantizes the shared matrix, under that name)"


@dataclass
class _Layer:
    """One layer to quantize: the weight of ``modules`` (each applies it; their hooks see its input), or
    with ``expert`` one expert's matrix inside the fused ``(experts, rows, in)`` parameter of ``modules[0]``,
    a transformers experts module (``expert.slot``: the parameter, the expert, the first of ``rows`` rows),
    or with ``stack`` (the parameter's name, the expert, how many) the whole of one expert of a fused
    parameter that the checkpoint stores fused too (``(experts, in, out)`` where ``expert.conv1d``)."""

    modules: list
    expert: Target | None = None
    rows: int = 0
    stack: tuple[str, int, int] | None = None

    def stored(self):
        """The parameter that holds the layer (the fused parameter of an expert's matrix)."""
        return self.modules[0].weight if self.expert is None else getattr(self.modules[0], self.expert.slot[0])

    def tensor(self):
        """The layer's matrix as the model holds it: the weight, or a view of the expert's rows."""
        if self.expert is None:
            return self.modules[0].weight
        _, e, r0 = self.expert.slot
        return self.stored()[e] if self.stack else self.stored()[e, r0:r0 + self.rows]

    @property
    def conv1d(self) -> bool:
        """The model holds it ``(in, out)``: a Conv1D's weight, an expert of GPT-OSS."""
        return self.expert.conv1d if self.expert is not None else _is_conv1d(self.modules[0])

    def matrix(self) -> np.ndarray:
        """The layer's ``(out, in)`` matrix as the disk path hands it to the format (``ModelSource.load``
        narrowed by ``blockwise.narrow_weights``: the same bits out): C-contiguous, float32 where every
        weight is one (a float32, bfloat16 or float16 parameter: 4 bytes a weight, not float64's 8), read
        in one copy with no float64 step. A float32 parameter on the CPU held ``(out, in)`` contiguous is
        not copied at all: a read-only view of it (nothing is written before every layer is quantized,
        and a format that wrote its input would raise instead of changing the model)."""
        import torch

        t = self.tensor().detach()
        t = t.T if self.conv1d else t
        if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
            w = t.numpy()
            w.flags.writeable = False
            return w
        exact = t.dtype in (torch.float32, torch.bfloat16, torch.float16)
        w = torch.empty(t.shape, dtype=torch.float32 if exact else torch.float64).copy_(t).numpy()
        return w if exact else narrow_weights(w)

    def in_features(self) -> int:
        return self.tensor().shape[0 if self.conv1d else 1]


#: weights per chunk of ``_finite``'s check (a few MB of temporaries)
_FINITE_CHUNK = 1 << 20


def _finite(t) -> bool:
    """Whether every element of the 2-D tensor ``t`` is finite, checked in row chunks (any strides):
    ``torch.isfinite`` of a whole layer holds about 5 bytes a weight of temporaries in bfloat16 (its
    abs and masks), which on the cast copy was the in-memory path's peak."""
    import torch

    step = max(1, _FINITE_CHUNK // max(1, t.shape[-1]))
    return all(bool(torch.isfinite(c).all()) for c in t.split(step))


def _expert_conversions(model) -> list[tuple[re.Pattern, list[str]]]:
    """transformers' checkpoint conversions that stack one 2-D matrix per expert into a fused parameter, as
    ``(the fused parameter's name pattern, the per-expert names of its sources in row order)``: Mixtral's
    ``gate_up_proj`` is ``w1.weight`` over ``w3.weight`` of each expert, its ``down_proj`` each ``w2.weight``.
    Only a stack along the experts (``MergeModulelist(dim=0)``) and for several sources a row concatenation
    (``Concatenate(dim=1)``): the sources are then equal row chunks of each expert's matrix, the tensors
    ``save_pretrained`` writes and the disk path quantizes. Private API of the pinned transformers: without
    it, no conversion (the fused experts are kept)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:
        return []
    out = []
    for conv in get_model_conversion_mapping(model):
        if not isinstance(conv, WeightConverter) or len(conv.target_patterns) != 1:
            continue
        ops, tails = list(conv.operations), [re.fullmatch(r".*experts\.\*\.(.+)", p) for p in conv.source_patterns]
        stacked = bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0
        rows = len(ops) == 1 if len(tails) == 1 else (len(ops) == 2 and type(ops[1]) is Concatenate
                                                      and ops[1].dim == 1 and ops[1].num_shards_attribute is None)
        if stacked and rows and all(tails):
            target = re.escape(conv.target_patterns[0].strip(".")).replace(r"\*", r"\d+")
            out.append((re.compile(rf"(^|\.){target}$"), [t[1] for t in tails]))
    return out


def _fused_experts(model):
    """``(module name, experts module, parameter name, the parameter, its per-expert names or None)`` for each
    fused ``(experts, rows, in)`` parameter of a transformers experts module (``is_transposed`` False, as the
    disk path's ``causal_lm._expert_slots`` takes them); the names from ``_expert_conversions``, None where
    no conversion splits the parameter (GraniteMoE's, stored fused on disk too)."""
    conversions = _expert_conversions(model)
    for mname, module, pname, p in fused_expert_params(model.named_modules()):
        full = f"{mname}.{pname}" if mname else pname
        tails = next((t for pattern, t in conversions if pattern.search(full)), None)
        yield mname, module, pname, p, None if tails is None or p.shape[1] % len(tails) else tails


def _unsplit_experts(module, p) -> str:
    """Why an experts module's fused parameter that neither ``_fused_experts`` nor ``_stacked_experts`` takes
    is kept."""
    kind = type(module).__name__
    if _fp8(p):
        return f"fused MoE experts of {kind} in {p.dtype}: kept, as on disk"
    if not p.is_floating_point():               # GPT-OSS on transformers' MXFP4 kernels: packed codes
        return (f"fused MoE experts of {kind}, packed as {str(p.dtype).removeprefix('torch.')} codes (MXFP4 as "
                f"transformers' kernels hold them): kept; a model loaded dequantized (on the CPU, or with "
                f"Mxfp4Config(dequantize=True)) has them as values, and on disk they are quantized")
    if type(module).__name__ in _BMM_EXPERTS:
        return (f"fused MoE experts of {kind}, called with every token scaled by its router score and no routed "
                f"indices: kept (on disk they are quantized)")
    if experts_transposed(module) is not None:
        return (f"fused MoE experts of {kind}, of a model type whose fused experts are kept, as on disk "
                f"(models.FUSED_EXPERTS)")
    return (f"fused MoE experts of {kind}, which does not say how it stores them (is_transposed): kept (a "
            f"checkpoint on disk with these experts is refused: quantize_model's exclude, or sop quantize's "
            f"--exclude, leaves them out)")


def _fp8(p) -> bool:
    """An FP8 parameter (its fused experts are kept, as on disk): a dtype of ``fp8_scales.FP8_DTYPES``."""
    return str(p.dtype).removeprefix("torch.") in FP8_DTYPES


def _stored_weight(module):
    """The module's ``weight`` if it is a parameter the module stores, else None (a parametrization such
    as weight_norm computes it at each access: writing it would change nothing)."""
    return dict(module.named_parameters(recurse=False)).get("weight")


def _router_modules(model) -> set[str]:
    """The names of ``model``'s MoE router modules: a router module (``causal_lm._is_router``) or a module
    whose weight the checkpoint rules name as a router (``models.router_weights``, as the disk path names it)."""
    by_name = router_weights(n for n, _ in model.named_parameters())
    return {mname for mname, module in model.named_modules()
            if _is_router(module) or (f"{mname}.weight" if mname else "weight") in by_name}


def linear_modules(model, include=None, exclude=None, lm_head: bool = False,
                   routers: bool = False) -> tuple[dict, dict[str, str]]:
    """``({layer name: _Layer}, {kept parameter: why})`` by the checkpoint rules (module docstring);
    ``kept`` names every parameter of two or more dimensions not quantized."""
    import torch

    include, exclude = globs(include, "include"), globs(exclude, "exclude")
    lm_head, routers = boolean("lm_head", lm_head), boolean("routers", routers)    # lm_head="no" was True
    routers_in = _router_modules(model)
    embeddings: dict[tuple, str] = {}               # a weight's view -> the first embedding holding it
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            embeddings.setdefault(_view(m.weight), f"{n}.weight" if n else "weight")
    in_mha = {id(sub) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) for sub in m.modules()}
    layers: dict[str, _Layer] = {}
    kept: dict[str, str] = {}
    decided: dict[tuple, tuple[str, bool]] = {}     # a weight's view -> (its first name, quantized)
    heads = 0                                       # output heads seen (by name, or tied to an embedding)
    for mname, module in model.named_modules():
        if not (_is_linear(module) or _is_router(module)):
            continue
        name = f"{mname}.weight" if mname else "weight"
        router = mname in routers_in
        weight = _stored_weight(module)
        if weight is None:
            if getattr(module, "weight", None) is not None:
                kept[name] = ("computed at each call (a parametrization such as weight_norm), not a stored "
                              "parameter: writing it would change nothing")
            continue
        if isinstance(weight, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name}: its weight is not initialized yet (a lazy module, {type(module).__name__}:"
                             f" run the model once on a batch first)")
        if _view(weight) in decided:                # a weight two modules apply: one layer, both inputs
            first, quantized = decided[_view(weight)]
            if quantized:
                layers[first].modules.append(module)
            else:
                kept[name] = f"the weight of {first}, kept"
            continue
        tied = embeddings.get(_view(weight))
        if id(module) in in_mha:
            why = _MHA
        elif tied is not None:                      # named as on disk: the embedding's tensor
            why, name = (None, tied) if lm_head else (_TIED.format(tied), name)
            heads += 1
        else:
            why = linear_reason(name, tuple(weight.shape), weight.is_floating_point())
            heads += why == "lm_head"
            why = None if why == "lm_head" and lm_head else why
            if why is None and router and not routers:
                why = _ROUTER
            if why is None and _fp8(weight):
                why = (f"stored in FP8 ({str(weight.dtype).removeprefix('torch.')}): a reconstruction written "
                       f"back would be rounded to FP8 again")
        if why is None and not _selected(name, include, exclude):
            why = "not selected (include/exclude)"
        if why is None and weight.is_meta:
            raise ValueError(f"layer {name}: its weight is on the meta device (not loaded): nothing to quantize")
        decided[_view(weight)] = (name, not why)
        if why:
            kept[name] = why
        else:
            layers[name] = _Layer([module])
    for mname, module, pname, p, tails in _fused_experts(model):   # each expert's matrices, named as on disk
        if tails is None:                           # stored fused on disk too: ``_stacked_experts``
            continue
        full = f"{mname}.{pname}" if mname else pname
        decided[_view(p)] = (full, True)
        rows = p.shape[1] // len(tails)
        for e in range(p.shape[0]):
            for k, tail in enumerate(tails):
                name = f"{mname}.{e}.{tail}"
                why = linear_reason(name, (rows, p.shape[2]), p.is_floating_point())
                if why is None and not _selected(name, include, exclude):
                    why = "not selected (include/exclude)"
                if why:
                    kept[name] = why
                    continue
                if p.is_meta:
                    raise ValueError(f"layer {name}: its weight is on the meta device (not loaded): nothing to "
                                     f"quantize")
                layers[name] = _Layer([module], Target(name, mname, False, slot=(pname, e, k * rows)), rows)
    if lm_head and not heads:
        raise ValueError("lm_head=True: the model has no output head (a linear module named as one: lm_head, "
                         "embed_out, ...) and no linear module whose weight is an embedding's")
    _stacked_experts(model, include, exclude, layers, kept, decided)
    for mname, module in model.named_modules():     # the rest, each with its owner's kind
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            state = decided.get(_view(p))
            if p.ndim < 2 or full in kept or (state is not None and state[1]):
                continue
            kept[full] = ("an embedding" if isinstance(module, torch.nn.Embedding) else
                          f"the weight of {state[0]}, kept" if state is not None else
                          _MHA if isinstance(module, torch.nn.MultiheadAttention) else
                          _unsplit_experts(module, p) if p.ndim == 3 and pname in (*_EXPERT_INPUT, "down_proj") else
                          f"a parameter of {type(module).__name__}, not the weight of a linear module")
    shared: dict[int, str | None] = {}             # a stored parameter -> the other tensor its memory overlaps
    for name, lay in list(layers.items()):         # a view of another tensor's memory: writing it writes that
        p = lay.stored()
        if _overlaps_itself(p):                    # copy_ refused it after the layers before it were written
            del layers[name]
            kept[name] = ("its elements share memory (an expanded view, a stride of 0): no reconstruction can "
                          "be written into it")
            continue
        other = shared[id(p)] = shared[id(p)] if id(p) in shared else _overlapping(model, p)
        if other is not None:
            del layers[name]
            kept[name] = f"shares memory with {other} (views of one tensor): writing it would change that one"
    return layers, kept


def _stacked_experts(model, include, exclude, layers: dict, kept: dict, decided: dict) -> None:
    """Into ``layers``, each expert of the fused parameters that no conversion splits (stored fused on disk
    too: GraniteMoE's, GPT-OSS's ``(experts, in, out)``): one layer per expert, ``<parameter>[<expert>]``,
    selected as one parameter by its name, as the disk path selects the fused tensor, and for the same
    model types (``models.FUSED_EXPERTS``, or a model that names none). Llama 4's experts (no routed
    indices to hook, ``causal_lm._BMM_EXPERTS``) and FP8 ones are kept (``_unsplit_experts``)."""
    import torch

    if not _fused_experts_layout(model)[0]:
        return
    for mname, module in model.named_modules():
        transposed = experts_transposed(module)
        if transposed is None or type(module).__name__ in _BMM_EXPERTS:
            continue
        for pname in (*_EXPERT_INPUT, "down_proj"):
            p = getattr(module, pname, None)
            full = f"{mname}.{pname}" if mname else pname
            if not isinstance(p, torch.nn.Parameter) or p.ndim != 3 or _view(p) in decided or _fp8(p) \
                    or not is_expert_stack(full, tuple(p.shape), p.is_floating_point()):
                continue
            selected = _selected(full, include, exclude)
            decided[_view(p)] = (full, selected)
            if not selected:
                kept[full] = "not selected (include/exclude)"
                continue
            if p.is_meta:
                raise ValueError(f"layer {full}: its weight is on the meta device (not loaded): nothing to quantize")
            n = p.shape[0]
            for e in range(n):
                name = expert_layer_name(full, e)
                layers[name] = _Layer([module], Target(name, mname, transposed, slot=(pname, e, 0)),
                                      stack=(full, e, n))


def _fused_experts_layout(model) -> tuple[bool, bool]:
    """``models.fused_experts_layout`` for the model's config: (whether its fused experts are quantized, whether
    its checkpoint stores them ``(experts, in, out)``, which a ``.sopq`` records whatever the model holds)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    quantized, in_out = fused_experts_layout({"model_type": getattr(config, "model_type", None),
                                              "text_config": {"model_type": getattr(text, "model_type", None)}})
    return quantized, bool(in_out)


def _view(p) -> tuple:
    """What makes two parameters one tensor: the same memory seen the same way (a head tied by
    ``.data = embedding.data`` is another Parameter over the embedding's storage); a meta tensor has
    no memory, only itself."""
    if p.is_meta:
        return ("meta", id(p))
    return (str(p.device), p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()))


def _span(p) -> tuple[int, int, int]:
    """``(storage, first byte, end byte)`` of the memory ``p`` reads."""
    extent = 1 + sum((n - 1) * st for n, st in zip(p.shape, p.stride())) if p.numel() else 0
    start = p.storage_offset() * p.element_size()
    return p.untyped_storage().data_ptr(), start, start + extent * p.element_size()


def _overlaps_itself(p) -> bool:
    """Some elements of ``p`` share memory (``expand``: a stride of 0 along an axis of several, or strides
    that fold the tensor onto itself): fewer memory places than elements."""
    return not p.is_meta and 1 + sum((n - 1) * st for n, st in zip(p.shape, p.stride())) < p.numel()


def _overlapping(model, weight) -> str | None:
    """The first other parameter or buffer whose memory overlaps ``weight``'s but is not the same view."""
    if weight.is_meta:
        return None
    mine, (ptr, lo, hi) = _view(weight), _span(weight)
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if t.is_meta or t.device != weight.device or _view(t) == mine:
            continue
        p2, lo2, hi2 = _span(t)
        if p2 == ptr and lo2 < hi and lo < hi2:
            return name
    return None


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


#: each mask and the inputs it covers, position for position (where no cache holds earlier positions)
_MASKED = {"attention_mask": ("input_ids", "inputs_embeds"),
           "decoder_attention_mask": ("decoder_input_ids", "decoder_inputs_embeds")}


def _check_batch(batch, i: int) -> None:
    """What a calibration batch cannot be, refused before it runs: a tensor on the meta device (no values:
    torch's embedding of meta ids on CPU weights returns uninitialized memory, which the statistics took in,
    different at every run), or a (batch, seq) mask of another shape than the inputs it covers (transformers
    runs it, a short mask's missing positions read as masked, while the statistics, finding no layer's rows
    to lay it on, counted every row, and the tokens as its ones). A batch carrying a cache (``cache``,
    transformers 5's name, or ``past_key_values``) masks the cached positions too: its mask is not checked."""
    import torch

    items = batch.items() if isinstance(batch, Mapping) else \
        enumerate(batch) if isinstance(batch, (tuple, list)) else [("input", batch)]
    for key, t in items:
        if isinstance(t, torch.Tensor) and t.is_meta:
            what = key if isinstance(key, str) else f"input {key}"
            raise ValueError(f"calibration batch {i}: its {what} is on the meta device (no values); give it on "
                             f"the model's device")
    if not isinstance(batch, Mapping) or _cached(batch):
        return
    for key, covered in _MASKED.items():
        name, positions = _covered(batch, covered)
        if batch.get(key) is None or name is None:
            continue
        mask = torch.as_tensor(batch[key])
        if mask.ndim == 2 and len(positions) == 2 and tuple(mask.shape) != positions:
            raise ValueError(f"calibration batch {i}: its {key} is {tuple(mask.shape)} and its {name} "
                             f"{positions} positions: a mask gives one entry per position")


def _cached(batch) -> bool:
    """A mapping batch carries a cache (``cache``, transformers 5's name, or ``past_key_values``): its
    ``attention_mask`` covers the cached positions, then the batch's own."""
    return any(batch.get(k) is not None for k in ("cache", "past_key_values"))


def _covered(batch, covered: tuple[str, str]) -> tuple[str | None, tuple]:
    """The input of a mapping batch that a mask covers (ids or embeddings: ``covered``) and its positions'
    shape, ``(None, ())`` where the batch has neither as a tensor."""
    import torch

    name = next((k for k in covered if isinstance(batch.get(k), torch.Tensor)), None)
    if name is None:
        return None, ()
    x = batch[name]
    return name, tuple(x.shape[:-1] if name.endswith("embeds") else x.shape)


def _run(model, batch, i: int) -> None:
    """The model on calibration batch ``i``. An error of the model's own (an id past its vocabulary, a batch
    of no position) is a ValueError naming the batch, the model's exception its cause; one raised in this
    package's hooks stays as it is."""
    import torch

    if isinstance(batch, Mapping):                  # a dict, a tokenizer's BatchEncoding
        args, kwargs = (), batch
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    elif isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    else:
        hint = " (torch.as_tensor makes one of it)" if isinstance(batch, np.ndarray) else ""
        kind = type(batch).__qualname__ if type(batch).__module__ == "builtins" else \
            f"{type(batch).__module__}.{type(batch).__qualname__}"
        raise ValueError(f"calibration batch {i} is a {kind}: each batch "
                         f"is a dict of the model's keyword inputs (a tokenizer's output), a torch tensor{hint}, "
                         f"or a tuple of positional inputs")
    try:
        model(*args, **kwargs)
    except Exception as err:                        # noqa: BLE001 - a model raises anything on an input it cannot run
        if _raised_in_sop(err):
            raise
        raise ValueError(f"calibration batch {i}: the model cannot run it ({describe_error(err)})") from err


def _encoder_modules(model) -> set[int]:
    """The modules of an encoder-decoder model's encoder (``get_encoder()``, transformers' own
    accessor): their inputs are the source positions ``attention_mask`` covers; every other module's
    are the target positions (``decoder_attention_mask``)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        return set()
    return {id(m) for m in model.get_encoder().modules()}


def _kept_rows(x, mask):
    """Which rows of the layer input ``x`` (``(..., in)``, its rows in order) sit at the positions ``mask``
    (batch, seq) keeps: ``x`` batch-first ``(batch, seq, in)``, sequence-first ``(seq, batch, in)`` (batch !=
    seq), either with axes of length 1 between (DeepSeek's ``kv_b_proj`` takes ``(batch, 1, seq, in)``), or
    flattened batch-first ``(batch * seq, in)`` (the hidden states an experts module takes); None where
    there is no mask, or for any other layout (gathered expert tokens, heads beside the positions, another
    length): no position to match, every row counts."""
    if mask is None or math.prod(x.shape[:-1]) != mask.numel():
        return None
    mask = mask.to(x.device)
    lead, axes = [d for d in x.shape[:-1] if d != 1], [d for d in mask.shape if d != 1]
    if lead == axes or x.ndim == 2:
        return mask.reshape(-1)
    if lead == axes[::-1]:
        return mask.T.reshape(-1)
    return None


def _positions(x, mask):
    """The rows of the layer input ``x`` at the positions ``mask`` keeps (``_kept_rows``), as ``(rows, in)``."""
    keep = _kept_rows(x, mask)
    rows = x.reshape(-1, x.shape[-1])
    return rows if keep is None else rows[keep]


def _masks(batch) -> tuple:
    """``(attention_mask, decoder_attention_mask)`` of a mapping batch as boolean (batch, seq) tensors,
    each None where absent or not two-dimensional (a positional batch has none). A batch with a cache:
    the mask's last columns, those of the batch's own positions (the cached ones ran in an earlier call)."""
    import torch

    if not isinstance(batch, Mapping):
        return None, None
    out = []
    for key, covered in _MASKED.items():
        m = batch.get(key)
        m = None if m is None else torch.as_tensor(m)
        if m is None or m.ndim != 2:
            out.append(None)
            continue
        positions = _covered(batch, covered)[1]
        if _cached(batch) and len(positions) == 2 and m.shape[1] > positions[1]:
            m = m[:, -positions[1]:]
        out.append(m.bool())
    return tuple(out)


def _batch_tokens(batch) -> int | None:
    """The tokens a calibration batch runs: its ``attention_mask``'s ones, else the positions of its
    ``input_ids`` (or ``inputs_embeds``; a positional batch's first input: integer ids, or float
    ``(..., features)`` rows); None where it says none."""
    import torch

    if isinstance(batch, Mapping):
        mask = _masks(batch)[0]
        if mask is not None:
            return int(mask.sum())
        batch = batch.get("input_ids", batch.get("inputs_embeds"))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    if not isinstance(batch, torch.Tensor):
        return None
    return batch.numel() if not batch.is_floating_point() else math.prod(batch.shape[:-1])


def activation_stats(model, layers: dict, batches) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Per-input-column mean square of each layer's input over every token of ``batches`` (the
    positions a mapping batch's ``attention_mask`` zeroes left out, ``_positions``; in an
    encoder-decoder model the encoder's layers by ``attention_mask``, and so a decoder layer that takes
    the encoder's output itself (cross-attention's key and value projections), the others by
    ``decoder_attention_mask`` or none), the tokens (the batches' own, ``_batch_tokens``; where a batch
    says none, the most rows any layer saw: every token passes a dense model's linear layers, but a layer
    applied per head sees a row per head and token) and the layers that no token reached (their modules not called,
    or called on no row). An expert's matrix: over the tokens that reached its experts module, a token not
    routed to the expert a zero input, as on disk (``causal_lm._expert_hook``, on the unmasked tokens)."""
    import torch

    if isinstance(batches, (Mapping, torch.Tensor)) or not hasattr(batches, "__iter__"):
        raise ValueError(f"batches is an iterable of batches, got a {type(batches).__name__}: for one batch, "
                         f"pass [batch]")
    meta = _meta_tensor(model)
    if meta is not None:
        raise ValueError(f"calibration: the model's {meta} is on the meta device (not loaded): the forward pass "
                         f"would compute with no values (a linear module's output uninitialized memory), and the "
                         f"statistics after it would be garbage; load it, or give no batches")
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    encoder = _encoder_modules(model)
    masks = (None, None)                            # the running batch's (source, target) masks
    source: list = []                               # the running batch's encoder output: source positions
    ran: list[int | None] = []                      # each batch's tokens

    def add(name: str, s, n: int):                  # s None: n tokens that add nothing (not routed to it)
        if s is not None:
            s = s.cpu()
            sums[name] = sums[name] + s if name in sums else s
        counts[name] += n

    def mask_of(module, x):
        if not encoder or id(module) in encoder:
            return masks[0]
        # a decoder module that takes the encoder's output as it is (BART's, T5's, Whisper's cross-attention
        # key and value), or a transposed view of it (FSMT's, sequence first): its rows are source
        # positions, whatever the two lengths (``_positions`` lays the mask on either layout)
        seen = source[0] if source else None
        same = (isinstance(x, torch.Tensor) and isinstance(seen, torch.Tensor) and x.data_ptr() == seen.data_ptr()
                and sorted(x.shape) == sorted(seen.shape))
        return masks[0] if same else masks[1]

    def hook_for(name: str, module):
        width = layers[name].in_features()

        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != width:                # the module's own call refuses it, naming the shapes
                return
            x = _positions(x.detach(), mask_of(module, x)).double()
            add(name, (x * x).sum(0), x.shape[0])
        return hook

    def encoded(_module, _args, out):
        source[:] = [out if isinstance(out, torch.Tensor) else out[0]]

    def experts_hook_for(module, targets: list):
        routed = _expert_hook(targets, add, "exclude= its experts, or give no batches")

        def hook(mod, args, kwargs):                # the masked positions' rows out of the tokens and their experts
            x = kwargs.get("hidden_states", args[0] if args else None)
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            keep = _kept_rows(x, mask_of(module, x)) if isinstance(x, torch.Tensor) else None
            if keep is not None and isinstance(idx, torch.Tensor) and idx.numel() % keep.numel() == 0:
                args, kwargs = (x.reshape(keep.numel(), -1)[keep], idx.reshape(keep.numel(), -1)[keep]), {}
            routed(mod, args, kwargs)
        return hook

    experts: dict[int, tuple] = {}                  # an experts module -> (it, its layers' targets)
    for lay in layers.values():
        if lay.expert is not None:
            experts.setdefault(id(lay.modules[0]), (lay.modules[0], []))[1].append(lay.expert)
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook_for(n, m), with_kwargs=True)
               for n, lay in layers.items() if lay.expert is None for m in lay.modules]
    handles += [m.register_forward_pre_hook(experts_hook_for(m, ts), with_kwargs=True) for m, ts in experts.values()]
    if encoder:
        handles.append(model.get_encoder().register_forward_hook(encoded))
    try:
        model.eval()
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                _check_batch(batch, i)
                masks = _masks(batch)
                given = batch.get("encoder_outputs") if isinstance(batch, Mapping) else None
                source[:] = [] if given is None else [given if isinstance(given, torch.Tensor) else given[0]]
                ran.append(_batch_tokens(batch))
                _run(model, batch, i)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if max(counts.values()) == 0:
        why = ("none given" if not ran else "every position masked: each batch's attention_mask is all 0"
               if all(n == 0 for n in ran) else "the model ran none")
        raise ValueError(f"the calibration batches reached no linear layer ({why})")
    tokens = sum(ran) if None not in ran and sum(ran) else max(counts.values())
    stats, unreached = {}, [n for n in layers if not (counts[n] and n in sums)]
    for name, lay in layers.items():            # a layer no token reached: one token of ones, as on disk
        reached = counts[name] and name in sums
        stats[name] = ((sums[name] / counts[name]).numpy() if reached else
                       np.full(lay.in_features(), 1 / (counts[name] or tokens)))
    for name in sums:                           # in the order the forward pass reached them: the first named
        if not np.isfinite(stats[name]).all():
            raise ValueError(f"layer {name}: its input's mean square is not finite (an Inf or NaN reached it, "
                             f"or its square overflowed): no calibration statistic")
    return stats, tokens, unreached


def _meta_tensor(model) -> str | None:
    """The first parameter or buffer of ``model`` on the meta device that its forward pass would read as it is
    (a module that accelerate offloads, ``_hf_hook.offload``, has its own loaded at each call), else None: torch
    computes a CPU input against a meta weight into uninitialized memory (a linear module without bias), so every
    statistic after it is garbage, where a selected layer's meta weight is refused anyway (``linear_modules``)."""
    for mname, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if any(getattr(h, "offload", False) for h in (hook, *getattr(hook, "hooks", ()))):
            continue
        for pname, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            if t is not None and t.is_meta:
                return f"{mname}.{pname}" if mname else pname
    return None


def _silent(_msg) -> None:
    """``_write_artifact``'s progress: none (a caller in Python prints its own)."""


def _source_files(model) -> list[Path]:
    """The files the model was loaded from, as far as it says (transformers' ``name_or_path``): that
    folder's ``folder_inputs``, or that file, as absolute paths (the header keeps them so: ``sop
    dequantize`` run from another folder still knows them). No ``sop`` output replaces one of them."""
    where = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(where, (str, os.PathLike)) or not str(where):
        return []
    where = Path(os.path.abspath(where))
    with contextlib.suppress(OSError):
        if where.is_dir():
            return folder_inputs(where)
        if where.is_file():
            return [where]
    return []


def _saved_names(model, layers: dict) -> dict[str, str]:
    """Each layer's name as ``save_pretrained`` writes it (``_reverted``); an expert of a fused parameter
    that the checkpoint stores fused is ``<the parameter's name on disk>[<expert>]`` (GraniteMoE's
    ``experts.gate_up_proj`` is ``input_linear.weight`` there)."""
    base = {name: lay.stack[0] if lay.stack else name for name, lay in layers.items()}
    saved = _reverted(model, sorted(set(base.values())))
    return {name: expert_layer_name(saved[base[name]], lay.stack[1]) if lay.stack else saved[name]
            for name, lay in layers.items()}


def _reverted(model, names) -> dict[str, str]:
    """Each of ``names`` as ``save_pretrained`` writes it: transformers' checkpoint renames undone
    (``revert_weight_conversion``, run on a placeholder per name: Mixtral's ``mlp`` is
    ``block_sparse_moe`` on disk, GPT-NeoX's ``lm_head`` is ``embed_out``); an expert's name already
    carries its checkpoint name. A name transformers would not write one to one keeps its own."""
    import torch

    names = list(names)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        placeholders = {n: torch.empty(0) for n in names}
        reverted = revert_weight_conversion(model, dict(placeholders))
    except Exception:                   # noqa: BLE001 - no transformers model, or a conversion we do not follow
        return {n: n for n in names}
    back = {id(t): n for n, t in placeholders.items()}
    saved = {back[id(t)]: new for new, t in reverted.items() if id(t) in back}
    out = {n: saved.get(n, n) for n in names}
    return out if len(set(out.values())) == len(out) else {n: n for n in names}


def _check_sopq(out, names, inputs) -> Path:
    """The ``.sopq`` target refused before any work (``golden.files.check_output``: a folder, a
    non-regular file, one of ``inputs``; a layer name a ``.sopq`` cannot hold, ``artifact.name_problem``)."""
    from sop.golden.files import check_output

    from .artifact import ArtifactError, name_problem, named_as_written
    from .models import ARTIFACT_SUFFIX

    if not isinstance(out, (str, os.PathLike)) or isinstance(os.fspath(out), bytes):
        raise ValueError(f"out is the .sopq file's path (a str or os.PathLike), got {type(out).__name__} {out!r}")
    out = check_output(out, inputs, option=option("out"))
    named_as_written(out, ARTIFACT_SUFFIX, "quantize_module()")
    for name in names:
        why = name_problem(name)
        if why:
            raise ArtifactError(f"layer {name[:80]!r} {why}; a .sopq cannot hold it")
    return out


@dataclass(frozen=True)
class _HeldLayer:
    name: str
    shape: tuple[int, int]                          # (out, in)
    transposed: bool                                # stored (in, out) on disk: a Conv1D, an expert of GPT-OSS
    stack: tuple[str, int, int] | None = None       # an expert of a fused tensor, as LinearLayer.stack on disk


class _HeldModel:
    """What a ``.sopq`` header records of its source (the role ``artifact._write_artifact`` gives a
    ``ModelSource``), for a model held in memory: each layer under its name on disk (``_saved_names``),
    the model's class, what was kept, and the files it was loaded from (``_source_files``: no command
    writes over them); no spec or fingerprint (what is in memory may not be what those files hold:
    ``sop dequantize --model-folder`` then needs ``--model``, and nothing can check it)."""

    def __init__(self, model, layers: dict, kept: dict, saved: dict, files: list):
        self.layers = []
        in_out = _fused_experts_layout(model)[1]    # an expert's orientation on disk (Qwen3-VL-MoE's: not held so)
        for name, lay in layers.items():
            rows, cols = lay.tensor().shape
            stack = None if lay.stack is None else (saved[name].rsplit("[", 1)[0], *lay.stack[1:])
            self.layers.append(_HeldLayer(saved[name], (cols, rows) if lay.conv1d else (rows, cols),
                                          lay.conv1d if stack is None else in_out, stack))
        self.cls, self.kept, self.files = type(model).__name__, kept, files

    def describe(self) -> dict:
        return {"spec": "", "kind": "in-memory", "class": self.cls, "files": [str(f) for f in self.files],
                "layers": len(self.layers), "weights": sum(r * c for r, c in (lay.shape for lay in self.layers)),
                "kept": dict(Counter(self.kept.values())), "forward": None}

    def fingerprint(self) -> str:
        return ""

    def aux_files(self) -> dict:
        return {}


@dataclass(frozen=True)
class _HeldCalibration:
    """A ``.sopq`` header's calibration (the role of a ``Calibration``): the caller's batches."""

    weighted: bool
    tokens: int
    unreached: tuple

    def describe(self) -> dict:
        d = {"weighted": self.weighted, "note": "the caller's batches (a model held in memory)" if self.weighted
             else "unweighted: no batches", "tokens": self.tokens}
        if self.unreached:
            d["unreached"] = list(self.unreached)
        return d


class _Outcomes:
    """``quantize_module``'s layers as ``_write_artifact`` takes them: ``(LayerOutcome, the record's chunks)``
    in order, the choice of a ``sop-budget`` layer ``option: choice`` as on disk; ``budgeted``: the knapsack's
    result or None, its report (which goes into the header) naming each layer as on disk (``saved``)."""

    def __init__(self, layers, budgeted, act, saved: dict, budget):
        self.layers, self.act, self.budgeted = layers, act, budgeted
        if budgeted is not None:                    # the table in the disk path's order: the report sorts it stably
            on_disk = [{**t, "layer": saved[t["layer"]]} for t in budgeted.table]
            self.budgeted = replace(budgeted, table=on_disk)
            self.budgeted.report = budget_report(self.budgeted, budget, budgeted.n_weights)

    def __iter__(self):
        from .artifact import encode_record
        from .layer_loop import LayerOutcome
        from .metrics import ErrorStats

        for name, w, res in self.layers:
            t0 = time.perf_counter()
            kind, chunks, padded = encode_record(res, w.shape, name)
            choice = res.choice if self.budgeted is None else f"{self.budgeted.choice[name]}: {res.choice}"
            yield LayerOutcome(name, ErrorStats.of(w, res.recon, self.act(name), res.bits), choice, int(res.bits), 0,
                               time.perf_counter() - t0, (kind, padded)), chunks


def quantize_module(model, fmt: str, batches=None, *, budget: float | None = None, include=None, exclude=None,
                    lm_head: bool = False, routers: bool = False, out=None) -> InMemoryResult:
    """Quantize ``model``'s linear layers in place with format ``fmt`` (module docstring); with ``out``, also
    into the ``.sopq`` file ``out`` (``_HeldModel``), written before the model."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model is the torch.nn.Module to quantize, got {type(model).__name__}")
    include, exclude = globs(include, "include"), globs(exclude, "exclude")
    qfmt = get_quant_format(fmt)
    if budget is not None and not qfmt.model_level:
        raise ValueError(f"budget is for sop-budget, not {fmt}: a fixed format has its own bits per weight")
    if qfmt.model_level and (budget is None or isinstance(budget, bool) or not isinstance(budget, Real)):
        raise ValueError(f"{fmt} needs budget=B, the average bits per weight (a number), got {budget!r}")
    if qfmt.model_level and not budget > 0:         # before calibration; NaN too
        raise ValueError(f"budget must be a number above 0, got {budget!r}")
    layers, kept = linear_modules(model, include, exclude, lm_head, routers)
    if routers and not _router_modules(model):
        warnings.warn(f"routers=True: the model has {NO_ROUTER}", stacklevel=2)
    if not layers:
        given = ", ".join(f"{k} {v}" for k, v in (("include", include), ("exclude", exclude)) if v)
        given = f" ({given})" if given else ""
        # the first kept parameter the include names (a router, the head: why it was kept), else the first
        first = next(((k, v) for k, v in kept.items() if include and _selected(k, include, exclude)), None) or \
            next(iter(kept.items()), None)
        why = f"; kept: {first[0]}, {first[1]}{f' (and {len(kept) - 1} more)' if len(kept) > 1 else ''}" \
            if first else ""
        raise ValueError(f"the model has no linear layer to quantize{given}: torch.nn.Linear, Conv1D or (with "
                         f"routers=True) a MoE router, selected by the checkpoint rules (quantize/models.py){why}")
    names = {*layers, *kept, *(n for n, _ in model.named_parameters(remove_duplicate=False))}
    for note in unmatched_globs(names, include, exclude, "parameter of the model", next(iter(layers))):
        warnings.warn(note, stacklevel=2)
    # in the checkpoint path's order (its tensors' names on disk, in natural order): sop-budget breaks exact
    # ties between layers by order, and the .sopq lists them in it
    saved = _saved_names(model, layers)
    layers = dict(sorted(layers.items(), key=lambda kv: _natural_key(saved[kv[0]])))
    if out is not None:
        files = _source_files(model)
        out = _check_sopq(out, saved.values(), files)
    for name, lay in layers.items():                # before calibration, which would blame a later layer's input
        if not _finite(lay.tensor().detach()):
            raise ValueError(f"layer {name}: its weight holds a NaN or an Inf: nothing is quantized")
    if qfmt.model_level:                # a budget below every cheapest option: refused before calibration
        check_budget_shapes([tuple(lay.tensor().shape)[::-1] if lay.conv1d else tuple(lay.tensor().shape)
                             for lay in layers.values()], budget)
    stats, tokens, unreached = activation_stats(model, layers, batches) if batches is not None else (None, 0, [])
    act = (lambda n: None) if stats is None else stats.get
    budget_res = (qfmt.solve_budget(LazyLayers(layers, lambda n: (layers[n].matrix(), act(n))), budget,
                                      option="budget") if qfmt.model_level else None)
    records, new = {}, {}

    def quantized():
        """Each layer quantized and cast into ``new`` (every layer before the first is written), yielded
        with its matrix for the .sopq. The matrix is held past the format's call only where the .sopq's
        error statistics need it (``out``): without, the cast copy is made without it."""
        for name, lay in layers.items():
            w = lay.matrix() if out is not None else None
            res = (budget_res.results.pop(name) if budget_res is not None else
                   qfmt.quantize(lay.matrix() if w is None else w, act_ms=act(name), name=name))
            recon = np.asarray(res.recon)
            records[name] = LayerRecord(recon.shape, res.bits, res.choice, res.stream)
            p = lay.stored()
            r = recon.T if lay.conv1d else recon
            if p.dtype == torch.float32:        # the float32 output rule, as `sop dequantize` writes the layer:
                r = to_float32(r)               # past float32's largest saturated (2^128 was refused here)
            # a transpose's strides are kept (no contiguous copy of it); copy_ writes any layout
            t = torch.from_numpy(r).to(dtype=p.dtype, device=p.device)
            if not _finite(t):
                # repr, not %g: 2^128 would print as float32's largest number itself
                raise ValueError(f"layer {name}: its reconstruction does not fit the parameter's {p.dtype} "
                                 f"(largest magnitude {float(np.abs(recon).max())!r}, the dtype's "
                                 f"{torch.finfo(p.dtype).max!r}): the model is unchanged")
            new[name] = t
            yield name, w, res
            del res, recon, w                       # one layer's reconstruction at a time

    if out is None:
        for _ in quantized():
            pass
    else:                                           # the file first: a refused write leaves the model as it was
        from .artifact import _write_artifact

        _write_artifact(_HeldModel(model, layers, kept, saved, files), qfmt, out, budget,
                        _HeldCalibration(stats is not None, tokens, tuple(unreached)), "error",
                        _Outcomes(quantized(), budget_res, act, saved, budget), _silent)
    with signals_held():                            # every parameter written, or (before the loop) none
        for name, lay in layers.items():
            # a model built under inference_mode holds inference tensors: written in place only there
            with torch.inference_mode() if lay.stored().is_inference() else torch.no_grad():
                lay.tensor().copy_(new.pop(name))
    return InMemoryResult(records, stats, kept, budget_res, tokens, unreached)
