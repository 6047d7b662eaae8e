"""End-to-end fidelity: a plain-torch BERT sentence encoder, and how far quantization moves it.

``Bert(folder, files=)`` runs a BERT checkpoint (all-MiniLM-L6-v2, or any Hugging Face
BERT folder with ``config.json``, ``tokenizer.json`` and safetensors weights: the
files the quantizer reads)
the way sentence-transformers does for all-MiniLM-L6-v2: the shipped tokenizer
(truncation where sentence-transformers cuts, its ``sentence_bert_config.json``'s
``max_seq_length``: 256 tokens for all-MiniLM-L6-v2; the batch is padded to its
longest sentence and the padding is masked), embeddings + LayerNorm, the encoder layers (erf GELU),
mean pooling over the attention mask, then L2 normalization. It is checked
against ``sentence_transformers`` in tests/test_calib.py.

Every ``nn.Linear``-equivalent matmul goes through one function, so

* ``weights={name: W}`` replaces any linear weight (``(out, in)``) by, e.g., its
  quantized reconstruction, and
* ``hook(name, x)`` sees each linear's input rows of the non-padding tokens,
  ``x`` of shape ``(tokens, in)``: quantize/calib.py accumulates its statistics;
* ``products={name: f}`` computes that linear's matrix product another way:
  ``f(x)`` takes the non-padding tokens' input rows ``(tokens, in)`` float32 and
  returns ``x W^T`` ``(tokens, out)`` (the bias is added after it); the demo runs
  the SOP dot engine's golden model (golden/dot.py) through it. Padding tokens
  keep the float product: attention and pooling mask them out.

The pooler (``pooler.dense``) does not enter the sentence embedding; it is run on
the [CLS] state only when a hook is given, so that calibration covers it.

``embedding_fidelity(ref, quant)`` is the end-to-end metric: the cosine between
full-precision and quantized embeddings of each held-out sentence, its mean and
its minimum.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from sop.quantize.checkpoint_files import CheckpointError

LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense")


class Bert:
    def __init__(self, folder, prefix: str = "", files=None):
        """``files``: the weights files to run (a ModelSource's ``files``: the ones the quantizer
        reads, so that calibration and the end-to-end reference run the model that is quantized,
        not a stray checkpoint beside it); default the ones the quantizer reads from ``folder``
        (``models.weights_files``)."""
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.prefix = prefix
        cfg = json.loads((self.folder / "config.json").read_text())
        if cfg.get("model_type") != "bert":
            raise ValueError(f"{folder}: not a BERT model (model_type {cfg.get('model_type')!r})")
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{folder}: activation {cfg.get('hidden_act')!r} not supported (gelu only)")
        self.params: dict[str, torch.Tensor] = {}
        self.cleaned = 0            # selected-layer entries replaced under --nan-policy zero (evaluate.bert_forward)
        if files is None:
            from sop.quantize.models import weights_files

            files = weights_files(str(self.folder))
        for f in files:
            self.params.update({k: v.float() for k, v in load_file(str(f)).items()})
        if not self.params:
            raise ValueError(f"{folder}: no safetensors weights")
        if (self.folder / "tokenizer.json").is_dir():       # (models._bert_info: a BERT folder all the same)
            raise CheckpointError(self.folder / "tokenizer.json", "is a folder, not a file: the tokenizer the BERT "
                                                                 "forward pass reads")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as err:            # noqa: BLE001 - the tokenizers library raises bare Exception
            raise ValueError(f"{self.folder / 'tokenizer.json'}: not a tokenizer the `tokenizers` "
                             f"library can load ({' '.join(str(err).split())[:200]})") from None
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")      # pad to the longest in the batch
        self.tokenizer.enable_truncation(max_length=self._max_tokens(cfg))

    def _max_tokens(self, cfg: dict) -> int:
        """Where a sentence is cut: sentence-transformers' ``max_seq_length`` where the folder has its
        ``sentence_bert_config.json`` (256 for all-MiniLM-L6-v2, whose ``tokenizer.json`` says 128), else the
        tokenizer's own truncation, else the model's positions; never past the positions."""
        positions = int(cfg.get("max_position_embeddings", 512))
        st = self.folder / "sentence_bert_config.json"
        try:
            n = json.loads(st.read_text()).get("max_seq_length") if st.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ValueError(f"{st}: not a sentence-transformers configuration (JSON with max_seq_length)") from None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return min(n, positions)
        if n is not None:
            raise ValueError(f"{st}: max_seq_length {n!r} is no positive whole number")
        own = self.tokenizer.truncation
        return min(int(own["max_length"]), positions) if own else positions

    def linear_names(self) -> list[str]:
        names = [f"{self.prefix}encoder.layer.{i}.{l}.weight" for i in range(self.layers) for l in LINEARS]
        pooler = f"{self.prefix}pooler.dense.weight"
        return names + ([pooler] if pooler in self.params else [])

    def tokenize(self, sentences: list[str]):
        import torch

        enc = self.tokenizer.encode_batch(list(sentences))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask

    def embed(self, sentences: list[str], weights: dict | None = None,
              hook: Callable[[str, "np.ndarray"], None] | None = None, batch: int = 64,
              products: dict[str, Callable[["np.ndarray"], "np.ndarray"]] | None = None) -> np.ndarray:
        """L2-normalized mean-pooled sentence embeddings, (n, hidden) float64."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(sentences), batch):
                ids, mask = self.tokenize(sentences[i:i + batch])
                out.append(self._forward(ids, mask, weights or {}, hook, products or {}))
        return np.concatenate(out).astype(np.float64)

    def _forward(self, ids, mask, weights, hook, products):
        import torch
        import torch.nn.functional as F

        P, pre = self.params, self.prefix
        keep = mask.bool()

        def lin(name, x):
            wname = f"{pre}{name}.weight"
            if hook is not None:
                hook(wname, x[keep].double().numpy() if x.dim() == 3 else x.double().numpy())
            W = weights.get(wname)
            W = P[wname] if W is None else torch.as_tensor(np.asarray(W), dtype=torch.float32)
            y = F.linear(x, W, P[f"{pre}{name}.bias"])
            if wname in products:
                rows = keep if x.dim() == 3 else slice(None)
                xw = torch.as_tensor(np.asarray(products[wname](x[rows].numpy()), dtype=np.float32))
                y[rows] = xw + P[f"{pre}{name}.bias"]
            return y

        def ln(name, x):
            return F.layer_norm(x, x.shape[-1:], P[f"{pre}{name}.weight"], P[f"{pre}{name}.bias"], self.eps)

        B, T = ids.shape
        e = f"{pre}embeddings."
        x = (P[e + "word_embeddings.weight"][ids] + P[e + "position_embeddings.weight"][:T][None]
             + P[e + "token_type_embeddings.weight"][torch.zeros_like(ids)])
        x = ln("embeddings.LayerNorm", x)
        H = x.shape[-1]
        d = H // self.heads
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i in range(self.layers):
            L = f"encoder.layer.{i}."

            def split(t):
                return t.view(B, T, self.heads, d).transpose(1, 2)

            q, k, v = (split(lin(L + f"attention.self.{n}", x)) for n in ("query", "key", "value"))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(B, T, H)
            x = ln(L + "attention.output.LayerNorm", x + lin(L + "attention.output.dense", ctx))
            h = F.gelu(lin(L + "intermediate.dense", x))
            x = ln(L + "output.LayerNorm", x + lin(L + "output.dense", h))
        if hook is not None and f"{pre}pooler.dense.weight" in P:
            lin("pooler.dense", x[:, 0])
        m = mask[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).numpy()


def memory_needed(src, extra: int = 0) -> int:
    """Bytes the BERT forward pass of the end-to-end check needs, roughly: every tensor of the model
    in float32 (``Bert`` holds them all) and one format's float32 reconstructions, plus ``extra``
    (what the layer search holds beside it). Activations (64 sentences x 128 tokens) are small."""
    params = sum(math.prod(src.tensor_shape(n)) for n in src.tensor_names())
    return 4 * params + 4 * src.n_weights + extra


def embedding_fidelity(ref: np.ndarray, quant: np.ndarray) -> dict:
    """Cosine between full-precision and quantized embeddings per sentence: mean and minimum."""
    ref, quant = np.asarray(ref, np.float64), np.asarray(quant, np.float64)
    cos = (ref * quant).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(quant, axis=1))
    return {"metric": "sentence-embedding cosine", "sentences": int(len(cos)),
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
