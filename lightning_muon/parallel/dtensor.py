"""DTensor helpers: one place that tells a sharded tensor from a plain one.

Plain torch (no Lightning). :func:`is_dtensor` tells a DTensor (an FSDP2 or tensor-parallel
parameter, its gradient or optimizer state) from a plain tensor; :func:`local` is this rank's
shard and :func:`full` the gathered tensor. Strategies that hand the optimizer flat 1-D shards are
refused by :func:`check_not_flat_shard`. Which ranks share what: :mod:`.groups`; where a DTensor's
pieces lie and how they travel: :mod:`.placement`; who orthogonalises which matrix: :mod:`.buckets`.

Example:
    >>> import torch
    >>> from lightning_muon.parallel.dtensor import full, is_dtensor, local
    >>> x = torch.ones(2, 3)
    >>> is_dtensor(x), local(x) is x, full(x) is x
    (False, True, True)
"""

from __future__ import annotations

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None

__all__ = ["UNSUPPORTED_STRATEGY", "check_not_flat_shard", "full", "is_dtensor", "local", "local_grad"]


#: The error text for strategies that hand the optimizer flat 1-D shards.
UNSUPPORTED_STRATEGY = (
    "Muon needs every weight matrix whole (DDP) or as a DTensor (FSDP2, tensor parallel), but {what}. "
    "This is what FSDPStrategy (FSDP1, FlatParameter) and DeepSpeed ZeRO do: they hand the "
    "optimizer flat 1-D shards that cut across matrices, so no polar factor can be computed. "
    "Supported strategies: 'ddp', 'ddp_spawn', a single device, and ModelParallelStrategy (FSDP2: "
    "fully_shard in configure_model). Under DeepSpeed use DeepSpeed's own Muon optimizer "
    '("optimizer": {{"type": "Muon"}} in the DeepSpeed config) instead of lightning_muon.Muon.'
)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 or tensor-parallel parameter, its gradient or state).

    Example:
        >>> import torch
        >>> is_dtensor(torch.zeros(2))
        False
    """
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise.

    Example:
        >>> import torch
        >>> x = torch.zeros(2)
        >>> local(x) is x
        True
    """
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is gathered (a collective: call it on every rank), ``t`` otherwise.

    Example:
        >>> import torch
        >>> x = torch.zeros(2)
        >>> full(x) is x
        True
    """
    return t.full_tensor() if is_dtensor(t) else t


def local_grad(param: Tensor) -> Tensor:
    """This rank's part of ``param.grad`` in ``param``'s own layout: a DTensor gradient placed
    otherwise (e.g. ``Partial()``, a pending sum, under tensor parallelism) is redistributed first."""
    grad = param.grad
    if is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local(grad)


def check_not_flat_shard(param: Tensor, where: str) -> None:
    """Raise ValueError if ``param`` is an FSDP1 flat parameter/view or a DeepSpeed ZeRO param."""
    if getattr(param, "_fsdp_flattened", False):
        raise ValueError(UNSUPPORTED_STRATEGY.format(what=f"{where} was flattened by FSDP1"))
    if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
        raise ValueError(UNSUPPORTED_STRATEGY.format(what=f"{where} is partitioned by DeepSpeed ZeRO"))
