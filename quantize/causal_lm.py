"""Causal language models through ``transformers``: the forward pass behind calibration and the
end-to-end check of any causal LM (quantize/calib.py, quantize/evaluate.py).

``load(src)`` runs the model of a ``ModelSource`` (quantize/models.py) whose ``forward`` is
``"causal-lm"``, in float32 on the CPU, offline (``HF_HUB_OFFLINE=1``, local files only):

* a folder (``config.json``, tokenizer files, safetensors single or sharded, or torch ``.bin``):
  ``AutoModelForCausalLM.from_pretrained``; every tensor the configuration needs must be in the
  checkpoint with its shape, and every checkpoint tensor must have a place in the model (but those
  transformers ignores by design, its ``_keys_to_ignore_on_load_unexpected``: an old Llama's
  ``rotary_emb.inv_freq``), else ``CheckpointError`` naming ``config.json`` and the first mismatch;
* a GGUF file: the configuration and tokenizer from its metadata alone (``transformers``' GGUF support;
  a ``config.json`` or tokenizer file beside it is not read), the model built from that configuration,
  and every tensor read by the project's own GGUF reader (quantized types dequantized to float32, as the
  quantizer reads them), converted to ``transformers``' names and layout by ``transformers``' own GGUF
  tables (name map, the Llama Q/K row permutation, GPT-2's transposes); a file that holds its own
  ``output.weight`` runs it as the head, never tied over the input embedding (transformers ties Falcon's
  and BLOOM's whatever the file holds). A Qwen-MoE GGUF gets its experts' width from the metadata
  (``_GGUF_CONFIG_MISSING``), a Mixtral GGUF (architecture ``llama`` with experts) is built as a
  Mixtral, and llama.cpp's ``ffn_gate_exps`` and ``ffn_up_exps`` are each their half of
  ``experts.gate_up_proj`` (``_GGUFConvert.stacks``).

A tokenizer whose ids pass the model's input embeddings (another model's tokenizer) is refused
when the windows are cut (``CheckpointError`` naming the folder or GGUF file).

**Names.** ``CausalLM.targets`` maps every checkpoint tensor that is the weight of an
``nn.Linear`` or HF ``Conv1D`` module to that module (``Target``); a tied output head maps to the
input embedding's tensor. A MoE router (a module of its own in transformers 5) maps like a linear
module; a per-expert matrix of a folder maps to its expert's rows of the fused ``(experts, rows,
in)`` parameter that transformers loads it into, found by its values (``Target.slot``), and an expert
of a fused tensor of the checkpoint (``LinearLayer.stack``) to its index of the parameter loaded from
that tensor, found by name (``_stack_slots``; a GGUF's: ``_gguf_stack_slots``). It must
cover every selected layer (``CheckpointError`` otherwise, before any work), and the module must
take the layer's input channels in the layer's column order (checked on an index matrix for GGUF
conversions).

**Calibration** (``collect_stats``): forward pre-hooks on every mapped module accumulate the
per-input-channel sum of squares of its input over every token of the windows (no padding: every
window is full), in float64. The output head is the last module: its hook records its input and
stops the pass, so no logits are computed. A hook on each experts module does the same per expert
matrix, a token the router did not send to that expert counting as a zero input (``_expert_hook``;
Llama 4's experts take every token times its router score: ``_bmm_expert_hook``);
an expert no token reaches gets ``1 / tokens`` in every column, one token of ones (``unrouted``).

**End to end** (``reference`` then ``score``), the convention of llama.cpp's
``perplexity --kl-divergence``: the held-out text is tokenized once and cut into ``n`` windows of
``T`` tokens (the first token of each replaced by BOS where the tokenizer adds one itself); in
each window the logits at positions ``T/2 .. T-2`` predict tokens ``T/2+1 .. T-1``: those
``n * (T - 1 - T/2)`` tokens are scored. With ``p`` the reference model's next-token distribution
and ``q`` the quantized model's, both ``softmax`` of float32 logits taken in float64:

* ``ppl = exp(mean(-log q[next token]))``, ``ppl_ref`` the same with ``p``;
* ``kld = mean(max(0, sum_v p_v (log p_v - log q_v)))`` in nats per token (rounding put a position at -4e-15);
* ``top1`` = the fraction of tokens where ``argmax q == argmax p``.

A reconstruction equal to the reference gives exactly ``kld == 0``, ``top1 == 1`` and
``ppl == ppl_ref`` (the same computation on the same numbers).

``transformers`` names are imported from the subpackage that defines them
(``transformers.models.auto``, ``transformers.utils``), never from its top level: resolving a name
there makes pyright bind every model ``transformers`` ships, half a minute of ``make test``'s
import check (tests/test_imports.py). The version is pinned in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sop.golden.files import OutputError, atomic_files, check_output, staging_folder
from sop.quantize.checkpoint_files import CheckpointError, describe_error
from sop.quantize.inputs import no_calib, no_e2e, on_command_line, option
from sop.quantize.models import GGUF_MOE, expert_layer_name, read_json
from sop.terminal import one_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # as models.py: whichever module loads transformers first

#: The defaults of a causal LM's calibration (windows of tokens) and end-to-end check (held-out windows):
#: calib.CalibSize, `sop eval` and `sop quantize` take them from here.
DEFAULT_CALIB_SEQS = 32
DEFAULT_SEQ_LEN = 256
DEFAULT_E2E_WINDOWS = 16
BATCH = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken",
                   "vocab.txt")
#: what a refused forward pass leaves the user (every command that needs the forward model says it; a Python
#: caller is told its own parameters and functions: ``hint``)
HINT = ("--no-calib quantizes it without a forward pass (sop eval: with --no-e2e too), into a .sopq; "
        "a model folder (sop dequantize --model-folder) needs the forward pass's model in any case")
PYTHON_HINT = ("calibrate=False quantizes it without a forward pass (evaluate: with e2e=False too), into a .sopq; "
               "a model folder (export_model_folder) needs the forward pass's model in any case")
#: GGUF tensors that are no parameter of any model: llama.cpp's RoPE tables, which transformers
#: computes from the configuration
GGUF_NO_PARAMETER = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hint() -> str:
    """``HINT`` as its caller reads it: the command's options, or (from Python) ``PYTHON_HINT``."""
    return HINT if on_command_line() else PYTHON_HINT


def quiet_transformers() -> None:
    """transformers' logging to errors only and no progress bars (sop prints its own progress)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor sits in the running model."""

    name: str           # the checkpoint tensor (the quantizer's layer name)
    module: str         # the nn.Linear / Conv1D module (or MoE router) that uses it as its weight, or the
                        # MoE experts module whose fused parameter holds it (``slot``)
    conv1d: bool        # HF Conv1D: the module's weight is (in, out) (an expert's slot: the fused parameter is)
    tied: bool = False  # the output head, tied to the input embedding
    #: one expert's matrix inside the experts module's fused ``(experts, rows, in)`` parameter:
    #: (the parameter's name, the expert, its first row); None: the module's own ``weight``
    slot: tuple[str, int, int] | None = None


class _Stop(Exception):
    """Raised by the output head's calibration hook: the logits are not needed."""


