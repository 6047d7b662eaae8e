"""A torch model held in memory, quantized in place: the entry point for a script that has the model.

``quantize_module(model, fmt, batches)`` does for a ``torch.nn.Module`` what ``sop quantize``
does for a checkpoint on disk, with the same rules and the same bits:

* **layers**: every ``torch.nn.Linear`` and transformers ``Conv1D`` (GPT-2 style, weight stored
  ``(in, out)``: quantized as its transpose), named ``<module>.weight`` as in a checkpoint, selected
  by the file path's rules (quantize/models.py: ``linear_reason``, ``include`` / ``exclude`` globs,
  the output head kept unless ``lm_head``). A parameter shared by several linear modules is quantized
  once, under its first name; a head tied to the input embedding (``lm_head=True``) changes the
  embedding with it, the one shared matrix, as on disk. Every other parameter of two or more
  dimensions (embeddings, fused 3-D MoE experts, convolutions) is left as it is and listed in
  ``kept`` with the reason.
* **calibration**: with ``batches`` (an iterable of a dict of model keywords, such as a tokenizer's
  output, or of one positional input), the model runs once on each in ``eval`` mode under
  ``torch.inference_mode`` (its mode is restored after), and each layer's ``act_ms`` is the mean
  square of its input per input column over every token that reached it, in float64, as
  calibration on disk computes it (quantize/causal_lm.py ``collect_stats``); a layer no token
  reached gets ``1/tokens`` in every column, as an unrouted expert does. A non-finite input
  statistic is refused naming the layer, and batches that reach no layer are refused. Without
  ``batches`` every layer is unweighted.
* **quantization**: ``schemes.get_quant_format(fmt)``: a per-layer format quantizes each layer
  alone, ``sop-budget`` chooses over every layer at once under ``budget`` bits per weight.
* **write back**: each weight gets its reconstruction cast to the parameter's own dtype and device
  (round to nearest: float32 holds the SOP points' values and the MX and FP8 baselines' exactly,
  not those of int8, NVFP4, IF4, NF4 or of sparse entries; BF16 and float16 round in general).
  Every layer is quantized and cast before the first is written: a bad input or a reconstruction
  that the parameter's dtype cannot hold (float16 past 65504) raises ``ValueError`` naming the
  layer and leaves the model untouched. Peak memory is therefore the model, the cast copy of its
  quantized layers, and one layer's float64 matrix and reconstruction (``sop-budget`` reads each
  layer twice, as on disk).

The result (``InMemoryResult``) holds for each layer what it stores (``LayerRecord``: ``bits``,
``bpw``, ``choice``, a SOP point's golden ``stream``; the reconstruction is the model's weight now),
the statistics, what was kept and why, and for ``sop-budget`` the knapsack's ``BudgetResult``.
Writing a ``.sopq`` still goes through a model on disk (``save_pretrained``, then
``artifact.quantize_model``): the container records its source files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sop.golden.layout import LayerStream

from .causal_lm import _is_linear
from .knapsack import LazyLayers
from .models import _selected, linear_reason
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
    layers: dict[str, LayerRecord]                  # layer name -> what it stores, in the model's module order
    act_ms: dict[str, np.ndarray] | None            # layer name -> input mean squares (None: unweighted)
    kept: dict[str, str] = field(default_factory=dict)     # a parameter left as it is -> why
    budget: object | None = None                    # sop-budget: the knapsack's BudgetResult
    tokens: int = 0                                 # calibration tokens (the most rows any layer saw)

    @property
    def bits(self) -> int:
        return sum(r.bits for r in self.layers.values())

    @property
    def bpw(self) -> float:
        weights = sum(r.shape[0] * r.shape[1] for r in self.layers.values())
        return self.bits / weights if weights else 0.0


def linear_modules(model, include=None, exclude=None, lm_head: bool = False) -> tuple[dict, dict[str, str]]:
    """``({layer name: module}, {kept parameter: why})`` by the checkpoint rules (module docstring);
    ``kept`` names every parameter of two or more dimensions that is not quantized."""
    layers, kept, owner = {}, {}, {}
    for mname, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not _is_linear(module) or weight is None:
            continue
        name = f"{mname}.weight" if mname else "weight"
        why = linear_reason(name, tuple(weight.shape), weight.is_floating_point())
        if why == "lm_head" and lm_head:
            why = None
        if why is None and id(weight) in owner:
            why = f"the parameter of {owner[id(weight)]} (quantized once, under that name)"
        if why is None and not _selected(name, include, exclude):
            why = "not selected (include/exclude)"
        if why is not None:
            kept[name] = why
            continue
        owner[id(weight)] = name
        layers[name] = module
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.ndim >= 2 and id(p) not in owner and pname not in kept:
            kept[pname] = "not the weight of a linear module (torch.nn.Linear, Conv1D)"
    return layers, kept


def _matrix(module) -> np.ndarray:
    """The layer's ``(out, in)`` matrix, float64 (what ModelSource.load gives)."""
    w = module.weight.detach().to("cpu").double().numpy()
    return w.T if type(module).__name__ == "Conv1D" else w


