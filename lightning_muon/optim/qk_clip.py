"""QK-clip (MuonClip, Kimi K2): rescale the query and key weights of heads whose logits grew too large.

Under Muon every update has the same spectral norm whatever the gradient's size, so the query and
key weights of a head can keep growing and its largest pre-softmax logit ``S_h = max q.k / sqrt(d)``
with them (Kimi K2, arXiv 2507.20534, saw it pass 1000 and destabilise training). After the
optimizer step, :func:`qk_clip_` scales the head's query and key rows by ``sqrt(tau / S_h)`` each
when ``S_h > tau``, which multiplies that head's logits by ``tau / S_h`` and leaves every other
head, value and output weight untouched. Query-only parts (a per-head rotary query under MLA, or
the query of a key shared by several heads under GQA) take the whole factor ``tau / S_h`` and the
shared key is left alone, so that clipping one head does not change the others. Measuring ``S_h``
and the attention protocol that says which rows belong to which head:
:mod:`lightning_muon.diagnostics.attention`.

Example:
    >>> import torch
    >>> from lightning_muon.diagnostics.attention import qk_attention
    >>> mha = torch.nn.MultiheadAttention(16, num_heads=4, batch_first=True)
    >>> x = torch.randn(2, 5, 16)
    >>> adapter = qk_attention(mha)
    >>> before = adapter.qk_logit_max((x, x, x), {})
    >>> clipped = qk_clip_(adapter.qk_clip_rows(), before, tau=0.5 * float(before.max()))
    >>> after = adapter.qk_logit_max((x, x, x), {})
    >>> bool(after.max() <= 0.5 * before.max() * (1 + 1e-5)), int(clipped.sum()) >= 1
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..diagnostics.attention import QKScaling
from ..parallel.dtensor import is_dtensor

__all__ = ["check_tau", "qk_clip_", "qk_clip_factors"]


def qk_clip_factors(max_logits: Tensor, tau: float) -> Tensor:
    """``gamma_h = min(1, tau / S_h)``: the factor each head's logits are multiplied by.

    Raises:
        ValueError: ``tau`` not a finite number > 0, or a NaN/inf in ``max_logits`` (a head whose
            logits overflowed cannot be rescaled meaningfully; filter it first).

    Example:
        >>> qk_clip_factors(torch.tensor([50.0, 200.0, -3.0]), tau=100.0)
        tensor([1.0000, 0.5000, 1.0000])
    """
    check_tau(tau)
    if not torch.isfinite(max_logits).all():
        raise ValueError(f"qk_clip_factors: max_logits must be finite, got {max_logits.tolist()}")
    s = max_logits.detach().float()
    return torch.where(s > tau, tau / s.clamp_min(tau), torch.ones_like(s))


def check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


@torch.no_grad()
def qk_clip_(rows: Sequence[QKScaling], max_logits: Tensor, tau: float) -> Tensor:
    """Scale the query/key slices of every head with ``S_h > tau`` in place (``gamma_h ** power``).

    Parameters that are ``DTensor`` sharded along ``dim`` (FSDP2's ``Shard(0)``, or replicated) are
    scaled shard by shard, without communication: the factor of a row does not depend on the other rows.

    Returns:
        ``(heads,)`` boolean: the heads that were clipped.

    Raises:
        ValueError: bad ``tau``, non-finite ``max_logits``, or a ``heads`` index out of range or of the
            wrong length (checked for every parameter before any is changed).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4, 2))  # rows: head 0 q, head 1 q, head 0 k, head 1 k
        >>> rows = [QKScaling(w, torch.tensor([0, 1, 0, 1]))]
        >>> qk_clip_(rows, torch.tensor([400.0, 10.0]), tau=100.0).tolist()
        [True, False]
        >>> w[:, 0].tolist()
        [0.5, 1.0, 0.5, 1.0]
    """
    gamma = qk_clip_factors(max_logits, tau)
    n_head = gamma.numel()
    for r in rows:
        size = r.param.shape[r.dim]
        if r.heads.shape != (size,) or (r.heads.numel() and (r.heads.max() >= n_head or r.heads.min() < -1)):
            raise ValueError(
                f"qk_clip_: heads must have one entry in [-1, {n_head}) per slice of dim {r.dim} ({size}), "
                f"got shape {tuple(r.heads.shape)}"
            )
    clipped = gamma < 1
    if not clipped.any():
        return clipped
    for r in rows:
        heads = r.heads.to(gamma.device)
        touched = heads >= 0
        if not clipped[heads[touched]].any():
            continue
        factor = torch.ones(heads.shape, device=gamma.device)
        factor[touched] = gamma[heads[touched]] ** r.power
        _scale_slices(r.param, factor, r.dim)
    return clipped


def _scale_slices(param: Tensor, factor: Tensor, dim: int) -> None:
    dim = dim % param.dim()
    shape = [1] * param.dim()
    shape[dim] = -1
    local, offset = param, 0
    if is_dtensor(param):  # DTensor: scale this rank's slices only
        local = param.to_local()
        if local.shape[dim] != param.shape[dim]:
            offset = _dim_offset(param, dim)
    factor = factor[offset : offset + local.shape[dim]].to(device=local.device, dtype=local.dtype)
    local.mul_(factor.view(shape))


def _dim_offset(param: Any, dim: int) -> int:
    """Global index of this rank's first slice along ``dim`` for a DTensor sharded on that dim only."""
    from torch.distributed.tensor.placement_types import Replicate, Shard

    sharded = [(i, p) for i, p in enumerate(param.placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or type(sharded[0][1]) is not Shard or sharded[0][1].dim != dim:
        raise ValueError(
            f"QK-clip: a DTensor sharded as {param.placements} cannot be clipped shard by shard; supported: "
            f"Shard({dim}) on one mesh dimension (FSDP2), other mesh dimensions Replicate"
        )
    mesh_dim = sharded[0][0]
    world, rank = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
    size = math.ceil(param.shape[dim] / world)
    return min(rank * size, param.shape[dim])
