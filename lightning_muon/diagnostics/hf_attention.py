"""The QK-clip protocol for Hugging Face ``transformers`` attention modules, without importing it.

:func:`hf_qk_attention` recognises (by module path, class and attribute names, so nothing here
imports ``transformers``) the self-attention of the families users fine-tune most and returns an
adapter implementing :class:`~lightning_muon.diagnostics.attention.QKAttention`:

* :class:`HFProjectionsQK`: separate query/key projections, ``q_proj``/``k_proj`` (Llama, Mistral,
  Qwen2/3, Mixtral, Qwen3-MoE, OLMoE, Gemma, Phi-3's successors, ViT in transformers 5) or
  ``query``/``key`` (BERT, RoBERTa, ViT in transformers 4). Grouped-query heads, rotary position
  embeddings (the ``position_embeddings=(cos, sin)`` of the call, applied with the modeling file's
  own ``apply_rotary_pos_emb``) and per-head query/key norms (Qwen3) are followed.
* :class:`HFConv1DQK`: GPT-2's fused ``c_attn`` (a ``Conv1D``, weight stored ``(in, out)``, columns
  ``[q; k; v]``), with its ``scaling`` (``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``).

Queries and keys are recomputed from the call's inputs, as the model computes them before its
attention function; the logit is ``scaling * q.k`` over the positions the call's ``attention_mask``
allows (a boolean mask: True attends; an additive float mask: entries above half the dtype's
minimum attend), or causal positions when there is no mask and the module ``is_causal``.
Cross-attention (keys from ``encoder_hidden_states``) is followed too; anything the adapter cannot
follow (a ``BlockMask``, an unknown norm) raises a ``RuntimeError`` naming it at the first observed
step. Not covered: T5 (its logits add a learned relative bias; only ``q.k`` could be clipped).

QK-clip on models with query/key norms: the norm undoes any scaling of the projection's rows, so
those adapters measure logits but refuse to clip (``qk_clip_refusal`` says why).

Example:
    >>> import torch
    >>> class LlamaLikeAttention(torch.nn.Module):  # the attribute layout transformers' Llama uses
    ...     __module__ = "transformers.models.toy.modeling_toy"
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head_dim, self.scaling, self.is_causal = 4, 0.5, True
    ...         self.config = type("Config", (), {"num_attention_heads": 2})()
    ...         self.q_proj, self.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    ...     def forward(self, hidden_states, attention_mask=None, **kwargs):
    ...         return hidden_states
    >>> adapter = hf_qk_attention(LlamaLikeAttention())
    >>> type(adapter).__name__, adapter.n_head, adapter.kv_heads
    ('HFProjectionsQK', 2, 1)
    >>> adapter.qk_logit_max((torch.randn(3, 5, 8),), {}).shape
    torch.Size([2])
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..routing.layers import is_transposed_linear
from ..routing.matrix_view import MatrixView
from .attention import QKScaling, attention_logit_max

__all__ = ["HFConv1DQK", "HFProjectionsQK", "hf_qk_attention"]

_PAIRS = (("q_proj", "k_proj"), ("query", "key"))
_CROSS_INPUTS = ("encoder_hidden_states", "key_value_states", "cross_attention_states")


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _n_head(module: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads", "n_head"):
        if found := _positive_int(getattr(module, attr, None)):
            return found
    return _positive_int(getattr(getattr(module, "config", None), "num_attention_heads", None))


class _CallArgs:
    """The named arguments of a module's forward call (positional ones bound by its signature)."""

    def __init__(self, module: nn.Module) -> None:
        self.signature = inspect.signature(module.forward)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        out: dict[str, Any] = {}
        for name, value in bound.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                out[name] = value
        return out


def _allowed(mask: Any, shape: tuple[int, int, int, int], causal: bool, device: torch.device) -> Tensor | None:
    """Where a query may attend, ``(B or 1, H or 1, L, S)`` boolean, from an HF attention mask."""
    B, H, L, S = shape
    if mask is None:
        if causal and L > 1:
            return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)[None, None]
        return None
    if not isinstance(mask, Tensor):
        raise RuntimeError(
            f"QK-clip: attention_mask of type {type(mask).__name__} (e.g. flex attention's BlockMask) is not "
            "supported; use attn_implementation='sdpa' or 'eager'"
        )
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed[..., -L:, -S:]