def activation_stats(model, layers: dict, batches) -> tuple[dict[str, np.ndarray], int]:
    """Per-input-column mean square of each layer's input over every token of ``batches``, and the
    tokens: the most rows any layer saw (every token passes a dense model's linear layers)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).double()
            s = (x * x).sum(0).cpu()
            sums[name] = sums[name] + s if name in sums else s
            counts[name] += x.shape[0]
        return hook

    was_training = model.training
    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in layers.items()]
    try:
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tokens = max(counts.values())
    if tokens == 0:
        raise ValueError("the calibration batches reached no linear layer (none given, or the model ran none)")
    stats = {}
    for name, module in layers.items():         # a layer no token reached: one token of ones, as on disk
        stats[name] = (sums[name] / counts[name]).numpy() if name in sums else np.full(_matrix_cols(module),
                                                                                       1 / tokens)
        if not np.isfinite(stats[name]).all():
            raise ValueError(f"layer {name}: its input's mean square is not finite (an Inf or NaN reached it, "
                             f"or its square overflowed): no calibration statistic")
    return stats, tokens


def _matrix_cols(module) -> int:
    w = module.weight
    return int(w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1])


def quantize_module(model, fmt: str, batches=None, *, budget: float | None = None, include=None, exclude=None,
                    lm_head: bool = False) -> InMemoryResult:
    """Quantize ``model``'s linear layers in place with format ``fmt`` (module docstring)."""
    import torch

    qfmt = get_quant_format(fmt)
    if budget is not None and not qfmt.model_level:
        raise ValueError(f"budget is for sop-budget, not {fmt}: a fixed format has its own bits per weight")
    layers, kept = linear_modules(model, include, exclude, lm_head)
    if not layers:
        raise ValueError("the model has no linear layer to quantize (torch.nn.Linear or Conv1D, selected by "
                         "the checkpoint rules: quantize/models.py)")
    stats, tokens = activation_stats(model, layers, batches) if batches is not None else (None, 0)
    act = (lambda n: None) if stats is None else stats.get
    if qfmt.model_level:
        budget_res = qfmt.quantize_model(LazyLayers(layers, lambda n: (_matrix(layers[n]), act(n))), budget)
        results = (budget_res.results.pop(n) for n in layers)
    else:
        budget_res = None
        results = (qfmt.quantize(_matrix(m), act_ms=act(m_name), name=m_name) for m_name, m in layers.items())
    records, new = {}, {}
    for (name, module), res in zip(layers.items(), results):    # every layer cast before the first is written
        recon = np.asarray(res.recon)
        records[name] = LayerRecord(recon.shape, res.bits, res.choice, res.stream)
        w = module.weight
        t = torch.from_numpy(np.ascontiguousarray(recon.T if type(module).__name__ == "Conv1D" else recon))
        t = t.to(dtype=w.dtype, device=w.device)
        if not torch.isfinite(t).all():
            raise ValueError(f"layer {name}: its reconstruction does not fit the parameter's {w.dtype} "
                             f"(largest magnitude {np.abs(recon).max():.6g}): the model is unchanged")
        new[name] = t
        del res, recon                              # one layer's reconstruction at a time
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.copy_(new.pop(name))
    return InMemoryResult(records, stats, kept, budget_res, tokens)
