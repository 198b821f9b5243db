"""Muon's orthogonalisation across processes: DDP work sharding and FSDP2 (DTensor) row shards.

Plain torch (no Lightning). :class:`lightning_muon.Muon` calls :func:`orthogonalize_buckets` once
per step with its same-shape buckets; this module decides where each matrix is orthogonalised:

* one process (or no process group): every matrix here, one batched call per bucket;
* DDP (``torch.distributed`` initialised, world size > 1, plain tensors): gradients are the same on
  every rank, so each matrix gets one owner rank (owners balanced by Newton–Schulz FLOPs, see
  :func:`assign_owners`), each rank orthogonalises what it owns, and one ``all_gather`` per bucket
  gives every rank every result. Momentum is computed everywhere, so optimizer state is complete
  on every rank (a rank-0 checkpoint is complete);
* DTensor params (FSDP2 ``Shard(0)``, tensor parallel ``Shard(0)``/``Shard(1)``/``Replicate()``,
  2-D FSDP2 x TP and HSDP meshes; uneven or empty shards allowed): momentum stays sharded; per
  bucket one ``all_to_all`` over the whole mesh moves each matrix's pieces to its owner (each
  matrix is assembled once, on one rank, owners balanced by FLOPs over all the mesh's ranks), the
  owner orthogonalises it, and one ``all_to_all`` sends every rank its piece back (see
  :mod:`lightning_muon.sharded`).

Example:
    >>> from lightning_muon.distributed import Bucket, orthogonalize_buckets
    >>> bucket = Bucket([torch.randn(8, 16)] * 3, (8, 16), "polar_express", 5, torch.bfloat16)
    >>> out = orthogonalize_buckets([bucket])
    >>> [tuple(o.shape) for o in out[0]]
    [(8, 16), (8, 16), (8, 16)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .newton_schulz import ns_flops, orthogonalize
from .sharded import check_placements, exchange, mesh_domain

__all__ = [
    "AUTO",
    "Bucket",
    "UNSUPPORTED_STRATEGY",
    "assign_owners",
    "all_finite",
    "check_dtensor_param",
    "check_not_flat_shard",
    "data_parallel_group",
    "local_grad",
    "local_tensor",
    "orthogonalize_buckets",
    "shard_rows",
]

#: ``process_group`` default: DDP's default group when ``torch.distributed`` runs with world size > 1.
AUTO = "auto"

#: The error text for strategies that hand the optimizer flat 1-D shards.
UNSUPPORTED_STRATEGY = (
    "Muon needs every weight matrix whole (DDP) or as a DTensor (FSDP2, tensor parallel), but {what}. "
    "This is what FSDPStrategy (FSDP1, FlatParameter) and DeepSpeed ZeRO do: they hand the "
    "optimizer flat 1-D shards that cut across matrices, so no polar factor can be computed. "
    "Supported strategies: 'ddp', 'ddp_spawn', a single device, and ModelParallelStrategy (FSDP2: "
    "fully_shard in configure_model). Under DeepSpeed use DeepSpeed's own Muon optimizer "
    '("optimizer": {{"type": "Muon"}} in the DeepSpeed config) instead of lightning_muon.Muon.'
)


@dataclass
class Bucket:
    """Same-shape Muon updates orthogonalised together.

    ``updates`` are local tensors whose global matrix shape is ``shape = (m, n)`` (trailing dims
    of conv kernels flattened): whole matrices when ``mesh`` is None, else this rank's pieces of
    DTensors on the DeviceMesh ``mesh``, all with the same ``layout = (global shape, placements)``
    (a 1-D mesh with ``layout`` None means ``Shard(0)``: FSDP2). ``method``, ``steps`` and
    ``dtype`` go to :func:`lightning_muon.orthogonalize`. ``view`` (DTensor buckets): the
    :class:`lightning_muon.structure.MatrixView` that turns each assembled global tensor into its
    ``(count, m, n)`` matrices on the owner; None flattens it to ``shape``.
    """

    updates: list[Tensor]
    shape: tuple[int, int]
    method: str
    steps: int
    dtype: torch.dtype
    mesh: Any = None
    layout: Any = None
    view: Any = None

    def count(self) -> int:
        """Matrices per update: more than 1 for a DTensor stack or split."""
        return 1 if self.view is None or self.layout is None else self.view.matrices(self.layout[0])[0]


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t


def local_grad(param: Tensor) -> Tensor:
    """This rank's part of ``param.grad`` in ``param``'s own layout: a DTensor gradient placed
    otherwise (e.g. ``Partial()``, a pending sum, under tensor parallelism) is redistributed first."""
    grad = param.grad
    if _is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local_tensor(grad)


def data_parallel_group() -> dist.ProcessGroup | None:
    """The default process group when ``torch.distributed`` runs with world size > 1, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def check_not_flat_shard(param: Tensor, where: str) -> None:
    """Raise ValueError if ``param`` is an FSDP1 flat parameter/view or a DeepSpeed ZeRO param."""
    if getattr(param, "_fsdp_flattened", False):
        raise ValueError(UNSUPPORTED_STRATEGY.format(what=f"{where} was flattened by FSDP1"))
    if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
        raise ValueError(UNSUPPORTED_STRATEGY.format(what=f"{where} is partitioned by DeepSpeed ZeRO"))


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank under ``Shard(0)`` (``torch.chunk`` rule: ceil-sized, trailing ranks may get 0).

    Example:
        >>> shard_rows(5, 4)
        [2, 2, 1, 0]
    """
    size = math.ceil(rows / world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def assign_owners(costs: list[int], world: int) -> list[int]:
    """Owner rank of each item, balancing the summed cost (greedy: largest first, least-loaded rank).

    Deterministic in ``costs`` alone, so every rank computes the same plan without communicating.

    Example:
        >>> assign_owners([4, 3, 3, 2], world=2)
        [0, 1, 1, 0]
    """
    load = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def _comm_dtype(bucket: Bucket, dtype: torch.dtype) -> torch.dtype:
    # Newton–Schulz casts a bf16 (or fp32, fp64) input to bucket.dtype first and returns values
    # representable in it, so sending in that dtype changes no result and halves bf16 traffic.
    # float16 is normalised before its cast (raw updates can overflow its range): send those as they are.
    return dtype if bucket.method == "svd" or bucket.dtype == torch.float16 else bucket.dtype


def _orthogonalize(bucket: Bucket, matrices: list[Tensor]) -> Tensor:
    return orthogonalize(_tame(torch.stack(matrices)), bucket.method, bucket.steps, dtype=bucket.dtype)


def _tame(X: Tensor) -> Tensor:
    """``X`` (a fresh stack, scaled in place): matrices with entries >= 2**32 divided by an exact
    power of two, the others multiplied by 1 (bit for bit unchanged).

    The polar factor is scale-invariant, but Newton–Schulz's Frobenius norm of a finite matrix
    with entries near 1e20 overflows float32 and would turn the update into zeros.
    """
    low, high = torch.aminmax(X.reshape(X.shape[0], -1), dim=1)
    _, exponent = torch.frexp(torch.maximum(high, -low).float())
    scale = torch.ldexp(torch.ones_like(exponent, dtype=X.dtype), torch.where(exponent > 32, -exponent, 0))
    return X.mul_(scale.view(-1, *([1] * (X.ndim - 1))))


def _by_owner(owners: list[int], world: int) -> list[list[int]]:
    """Bucket positions owned by each rank, in bucket order."""
    return [[i for i, o in enumerate(owners) if o == r] for r in range(world)]


def orthogonalize_buckets(buckets: list[Bucket], group: Any = AUTO) -> list[list[Tensor]]:
    """Orthogonalised updates of every bucket, as this rank needs them.

    Returns, per bucket and in its order, an ``(m, n)`` tensor for a plain update and this rank's
    ``(local_rows, n)`` rows for a DTensor update. ``group`` shares the plain (DDP) matrices:
    ``"auto"`` is :func:`data_parallel_group`, None means this process alone (no communication),
    a ProcessGroup its ranks. Every rank of the group must call it with the same buckets (as every
    optimizer step does). DTensor buckets use their own mesh.
    """
    sharded = _sharded_buckets([b for b in buckets if b.mesh is not None])
    costs = [ns_flops(*b.shape, b.steps) for b in buckets if b.mesh is None for _ in b.updates]
    if isinstance(group, str):
        group = data_parallel_group()
    elif group is not None and group.size() == 1:
        group = None
    owners = assign_owners(costs, group.size() if group is not None else 1)
    results, start = [], 0
    for bucket in buckets:
        if bucket.mesh is not None:
            results.append(next(sharded))
            continue
        own = owners[start : start + len(bucket.updates)]
        start += len(bucket.updates)
        if group is not None:
            results.append(_replicated_bucket(bucket, own, group))
        else:
            flat = [u.reshape(bucket.shape) for u in bucket.updates]
            results.append(list(_orthogonalize(bucket, flat)))
    return results


def _replicated_bucket(bucket: Bucket, owners: list[int], group: dist.ProcessGroup) -> list[Tensor]:
    """DDP: each rank orthogonalises its own matrices; one all_gather shares them."""
    world, rank = group.size(), group.rank()
    by_owner = _by_owner(owners, world)
    mine = by_owner[rank]
    slots = max(len(b) for b in by_owner)  # every rank sends `slots` matrices, zero-padded
    first = bucket.updates[0]
    dtype = _comm_dtype(bucket, first.dtype)
    send = torch.zeros(slots, *bucket.shape, dtype=dtype, device=first.device)
    if mine:
        send[: len(mine)] = _orthogonalize(bucket, [bucket.updates[i].reshape(bucket.shape) for i in mine])
    gathered = torch.empty(world * slots, *bucket.shape, dtype=dtype, device=first.device)
    dist.all_gather_into_tensor(gathered, send, group=group)
    out: list[Tensor] = [first] * len(owners)
    for r, positions in enumerate(by_owner):
        for j, i in enumerate(positions):
            out[i] = gathered[r * slots + j].to(first.dtype)
    return out


def _sharded_buckets(buckets: list[Bucket]) -> Any:
    """DTensor buckets: owners balanced by NS FLOPs over each mesh's ranks, then one
    :func:`lightning_muon.sharded.exchange` per bucket. Yields each bucket's local results."""
    domains = [mesh_domain(b.mesh).group for b in buckets]
    owners: list[list[int]] = [[] for _ in buckets]
    for group in dict.fromkeys(domains):  # one plan per process group (the whole mesh: WORLD)
        mine = [k for k, d in enumerate(domains) if d is group]
        costs = [
            ns_flops(*buckets[k].shape, buckets[k].steps) * buckets[k].count() for k in mine for _ in buckets[k].updates
        ]
        plan, start = assign_owners(costs, group.size()), 0
        for k in mine:
            owners[k] = plan[start : start + len(buckets[k].updates)]
            start += len(buckets[k].updates)
    for bucket, own in zip(buckets, owners):
        shape, placements = bucket.layout if bucket.layout is not None else (bucket.shape, _shard0(bucket.mesh))
        yield exchange(
            bucket.updates,
            shape,
            bucket.mesh,
            placements,
            own,
            _comm_dtype(bucket, bucket.updates[0].dtype),
            lambda full, b=bucket, s=shape: _orthogonalize_whole(b, full, s),
        )