class _HFAttention:
    """What both adapters share: the call's inputs, the mask, the logits."""

    module: nn.Module
    n_head: int
    scaling: float
    qk_clip_refusal: str | None = None

    def _setup(self, module: nn.Module) -> None:
        self.module = module
        self._call_args = _CallArgs(module)

    def _queries_keys(self, call: dict[str, Any]) -> tuple[Tensor, Tensor, bool]:
        raise NotImplementedError

    def qk_logit_max(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        call = self._call_args(args, kwargs)
        q, k, cross = self._queries_keys(call)  # (B, H, L, d), (B, H, S, d)
        causal = not cross and bool(call.get("is_causal", getattr(self.module, "is_causal", False)))
        mask = call.get("encoder_attention_mask") if cross and "encoder_attention_mask" in call else None
        mask = mask if mask is not None else call.get("attention_mask")
        allowed = _allowed(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), causal, q.device)
        return attention_logit_max(q, k, scale=self.scaling, allowed=allowed)


def _rotary(module: nn.Module) -> Callable | None:
    return getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)


class HFProjectionsQK(_HFAttention):
    """The QK-clip protocol for an HF attention with separate query and key ``nn.Linear`` projections.

    Heads: ``n_head`` query heads of ``head_dim``; ``kv_heads`` key heads (grouped-query attention
    when fewer: query head ``h`` reads key head ``h // (n_head // kv_heads)``, as HF's ``repeat_kv``).
    Clipping: with one key head per query head, the head's query and key rows take ``sqrt(gamma)``
    each; under GQA the query rows take ``gamma`` and the shared keys are left alone.
    """

    def __init__(self, module: nn.Module, q: nn.Linear, k: nn.Linear, n_head: int, head_dim: int) -> None:
        self._setup(module)
        self.q, self.k = q, k
        self.n_head, self.head_dim = n_head, head_dim
        self.kv_heads = k.out_features // head_dim
        scaling = getattr(module, "scaling", None)
        self.scaling = float(scaling) if isinstance(scaling, (int, float)) else head_dim**-0.5
        self.q_norm, self.k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        self.rotary = _rotary(module)
        if self.q_norm is not None or self.k_norm is not None:
            self.qk_clip_refusal = (
                "its query/key norms (q_norm, k_norm) rescale every head's queries and keys after the projection, "
                "so scaling the projection's rows does not change the logits"
            )

    def _project(self, x: Tensor, linear: nn.Linear, norm: nn.Module | None, heads: int) -> Tensor:
        y = linear(x)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.numel() != self.head_dim:
            y = norm(y)  # a norm over the whole projection (OLMo-2 style)
            norm = None
        y = y.unflatten(-1, (heads, self.head_dim))
        if norm is not None:
            y = norm(y)  # per head (Qwen3 style)
        return y.transpose(-3, -2)

    def _queries_keys(self, call: dict[str, Any]) -> tuple[Tensor, Tensor, bool]:
        x = call["hidden_states"]
        source = next((call[n] for n in _CROSS_INPUTS if call.get(n) is not None), None)
        cross = source is not None
        q = self._project(x, self.q, self.q_norm, self.n_head)
        k = self._project(source if cross else x, self.k, self.k_norm, self.kv_heads)
        rope = call.get("position_embeddings")
        if rope is not None and not cross:
            if self.rotary is None:
                raise RuntimeError(
                    f"QK-clip: {type(self.module).__name__} got position_embeddings but its modeling file has no "
                    "apply_rotary_pos_emb to apply them with"
                )
            q, k = self.rotary(q, k, *rope)
        if self.kv_heads != self.n_head:
            k = k.repeat_interleave(self.n_head // self.kv_heads, dim=-3)
        return q, k, cross

    def qk_clip_rows(self) -> list[QKScaling]:
        if self.qk_clip_refusal is not None:
            raise RuntimeError(f"QK-clip cannot clip {type(self.module).__name__}: {self.qk_clip_refusal}")
        d, group = self.head_dim, self.n_head // self.kv_heads
        q_heads = torch.arange(self.n_head).repeat_interleave(d)
        rows = []
        if group == 1:
            k_heads = torch.arange(self.kv_heads).repeat_interleave(d)
            for layer, heads in ((self.q, q_heads), (self.k, k_heads)):
                rows += [QKScaling(p, heads) for p in (layer.weight, layer.bias) if p is not None]
        else:  # a key shared by `group` query heads: the queries take the whole factor
            rows += [QKScaling(p, q_heads, power=1.0) for p in (self.q.weight, self.q.bias) if p is not None]
        return rows


class HFConv1DQK(_HFAttention):
    """The QK-clip protocol for GPT-2's attention: a fused ``c_attn`` ``Conv1D`` whose weight is
    stored ``(in, 3 d)``, columns ``[q; k; v]`` each ``(head, head_dim)`` (the matrix view
    ``"split=3,heads=H,transposed"``)."""

    def __init__(self, module: nn.Module, n_head: int, head_dim: int) -> None:
        self._setup(module)
        self.c_attn = module.c_attn
        self.n_head, self.head_dim = n_head, head_dim
        self.view = MatrixView.parse(f"split=3,heads={n_head},transposed")
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, (int, float)):  # older transformers: from the config flags
            scaling = head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
            if getattr(module, "scale_attn_by_inverse_layer_idx", False):
                scaling /= float(module.layer_idx + 1)
        self.scaling = float(scaling)

    def _queries_keys(self, call: dict[str, Any]) -> tuple[Tensor, Tensor, bool]:
        x = call["hidden_states"]
        out = []
        width = self.c_attn.weight.shape[1]
        for part in (0, 1):
            cols = self.view.part_rows(width, part).to(x.device)
            bias = self.c_attn.bias[cols] if getattr(self.c_attn, "bias", None) is not None else None
            y = x @ self.c_attn.weight[:, cols]
            y = y + bias if bias is not None else y
            out.append(y.unflatten(-1, (self.n_head, self.head_dim)).transpose(-3, -2))
        return out[0], out[1], False

    def qk_clip_rows(self) -> list[QKScaling]:
        width = self.c_attn.weight.shape[1]
        heads = torch.full((width,), -1, dtype=torch.long)
        owner = torch.arange(self.n_head).repeat_interleave(self.head_dim)
        for part in (0, 1):
            heads[self.view.part_rows(width, part)] = owner
        rows = [QKScaling(self.c_attn.weight, heads, dim=1)]
        if getattr(self.c_attn, "bias", None) is not None:
            rows.append(QKScaling(self.c_attn.bias, heads))
        return rows


