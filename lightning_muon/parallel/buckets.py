"""Who orthogonalises which Muon matrix: same-shape buckets shared out over the processes.

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
  :mod:`lightning_muon.parallel.placement`).

Example:
    >>> from lightning_muon.parallel.buckets import Bucket, orthogonalize_buckets
    >>> bucket = Bucket([torch.randn(8, 16)] * 3, (8, 16), "polar_express", 5, torch.bfloat16)
    >>> out = orthogonalize_buckets([bucket])
    >>> [tuple(o.shape) for o in out[0]]
    [(8, 16), (8, 16), (8, 16)]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.newton_schulz import CUSTOM_METHODS, GRAM_METHODS, ns_flops, polar_stack
from ..routing.matrix_view import MatrixView
from .dtensor import is_dtensor
from .groups import AUTO, mesh_domain, process_group_of
from .placement import exchange

__all__ = ["Bucket", "BucketKey", "BucketPlan", "assign_owners", "orthogonalize_buckets"]


@dataclass
class Bucket:
    """Same-shape Muon updates orthogonalised together.

    ``updates`` are local tensors whose global matrix shape is ``shape = (m, n)`` (trailing dims
    of conv kernels flattened): whole matrices when ``mesh`` is None, else this rank's pieces of
    DTensors on the DeviceMesh ``mesh``, all with the same ``layout = (global shape, placements)``
    (a 1-D mesh with ``layout`` None means ``Shard(0)``: FSDP2). ``method``, ``steps`` and
    ``dtype`` go to :func:`lightning_muon.orthogonalize`. ``view`` (DTensor buckets): the
    :class:`lightning_muon.routing.MatrixView` that turns each assembled global tensor into its
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
    in_place: bool = False  # plain updates only: the results may overwrite them (nothing else reads them)

    def count(self) -> int:
        """Matrices per update: more than 1 for a DTensor stack or split."""
        return 1 if self.view is None or self.layout is None else self.view.matrices(self.layout[0])[0]


@dataclass(frozen=True)
class BucketKey:
    """What the updates of one bucket share.

    ``shape`` is each matrix's ``(m, n)``; ``device`` and ``dtype`` the updates'; ``method``,
    ``steps`` and ``ns_dtype`` the Newton–Schulz settings of their groups (``"auto"`` resolved when
    the bucket runs). Plain tensors leave the rest None: each of their matrices is one slot of the
    bucket. DTensor updates add their ``mesh``, ``layout = (global shape, placements)`` and matrix
    ``view``: the owner assembles the whole tensor and cuts it into matrices.
    """

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    method: str
    steps: int
    ns_dtype: str
    mesh: Any = None
    layout: tuple | None = None
    view: MatrixView | None = None