def _orthogonalize_whole(bucket: Bucket, full: list[Tensor], shape: Any) -> Tensor:
    """Assembled global tensors of ``shape`` -> their orthogonalised matrices, stacked in ``shape``."""
    if bucket.view is None:
        return _orthogonalize(bucket, [t.reshape(bucket.shape) for t in full])
    matrices = bucket.view.to_matrices(torch.stack(full))
    return bucket.view.from_matrices(_orthogonalize(bucket, list(matrices)), tuple(shape))


def _shard0(mesh: Any) -> tuple:
    from torch.distributed.tensor import Shard

    return (Shard(0),) * mesh.ndim


def check_dtensor_param(param: Tensor, where: str) -> None:
    """Raise ValueError unless Muon can assemble a DTensor ``param``'s matrix: placements Shard,
    _StridedShard (FSDP2 over TP) or Replicate, on a mesh that spans every process or is 1-D."""
    if not _is_dtensor(param):
        return
    check_placements(param.placements, where)
    mesh_domain(param.device_mesh)


def all_finite(grads: list[Tensor]) -> bool:
    """True if every gradient is finite on every rank that holds a shard of it.

    Plain (DDP) gradients are identical on all ranks and need no communication; DTensor shards
    are checked locally and agreed on with one ``all_reduce`` over their mesh. Fast path (one
    host sync): fused 2-norms. A non-finite norm means a NaN/Inf entry or an overflowing sum of
    squares (finite entries near 1e19, or float16); only then are those tensors checked
    element-wise (a second sync), so huge finite gradients are not reported as non-finite.
    """
    if not grads:
        return True
    local = [local_tensor(g) for g in grads]
    nonempty = [g for g in local if g.numel()]
    # DTensor shards are agreed on over the processes their meshes span (in practice one: WORLD)
    groups = list(dict.fromkeys(mesh_domain(g.device_mesh).group for g in grads if _is_dtensor(g)))
    device = local[0].device

    def agreed(ok: Tensor) -> bool:
        ok = ok.to(torch.int32).reshape(1)
        for group in groups:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        return bool(ok.item())

    norms = torch._foreach_norm(nonempty) if nonempty else []
    none = torch.ones(0, dtype=torch.bool, device=device)
    finite = torch.stack([n.float() for n in norms]).isfinite() if norms else none
    if agreed(finite.all()):
        return True
    suspects = [g for g, f in zip(nonempty, finite.tolist()) if not f]
    exact = torch.stack([g.isfinite().all() for g in suspects]).all() if suspects else torch.ones((), device=device)
    return agreed(exact)