def hf_qk_attention(module: nn.Module) -> _HFAttention | None:
    """An adapter for a Hugging Face self- or cross-attention module, or None when it is not one
    this module recognises (see the module docstring)."""
    if not _from_transformers(module):
        return None
    n_head = _n_head(module)
    if n_head is None:
        return None
    c_attn = getattr(module, "c_attn", None)
    if is_transposed_linear(c_attn):
        head_dim = _positive_int(getattr(module, "head_dim", None))
        cross = getattr(module, "is_cross_attention", False)
        if head_dim and not cross and c_attn.weight.shape[1] == 3 * n_head * head_dim:
            return HFConv1DQK(module, n_head, head_dim)
        return None
    for q_name, k_name in _PAIRS:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
            continue
        head_dim = (
            _positive_int(getattr(module, "head_dim", None))
            or _positive_int(getattr(module, "attention_head_size", None))
            or (q.out_features // n_head if q.out_features % n_head == 0 else None)
        )
        if not head_dim or q.out_features != n_head * head_dim or k.out_features % head_dim:
            return None
        if n_head % (k.out_features // head_dim):
            return None
        if "position_embeddings" in inspect.signature(module.forward).parameters and _rotary(module) is None:
            return None  # rotary embeddings we could not apply
        return HFProjectionsQK(module, q, k, n_head, head_dim)
    return None