class BucketPlan:
    """One step's Muon directions, collected into buckets, orthogonalised, and handed back per parameter.

    :meth:`add` each parameter's direction (its local piece under FSDP2/TP) with its matrix view and
    Newton–Schulz settings; :meth:`run` orthogonalises every bucket once (shared over the ranks, see
    :func:`orthogonalize_buckets`) and returns, per added direction, its orthogonalised update in
    the direction's own shape.

    Example:
        >>> from lightning_muon.routing import MatrixView
        >>> plan = BucketPlan()
        >>> W = torch.randn(2, 8, 16)  # a stack of two 8 x 16 matrices
        >>> i = plan.add(W, MatrixView("stack"), "polar_express", 5, "float32")
        >>> j = plan.add(torch.randn(8, 16), MatrixView("matrix"), "polar_express", 5, "float32")
        >>> [(tuple(k.shape), len(slots)) for k, slots in plan.buckets.items()]  # one bucket, 3 matrices
        [((8, 16), 3)]
        >>> out = plan.run(lambda key: getattr(torch, key.ns_dtype))
        >>> tuple(out[i].shape), tuple(out[j].shape)
        ((2, 8, 16), (8, 16))
    """

    def __init__(self) -> None:
        #: key -> [(entry, slot)]: slot j of a plain entry is its j-th matrix
        self.buckets: dict[BucketKey, list[tuple[int, int]]] = defaultdict(list)
        self._entries: list[tuple[Tensor, tuple[int, ...], MatrixView, Tensor | None]] = []
        self._scratch: list[bool] = []

    def add(
        self,
        direction: Tensor,
        view: MatrixView,
        method: str,
        steps: int,
        ns_dtype: str,
        param: Tensor | None = None,
        scratch: bool = False,
    ) -> int:
        """Add one direction; returns its index in :meth:`run`'s result.

        ``param``: the DTensor parameter whose local piece ``direction`` is (its global shape and
        placements key the bucket); None for a whole tensor. ``scratch``: nothing reads
        ``direction`` after :meth:`run`, so its update may be written into it (no new tensor).
        """
        entry = len(self._entries)
        self._scratch.append(scratch)
        if param is None or not is_dtensor(param):
            matrices = view.to_matrices(direction.unsqueeze(0))
            self._entries.append((matrices, tuple(direction.shape), view, None))
            key = BucketKey(tuple(matrices.shape[1:]), direction.device, direction.dtype, method, steps, ns_dtype)
            self.buckets[key].extend((entry, j) for j in range(matrices.shape[0]))
        else:
            self._entries.append((direction, tuple(direction.shape), view, param))
            shape = tuple(param.shape)
            layout = (shape, tuple(param.placements))
            key = BucketKey(
                view.matrices(shape)[1:],
                direction.device,
                direction.dtype,
                method,
                steps,
                ns_dtype,
                param.device_mesh,
                layout,
                view,
            )
            self.buckets[key].append((entry, 0))
        return entry

    def run(self, compute_dtype: Callable[[BucketKey], torch.dtype], group: Any = AUTO) -> list[Tensor]:
        """Orthogonalise every bucket (``compute_dtype(key)``: its Newton–Schulz dtype); per entry, its update."""
        plan = [
            Bucket(
                [self._entries[e][0] if key.mesh is not None else self._entries[e][0][j] for e, j in slots],
                key.shape,
                key.method,
                key.steps,
                compute_dtype(key),
                key.mesh,
                key.layout,
                key.view,
                in_place=all(self._scratch[e] for e, _ in slots),
            )
            for key, slots in self.buckets.items()
        ]
        pieces: list[list[Any]] = [[None] * (1 if param is not None else len(m)) for m, _, _, param in self._entries]
        for slots, results in zip(self.buckets.values(), orthogonalize_buckets(plan, group)):
            for (e, j), result in zip(slots, results):
                pieces[e][j] = result
        out = []
        for (_, shape, view, param), got in zip(self._entries, pieces):
            if param is not None:
                out.append(got[0].reshape(shape))
            else:  # a plain matrix's one result is used as it is (a view), a stack's are stacked again
                matrices = got[0].unsqueeze(0) if len(got) == 1 else torch.stack(got)
                out.append(view.from_matrices(matrices, shape)[0])
        return out


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
    # A registered method's output is only known to have the update's dtype: send in that.
    if bucket.method in CUSTOM_METHODS:
        return dtype
    # Newton–Schulz casts a bf16 (or fp32, fp64) input to bucket.dtype first and returns values
    # representable in it, so sending in that dtype changes no result and halves bf16 traffic.
    # float16 is normalised before its cast (raw updates can overflow its range): send those as they are,
    # and so for Gram NS, which iterates in float16 when asked for bfloat16.
    if bucket.method == "svd" or bucket.dtype == torch.float16 or bucket.method in GRAM_METHODS:
        return dtype
    return bucket.dtype


def _orthogonalize(bucket: Bucket, matrices: list[Tensor], out: list[Tensor] | None = None) -> Sequence[Tensor]:
    """The bucket's matrices orthogonalised: a new ``(len(matrices), m, n)`` tensor, or written into ``out``.

    Newton–Schulz reads the matrices where they are (:func:`lightning_muon.optim.newton_schulz.polar_stack`:
    no stacked copy) and takes any finite scale; ``"svd"`` and registered methods get a stack with
    huge entries tamed first (:func:`_tame`).
    """
    if bucket.method == "svd" or bucket.method in CUSTOM_METHODS:
        matrices = _tame(torch.stack(matrices))
    return polar_stack(matrices, bucket.method, bucket.steps, dtype=bucket.dtype, out=out)


def _tame(X: Tensor) -> Tensor:
    """``X`` (a fresh stack, scaled in place): matrices with entries >= 2**32 divided by an exact
    power of two, the others multiplied by 1 (bit for bit unchanged).

    The polar factor is scale-invariant, but a registered method gets its input unnormalised, and
    a Frobenius norm of a finite float32 matrix with entries near 1e20 overflows.
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
    group = process_group_of(group)
    if group is not None and group.size() == 1:
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
            results.append(list(_orthogonalize(bucket, flat, out=flat if bucket.in_place else None)))
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
    :func:`lightning_muon.parallel.placement.exchange` per bucket. Yields each bucket's local results."""
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