def memory_needed(src, windows: int = 0, seq_len: int = DEFAULT_SEQ_LEN, extra: int = 0) -> int:
    """Bytes the forward pass needs, roughly: the model in float32, and for the end-to-end check
    (``windows`` > 0) one batch's logits, one format's float32 reconstructions and the reference
    logits; plus ``extra`` (what the layer search holds beside it: quantize/evaluate.py
    ``search_memory``). Calibration makes no logits (its head hook stops the pass, ``_Stop``)."""
    shapes = [src.tensor_shape(n) for n in src.tensor_names()]
    params = sum(math.prod(s) for s in shapes)
    vocab = max((s[0] for s in shapes if len(s) == 2), default=0)
    need = 4 * params                                        # the model
    if windows:
        need += (4 * BATCH * seq_len * vocab + 4 * src.n_weights
                 + 4 * windows * (seq_len - 1 - seq_len // 2) * vocab)
    return need + extra


def available_memory() -> int | None:
    """Bytes a forward pass may use now (``quantize.memory.available_memory``: psutil, capped by
    ``SOP_MEMORY_LIMIT``)."""
    from sop.quantize.memory import available_memory as avail

    return avail()


#: what a model loaded alone (no windows) is for, when it is not calibration: the remedy its refusal names
EXPORT = ("the model folder", "sop dequantize without --model-folder writes the quantized layers alone "
                              "(a .safetensors)")
PYTHON_EXPORT = (EXPORT[0], "dequantize writes the quantized layers alone (a .safetensors)")    # from Python


def check_memory(src, windows: int = 0, seq_len: int = DEFAULT_SEQ_LEN, extra: int = 0,
                 purpose: tuple[str, str] | None = None, beside: str = "") -> None:
    """Refuse, before any work, a model whose forward pass does not fit in the memory available. ``purpose``:
    (what the model is for, how to do without it) where that is neither calibration nor the end-to-end check
    (``EXPORT``, ``PYTHON_EXPORT``); ``beside``: what ``extra`` bytes hold, as the refusal names it."""
    from sop.quantize.memory import check_fits

    what, fix = purpose or (("the end-to-end check", f"{no_e2e()} skips it") if windows
                            else ("calibration", f"{no_calib()} skips it (unweighted search)"))
    held = ("the model in float32" + (", one format of reconstructions and the reference logits" if windows else "")
            + (f", {beside}" if beside else ""))
    check_fits(memory_needed(src, windows, seq_len, extra), f"{src.spec}: the forward pass for {what} ({held})",
               fix)


def load(src) -> "CausalLM":
    """The forward pass of a causal-LM ModelSource, loaded once and cached on it."""
    if src._runner is not None:
        return src._runner
    if src.forward != "causal-lm":
        raise ValueError(f"{src.spec}: no causal-LM forward pass ({src.forward_note or src.forward})")
    quiet_transformers()
    if src.kind == "gguf":
        model, tok, convert = _load_gguf(src)
    else:
        model, tok = _load_folder(src)
        convert = None
    src._runner = CausalLM(src, model, tok, convert)
    return src._runner


#: the generation settings of a model folder, which a model folder export carries (``save_folder``)
GENERATION_CONFIG = "generation_config.json"


def check_generation_config(folder: Path) -> None:
    """A model folder's ``generation_config.json``, where there is one, is a JSON object transformers reads;
    else ``CheckpointError`` naming it. transformers' loader ignores one that is no JSON (it makes a default
    one from config.json), and ``save_folder`` wrote that default in its place: the source's end-of-text ids
    and sampling settings lost without a word; as an unreadable config.json or tokenizer is, it is refused,
    before the model is loaded. An absent one is the user's choice: transformers' default, as it was."""
    f = Path(folder) / GENERATION_CONFIG
    if not (f.exists() or f.is_symlink()):           # a dangling link is a file that cannot be read
        return
    fix = "fix it, or remove it for transformers' default"
    try:
        read_json(f)
    except CheckpointError as err:
        raise CheckpointError(f, f"{err.what}; {fix}") from None
    from transformers.generation.configuration_utils import GenerationConfig

    try:
        GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:            # noqa: BLE001 - transformers raises anything from a bad value
        raise CheckpointError(f, f"transformers cannot read it ({describe_error(err)}); {fix}") from None


def _load_folder(src):
    import torch
    from transformers.models.auto import AutoModelForCausalLM, AutoTokenizer

    folder = Path(src.folder)
    cfg = folder / "config.json"
    for f in TOKENIZER_FILES:           # it was "has no tokenizer", which sent the user looking for a missing file
        if (folder / f).is_dir():
            raise CheckpointError(folder / f, f"is a folder, not a file: the tokenizer the forward pass of "
                                              f"calibration and of the end-to-end check reads; {hint()}")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(folder, f"has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): the forward "
                                      f"pass of calibration and of the end-to-end check needs one; add it, or {hint()}")
    check_generation_config(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:            # noqa: BLE001 - transformers raises anything from a bad tokenizer
        raise CheckpointError(folder, f"transformers cannot load its tokenizer ({describe_error(err)}); "
                                      f"{hint()}") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except Exception as err:            # noqa: BLE001 - transformers raises anything from a bad folder
        raise CheckpointError(folder, f"transformers cannot load it as a causal LM ({describe_error(err)}); "
                                      f"{hint()}") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, ckpt, want = mismatched[0]
        raise CheckpointError(cfg, f"does not match the weights: {name} is {tuple(ckpt)} in the checkpoint, the "
                                   f"model config.json describes has it {tuple(want)} ({len(mismatched)} "
                                   f"tensors differ)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(cfg, f"does not match the weights: the model config.json describes needs "
                                   f"{missing[0]}, which the checkpoint lacks ({len(missing)} tensors missing)")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise CheckpointError(cfg, f"does not match the weights: the checkpoint holds {unexpected[0]}, which "
                                   f"the model config.json describes has no place for ({len(unexpected)} "
                                   f"tensors unused)")
    return model.eval(), tok


#: GGUF metadata that transformers' GGUF config mapping (5.24) leaves out, per architecture: the key after
#: ``<arch>.`` and the config attribute it sets (without it a Qwen-MoE is built at its experts' default width)
_GGUF_CONFIG_MISSING = {"qwen2moe": {"expert_feed_forward_length": "moe_intermediate_size",
                                     "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
                        "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"}}

#: llama.cpp's fused experts tensors (``(experts, out, in)``), as transformers' GGUF name map keys them
_GGUF_EXPERTS = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps")


class _GGUFConvert:
    """A GGUF tensor (as the project's reader returns it) to transformers' name and layout.

    ``stacks``: each fused experts tensor of the GGUF's model as ``(parameter, k, n)``, the ``k``-th of ``n``
    equal chunks of the parameter's rows (dimension 1): llama.cpp's ``ffn_gate_exps`` and ``ffn_up_exps``, each
    ``(experts, inter, hidden)``, are the halves of a Qwen-MoE's ``experts.gate_up_proj``, gate first (the
    model's ``chunk(2)``); ``ffn_down_exps`` is all of ``experts.down_proj``. ``__call__`` gives such a tensor
    as it is."""

    def __init__(self, model, arch: str, config: dict):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        # transformers builds gguf's name table again for each submodule it visits (400 of SmolLM2's 30 blocks:
        # 5 s); the table depends on its arguments alone, so it is built once for the call
        build = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build)
        try:                            # the file's own architecture names its tensors (a Mixtral's are a Llama's)
            self.names = get_gguf_hf_weights_map(model, self.processor, model_type=arch)
        finally:
            gguf.get_tensor_name_map = build
        for hf in model.state_dict():           # fused gate and up experts (the Qwen-MoE processor maps its own)
            m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.mlp\.experts\.gate_up_proj", hf)
            if m is not None:
                for part in ("gate", "up"):
                    self.names.setdefault(f"blk.{m[1]}.ffn_{part}_exps", hf)
        self.back = {hf: g for g, hf in self.names.items()}
        chunks: dict[str, dict[str, str]] = {}
        for g, hf in self.names.items():
            m = _GGUF_EXPERTS.fullmatch(g)
            if m is not None:
                chunks.setdefault(hf, {})[m[1]] = f"{g}.weight"
        self.stacks = {g: (hf, k, len(gs)) for hf, gs in chunks.items()
                       for k, g in enumerate(gs[p] for p in ("gate", "up", "down") if p in gs)}

    def __call__(self, name: str, w: np.ndarray):
        """(transformers parameter name or None when the model has no place for it, weights)."""
        if name in self.stacks:                 # transformers' processor would zero a merged parameter's other half
            return self.stacks[name][0], w
        parsed = {"tensors": {}}
        res = self.processor.process(weights=w, name=name, tensor_key_mapping=self.names, parsed_parameters=parsed)
        if res.name is None:                      # GPT-2's output.weight: the processor stores it itself
            (hf, t), = parsed["tensors"].items()
            return hf, t.numpy()
        return self.names.get(res.name), res.weights


def _as_shape(w: np.ndarray, shape: tuple) -> np.ndarray:
    """``w`` in ``shape`` where the two differ by axes of one alone (transformers' processor makes a Qwen2-MoE's
    shared expert gate ``(1, in)`` of a 1-D one, and ``(1, 1, in)`` of one stored ``(1, in)``, as llama.cpp
    allows); else ``w`` as it is."""
    same = tuple(w.shape) != tuple(shape) and [d for d in w.shape if d != 1] == [d for d in shape if d != 1]
    return np.reshape(w, shape) if same else w


def _mixtral_config(cfg, reader):
    """The Mixtral a GGUF of architecture ``llama`` with experts is (llama.cpp converts Mixtral so), from the
    Llama configuration transformers reads from its metadata: the experts' count (the top-k:
    ``_experts_per_token``), each expert as wide as the metadata's ``feed_forward_length``."""
    from transformers.models.mixtral import MixtralConfig

    d = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures", "num_experts")}
    d["num_local_experts"] = int(reader.field("llama.expert_count"))
    return MixtralConfig(**d)


def _experts_per_token(f: Path, reader, arch: str) -> int | None:
    """A MoE GGUF's top-k, ``<arch>.expert_used_count`` (1 to ``<arch>.expert_count``); None for a GGUF
    without experts. Missing or out of range, transformers would run its own default (Qwen3-MoE's 8) or
    route no token anywhere (0) without a word; llama.cpp refuses such a file."""
    experts = reader.field(f"{arch}.expert_count")
    if arch not in GGUF_MOE and not (arch == "llama" and experts):
        return None
    k = reader.field(f"{arch}.expert_used_count")
    if k is None:
        raise CheckpointError(f, f"its metadata has no {arch}.expert_used_count (how many experts each token is "
                                 f"routed to): the model it describes cannot be run")
    top = experts if isinstance(experts, int) and experts > 0 else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (top is not None and k > top):
        raise CheckpointError(f, f"its metadata gives {arch}.expert_used_count {k!r} (how many experts each token "
                                 f"is routed to): it must be 1 to {arch}.expert_count"
                                 f"{f' ({top})' if top is not None else ''}")
    return k


def _load_gguf(src):
    import torch
    from transformers.initialization import no_init_weights
    from transformers.models.auto import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    f = Path(src.files[0])
    reader = src._reader
    if reader.field("tokenizer.ggml.model") is None:
        raise CheckpointError(f, f"has no tokenizer (no tokenizer.ggml.* metadata): the forward pass of "
                                 f"calibration and of the end-to-end check needs one; {hint()}")
    arch = reader.field("general.architecture")
    top_k = _experts_per_token(f, reader, arch)
    try:
        # transformers takes a tokenizer.json beside a GGUF over the file's own (llama.cpp's converter writes
        # into the HF folder): read from a folder that holds the GGUF alone, its metadata is the one source
        with tempfile.TemporaryDirectory(prefix="sop-gguf-") as alone, _gguf_metadata_read_once(reader.parsed):
            (Path(alone) / f.name).symlink_to(f.resolve())
            cfg = AutoConfig.from_pretrained(alone, gguf_file=f.name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(alone, gguf_file=f.name, local_files_only=True)
        if "output.weight" in reader.names() and getattr(cfg, "tie_word_embeddings", False):
            # transformers ties Falcon's and BLOOM's head to the input embedding whatever the file holds;
            # tied, the one matrix would be output.weight's (loaded last) and token_embd.weight's rows
            # would be lost: the file's own head is what llama.cpp runs
            cfg.tie_word_embeddings = False
        for key, attr in _GGUF_CONFIG_MISSING.get(arch, {}).items():
            if reader.field(f"{arch}.{key}") is not None:
                setattr(cfg, attr, int(reader.field(f"{arch}.{key}")))
        if arch == "llama" and top_k is not None:                      # a Mixtral (models._causal_gguf)
            cfg = _mixtral_config(cfg, reader)
        if top_k is not None:
            cfg.num_experts_per_tok = top_k
        # every tensor of the state dict is the file's (checked below): transformers' random initialisation
        # would only be overwritten (a minute of a 7B's load); tying is part of what it skips. The buffers
        # outside the state dict (RoPE's frequencies) are the modules' constructors', which it leaves running
        # (equal to transformers' own build for each GGUF architecture it reads, checked with 5.24)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.tie_weights()
        convert = _GGUFConvert(model, arch, cfg.to_dict())
    except Exception as err:            # noqa: BLE001 - transformers raises anything from a GGUF it cannot read
        raise CheckpointError(f, f"transformers cannot build a causal LM from its metadata "
                                 f"({describe_error(err)}); {hint()}") from None
    # each tensor is written into the model's own parameter (one copy of the model in memory, not two)
    expect = model.state_dict()
    loaded, unused, chunks = set(), [], {}
    for name in src.tensor_names():
        try:
            w = src.read_tensor(name)
        except CheckpointError as err:          # a tensor the forward pass alone reads (an embedding, a norm)
            raise CheckpointError(f, f"{err.what}, and the forward pass needs it; {hint()}") from None
        try:
            hf, w = convert(name, w)
        except (ValueError, RuntimeError, IndexError) as err:   # transformers' processor: a reshape the metadata sets
            raise CheckpointError(f, f"does not match its metadata: tensor {name} {tuple(src.tensor_shape(name))} "
                                     f"cannot be laid out as the metadata describes the model "
                                     f"({describe_error(err)})") from None
        if hf is None or hf not in expect:
            if name not in GGUF_NO_PARAMETER:
                unused.append(name)
            continue
        want, (_, k, n) = tuple(expect[hf].shape), convert.stacks.get(name, (hf, 0, 1))
        if n > 1:                           # a chunk of the parameter's rows
            want = (want[0], want[1] // n, *want[2:])
        w = _as_shape(w, want)
        if tuple(w.shape) != want:
            raise CheckpointError(f, f"does not match its metadata: tensor {name} ({hf}"
                                     f"{f', part {k + 1} of {n}' if n > 1 else ''}) is "
                                     f"{tuple(src.tensor_shape(name))} in the file, the model the metadata "
                                     f"describes has it {want}")
        with torch.no_grad():
            held = expect[hf] if n == 1 else expect[hf][:, k * want[1]:(k + 1) * want[1]]
            held.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
        loaded.add(hf)
        if n > 1:
            chunks.setdefault(hf, set()).add(name)
    lacking = sorted(g for g, (hf, _, n) in convert.stacks.items() if hf in chunks and g not in chunks[hf])
    if lacking:                             # a parameter loaded in part would run zeros in the rest
        raise CheckpointError(f, f"does not match its metadata: the model it describes needs {lacking[0]} "
                                 f"beside the other part of {convert.stacks[lacking[0]][0]}, which the file lacks "
                                 f"({len(lacking)} tensor{'s' * (len(lacking) > 1)} missing)")
    if unused:
        # llama.cpp would run them (a Llama GGUF with attention biases): the reference is not the file's model
        note = (f"{len(unused)} tensor{'s' * (len(unused) > 1)} of the GGUF ({', '.join(unused[:3])}"
                f"{', ...' if len(unused) > 3 else ''}) {'have' if len(unused) > 1 else 'has'} no place in "
                f"the model transformers builds from its metadata: calibration and the end-to-end check "
                f"run that model without {'them' if len(unused) > 1 else 'it'}")
        src.notes.append(note)
        print(one_line(f"warning: {note}"), file=sys.stderr, flush=True)
    tied_head = _tied_head_name(model)
    missing = [k for k in expect if k not in loaded and k != tied_head]
    if missing:
        raise CheckpointError(f, f"does not match its metadata: the model it describes needs {missing[0]}, "
                                 f"which the file lacks ({len(missing)} tensors missing)")
    return model.eval(), tok, convert


@contextlib.contextmanager
def _gguf_metadata_read_once(parsed: dict):
    """transformers' reading of a GGUF's metadata without its tensors, done once per file in the block, from
    the file as the project's reader parsed it (``parsed``: gguf.GGUFReader by real path). gguf parses each
    of the vocabulary's strings one numpy access at a time (4 s for SmolLM2's 49k tokens), and transformers
    read all of it again for its config and again for its tokenizer. Each caller gets its own copy (they
    edit what they get)."""
    import copy

    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    read, parse, done = gguf_utils.load_gguf_checkpoint, gguf.GGUFReader, {}

    def once(path, return_tensors=False, **kw):
        if return_tensors or kw:
            return read(path, return_tensors=return_tensors, **kw)
        key = os.path.realpath(path)
        if key not in done:
            done[key] = read(path, return_tensors=False)
        return copy.deepcopy(done[key])

    def parsed_before(path, *a, **kw):   # transformers calls gguf.GGUFReader(path) and reads what it holds
        r = parsed.get(os.path.realpath(path))
        return r if r is not None and not a and not kw else parse(path, *a, **kw)

    gguf_utils.load_gguf_checkpoint, gguf.GGUFReader = once, parsed_before
    try:
        yield
    finally:
        gguf_utils.load_gguf_checkpoint, gguf.GGUFReader = read, parse


def _tied_head_name(model) -> str | None:
    """The output head's weight parameter name when it is the input embedding's (tied), else None."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    for name, mod in model.named_modules():
        if mod is out:
            return f"{name}.weight"
    return None


def _raised_in_sop(err: BaseException) -> bool:
    """Whether ``err`` was raised in this package's own code (a forward hook's), not in torch's or
    transformers'."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("sop.")


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _is_router(module) -> bool:
    """A MoE router as transformers 5 builds it (``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ...): a module
    of its own whose forward applies ``F.linear`` to its input and its 2-D ``weight``."""
    import torch

    w = getattr(module, "weight", None)
    return type(module).__name__.endswith("Router") and isinstance(w, torch.nn.Parameter) and w.dim() == 2


#: an experts module's fused parameters that take the expert's input (the rest, ``down_proj``, take its
#: gated intermediate)
_EXPERT_INPUT = ("gate_up_proj", "up_proj")


def fused_expert_params(named_modules):
    """``(module name, module, parameter name, parameter)`` for each fused ``(experts, rows, in)`` parameter
    of transformers' experts modules among ``named_modules`` (they say ``is_transposed`` False; a module
    that says True, or nothing, is not taken): ``gate_up_proj`` / ``up_proj`` and ``down_proj``."""
    import torch

    for mname, mod in named_modules:
        if getattr(mod, "is_transposed", True):
            continue
        for pname in _EXPERT_INPUT + ("down_proj",):
            p = getattr(mod, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                yield mname, mod, pname, p


def _block_of(name: str) -> str:
    """A name up to its first number (``model.layers.3``): a transformer block, whatever the checkpoint
    calls the MoE inside it (Mixtral's ``block_sparse_moe`` is transformers' ``mlp``)."""
    m = re.match(r"(.*?\.\d+)(\.|$)", name)
    return m[1] if m else ""


#: experts modules called with one ``(experts * tokens, in)`` input, each expert's rows together (every token,
#: times the router's score for that expert: 0 where it sent the token elsewhere), that hold their fused
#: parameters ``(experts, in, out)`` and apply them with ``bmm``: transformers' Llama 4
_BMM_EXPERTS = ("Llama4TextExperts",)


def experts_transposed(module) -> bool | None:
    """Whether an experts module holds its fused parameters ``(experts, in, out)``: its ``is_transposed``
    (transformers' experts modules), True for ``_BMM_EXPERTS``; None for any other module."""
    if type(module).__name__ in _BMM_EXPERTS:
        return True
    held = getattr(module, "is_transposed", None)
    return held if isinstance(held, bool) else None


def expert_hook(module, targets: list[Target], add, fix: str | None = None):
    """The forward pre-hook that takes the statistics of ``targets``, expert matrices of ``module``."""
    return _bmm_expert_hook(targets, add) if type(module).__name__ in _BMM_EXPERTS else _expert_hook(targets, add, fix)


def _bmm_expert_hook(targets: list[Target], add):
    """A forward pre-hook on a ``_BMM_EXPERTS`` module that ``add``s, for each of ``targets``, the per-column
    sum of squares of what its expert's matrix takes (gate and up: the expert's rows of the input, each token
    times the router's score; down: the gated intermediate recomputed from them) over every token, and the
    count of tokens; None where the router sent the expert none (all its rows zero)."""
    def hook(mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        x = x.detach().reshape(mod.gate_up_proj.shape[0], -1, x.shape[-1])
        done: dict[tuple, object] = {}
        for t in targets:
            e, down = t.slot[1], t.slot[0] not in _EXPERT_INPUT
            if not bool(x[e].any()):
                add(t.name, None, x.shape[1])
                continue
            if (e, down) not in done:
                a = x[e]
                if down:
                    gate, up = (a @ mod.gate_up_proj[e]).chunk(2, dim=-1)
                    a = up * mod.act_fn(gate)
                done[e, down] = (a.double() ** 2).sum(0)
            add(t.name, done[e, down], x.shape[1])
    return hook


def _expert_hook(targets: list[Target], add, fix: str | None = None):
    """A forward pre-hook on a MoE experts module (transformers 5: ``forward(hidden_states, top_k_index,
    top_k_weights)``) that ``add``s, for each of ``targets`` (its mapped expert matrices), the per-column sum
    of squares of what that expert's matrix takes over the tokens the router sent to it (None where it sent
    none), and the count of every token that reached the module: a token not sent to an expert counts as a
    zero input to it. What a matrix takes: the hidden states for gate and up; for down the gated
    intermediate, recomputed here from those tokens with the module's own parameters and gate
    (``_apply_gate``, or ``act_fn`` without one). ``fix``: what the caller can do where the module is called
    otherwise (a command's flags; a Python caller's arguments; by default the disk path's, as its caller gives
    them)."""
    fix = fix or f"{option('exclude', '')} its experts, or {no_calib()}"
    by_expert: dict[int, list[Target]] = {}
    for t in targets:
        by_expert.setdefault(t.slot[1], []).append(t)

    def hook(mod, args, kwargs):
        import torch

        x = kwargs.get("hidden_states", args[0] if args else None)
        idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if not (isinstance(x, torch.Tensor) and isinstance(idx, torch.Tensor) and not idx.is_floating_point()):
            raise ValueError(f"calibration: the experts module {type(mod).__name__} is not called as transformers' "
                             f"experts are (hidden_states, top_k_index, top_k_weights), so which tokens reach an "
                             f"expert is unknown; {fix}")
        x = x.detach().reshape(-1, x.shape[-1])
        idx = idx.reshape(x.shape[0], -1)
        for e, ts in by_expert.items():
            tok = (idx == e).any(dim=1).nonzero()[:, 0]
            if not tok.numel():
                for t in ts:
                    add(t.name, None, x.shape[0])
                continue
            xe, done = x[tok], {}
            for t in ts:
                down = t.slot[0] not in _EXPERT_INPUT          # takes the gated intermediate
                if down not in done:
                    a = xe
                    if down:
                        up = "gate_up_proj" if mod.has_gate else "up_proj"
                        bias = getattr(mod, f"{up}_bias")[e] if mod.has_bias else None
                        w = getattr(mod, up)[e]
                        h = torch.nn.functional.linear(xe, w.T if mod.is_transposed else w, bias)
                        a = mod._apply_gate(h) if mod.has_gate else mod.act_fn(h)
                    done[down] = (a.double() ** 2).sum(0)
                add(t.name, done[down], x.shape[0])

    return hook


def _attribute(target) -> str:
    """The attribute of a layer's module that holds its parameter: ``weight``, or a fused experts parameter's
    name (``target.slot[0]``)."""
    return "weight" if target.slot is None else target.slot[0]


class CausalLM:
    """A loaded causal LM with its checkpoint-name map (see the module docstring)."""

    def __init__(self, src, model, tokenizer, convert=None):
        self.src = src
        self.model = model
        self.tokenizer = tokenizer
        self.convert = convert                    # GGUF: _GGUFConvert; folders: None
        self.ambiguous: set[str] = set()          # expert matrices whose values sit at several places (refused)
        self._renames: dict[str, str] | None = None   # _renamed, built once
        self.modules = dict(model.named_modules())
        head = model.get_output_embeddings()
        self.head_module = next((n for n, m in self.modules.items() if m is head), None) if head is not None \
            else None
        self.targets = self._map_targets()
        self._check_fp8()                         # first: an FP8 expert run otherwise is found nowhere, and
        self._check_selected()                    # so unmapped: its remedy is --no-calib, not --exclude
        self.cleaned = 0
        self._clean_selected()
        ids = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and ids and ids[0] == bos else None
        self._ref = None
        self.unrouted: list[str] = []           # collect_stats: expert matrices no calibration token reached

    # -- names ----------------------------------------------------------------------------------------

    def _tensor_for(self, module_name: str, names: set) -> str | None:
        """The checkpoint tensor a module's weight was loaded from."""
        param = f"{module_name}.weight" if module_name else "weight"
        if self.convert is not None:
            g = self.convert.back.get(param)
            if g is None and module_name == self.head_module and "output.weight" in names:
                g = "output.weight"
            return g if g in names else None
        return self._param_tensor(param, names)

    def _renamed(self, names: set) -> dict[str, str]:
        """transformers' own name of each checkpoint tensor that it renames on loading (its checkpoint
        conversion's ``WeightRenaming``s: GPT-NeoX's ``embed_out`` is ``lm_head``) -> the checkpoint's
        name. Merging conversions (fused experts) give no module weight one tensor: not followed."""
        if self._renames is None:
            self._renames = {}
            try:
                from transformers.conversion_mapping import get_model_conversion_mapping
                from transformers.core_model_loading import WeightRenaming, rename_source_key
            except ImportError:             # a transformers without checkpoint conversions renames nothing
                return self._renames
            renamings = [t for t in get_model_conversion_mapping(self.model) if isinstance(t, WeightRenaming)]
            for name in sorted(names):      # two names renamed alike: the first in order, every run
                new = rename_source_key(name, renamings, [])[0]
                if new != name:
                    self._renames.setdefault(new, name)
        return self._renames

    def _map_targets(self) -> dict[str, Target]:
        names = set(self.src.tensor_names())
        tied = _tied_head_name(self.model)
        embed = self.model.get_input_embeddings()
        embed_name = next((n for n, m in self.modules.items() if m is embed), None)
        out: dict[str, Target] = {}
        for mname, mod in self.modules.items():
            if not _is_linear(mod):
                continue
            is_tied = tied is not None and mname == self.head_module
            # a tied head is its embedding's tensor, or its own where the checkpoint stores both (torch.save
            # of a state dict): one parameter, so quantizing either changes both
            tname = self._tensor_for(mname, names)
            if is_tied and tname is None:
                tname = self._tensor_for(embed_name, names)
            if tname is None:
                raise CheckpointError(self.src.files[0], f"the weight of the model's linear module {mname} comes "
                                                         f"from no tensor of the checkpoint; {hint()}")
            out[tname] = Target(tname, mname, type(mod).__name__ == "Conv1D", is_tied)
        for mname, mod in self.modules.items():
            # a MoE router (transformers 5: a module of its own, F.linear of its input and its weight)
            if _is_router(mod):
                tname = self._tensor_for(mname, names)
                if tname is not None:
                    out[tname] = Target(tname, mname, False)
        if self.convert is None:
            out.update(self._expert_slots(names, set(out)))
            out.update(self._stack_slots(names))
        else:
            out.update(self._gguf_stack_slots())
        return out

    def _gguf_stack_slots(self) -> dict[str, Target]:
        """The experts of a GGUF's selected fused experts tensors (llama.cpp's ``ffn_*_exps``, ``(experts, out,
        in)``): each at its index of the parameter the conversion loads the tensor into, at the rows of its chunk
        (``_GGUFConvert.stacks``), where the first and last experts' values are the parameter's (else unmapped:
        refused if selected)."""
        import torch

        out: dict[str, Target] = {}
        for tensor, lay in {lay.tensor: lay for lay in self.src.layers if lay.stack is not None}.items():
            hf, k, n = self.convert.stacks.get(tensor, ("", 0, 1))
            mname, _, pname = hf.rpartition(".")
            mod = self.modules.get(mname)
            p = getattr(mod, pname, None)
            if not isinstance(p, torch.nn.Parameter) or p.dim() != 3 or experts_transposed(mod) is not False:
                continue
            rows, experts = p.shape[1] // n, lay.stack[2]
            if p.shape[0] == experts and all(self._holds(p.data[e, k * rows:(k + 1) * rows], lay, e)
                                             for e in {0, experts - 1}):
                out.update((name, Target(name, mname, False, slot=(pname, e, k * rows)))
                           for e in range(experts) for name in [expert_layer_name(tensor, e)])
        return out

    def _stack_slots(self, names: set) -> dict[str, Target]:
        """The experts of the selected fused experts tensors (``LinearLayer.stack``): each at its index of the
        transformers experts module's fused parameter loaded from that tensor (by its name, through transformers'
        renames: GraniteMoE's ``input_linear.weight`` is ``experts.gate_up_proj``), held ``(experts, in, out)``
        where the module says so (``experts_transposed``: GPT-OSS, Llama 4; Qwen3-VL-MoE stores them so and
        transformers transposes them on loading). The first and last experts' values, each ``(out, in)``, must
        be the parameter's (a loading conversion that reorders them leaves the tensor unmapped: refused if
        selected)."""
        import torch

        stacks = {lay.tensor: lay for lay in self.src.layers if lay.stack is not None}
        if not stacks:
            return {}
        out: dict[str, Target] = {}
        for mname, mod in self.modules.items():
            transposed = experts_transposed(mod)
            if transposed is None:                      # no experts module
                continue
            for pname in _EXPERT_INPUT + ("down_proj",):
                p = getattr(mod, pname, None)
                full = f"{mname}.{pname}" if mname else pname
                tname = self._param_tensor(full, names) if isinstance(p, torch.nn.Parameter) else None
                lay = stacks.get(tname)
                if lay is None or p.shape[0] != lay.stack[2]:
                    continue
                n = lay.stack[2]
                if all(self._holds(p.data[e].T if transposed else p.data[e], lay, e) for e in {0, n - 1}):
                    out.update((name, Target(name, mname, transposed, slot=(pname, e, 0)))
                               for e in range(n) for name in [expert_layer_name(tname, e)])
        return out

    def _param_tensor(self, full: str, names: set) -> str | None:
        """The checkpoint tensor a parameter named ``full`` was loaded from (as ``_tensor_for`` finds a module's
        weight's)."""
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        cands = (full, full.removeprefix(f"{prefix}.") if prefix else full, f"{prefix}.{full}")
        found = next((c for c in cands if c in names), None)
        if found is None:
            renamed = self._renamed(names)
            found = next((renamed[c] for c in cands if c in renamed), None)
        return found

    def _holds(self, held, lay, e: int) -> bool:
        """Whether ``held`` (an expert of a fused parameter, ``(out, in)``) is expert ``e`` of the fused tensor of
        layer ``lay`` read from the checkpoint, rounded to float32 (as transformers loads it to run on the CPU)."""
        import torch

        with np.errstate(over="ignore"):    # a value past float32 is inf there, as in the model (refused later)
            w = np.asarray(self.src.read_tensor(lay.tensor, e), dtype=np.float32)
        w = torch.from_numpy(np.ascontiguousarray(w.T if lay.transposed else w))
        return held.shape == w.shape and bool(((held == w) | (held.isnan() & w.isnan())).all())

    def _expert_slots(self, names: set, mapped: set) -> dict[str, Target]:
        """The checkpoint's per-expert matrices (``...experts.<e>.w1.weight``, ``...experts.<e>.gate_proj.weight``)
        that transformers fuses on loading into one ``(experts, rows, in)`` parameter of an experts module
        (``gate_up_proj`` holding gate over up, ``up_proj``, ``down_proj``): each found by its values (an FP8
        matrix's times its scale, rounded to float32, as transformers dequantizes it there), in the
        parameter of its own block (the name up to the block's number) at its expert's index, at exactly one
        row offset (where equal values sit at several, the one transformers' conversion names: ``_merged_at``);
        a matrix found nowhere, or at several places still, is left unmapped (then refused if selected).
        ``names``: the checkpoint's tensors; those in ``mapped`` are another module's."""
        import torch

        prefix = f"{getattr(self.model, 'base_model_prefix', '') or ''}."

        def block(name: str) -> str:                    # without the model's base prefix, which checkpoints may omit
            return _block_of(name).removeprefix(prefix)

        fused: dict[str, list] = {}
        for mname, _, pname, p in fused_expert_params(self.modules.items()):
            fused.setdefault(block(mname), []).append((mname, pname, p))
        out: dict[str, Target] = {}
        if not fused:
            return out
        loaded_as = {ckpt: new for new, ckpt in self._renamed(names).items()}    # Nemotron-H's backbone. -> model.
        for tname in sorted(names - mapped):
            m = re.search(r"\.experts\.(\d+)\.", tname)
            shape = self.src.tensor_shape(tname)
            if m is None or len(shape) != 2:
                continue
            e, (rows, cols) = int(m[1]), shape
            cands = [(mn, pn, p) for mn, pn, p in fused.get(block(loaded_as.get(tname, tname)), ())
                     if p.shape[0] > e and p.shape[2] == cols and p.shape[1] % rows == 0]
            if not cands:
                continue
            scaled = self.src.scaled_tensor(tname)          # an FP8 matrix: its values times its scale
            with np.errstate(over="ignore"):                # as in _holds
                w = torch.from_numpy(np.asarray(self.src.read_tensor(tname) if scaled is None else scaled,
                                                dtype=np.float32))
            hits = [(mn, pn, r0) for mn, pn, p in cands for r0 in range(0, p.shape[1], rows)
                    if bool(((p.data[e, r0:r0 + rows] == w) | (p.data[e, r0:r0 + rows].isnan() & w.isnan())).all())]
            several = len(hits) > 1
            if several:             # equal values at several places (a zero expert, gate equal to up)
                hits = [h for h in hits if (h[1], h[2] // rows) == self._merged_at(tname)]
            if len(hits) == 1:
                mn, pn, r0 = hits[0]
                out[tname] = Target(tname, mn, False, slot=(pn, e, r0))
            elif several:
                self.ambiguous.add(tname)
        return out

    def _merged_at(self, tname: str) -> tuple[str, int] | None:
        """Where transformers' checkpoint conversion puts a per-expert tensor: (the fused parameter's name, the
        chunk of its rows), from the order of the source patterns it concatenates (Mixtral's ``w1`` then
        ``w3`` into ``gate_up_proj``); None where no conversion names it. Only asked where the values alone
        leave the place open."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter
        except ImportError:                 # a transformers without checkpoint conversions: the values decide
            return None
        for conv in get_model_conversion_mapping(self.model):
            if not isinstance(conv, WeightConverter) or len(conv.target_patterns) != 1:
                continue
            for k, pattern in enumerate(conv.source_patterns):
                if re.search(re.escape(pattern).replace(r"\*", r"\d+"), tname):
                    return conv.target_patterns[0].strip(".").rsplit(".", 1)[-1], k
        return None

    def weight_of(self, t: Target):
        """The tensor holding ``t``'s matrix in the running model: the module's weight, or the expert's rows of
        its fused parameter (a view: writing it writes the parameter)."""
        mod = self.modules[t.module]
        if t.slot is None:
            return mod.weight
        pname, e, r0 = t.slot
        held = getattr(mod, pname).data[e]
        return held if t.conv1d else held[r0:r0 + self.src.matrix_shape(t.name)[0]]

    def _clean_selected(self) -> None:
        """The selected layers' weights cleaned as the quantizer reads them (evaluate.clean_forward_weight);
        ``cleaned``: how many entries were replaced."""
        from sop.quantize.evaluate import clean_forward_weight

        self.cleaned = sum(clean_forward_weight(self.src, lay.name, self.weight_of(self.targets[lay.name]))
                           for lay in self.src.layers)

    def _check_selected(self) -> None:
        """Every selected layer is a mapped module's weight, with the module's shape and channel order."""
        for lay in self.src.layers:
            t = self.targets.get(lay.name)
            if t is None and lay.name in self.ambiguous:
                raise CheckpointError(self.src.files[0], f"layer {lay.name}: its values sit at several places of "
                                                         f"the model's fused experts parameters and its name "
                                                         f"settles none of them; {option('exclude', '')} it, or "
                                                         f"{hint()}")
            if t is None:                       # an expert is excluded with its tensor (`[` is a glob's class)
                what = "it" if lay.stack is None else f"{lay.tensor}, its experts' tensor"
                raise CheckpointError(self.src.files[0], f"layer {lay.name} is the weight of no linear module of "
                                                         f"the {type(self.model).__name__} that transformers "
                                                         f"runs; {option('exclude', '')} {what}, or {hint()}")
            if t.slot is not None:              # found by its values at that place: nothing more to check
                continue
            if t.conv1d != lay.transposed and self.convert is None:
                raise CheckpointError(self.src.files[0], f"layer {lay.name}: the checkpoint stores it "
                                                         f"{'(in, out)' if lay.transposed else '(out, in)'}, the "
                                                         f"model's {t.module} is "
                                                         f"{'a Conv1D' if t.conv1d else 'an nn.Linear'}")
            rows, cols = lay.shape
            probe = np.arange(rows * cols, dtype=np.int32 if rows * cols < 2**31 else np.int64).reshape(rows, cols)
            w = self.module_weight(lay.name, probe)
            param = self.modules[t.module].weight
            if tuple(w.shape) != tuple(param.shape):
                raise CheckpointError(self.src.files[0], f"layer {lay.name} is {lay.shape} (out, in), the model's "
                                                         f"{t.module} has a weight of {tuple(param.shape)}")
            cols_seen = (w.T if t.conv1d else w) % cols           # (out, in): each column's source column
            if not bool((cols_seen == np.arange(cols)).all()):
                raise CheckpointError(self.src.files[0], f"layer {lay.name}: its input channels reach "
                                                         f"{t.module} in another order; {hint()}")

    def _check_fp8(self) -> None:
        """Every FP8 tensor with a scale that the model runs holds what the quantizer reads: its values times its
        scale, rounded to float32 (transformers dequantizes such a model to run it on the CPU, and places the
        scales of a block grid that does not divide the matrix otherwise: 32 x 48 in blocks of 32 is read as
        blocks of 24 columns). Selected or not: an excluded layer still runs in the reference model. A per-expert
        matrix is checked where it is found by those values (``_expert_slots``); one found nowhere is refused."""
        if self.convert is not None or not self.src.fp8_scale_of:      # a GGUF has no FP8 scales
            return
        names = set(self.src.tensor_names())
        params = {}                                   # checkpoint tensor -> the parameter loaded from it
        for pname, p in self.model.named_parameters():
            params.setdefault(self._param_tensor(pname, names), p)
        fp8 = self.src.fp8_scale_of
        for tname in [n for n in self.targets if n in fp8] + [n for n in fp8 if n not in self.targets]:
            t, scale = self.targets.get(tname), fp8[tname]        # the model's modules in order, then the rest
            if (t is not None and t.slot is not None) or tname in self.ambiguous:
                continue                              # found by its values: holds them
            p = self.modules[t.module].weight if t is not None else params.get(tname)
            want = self.src.scaled_tensor(tname).astype(np.float32)
            got = None if p is None else p.detach().numpy()
            if got is None or want.shape != got.shape or not np.array_equal(want, got, equal_nan=True):
                raise CheckpointError(self.src.file_of(tname), f"transformers runs the FP8 layer {tname} with "
                                                               f"other weights than its values times its scale "
                                                               f"{scale.name} in blocks of {scale.block[0]} x "
                                                               f"{scale.block[1]}: the forward pass would not run "
                                                               f"this checkpoint's model; {hint()}")

    def module_weight(self, name: str, w: np.ndarray) -> np.ndarray:
        """A layer's ``(out, in)`` matrix (as ModelSource.load gives it) in the module's layout."""
        t = self.targets[name]
        if self.convert is not None and t.slot is None:
            hf, out = self.convert(name, w)
            if hf is None:                                        # pragma: no cover - mapped at load
                raise CheckpointError(self.src.files[0], f"layer {name} has no place in the model")
            return _as_shape(np.asarray(out), tuple(self.modules[t.module].weight.shape))
        return w.T if t.conv1d else w

    # -- substitution -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def substituted(self, weights: dict | None):
        """Within the block the model runs with ``weights`` ({layer: (out, in) array}) in place of the
        reference; the reference is restored after, whatever happens."""
        import torch

        saved = {}                      # id(parameter) -> (the parameter, its reference data)
        try:
            for name, w in (weights or {}).items():
                t = self.targets[name]
                param = getattr(self.modules[t.module], _attribute(t))
                if id(param) not in saved:
                    saved[id(param)] = (param, param.data)
                    if t.slot is not None:      # a fused experts parameter: a copy, its expert's rows written
                        param.data = param.data.clone()
                self.place(name, torch.from_numpy(np.ascontiguousarray(self.module_weight(name, np.asarray(w)),
                                                                       dtype=np.float32)))
            yield self
        finally:
            for param, data in saved.values():
                param.data = data

    def param_name(self, name: str) -> str:
        """The model's name of the parameter that holds layer ``name`` (its module's ``weight``, or the fused
        experts parameter its ``slot`` names): what transformers' loading matches its float32 patterns against."""
        t = self.targets[name]
        return f"{t.module}.{_attribute(t)}"

    def place(self, name: str, new) -> None:
        """The torch tensor ``new`` (layer ``name``'s weight in its module's layout, ``module_weight``) put in
        the model: the module's weight data replaced by it, or a fused experts parameter's rows written
        (``weight_of``: into the parameter's data as it is, so the caller has made that data a copy where the
        reference must survive, as ``substituted`` does)."""
        t = self.targets[name]
        if t.slot is None:
            self.modules[t.module].weight.data = new
        else:
            self.weight_of(t).copy_(new)

    # -- text and windows ------------------------------------------------------------------------------

    def token_ids(self, sentences: list[str]) -> list[int]:
        """The sentences joined by spaces, tokenized once without special tokens."""
        return list(self.tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"])

    def windows(self, ids: list[int], n: int, seq_len: int, what: str, remedy: str = "ask for fewer"):
        """``n`` consecutive windows of ``seq_len`` tokens (BOS first where the tokenizer adds one); too few
        ``ids`` for them is a ``ValueError`` naming ``what`` and ending with ``remedy``."""
        import torch

        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and 0 < positions < seq_len and self._position_table():
            # a learned position table (GPT-2, OPT, StarCoder), or GPT-J's rotary one made once, has no row past
            # it: an IndexError deep in torch (other rotary models compute any position, and run past it as before)
            raise ValueError(f"{what}: windows of {seq_len} tokens, and the model has {positions} positions "
                             f"(max_position_embeddings): give {option('seq_len', str(positions))} or less")
        if isinstance(positions, int) and 0 < positions < seq_len:
            # a rotary model computes any position, but its numbers there are of a context it was not made for
            note = (f"windows of {seq_len} tokens run past the model's {positions} positions "
                    f"(max_position_embeddings): it computes them (rotary), but was not configured for them, so "
                    f"the statistics and scores of those windows are of positions it may never have seen; "
                    f"{option('seq_len', str(positions))} or less keeps within them")
            if note not in self.src.notes:
                self.src.notes.append(note)
                print(one_line(f"warning: {note}"), file=sys.stderr, flush=True)
        need = n * seq_len
        if len(ids) < need:
            raise ValueError(f"{what}: {n} x {seq_len} = {need:,} tokens asked, the text gives {len(ids):,} with "
                             f"this model's tokenizer; {remedy}")
        w = torch.tensor(ids[:need], dtype=torch.long).view(n, seq_len)
        if self.bos is not None:
            w[:, 0] = self.bos
        rows = self.model.get_input_embeddings().weight.shape[0]
        top = int(w.max())
        if top >= rows or int(w.min()) < 0:
            where = self.src.files[0] if self.convert is not None else Path(self.src.folder)
            raise CheckpointError(where, f"its tokenizer gives token id {top if top >= rows else int(w.min())} "
                                         f"for the {what}, and the model has {rows} input embeddings "
                                         f"(0 to {rows - 1}): the tokenizer is not this model's; {hint()}")
        return w

    def _position_table(self) -> bool:
        """Whether the model has a position table of fixed size: a learned embedding besides its input
        embedding, or a rotary table computed once for its positions (GPT-J's and CodeGen's buffer
        ``embed_positions``: past it the forward pass was an IndexError, reported as a model that cannot run,
        after a warning that it computes any position)."""
        import torch

        inputs = self.model.get_input_embeddings()
        return any(isinstance(m, torch.nn.Embedding) and m is not inputs for m in self.modules.values()) \
            or any(name.rsplit(".", 1)[-1] == "embed_positions" for name, _ in self.model.named_buffers())

    # -- calibration ------------------------------------------------------------------------------------

    def collect_stats(self, windows, batch: int = BATCH) -> tuple[dict[str, np.ndarray], int]:
        """Per-input-channel mean square of every mapped module's input over every token of ``windows``
        (of an expert's matrix: over every token that reached its experts module, a token routed
        elsewhere counting as a zero input)."""
        import torch

        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        handles = []

        def add(tname: str, s, n: int):          # s None: n tokens that add nothing
            if s is not None:
                sums[tname] = sums[tname] + s if tname in sums else s
            counts[tname] = counts.get(tname, 0) + n

        def hook_for(tname: str, stop: bool):
            def hook(_module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                x = x.detach().reshape(-1, x.shape[-1]).double()
                add(tname, (x * x).sum(0), x.shape[0])
                if stop:
                    raise _Stop
            return hook

        experts: dict[str, list[Target]] = {}
        for t in self.targets.values():
            if t.slot is not None:
                experts.setdefault(t.module, []).append(t)
        try:
            for t in self.targets.values():
                if t.slot is None:
                    handles.append(self.modules[t.module].register_forward_pre_hook(
                        hook_for(t.name, t.module == self.head_module), with_kwargs=True))
            for mname, ts in experts.items():
                handles.append(self.modules[mname].register_forward_pre_hook(expert_hook(self.modules[mname], ts, add),
                                                                             with_kwargs=True))
            with torch.inference_mode():
                for i in range(0, len(windows), batch):
                    try:
                        self._run(input_ids=windows[i:i + batch], use_cache=False)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        tokens = int(windows.numel())
        # an expert no calibration token reached: as if one token of ones had (unweighted within the layer,
        # next to nothing beside the others under a bit budget)
        self.unrouted = sorted(n for n in counts if n not in sums)
        stats = {n: (sums[n] / counts[n]).numpy() for n in sums}
        stats.update((n, np.full(self.src.matrix_shape(n)[1], 1 / counts[n])) for n in self.unrouted)
        return stats, tokens

    # -- end to end -----------------------------------------------------------------------------------------

    def _run(self, **inputs):
        """The model's forward pass; an error of transformers running this model (a configuration it
        builds but cannot run, such as an odd rotary width) is the checkpoint's, one line, not a bug of
        sop's. A hook's ``_Stop`` and running out of memory pass through."""
        try:
            return self.model(**inputs)
        except (_Stop, MemoryError):
            raise
        except Exception as err:            # noqa: BLE001 - transformers raises anything from a model it cannot run
            if _raised_in_sop(err) or "allocate memory" in str(err):    # our hooks' bug; out of memory
                raise
            where = self.src.files[0] if self.convert is not None else Path(self.src.folder)
            raise CheckpointError(where, f"transformers cannot run the model's forward pass "
                                         f"({describe_error(err)}); {hint()}") from None

    def _logits(self, ids):
        """float32 logits at positions T/2 .. T-2 of each window: (batch, T - 1 - T/2, vocab)."""
        T = ids.shape[1]
        first = T // 2
        out = self._run(input_ids=ids, use_cache=False, logits_to_keep=T - first).logits
        out = out[:, first:T - 1] if out.shape[1] == T else out[:, :-1]
        return out.float()

    def reference(self, windows, batch: int = BATCH) -> None:
        """Run the unquantized model on the windows once; ``score`` compares against it."""
        import torch

        with torch.inference_mode():
            ref = torch.cat([self._logits(windows[i:i + batch]) for i in range(0, len(windows), batch)])
        if not bool(torch.isfinite(ref).all()):
            from sop.quantize.evaluate import reference_not_finite

            raise reference_not_finite(self.src.spec, "logits")
        self._ref = (windows, ref)

    def score(self, weights: dict | None = None, batch: int = BATCH) -> dict:
        """Perplexity, KL divergence and top-1 agreement of the model with ``weights`` substituted,
        against the reference (module docstring)."""
        import torch

        if self._ref is None:
            raise RuntimeError("CausalLM.score needs CausalLM.reference first")
        windows, ref = self._ref
        first = windows.shape[1] // 2
        acc = np.zeros(5)
        with self.substituted(weights), torch.inference_mode():
            for i in range(0, len(windows), batch):
                q = self._logits(windows[i:i + batch])
                for j in range(q.shape[0]):
                    acc += next_token_sums(ref[i + j], q[j], windows[i + j, first + 1:])
        kld, nll_ref, nll, top1, n = acc
        return {"metric": "causal-lm", "tokens": int(n), "ppl": perplexity(nll, n), "ppl_ref": perplexity(nll_ref, n),
                "kld": kld / n, "top1": top1 / n, "windows": int(len(windows)), "seq_len": int(windows.shape[1])}

    # -- generation and export ----------------------------------------------------------------------------

    def complete(self, prompt: str, max_new_tokens: int = 24, weights: dict | None = None) -> str:
        """The greedy completion of ``prompt`` (its new text only)."""
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.substituted(weights), torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def save_folder(self, out: Path, weights: dict | None = None, inputs=(), out_option: str = "--out") -> list[Path]:
        """A model folder ``transformers`` loads (config, float32 safetensors, tokenizer) of the model
        with ``weights`` substituted; written all or nothing (golden.files.atomic_files), every file
        checked against ``inputs`` (golden.files.check_output; ``out_option``: how the caller gave ``out``) and
        the folder against files of another model (``refuse_other_files``) before any is written."""
        out = Path(out)
        with self.substituted(weights), staging_folder(out) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            made = sorted(f for f in tmp.iterdir() if f.is_file())
            for f in made:
                check_output(out / f.name, inputs, option=out_option)
            refuse_other_files(out, {f.name for f in made})
            with atomic_files() as files:
                for f in made:
                    with open(f, "rb") as src, files.open(out / f.name) as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
        return [out / f.name for f in made]


def refuse_other_files(out: Path, names: set[str]) -> None:
    """Refuse (``OutputError``) an existing folder that holds files a model folder export does not
    write (``names``): transformers would read them with the new model. An earlier export's
    ``model.safetensors`` beside new shards is loaded in their place; an old chat template is used.
    Hidden files (``.gitattributes``, temporary files) and subfolders are not read as the model."""
    if not out.is_dir():
        return
    other = sorted(p.name for p in out.iterdir()
                   if p.name not in names and not p.name.startswith(".") and not p.is_dir())
    if other:
        more = f" and {len(other) - 1} more" if len(other) > 1 else ""
        raise OutputError(f"{out}: holds {other[0]}{more}, which this export does not write; transformers "
                          f"would load it with the new model: give a new or empty folder")


#: The largest mean NLL (nats) whose exponential a float64 holds.
MAX_LOG_PPL = math.log(sys.float_info.max)


def perplexity(nll_sum: float, tokens: float) -> float:
    """``exp(mean NLL)``; inf (JSON null, the table's "inf") for a model so broken that its mean NLL
    passes 709 nats, where ``math.exp`` would raise OverflowError."""
    mean = nll_sum / tokens
    return math.exp(mean) if mean <= MAX_LOG_PPL else math.inf


def next_token_sums(ref_logits, logits, targets) -> np.ndarray:
    """Sums over one window's scored positions: (KLD, NLL of the reference, NLL, top-1 matches, count).

    ``ref_logits``, ``logits``: (positions, vocab); ``targets``: (positions,) the next tokens."""
    import torch

    lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lq = torch.log_softmax(logits.double(), dim=-1)
    # each position's KL divergence is >= 0; where q is p moved by float32 ulps (small logits: a near-uniform
    # model) the float64 rounding of the two log-softmaxes put it at -4e-15, which sop report refuses
    kld = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
    tgt = targets.long()[:, None]
    nll_p = -lp.gather(-1, tgt).squeeze(-1)
    nll_q = -lq.gather(-1, tgt).squeeze(-1)
    top1 = lp.argmax(-1) == lq.argmax(-1)
    return np.array([float(kld.sum()), float(nll_p.sum()), float(nll_q.sum()), float(top1.sum()), len(targets)])
