"""Which processes share Muon's work: the data-parallel group, a DTensor mesh's ranks, agreed checks.

Plain torch (no Lightning). :func:`data_parallel_group` and :func:`process_group_of` name the
ranks that share plain (DDP) matrices, :func:`mesh_domain` the ranks a DeviceMesh spreads a
DTensor over, and :func:`all_finite` agrees over them on whether a step's gradients are finite.

Example:
    >>> from lightning_muon.parallel.groups import process_group_of
    >>> process_group_of(None) is None
    True
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dtensor import is_dtensor, local

__all__ = ["AUTO", "MeshDomain", "all_finite", "data_parallel_group", "mesh_domain", "process_group_of", "rank"]


#: ``process_group`` default: DDP's default group when ``torch.distributed`` runs with world size > 1.
AUTO = "auto"


def data_parallel_group() -> dist.ProcessGroup | None:
    """The default process group when ``torch.distributed`` runs with world size > 1, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def process_group_of(setting: Any) -> dist.ProcessGroup | None:
    """The process group a ``process_group`` setting names: ``"auto"`` is :func:`data_parallel_group`,
    None this process alone, a ProcessGroup itself.

    Example:
        >>> process_group_of(None) is None
        True
    """
    return data_parallel_group() if isinstance(setting, str) else setting


def rank() -> int:
    """This process's global rank: from ``torch.distributed`` when initialised, else ``$RANK`` (0 if unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class MeshDomain:
    """The ranks a DTensor's matrices are spread over, in the process group that connects them.

    ``coordinates[g]`` is group rank ``g``'s coordinate on the DTensor's own mesh; ``primary[g]``
    is False for a copy along a root-mesh dim that the DTensor's mesh does not use (such a copy
    holds the same data as the primary one; only the primary sends).
    """

    group: Any
    coordinates: tuple[tuple[int, ...], ...]
    primary: tuple[bool, ...]


_DOMAINS: dict[tuple[int, int], tuple[Any, Any, MeshDomain]] = {}  # (mesh, WORLD, domain) by id


def mesh_domain(mesh: Any) -> MeshDomain:
    """The :class:`MeshDomain` of ``mesh``: all processes (``WORLD``) when ``mesh`` or the root mesh
    it was sliced from (by dim names) spans every process, else the 1-D mesh's own group.

    Raises ValueError for a mesh of more than one dim that spans only some processes.
    """
    key = (id(mesh), id(dist.group.WORLD))
    cached = _DOMAINS.get(key)
    if cached is not None and cached[0] is mesh and cached[1] is dist.group.WORLD:
        return cached[2]
    get_root = getattr(mesh, "_get_root_mesh", None)
    root = get_root() if get_root is not None else mesh
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if root is mesh or root == mesh:
        dims: list[int] | None = list(range(mesh.ndim))
    elif names and root_names and set(names) <= set(root_names):
        dims = [root_names.index(n) for n in names]
    else:
        dims = None
    world = dist.get_world_size()
    if dims is not None and root.mesh.numel() == world:
        coordinates: list[tuple[int, ...]] = [()] * world
        primary = [False] * world
        for idx in itertools.product(*(range(s) for s in root.mesh.shape)):
            r = int(root.mesh[idx])
            coordinates[r] = tuple(idx[d] for d in dims)
            primary[r] = all(idx[d] == 0 for d in range(root.ndim) if d not in dims)
        domain = MeshDomain(dist.group.WORLD, tuple(coordinates), tuple(primary))
    elif mesh.ndim == 1:
        group = mesh.get_group()
        ranks = mesh.mesh.tolist()
        coords = tuple((ranks.index(dist.get_global_rank(group, g)),) for g in range(group.size()))
        domain = MeshDomain(group, coords, (True,) * group.size())
    else:
        raise ValueError(
            f"Muon: a {mesh.ndim}-D DeviceMesh {tuple(mesh.mesh_dim_names or ())} over {mesh.mesh.numel()} of "
            f"{world} processes: Muon assembles matrices over all processes and needs a multi-dim mesh to "
            "span every process (pipeline parallelism is not supported)."
        )
    _DOMAINS[key] = (mesh, dist.group.WORLD, domain)
    return domain


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
    pieces = [local(g) for g in grads]
    nonempty = [g for g in pieces if g.numel()]
    # DTensor shards are agreed on over the processes their meshes span (in practice one: WORLD)
    groups = list(dict.fromkeys(mesh_domain(g.device_mesh).group for g in grads if is_dtensor(g)))
    device = pieces[0].device

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
