"""Per-example gradient norms of Linear and normalization layers from activations and output gradients.

Plain torch, no Lightning. For a batch of ``B`` examples (a sequence is one example: its tokens are
summed over), the weight gradient of a layer is ``sum_i c_i``, one contribution ``c_i`` per example.
These functions return ``|c_i|^2`` for every ``i`` and ``|sum_i c_i|^2`` from what a forward hook
(the layer's input) and a backward hook (the gradient of its output) see, without building the
per-example gradients of the whole model. :func:`per_example_noise_scale` turns them into
McCandlish et al.'s B_simple with a small batch of one example and a large batch of ``B``.

* ``nn.Linear`` (:func:`linear_grad_norms`): ``c_i = sum_t g_{i,t} a_{i,t}^T``. Either materialised
  (``B`` outer-product sums, ``B T d_in d_out`` flops) or by the ghost-norm identity
  ``|c_i|^2 = sum_{s,t} (a_s . a_t)(g_s . g_t) = trace(A_i A_i^T G_i G_i^T)`` (``B T^2 (d_in + d_out)``
  flops); ``method="auto"`` takes the cheaper for the shape.
* ``nn.LayerNorm`` / ``nn.RMSNorm`` (:func:`norm_grad_norms`): ``c_i = sum_t g_{i,t} * xhat_{i,t}``
  for the gain and ``sum_t g_{i,t}`` for the bias, ``O(B T d)``: Gray et al. (NeurIPS 2024) show the
  normalization layers' noise scale tracks the whole transformer's.
* ``nn.Conv1d/2d/3d`` (:func:`conv_grad_norms`): a convolution is a Linear layer applied to every
  patch of its (padded) input, so the input is unfolded into ``(B, positions, in/groups * prod(k))``
  patches and each group is a Linear map from its channels' patches: :func:`linear_grad_norms`
  per group (ghost or materialised), in chunks of the batch so that the patches stay bounded.
* Hugging Face's ``Conv1D`` (``x @ W + b``, ``W`` stored ``(in, out)``): its per-example gradient is
  the transpose of a Linear layer's, with the same norm: :func:`linear_grad_norms` as it is.
* ``nn.Embedding`` (:func:`embedding_grad_norms`): ``c_i`` adds ``g_{i,t}`` into row ``id_{i,t}``,
  so ``|c_i|^2`` sums the rows after adding up the tokens of equal id: ``O(B T d)``, exact.

Example:
    >>> A, G = torch.randn(4, 10, 8), torch.randn(4, 10, 6)  # 4 sequences of 10 tokens
    >>> norms = linear_grad_norms(A, G)
    >>> c = torch.einsum("bto,bti->boi", G, A)             # per-example gradients, materialised
    >>> torch.allclose(norms.per_example_sq, c.square().sum((1, 2)), rtol=1e-4)
    True
    >>> bool(per_example_noise_scale(norms.per_example_sq, norms.batch_sq).trace_sigma > 0)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .critical_batch import NoiseScale, noise_scale

__all__ = [
    "LINEAR_METHODS",
    "PerExampleNorms",
    "conv_grad_norms",
    "embedding_grad_norms",
    "linear_grad_norms",
    "norm_grad_norms",
    "per_example_noise_scale",
]

LINEAR_METHODS = ("auto", "ghost", "materialize")
_CHUNK = 1 << 24  # elements of one temporary (per-example gradients or Gram matrices): 64 MiB in fp32


class PerExampleNorms(NamedTuple):
    """``per_example_sq`` (B,): ``|c_i|^2`` per example; ``batch_sq`` (): ``|sum_i c_i|^2``."""

    per_example_sq: Tensor
    batch_sq: Tensor


def _as_sequences(x: Tensor, name: str, where: str) -> Tensor:
    """``(B, ..., d)`` -> ``(B, T, d)`` in fp32 (fp64 stays fp64); a ``(B, d)`` input has T = 1."""
    if x.ndim < 2:
        raise ValueError(f"{where}: {name} must have shape (batch, ..., features), got {tuple(x.shape)}")
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_cost(T: int, d_in: int, d_out: int) -> tuple[int, int]:
    """Flops per example of (materialise, ghost)."""
    return T * d_in * d_out, T * T * (d_in + d_out + 1)


def linear_grad_norms(inputs: Tensor, grad_outputs: Tensor, method: str = "auto") -> PerExampleNorms:
    """Per-example squared norms of an ``nn.Linear`` weight gradient, and of the batch's.

    Args:
        inputs: the layer's input ``(B, ..., d_in)``; leading dim = examples, middle dims (tokens)
            are summed over within an example.
        grad_outputs: the gradient of the loss w.r.t. the layer's output ``(B, ..., d_out)``.
        method: ``"materialize"`` (per-example ``(d_out, d_in)`` products, in chunks of the batch),
            ``"ghost"`` (``trace(A_i A_i^T G_i G_i^T)``, no per-example gradient built) or ``"auto"``:
            ghost when ``T (d_in + d_out) < d_in d_out``, i.e. short sequences of wide layers.

    Example:
        >>> linear_grad_norms(torch.ones(2, 3), torch.ones(2, 4)).per_example_sq  # |g a^T|^2 = 3 * 4
        tensor([12., 12.])
    """
    where = "linear_grad_norms"
    if method not in LINEAR_METHODS:
        raise ValueError(f"{where}: method must be one of {LINEAR_METHODS}, got {method!r}")
    A, G = _as_sequences(inputs, "inputs", where), _as_sequences(grad_outputs, "grad_outputs", where)
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(
            f"{where}: inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} "
            "must agree in all but the last dim"
        )
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    G = G.to(A.dtype)
    materialise, ghost = _linear_cost(T, d_in, d_out)
    if method == "auto":
        method = "ghost" if ghost < materialise else "materialize"
    per_example = []
    if method == "materialize":
        chunk = max(1, _CHUNK // max(1, d_in * d_out))
        total = A.new_zeros(d_out, d_in)
        for i in range(0, B, chunk):
            c = G[i : i + chunk].mT @ A[i : i + chunk]  # (b, d_out, d_in)
            per_example.append(c.square().sum((-2, -1)))
            total += c.sum(0)
    else:
        chunk = max(1, _CHUNK // max(1, T * T))
        for i in range(0, B, chunk):
            a, g = A[i : i + chunk], G[i : i + chunk]
            per_example.append(((a @ a.mT) * (g @ g.mT)).sum((-2, -1)))
        total = G.reshape(-1, d_out).mT @ A.reshape(-1, d_in)  # the batch gradient: one matmul
    sq = torch.cat(per_example) if per_example else A.new_zeros(0)
    return PerExampleNorms(sq, total.square().sum())


def _tuple(value: int | Sequence[int], nd: int, name: str, where: str) -> tuple[int, ...]:
    out = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(out) != nd or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in out):
        raise ValueError(f"{where}: {name} must be an integer >= 0 or {nd} of them, got {value!r}")
    return out


def _padding_pairs(
    padding: str | int | Sequence[int], kernel: tuple[int, ...], dilation: tuple[int, ...], where: str
) -> list[tuple[int, int]]:
    """``(before, after)`` per spatial dim, as ``nn.Conv*`` pads (``"same"``: the odd one after)."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in _tuple(padding, len(kernel), "padding", where)]


