"""DTensor parameters in Muon: where each rank's piece of a matrix lies, and how a whole matrix
reaches one owner rank and its polar factor comes back.

Plain torch (no Lightning). Covers the layouts Lightning's ``ModelParallelStrategy`` builds and
HSDP: FSDP2 (``Shard(0)`` over the data-parallel ranks), tensor parallelism (``Shard(0)``
column-wise, ``Shard(1)`` row-wise, ``Replicate()``), both at once on a 2-D mesh (FSDP2 marks its
dimension ``_StridedShard`` when it shards a dim that tensor parallelism already split), and
``Replicate() x Shard(0)`` (HSDP). Every rank's piece of a matrix is a Cartesian product of global
indices per tensor dim (:func:`chunk_indices`), computed from the mesh shape, the rank's mesh
coordinate and the placements alone, so every rank knows every other rank's layout without
communicating. :func:`exchange` then moves each shape bucket with one ``all_to_all`` to the owners
and one back, over the whole mesh's ranks (:func:`lightning_muon.parallel.groups.mesh_domain`). On a
``Replicate()`` dim (and on root-mesh dims the parameter's mesh does not use) one copy sends and
every copy receives.

Example:
    >>> from torch.distributed.tensor import Replicate, Shard
    >>> [i.tolist() for i in chunk_indices((5, 4), (2, 2), (1, 0), [Shard(0), Shard(1)])]
    [[3, 4], [0, 1]]
    >>> [i.tolist() for i in chunk_indices((4, 2), (2,), (1,), [Replicate()])]
    [[0, 1, 2, 3], [0, 1]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dtensor import is_dtensor
from .groups import MeshDomain, mesh_domain

__all__ = [
    "check_dtensor_param",
    "check_placements",
    "chunk_indices",
    "exchange",
    "global_index",
    "shard_rows",
    "sum_rows_over_mesh",
]


def _kind(placement: Any) -> str:
    """``"strided"`` (FSDP2 over TP), ``"shard"``, ``"replicate"`` or ``"other"`` (e.g. Partial)."""
    if hasattr(placement, "split_factor") and hasattr(placement, "dim"):
        return "strided"
    if getattr(placement, "is_shard", lambda: False)():
        return "shard"
    if getattr(placement, "is_replicate", lambda: False)():
        return "replicate"
    return "other"


def _chunk(index: Tensor, parts: int, part: int) -> Tensor:
    """Piece ``part`` of ``index`` split in ``parts`` (torch.chunk rule: ceil-sized, trailing may be empty)."""
    size = math.ceil(len(index) / parts) if len(index) else 0
    return index[part * size : (part + 1) * size]


def chunk_indices(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any]
) -> list[Tensor]:
    """Global indices, per tensor dim, of the piece held at ``coordinate`` of a mesh of ``mesh_shape``.

    ``placements`` are DTensor placements, applied left to right as DTensor does: ``Shard(d)``
    takes the rank's ``torch.chunk`` piece of dim ``d``; ``_StridedShard(d, split_factor=f)`` cuts
    dim ``d`` in ``f`` pieces, takes the rank's chunk of each and concatenates them; ``Replicate()``
    keeps everything. The piece is the Cartesian product of the returned index lists.

    Example:
        >>> from torch.distributed.tensor import Shard
        >>> [i.tolist() for i in chunk_indices((6, 2), (3,), (2,), [Shard(0)])]
        [[4, 5], [0, 1]]
    """
    index = [torch.arange(s) for s in shape]
    for size, c, placement in zip(mesh_shape, coordinate, placements):
        kind = _kind(placement)
        if kind == "shard":
            index[placement.dim] = _chunk(index[placement.dim], size, c)
        elif kind == "strided":
            f = int(placement.split_factor)
            pieces = [_chunk(index[placement.dim], f, j) for j in range(f)]
            index[placement.dim] = torch.cat([_chunk(p, size, c) for p in pieces])
        elif kind != "replicate":
            raise ValueError(f"placement {placement} is neither Shard nor Replicate")
    return index


def check_placements(placements: Sequence[Any], where: str) -> None:
    """Raise ValueError for a placement Muon cannot assemble (``Partial``, custom placements)."""
    bad = [p for p in placements if _kind(p) == "other"]
    if bad:
        raise ValueError(
            f"Muon: {where} is a DTensor with placements {tuple(placements)}; Muon supports Shard(d), "
            f"Replicate() and FSDP2's _StridedShard, not {bad[0]} (a pending reduction cannot be "
            "orthogonalised; redistribute it to Shard or Replicate first)."
        )


def check_dtensor_param(param: Tensor, where: str) -> None:
    """Raise ValueError unless Muon can assemble a DTensor ``param``'s matrix: placements Shard,
    _StridedShard (FSDP2 over TP) or Replicate, on a mesh that spans every process or is 1-D."""
    if not is_dtensor(param):
        return
    check_placements(param.placements, where)
    mesh_domain(param.device_mesh)


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank under ``Shard(0)`` (``torch.chunk`` rule: ceil-sized, trailing ranks may get 0).

    Example:
        >>> shard_rows(5, 4)
        [2, 2, 1, 0]
    """
    size = math.ceil(rows / world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _index(index: list[Tensor]) -> tuple:
    """Indexing a batch of full tensors at one rank's piece: slices where contiguous, else index lists."""
    contiguous = all(len(i) == 0 or int(i[-1]) - int(i[0]) + 1 == len(i) for i in index)
    if contiguous:
        return (slice(None), *(slice(int(i[0]), int(i[0]) + len(i)) if len(i) else slice(0, 0) for i in index))
    n = len(index)
    return (slice(None), *(i.view([-1 if k == d else 1 for k in range(n)]) for d, i in enumerate(index)))


def exchange(
    updates: list[Tensor],
    shape: Sequence[int],
    mesh: Any,
    placements: Sequence[Any],
    owners: list[int],
    dtype: torch.dtype,
    orthogonalize: Callable[[list[Tensor]], Tensor],
) -> list[Tensor]:
    """Orthogonalise same-layout DTensor updates: each on its owner (a rank of ``mesh_domain(mesh)``'s
    group), with one ``all_to_all`` that brings every piece to the owner and one that returns them.

    ``updates`` are this rank's local pieces of global tensors of ``shape``; ``orthogonalize`` maps
    a list of whole ``shape`` tensors to their stacked results (flattening as it needs). Returns
    this rank's piece of each result, in ``updates``' order. Data travel in ``dtype``.
    """
    domain = mesh_domain(mesh)
    group = domain.group
    world, me = group.size(), group.rank()
    pieces = [chunk_indices(shape, mesh.shape, c, placements) for c in domain.coordinates]
    sizes = [math.prod(len(i) for i in p) for p in pieces]
    replicated = [d for d, p in enumerate(placements) if _kind(p) == "replicate"]
    sender = [domain.primary[g] and all(domain.coordinates[g][d] == 0 for d in replicated) for g in range(world)]
    by_owner = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    mine = by_owner[me]
    local = [u.reshape(-1) for u in updates]
    if any(t.numel() != sizes[me] for t in local):
        raise ValueError(
            f"Muon: a DTensor's local piece has {local[0].numel()} elements but its placements "
            f"{tuple(placements)} on mesh {tuple(mesh.shape)} give {sizes[me]}"
        )
    like = local[0]

    # 1) the sending copy of each piece to the owner of its matrix
    out_splits = [len(by_owner[r]) * sizes[me] if sender[me] else 0 for r in range(world)]
    send = [local[i].to(dtype) for r in range(world) for i in by_owner[r]] if sender[me] else []
    send_t = torch.cat(send) if send else like.new_empty(0, dtype=dtype)
    in_splits = [len(mine) * sizes[s] if sender[s] else 0 for s in range(world)]
    recv = like.new_empty(sum(in_splits), dtype=dtype)
    dist.all_to_all_single(recv, send_t, output_split_sizes=in_splits, input_split_sizes=out_splits, group=group)
    full = like.new_zeros(len(mine), *shape, dtype=dtype)
    for s, part in enumerate(recv.split(in_splits)):
        if in_splits[s]:
            full[_index(pieces[s])] = part.view(len(mine), *(len(i) for i in pieces[s]))
    ortho = orthogonalize(list(full)).to(dtype).view(len(mine), *shape) if mine else full

    # 2) every rank (every copy) its piece of each result
    back = [ortho[_index(pieces[r])].reshape(-1) for r in range(world)]
    send_back = torch.cat(back) if back else ortho.reshape(-1)
    back_in = [len(by_owner[s]) * sizes[me] for s in range(world)]
    recv_back = like.new_empty(sum(back_in), dtype=dtype)
    dist.all_to_all_single(
        recv_back,
        send_back,
        output_split_sizes=back_in,
        input_split_sizes=[len(mine) * sizes[r] for r in range(world)],
        group=group,
    )
    out: list[Tensor] = list(updates)
    for s, part in enumerate(recv_back.split(back_in)):
        for j, i in enumerate(by_owner[s]):
            out[i] = part.view(len(by_owner[s]), sizes[me])[j].to(like.dtype)
    return out


def _sends(domain: MeshDomain, placements: Sequence[Any], g: int) -> bool:
    """Whether group rank ``g`` holds the copy of its piece that counts (one per piece, as in :func:`exchange`)."""
    replicated = [d for d, p in enumerate(placements) if _kind(p) == "replicate"]
    return domain.primary[g] and all(domain.coordinates[g][d] == 0 for d in replicated)


def global_index(t: Tensor) -> Tensor:
    """Row-major index in the whole tensor of each element of this rank's piece (int64, local shape).

    For a plain tensor ``arange(numel)``; for a DTensor the Cartesian product of its
    :func:`chunk_indices`, so the same element has the same index on every rank and world size.

    Example:
        >>> global_index(torch.zeros(2, 3))
        tensor([[0, 1, 2],
                [3, 4, 5]])
    """
    if not is_dtensor(t):
        return torch.arange(t.numel(), device=t.device).view(t.shape)
    mesh = t.device_mesh
    index = chunk_indices(t.shape, mesh.shape, mesh.get_coordinate(), t.placements)
    strides = [math.prod(t.shape[d + 1 :]) for d in range(t.ndim)]
    flat = torch.zeros((), dtype=torch.int64)
    for d, (i, stride) in enumerate(zip(index, strides)):
        flat = flat + (i * stride).view([-1 if k == d else 1 for k in range(t.ndim)])
    return flat.expand(tuple(len(i) for i in index)).to(t.to_local().device)


def sum_rows_over_mesh(pieces: list[tuple[Tensor, Tensor, int | Callable[[Tensor], Tensor]]]) -> list[Tensor]:
    """Rows' sums of squares of whole matrices whose pieces are spread over DTensor meshes.

    ``pieces``: (DTensor parameter ``p``, this rank's piece of a tensor of ``p``'s shape, e.g. its
    orthogonalised update, ``columns`` of ``p``'s matrix view). The view's rows are row-major
    runs of ``columns`` elements (element ``k`` of the whole tensor lies in row ``k // columns``);
    instead of ``columns``, a function from elements' indices to their rows (a matrix view's
    ``row_of``, e.g. for a weight stored transposed, whose rows are the stored columns; the last
    element must lie in the last row).
    Each rank adds its elements' squares into their rows (a replicated copy adds nothing), then
    one ``all_reduce`` per process group sums them: every rank gets every row's total (float32
    or wider, ``numel // columns`` of them).
    """
    out: list[Tensor] = []
    by_group: dict[Any, list[int]] = {}
    for k, (p, piece, cols) in enumerate(pieces):
        domain = mesh_domain(p.device_mesh)
        wide = torch.promote_types(piece.dtype, torch.float32)
        row_of = cols if callable(cols) else (lambda index, c=cols: index // c)
        n_rows = p.numel() // cols if not callable(cols) else int(row_of(torch.tensor([p.numel() - 1]))) + 1
        total = torch.zeros(n_rows, dtype=wide, device=piece.device)
        if _sends(domain, p.placements, domain.group.rank()) and piece.numel():
            total.index_add_(0, row_of(global_index(p)).reshape(-1), piece.reshape(-1).to(wide).square())
        out.append(total)
        by_group.setdefault(domain.group, []).append(k)
    for group, ks in by_group.items():
        flat = torch.cat([out[k] for k in ks])
        dist.all_reduce(flat, group=group)
        for k, part in zip(ks, flat.split([out[k].numel() for k in ks])):
            out[k] = part
    return out
