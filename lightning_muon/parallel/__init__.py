"""Muon under data and model parallelism: who orthogonalises which matrix, and how its pieces travel.

Plain torch (no Lightning):

* :mod:`.dtensor`: a DTensor (FSDP2, tensor parallel) told from a plain tensor; its local piece,
  its whole; flat shards (FSDP1, DeepSpeed ZeRO) refused;
* :mod:`.groups`: the ranks that share plain (DDP) matrices, the ranks of a DTensor's mesh, and
  the finite-gradient check agreed over them;
* :mod:`.placement`: where each rank's piece of a DTensor lies, and the all-to-all exchange that
  assembles a matrix on its owner and returns the result;
* :mod:`.buckets`: same-shape buckets, owners balanced by Newton–Schulz FLOPs, one collective per
  bucket.
"""

from .buckets import Bucket, BucketKey, BucketPlan, assign_owners, orthogonalize_buckets
from .dtensor import UNSUPPORTED_STRATEGY, check_not_flat_shard, full, is_dtensor, local, local_grad
from .groups import AUTO, MeshDomain, all_finite, data_parallel_group, mesh_domain, process_group_of, rank
from .placement import chunk_indices, exchange, global_index, sum_rows_over_mesh

__all__ = [
    "AUTO",
    "Bucket",
    "BucketKey",
    "BucketPlan",
    "MeshDomain",
    "UNSUPPORTED_STRATEGY",
    "all_finite",
    "assign_owners",
    "check_not_flat_shard",
    "chunk_indices",
    "data_parallel_group",
    "exchange",
    "full",
    "global_index",
    "is_dtensor",
    "local",
    "local_grad",
    "mesh_domain",
    "orthogonalize_buckets",
    "process_group_of",
    "rank",
    "sum_rows_over_mesh",
]