def _patches(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pads: list[tuple[int, int]],
    dilation: tuple[int, ...],
    padding_mode: str,
) -> Tensor:
    """``(B, C, *spatial)`` -> ``(B, positions, C, prod(kernel))``: every patch a conv kernel reads."""
    flat = [v for pair in reversed(pads) for v in pair]
    if any(flat):
        x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    nd = len(kernel)
    for d in range(nd):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])  # a window dim appended at the end
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    B, C = x.shape[:2]
    positions = x.shape[2 : 2 + nd].numel()
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(order).reshape(B, positions, C, -1)


def conv_grad_norms(
    inputs: Tensor,
    grad_outputs: Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    method: str = "auto",
) -> PerExampleNorms:
    """Per-example squared norms of an ``nn.Conv1d/2d/3d`` weight gradient, and of the batch's.

    Args:
        inputs: the layer's input ``(B, C_in, *spatial)`` (one example per row of the batch).
        grad_outputs: the gradient of the loss w.r.t. its output ``(B, C_out, *spatial_out)``.
        kernel_size, stride, padding, dilation, groups, padding_mode: the conv's (``padding`` may be
            ``"same"`` or ``"valid"``; ``padding_mode`` one of ``"zeros"``, ``"reflect"``,
            ``"replicate"``, ``"circular"``).
        method: as :func:`linear_grad_norms`, per group with the positions as the tokens.

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        >>> x = torch.randn(2, 3, 5, 5); g = torch.randn(2, 4, 5, 5)
        >>> norms = conv_grad_norms(x, g, 3, padding=1)
        >>> w = [torch.autograd.grad((conv(x[i : i + 1]) * g[i : i + 1]).sum(), conv.weight)[0] for i in range(2)]
        >>> torch.allclose(norms.per_example_sq, torch.stack([c.square().sum() for c in w]), rtol=1e-4)
        True
    """
    where = "conv_grad_norms"
    if method not in LINEAR_METHODS:
        raise ValueError(f"{where}: method must be one of {LINEAR_METHODS}, got {method!r}")
    nd = inputs.ndim - 2
    if nd < 1 or grad_outputs.ndim != inputs.ndim or inputs.shape[0] != grad_outputs.shape[0]:
        raise ValueError(
            f"{where}: inputs (B, C_in, *spatial) and grad_outputs (B, C_out, *spatial_out) must have one batch "
            f"and the same number of dims, got {tuple(inputs.shape)} and {tuple(grad_outputs.shape)}"
        )
    kernel = _tuple(kernel_size, nd, "kernel_size", where)
    strides, dilations = _tuple(stride, nd, "stride", where), _tuple(dilation, nd, "dilation", where)
    pads = _padding_pairs(padding, kernel, dilations, where)
    C, C_out = inputs.shape[1], grad_outputs.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or C % groups or C_out % groups:
        raise ValueError(f"{where}: groups must divide C_in ({C}) and C_out ({C_out}), got {groups!r}")
    x = inputs.detach()
    x = x if x.dtype == torch.float64 else x.float()
    g = grad_outputs.detach().to(x.dtype)
    B, G = x.shape[0], groups
    positions = grad_outputs.shape[2:].numel()
    patch = C // G * math.prod(kernel)
    chunk = max(1, _CHUNK // max(1, positions * C * math.prod(kernel)))
    per_example, total = [], x.new_zeros(G, C_out // G, patch)
    for i in range(0, B, chunk):
        a = _patches(x[i : i + chunk], kernel, strides, pads, dilations, padding_mode)  # (b, L, C, k)
        b = a.shape[0]
        if a.shape[1] != positions:
            raise ValueError(
                f"{where}: inputs {tuple(inputs.shape)} give {a.shape[1]} output positions with these settings, "
                f"grad_outputs {tuple(grad_outputs.shape)} has {positions}"
            )
        a = a.reshape(b, positions, G, patch).transpose(1, 2).reshape(b * G, positions, patch)
        o = (
            g[i : i + chunk]
            .reshape(b, G, C_out // G, positions)
            .transpose(-1, -2)
            .reshape(b * G, positions, C_out // G)
        )
        norms = linear_grad_norms(a, o, method)
        per_example.append(norms.per_example_sq.view(b, G).sum(1))
        total += torch.einsum("bglo,bgli->goi", o.view(b, G, positions, -1), a.view(b, G, positions, -1))
    return PerExampleNorms(torch.cat(per_example), total.square().sum())


def embedding_grad_norms(ids: Tensor, grad_outputs: Tensor, padding_idx: int | None = None) -> PerExampleNorms:
    """Per-example squared norms of an ``nn.Embedding`` weight gradient, and of the batch's.

    Example ``i`` adds ``g_{i,t}`` into row ``ids[i, t]``; tokens of equal id add up before the row
    is squared. Tokens equal to ``padding_idx`` get no gradient (as in ``nn.Embedding``).

    Args:
        ids: the looked-up indices ``(B, ...)``.
        grad_outputs: the gradient of the loss w.r.t. the embeddings ``(B, ..., d)``.
        padding_idx: the embedding's ``padding_idx`` (None: every token counts).

    Example:
        >>> ids = torch.tensor([[1, 1, 2]]).expand(2, 3); g = torch.ones(2, 3, 4)
        >>> embedding_grad_norms(ids, g).per_example_sq  # row 1 gets 2 g: |2 g|^2 + |g|^2 = 16 + 4
        tensor([20., 20.])
    """
    where = "embedding_grad_norms"
    if ids.dtype not in (torch.int64, torch.int32) or grad_outputs.shape[:-1] != ids.shape or ids.ndim < 1:
        raise ValueError(
            f"{where}: ids (B, ...) must be integers and grad_outputs (B, ..., d) match them, "
            f"got {tuple(ids.shape)} ({ids.dtype}) and {tuple(grad_outputs.shape)}"
        )
    g = grad_outputs.detach()
    g = g if g.dtype == torch.float64 else g.float()
    B, d = ids.shape[0], g.shape[-1]
    ids = ids.reshape(B, -1).long()
    g = g.reshape(B, -1, d)
    if padding_idx is not None:
        g = g * (ids != padding_idx).unsqueeze(-1)
    example = torch.arange(B, device=ids.device)[:, None].expand_as(ids)

    def summed_rows(key: Tensor) -> tuple[Tensor, Tensor]:
        unique, inverse = torch.unique(key.reshape(-1), return_inverse=True)
        rows = g.new_zeros(unique.numel(), d).index_add_(0, inverse, g.reshape(-1, d))
        return unique, rows.square().sum(-1)

    vocab = int(ids.max()) + 1 if ids.numel() else 1
    unique, sq = summed_rows(example * vocab + ids)  # rows per (example, id)
    per_example = g.new_zeros(B).index_add_(0, unique // vocab, sq)
    _, batch = summed_rows(ids)
    return PerExampleNorms(per_example, batch.sum())


def norm_grad_norms(
    inputs: Tensor,
    grad_outputs: Tensor,
    normalized_ndim: int = 1,
    eps: float = 1e-5,
    *,
    rms: bool = False,
    weight: bool = True,
    bias: bool = True,
) -> PerExampleNorms:
    """Per-example squared gradient norms of a LayerNorm's (or RMSNorm's) gain and bias together.

    ``xhat`` is recomputed from ``inputs`` (``(x - mean) / sqrt(var + eps)`` over the last
    ``normalized_ndim`` dims, or ``x / sqrt(mean(x^2) + eps)`` with ``rms=True``); the gain's
    per-example gradient is ``sum_t g_t * xhat_t``, the bias's ``sum_t g_t``.

    Example:
        >>> ln = torch.nn.LayerNorm(8)
        >>> x = torch.randn(3, 5, 8); g = torch.randn(3, 5, 8)
        >>> norm_grad_norms(x, g, eps=ln.eps).per_example_sq.shape
        torch.Size([3])
    """
    where = "norm_grad_norms"
    nd = normalized_ndim
    if isinstance(nd, bool) or not isinstance(nd, int) or not 1 <= nd < inputs.ndim:
        raise ValueError(f"{where}: normalized_ndim must be an integer in [1, inputs.ndim - 1], got {nd!r}")
    if inputs.shape != grad_outputs.shape:
        raise ValueError(
            f"{where}: inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} must have one shape"
        )
    if not (weight or bias):
        raise ValueError(f"{where}: nothing to measure: weight and bias are both False")
    x = inputs.detach()
    x = x if x.dtype == torch.float64 else x.float()
    g = grad_outputs.detach().to(x.dtype)
    dims = tuple(range(-normalized_ndim, 0))
    B = x.shape[0]
    feature = x.shape[x.ndim - normalized_ndim :].numel()
    per_example = x.new_zeros(B)
    total = x.new_zeros(())
    if weight:
        if rms:
            xhat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        else:
            mean = x.mean(dims, keepdim=True)
            xhat = (x - mean) * torch.rsqrt((x - mean).square().mean(dims, keepdim=True) + eps)
        c = (g * xhat).reshape(B, -1, feature).sum(1)  # (B, features)
        per_example += c.square().sum(-1)
        total += c.sum(0).square().sum()
    if bias:
        c = g.reshape(B, -1, feature).sum(1)
        per_example += c.square().sum(-1)
        total += c.sum(0).square().sum()
    return PerExampleNorms(per_example, total)


def per_example_noise_scale(per_example_sq: Tensor, batch_sq: Tensor | float) -> NoiseScale:
    """B_simple from one batch: small batch = one example, large batch = all ``B`` of them.

    ``per_example_sq`` holds ``|c_i|^2`` (``(..., B)``), ``batch_sq`` ``|sum_i c_i|^2``. Whatever
    uniform factor scales the loss (a mean or a sum over examples, loss scaling, accumulation), the
    per-example gradient is ``g_i = B c_i`` up to that factor and the batch mean ``sum_i c_i``, so
    B_simple (in examples) does not depend on it; ``grad_sq`` and ``trace_sigma`` are in the units
    of the mean-loss gradient when the loss was the batch mean.

    Example:
        >>> per_example_noise_scale(torch.tensor([1.0, 1.0]), 4.0).b_simple  # c_1 = c_2: no noise
        tensor(0.)
    """
    sq = torch.as_tensor(per_example_sq)
    B = sq.shape[-1] if sq.ndim else 0
    if B < 2:
        raise ValueError(f"per_example_noise_scale: need >= 2 examples, got per_example_sq of shape {tuple(sq.shape)}")
    return noise_scale(B * B * sq.mean(-1), batch_sq, 1, B)
