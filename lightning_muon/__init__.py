"""Muon for PyTorch Lightning: one hybrid Muon/AdamW optimizer, a factory, and diagnostics.

Example:
    >>> import lightning as L
    >>> from lightning_muon import configure_muon
    >>> class Lit(L.LightningModule):
    ...     def configure_optimizers(self):
    ...         return configure_muon(self, lr=0.02, adjust_lr="original", adamw_lr=3e-4)
"""

from .factory import SCHEDULES, configure_muon, lr_lambda
from .functional import ADJUST_LR, adjusted_lr, apply_muon_update, matrix_shape, matrix_view, muon_direction
from .newton_schulz import METHODS, NS_PRESETS, NSPreset, ns_flops, orthogonalize, singular_value_band
from .optimizer import Muon, NonFiniteGradientError
from .per_example import PerExampleNorms, linear_grad_norms, norm_grad_norms, per_example_noise_scale
from .precision import NS_DTYPES, NSDtypeChoice, describe_device, ns_dtype_choice, resolve_ns_dtype
from .routing import (
    DEFAULT_EMBEDDING_NAMES,
    DEFAULT_HEAD_NAMES,
    DEFAULT_QKV_NAMES,
    SPLIT_QKV,
    Route,
    matching_pattern,
    muon_param_groups,
    route_named_parameters,
    route_parameters,
    routing_table,
    why_not_muon,
)
from .spectral import (
    CriticalBatch,
    NoiseScale,
    effective_rank,
    muon_critical_batch_size,
    noise_scale,
    polar_misalignment,
    polar_sensitivity,
    sin_theta,
    singular_values,
    spectral_entropy,
    stable_rank,
    top_frames,
    top_singular_value,
)
from .structure import MATRIX_RULES, MatrixView, matrix_view_for

__version__ = "0.1.0"

__all__ = [
    "ADJUST_LR",
    "DEFAULT_EMBEDDING_NAMES",
    "DEFAULT_HEAD_NAMES",
    "MATRIX_RULES",
    "MatrixView",
    "matrix_view_for",
    "DEFAULT_QKV_NAMES",
    "SPLIT_QKV",
    "METHODS",
    "NS_PRESETS",
    "SCHEDULES",
    "adjusted_lr",
    "apply_muon_update",
    "configure_muon",
    "CriticalBatch",
    "describe_device",
    "effective_rank",
    "linear_grad_norms",
    "lr_lambda",
    "matching_pattern",
    "matrix_shape",
    "matrix_view",
    "Muon",
    "muon_critical_batch_size",
    "muon_direction",
    "muon_param_groups",
    "noise_scale",
    "norm_grad_norms",
    "NoiseScale",
    "NS_DTYPES",
    "ns_dtype_choice",
    "NSDtypeChoice",
    "NonFiniteGradientError",
    "ns_flops",
    "per_example_noise_scale",
    "PerExampleNorms",
    "NSPreset",
    "orthogonalize",
    "polar_misalignment",
    "polar_sensitivity",
    "resolve_ns_dtype",
    "Route",
    "route_named_parameters",
    "route_parameters",
    "routing_table",
    "sin_theta",
    "singular_value_band",
    "singular_values",
    "spectral_entropy",
    "stable_rank",
    "top_frames",
    "top_singular_value",
    "why_not_muon",
]
