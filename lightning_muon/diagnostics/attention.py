"""Attention logits: each head's largest pre-softmax logit, and which weight rows belong to which head.

What QK-clip (:mod:`lightning_muon.optim.qk_clip`) and the attention-logit monitor need from an
attention module: ``S_h = max q.k / sqrt(d)`` per head for the step's forward passes, and the
query/key slices of each head's weights.

The attention protocol: an attention module is clippable when it has

* ``n_head``: the number of query heads;
* ``qk_logit_max(args, kwargs) -> Tensor``: shape ``(n_head,)``, the largest pre-softmax logit of
  each head (softmax scale included, masked positions left out) for the forward call made with
  ``args``/``kwargs``, e.g. recomputed with :func:`attention_logit_max`, or a value the forward
  stored itself;
* ``qk_clip_rows() -> list[QKScaling]``: which slices of which parameters belong to which head,
  with the power of the head's factor ``gamma = tau / S_h`` they take (1/2 for query and key rows,
  1 for query-only rows).

:func:`qk_attention` returns such an object for a module that implements the protocol, for
``torch.nn.MultiheadAttention`` (through :class:`MultiheadAttentionQK`) and for the attention of
Hugging Face models (:mod:`lightning_muon.diagnostics.hf_attention`). An adapter may also say
``qk_clip_refusal``: why its weights cannot be clipped (it still measures logits).

Example:
    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(16, num_heads=4, batch_first=True)
    >>> x = torch.randn(2, 5, 16)
    >>> adapter = qk_attention(mha)
    >>> before = adapter.qk_logit_max((x, x, x), {})
    >>> before.shape, [tuple(r.param.shape) for r in adapter.qk_clip_rows()]
    (torch.Size([4]), [(48, 16), (48,)])
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..parallel.dtensor import is_dtensor
from ..routing.matrix_view import MatrixView

__all__ = [
    "QKAttention",
    "QKObserver",
    "QKScaling",
    "MultiheadAttentionQK",
    "attention_logit_max",
    "find_qk_attention",
    "fused_qkv_project",
    "fused_qkv_rows",
    "qk_attention",
]


@dataclass(frozen=True)
class QKScaling:
    """Slices of ``param`` along ``dim`` that belong to attention heads.

    ``heads[i]`` is the query head of slice ``i`` (``-1``: not touched, e.g. a value row);
    the slice is multiplied by ``gamma_h ** power`` where ``gamma_h = min(1, tau / S_h)``:
    ``power=0.5`` for query and key rows (their product then scales by ``gamma_h``), ``1.0`` for
    query rows whose key is not scaled (shared across heads).
    """

    param: Tensor
    heads: Tensor
    power: float = 0.5
    dim: int = 0


@runtime_checkable
class QKAttention(Protocol):
    """What :class:`QKObserver` and the QK-clip callbacks need from an attention module."""

    n_head: int

    def qk_logit_max(self, args: tuple, kwargs: dict[str, Any]) -> Tensor: ...

    def qk_clip_rows(self) -> Sequence[QKScaling]: ...


# ----------------------------------------------------------------------------- the math
def attention_logit_max(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    allowed: Tensor | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Largest pre-softmax logit ``scale * q_i . k_j`` of each head, over batch and allowed positions.

    Args:
        q: ``(..., heads, L, d)`` queries; k: ``(..., heads, S, d)`` keys (leading dims broadcast).
        scale: the softmax scale, ``1 / sqrt(d)`` by default (what ``scaled_dot_product_attention`` uses).
        is_causal: only ``j <= i`` (top-left aligned, as ``scaled_dot_product_attention``).
        allowed: a boolean mask broadcastable to ``(..., heads, L, S)``, ``True`` where a query may attend.
        chunk: queries per block, to bound the memory of the ``L x S`` logits.

    Returns:
        ``(heads,)`` in float32; ``-inf`` for a head with no allowed position.

    Example:
        >>> q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
        >>> ref = (q @ k.transpose(-1, -2) / 8**0.5).amax(dim=(0, 2, 3))
        >>> torch.allclose(attention_logit_max(q, k), ref)
        True
    """
    if q.dim() < 3 or k.dim() < 3 or q.shape[-1] != k.shape[-1] or q.shape[-3] != k.shape[-3]:
        raise ValueError(
            f"attention_logit_max: q (..., heads, L, d) and k (..., heads, S, d) must agree in heads and d, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if allowed is not None and allowed.dtype != torch.bool:
        raise ValueError(f"attention_logit_max: allowed must be a boolean mask, got {allowed.dtype}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"attention_logit_max: chunk must be an integer >= 1, got {chunk!r}")
    d, heads, L, S = q.shape[-1], q.shape[-3], q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k = q.detach().float(), k.detach().float()
    best = torch.full((heads,), -math.inf, device=q.device)
    kt = k.transpose(-1, -2)
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        logits = (q[..., start:stop, :] @ kt) * scale  # (..., heads, l, S)
        mask = None
        if is_causal:
            rows = torch.arange(start, stop, device=q.device)[:, None]
            mask = rows >= torch.arange(S, device=q.device)[None, :]
        if allowed is not None:
            part = allowed[..., start:stop, :] if allowed.shape[-2] != 1 else allowed
            mask = part if mask is None else mask & part
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        per_head = logits.movedim(-3, 0).reshape(heads, -1).amax(dim=1)
        best = torch.maximum(best, per_head)
    return best


# ----------------------------------------------------------------------------- fused projections
def _layout(layout: str | MatrixView, n_head: int, where: str) -> MatrixView:
    """A fused q/k/v projection's row layout as a ``split=3`` :class:`~lightning_muon.routing.MatrixView`
    (the spec a module declares in ``muon_qkv_layout``); ``"qkv_head"``/``"head_qkv"`` are the
    earlier names of ``"split=3,heads=H"`` and ``"split=3,heads=H,order=heads"``."""
    legacy = {"qkv_head": f"split=3,heads={n_head}", "head_qkv": f"split=3,heads={n_head},order=heads"}
    if isinstance(layout, str) and layout in legacy:
        warnings.warn(
            f"{where}: order={layout!r} is deprecated; pass the matrix view {legacy[layout]!r} "
            "(the muon_qkv_layout spec)",
            DeprecationWarning,
            stacklevel=3,
        )
        layout = legacy[layout]
    view = MatrixView.parse(layout)
    if view.rule != "split" or view.parts != 3 or view.heads not in (0, n_head):
        raise ValueError(f"{where}: layout must be a 'split=3,heads={n_head}[,order=heads]' view, got {str(view)!r}")
    return dataclasses.replace(view, heads=n_head, per_head=False)


def _head_dim(weight: Tensor, n_head: int, where: str) -> int:
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1 or weight.shape[0] % (3 * n_head):
        raise ValueError(f"{where}: {weight.shape[0]} rows are not 3 x n_head ({n_head!r}) x head_dim")
    return weight.shape[0] // (3 * n_head)


def fused_qkv_rows(
    weight: Tensor, bias: Tensor | None, n_head: int, layout: str | MatrixView | None = None
) -> list[QKScaling]:
    """:class:`QKScaling` of a fused ``(3 * d, d_in)`` QKV projection (and its bias).

    ``layout`` is the matrix view of the fused weight (:class:`~lightning_muon.routing.MatrixView`,
    the same spec as a module's ``muon_qkv_layout``): ``"split=3,heads=H"`` (default) for rows
    ``[W_q; W_k; W_v]``, each ``(head, head_dim)`` (nanoGPT, ``nn.MultiheadAttention``, timm);
    ``"split=3,heads=H,order=heads"`` for ``(head, q/k/v, head_dim)`` (Megatron, this project's
    ``examples/gpt.py``).

    Example:
        >>> [r.heads.tolist() for r in fused_qkv_rows(torch.zeros(6, 4), None, 1, "split=3,heads=1,order=heads")]
        [[0, 0, 0, 0, -1, -1]]
    """
    head_dim = _head_dim(weight, n_head, "fused_qkv_rows")
    view = _layout(layout or f"split=3,heads={n_head}", n_head, "fused_qkv_rows")
    heads = torch.full((weight.shape[0],), -1, dtype=torch.long)
    owner = torch.arange(n_head).repeat_interleave(head_dim)
    for part in (0, 1):
        heads[view.part_rows(weight.shape[0], part)] = owner
    return [QKScaling(p, heads) for p in (weight, bias) if p is not None]


def fused_qkv_project(
    x: Tensor, weight: Tensor, bias: Tensor | None, n_head: int, layout: str | MatrixView | None = None
) -> tuple[Tensor, Tensor]:
    """Queries and keys ``(..., n_head, T, head_dim)`` of ``x`` ``(..., T, d_in)`` through a fused
    QKV weight of the given ``layout`` (as :func:`fused_qkv_rows`; only the q and k rows are computed).

    Example:
        >>> w, x = torch.randn(12, 4), torch.randn(2, 5, 4)
        >>> q, k = fused_qkv_project(x, w, None, n_head=2)  # [W_q; W_k; W_v]: the keys of head 1 are rows 6, 7
        >>> q.shape, torch.allclose(k[:, 1], x @ w[6:8].T)
        (torch.Size([2, 2, 5, 2]), True)
    """
    head_dim = _head_dim(weight, n_head, "fused_qkv_project")
    view = _layout(layout or f"split=3,heads={n_head}", n_head, "fused_qkv_project")
    out = []
    for part in (0, 1):
        idx = view.part_rows(weight.shape[0], part).to(weight.device)
        y = torch.nn.functional.linear(x, weight[idx], None if bias is None else bias[idx])
        out.append(y.unflatten(-1, (n_head, head_dim)).transpose(-3, -2))
    return out[0], out[1]


# ----------------------------------------------------------------------------- nn.MultiheadAttention
class MultiheadAttentionQK:
    """The QK-clip protocol for ``torch.nn.MultiheadAttention`` (torchvision's ViT uses it).

    Queries and keys are recomputed from the forward's inputs with ``in_proj_weight`` (rows
    ``[W_q; W_k; W_v]``) or ``q_proj_weight``/``k_proj_weight`` (when ``kdim``/``vdim`` differ) and
    the q/k parts of ``in_proj_bias``; ``bias_k`` (``add_bias_kv``) is an extra key, scaled with the
    keys. Masks (``attn_mask``, ``key_padding_mask``: boolean, or float with ``-inf``) remove
    positions; the finite values of a float mask are not part of the logit measured (QK-clip scales
    only ``q.k``). ``add_zero_attn`` adds a logit 0.
    """

    def __init__(self, module: nn.MultiheadAttention) -> None:
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttentionQK needs a torch.nn.MultiheadAttention, got {type(module).__name__}")
        self.module = module
        self.n_head = module.num_heads

    def _weights(self) -> tuple[Tensor, Tensor]:
        m = self.module
        if m._qkv_same_embed_dim:
            e = m.embed_dim
            return m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e]
        return m.q_proj_weight, m.k_proj_weight

    def qk_logit_max(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        m = self.module
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        call = dict(zip(names, args)) | kwargs
        query, key = call["query"], call["key"]
        unbatched = query.dim() == 2
        if unbatched:
            query, key = query.unsqueeze(0), key.unsqueeze(0)
        elif not m.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        e, h = m.embed_dim, self.n_head
        wq, wk = self._weights()
        bq = bk = None
        if m.in_proj_bias is not None:
            bq, bk = m.in_proj_bias[:e], m.in_proj_bias[e : 2 * e]
        q = torch.nn.functional.linear(query, wq, bq).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, L, hd)
        k = torch.nn.functional.linear(key, wk, bk).unflatten(-1, (h, -1)).transpose(1, 2)
        B, L, S = q.shape[0], q.shape[2], k.shape[2]
        allowed = torch.ones(B, 1, L, S, dtype=torch.bool, device=q.device)
        attn_mask, pad = call.get("attn_mask"), call.get("key_padding_mask")
        if attn_mask is None and call.get("is_causal", False):
            allowed &= torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            a = _allowed(attn_mask)
            allowed = allowed & (a.view(B, h, L, S) if a.dim() == 3 else a)
        if pad is not None:
            allowed = allowed & _allowed(pad).view(-1, 1, 1, S)
        best = attention_logit_max(q, k, allowed=allowed)
        extra = []
        if m.bias_k is not None:  # one more key, the same for every example (its mask column is always allowed)
            kb = m.bias_k.reshape(h, 1, -1)
            extra.append(((q @ kb.transpose(-1, -2)).squeeze(-1) / math.sqrt(q.shape[-1])).amax(dim=(0, 2)))
        if m.add_zero_attn:
            extra.append(torch.zeros(h, device=q.device))
        for x in extra:
            best = torch.maximum(best, x.float())
        return best

    def qk_clip_rows(self) -> list[QKScaling]:
        m = self.module
        e, h = m.embed_dim, self.n_head
        owner = torch.arange(h).repeat_interleave(e // h)
        none = torch.full((e,), -1, dtype=torch.long)
        rows = []
        if m._qkv_same_embed_dim:
            rows.append(QKScaling(m.in_proj_weight, torch.cat([owner, owner, none])))
        else:
            rows += [QKScaling(m.q_proj_weight, owner), QKScaling(m.k_proj_weight, owner)]
        if m.in_proj_bias is not None:
            rows.append(QKScaling(m.in_proj_bias, torch.cat([owner, owner, none])))
        if m.bias_k is not None:
            rows.append(QKScaling(m.bias_k, owner, dim=-1))
        return rows


def _allowed(mask: Tensor) -> Tensor:
    """``nn.MultiheadAttention`` masks mark what is NOT attended (True, or -inf): invert to 'allowed'."""
    return ~mask if mask.dtype == torch.bool else mask != -math.inf


# ----------------------------------------------------------------------------- discovery and observation
def qk_attention(module: nn.Module) -> QKAttention | None:
    """``module`` itself when it implements :class:`QKAttention`, an adapter for
    ``nn.MultiheadAttention`` or for a Hugging Face attention module
    (:mod:`lightning_muon.diagnostics.hf_attention`: Llama-style ``q_proj``/``k_proj`` with GQA,
    BERT's ``query``/``key``, GPT-2's ``c_attn``), else ``None``."""
    if isinstance(module, QKAttention):
        return module
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttentionQK(module)
    from .hf_attention import hf_qk_attention  # recognises transformers' classes without importing it

    return hf_qk_attention(module)


def find_qk_attention(model: nn.Module) -> dict[str, tuple[nn.Module, QKAttention]]:
    """Every clippable attention module of ``model`` by name: ``{name: (module, protocol object)}``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 8))
        >>> list(find_qk_attention(model))
        ['0']
    """
    found = {}
    for name, module in model.named_modules():
        adapter = qk_attention(module)
        if adapter is not None:
            found[name] = (module, adapter)
    return found


class QKObserver:
    """Forward hooks keeping, per attention module, the running max logit of each head while ``enabled``.

    The hook runs after the module's forward, under ``no_grad`` and with autocast off (float32
    logits), and calls the protocol's ``qk_logit_max`` with the forward's inputs: with a recomputing
    adapter that costs about the ``q.k`` part of attention again, so enable it only on the steps
    that need it. Refuses (``RuntimeError``) query/key weights that are DTensors during the forward,
    i.e. tensor-parallel heads: each rank would see only its own heads.

    Example:
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> obs = QKObserver(find_qk_attention(torch.nn.ModuleDict({"attn": mha})))
        >>> obs.enabled = True
        >>> _ = mha(*[torch.randn(1, 3, 8)] * 3)
        >>> obs.maxima["attn"].shape
        torch.Size([2])
        >>> obs.remove()
    """

    def __init__(self, modules: dict[str, tuple[nn.Module, QKAttention]]) -> None:
        self.modules = modules
        self.enabled = False
        self.maxima: dict[str, Tensor] = {}
        self._handles = [
            m.register_forward_hook(self._hook(name), with_kwargs=True) for name, (m, _) in modules.items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if not self.enabled:
                return
            adapter = self.modules[name][1]
            if getattr(adapter, "qk_clip_refusal", None):  # it cannot say its q/k rows: all its weights
                weights = list(module.parameters())
            else:
                weights = [r.param for r in adapter.qk_clip_rows()]
            sharded = [p for p in weights if is_dtensor(p)]
            if sharded:
                raise RuntimeError(
                    f"QK-clip: attention {name!r} computes with DTensor query/key weights "
                    f"({sharded[0].placements}), i.e. tensor-parallel heads; not supported (FSDP2, whose "
                    "weights are whole during the forward, and DDP are)."
                )
            device = next((t.device for t in _tensors(args)), torch.device("cpu"))
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                value = adapter.qk_logit_max(args, kwargs).detach().float().reshape(-1)
            if value.numel() != adapter.n_head:
                raise RuntimeError(
                    f"QK-clip: {name}.qk_logit_max returned {value.numel()} values for n_head={adapter.n_head}"
                )
            old = self.maxima.get(name)
            self.maxima[name] = value if old is None else torch.maximum(old, value)

        return hook

    def reset(self) -> None:
        self.maxima = {}

    def reduced(self, all_reduce_max=None) -> dict[str, Tensor]:
        """The maxima of every module (``-inf`` for one not called), optionally MAX-reduced in one call."""
        device = next((v.device for v in self.maxima.values()), None)
        if device is None:
            device = next((p.device for m, _ in self.modules.values() for p in m.parameters()), torch.device("cpu"))
        sizes = [a.n_head for _, a in self.modules.values()]
        flat = torch.cat(
            [self.maxima.get(n, torch.full((s,), -math.inf)).to(device) for n, s in zip(self.modules, sizes)]
        )
        if all_reduce_max is not None:
            flat = all_reduce_max(flat)
        return dict(zip(self.modules, flat.split(sizes)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _tensors(args: Iterable[Any]) -> Iterator[Tensor]:
    return (a for a in args if isinstance(a, Tensor))
