"""The Muon step as plain functions on lists of tensors: no optimizer object, no Lightning.

:class:`lightning_muon.Muon` validates settings, holds the momentum buffers and loops over its
param groups; the arithmetic of one step lives here so that the optimizer, the diagnostics
(:class:`lightning_muon.callbacks.PolarMisalignmentMonitor` predicts the step with the same
functions) and a user's own training loop share one definition:

1. :func:`muon_direction`: momentum (an EMA of the gradients) and its Nesterov form, the matrix
   that gets orthogonalised;
2. :func:`lightning_muon.orthogonalize` of each direction as a :func:`matrix_view`;
3. :func:`apply_muon_update`: decoupled weight decay, then the orthogonalised direction scaled by
   the :func:`adjusted_lr` rule.

Example:
    >>> import torch
    >>> from lightning_muon import orthogonalize
    >>> from lightning_muon import apply_muon_update, matrix_view, muon_direction
    >>> W, G = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    >>> buf = torch.zeros_like(W)
    >>> (D,) = muon_direction([G], [buf], beta=0.95, nesterov=True)
    >>> O = orthogonalize(matrix_view(D), "svd")
    >>> tuple(O.shape)
    (8, 36)
    >>> apply_muon_update([W], [O], lr=0.02, weight_decay=0.01, adjust_lr="original")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..routing.matrix_view import matrix_shape

__all__ = ["ADJUST_LR", "adjusted_lr", "apply_muon_update", "muon_direction"]

#: Update-scale rules; m = fan_out (rows), n = fan_in (columns of the flattened weight).
ADJUST_LR: dict[str, Callable[[int, int], float]] = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),  # Keller Jordan
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),  # Moonlight: update RMS 0.2
    "spectral": lambda m, n: math.sqrt(m / n),  # Bernstein: spectral-norm condition
}


def adjusted_lr(lr: float, shape: Sequence[int], rule: str) -> float:
    """The learning rate Muon applies to a weight of ``shape`` under the ``adjust_lr`` ``rule``.

    The rule sees the :func:`matrix_shape` of ``shape``, so a conv kernel is scaled as its
    flattened matrix.

    Example:
        >>> adjusted_lr(0.02, (1024, 256), "original")
        0.04
    """
    m, n = matrix_shape(shape)
    return lr * ADJUST_LR[rule](m, n)


def muon_direction(grads: Sequence[Tensor], bufs: Sequence[Tensor], beta: float, nesterov: bool) -> list[Tensor]:
    """Update the momentum buffers in place and return the directions Muon orthogonalises.

    ``buf <- lerp(buf, g, 1 - beta)`` (an EMA of the gradients), then the direction is
    ``lerp(g, buf, beta)`` with ``nesterov`` and ``buf`` itself without. One foreach call per
    operation. ``grads`` must have the buffers' dtypes and shapes. Without Nesterov the returned
    tensors are the buffers: read them, do not modify them.

    Example:
        >>> g, buf = torch.ones(2, 2), torch.zeros(2, 2)
        >>> muon_direction([g], [buf], beta=0.9, nesterov=False)[0]
        tensor([[0.1000, 0.1000],
                [0.1000, 0.1000]])
        >>> buf  # updated in place
        tensor([[0.1000, 0.1000],
                [0.1000, 0.1000]])
    """
    grads, bufs = list(grads), list(bufs)
    torch._foreach_lerp_(bufs, grads, 1 - beta)
    return torch._foreach_lerp(grads, bufs, beta) if nesterov else bufs


def apply_muon_update(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float,
    adjust_lr: str,
    shapes: Sequence[Sequence[int]] | None = None,
) -> None:
    """``W <- (1 - lr * weight_decay) W - adjusted_lr(lr, shape, adjust_lr) * update`` in place.

    ``updates`` are the orthogonalised directions, any shape with ``W``'s number of elements (the
    ``(m, n)`` matrix of a conv kernel, for one), cast to ``W``'s dtype. ``shapes`` are the
    weights' global shapes when ``params`` are local pieces of sharded tensors (default: their
    own shapes); the scale rule is applied to them.

    Example:
        >>> W = torch.ones(2, 2)
        >>> apply_muon_update([W], [torch.eye(2)], lr=0.5, weight_decay=0.0, adjust_lr="spectral")
        >>> W
        tensor([[0.5000, 1.0000],
                [1.0000, 0.5000]])
    """
    shapes = [p.shape for p in params] if shapes is None else shapes
    decay = 1 - lr * weight_decay
    for w, update, shape in zip(params, updates, shapes):
        if decay != 1:  # without decay, no pass over the weights multiplying them by 1
            w.mul_(decay)
        w.add_(update.view_as(w).to(w.dtype), alpha=-adjusted_lr(lr, shape, adjust_lr))
