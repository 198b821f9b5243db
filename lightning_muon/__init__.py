"""Muon for PyTorch Lightning: one hybrid Muon/AdamW optimizer, a factory, and diagnostics.

Example:
    >>> import lightning as L
    >>> from lightning_muon import configure_muon
    >>> class Lit(L.LightningModule):
    ...     def configure_optimizers(self):
    ...         return configure_muon(self, lr=0.02, adjust_lr="original", adamw_lr=3e-4)
"""

from . import _deprecated
from .configure import SCHEDULES, configure_muon, lr_lambda, muon_optimizer
from .diagnostics.attention import (
    MultiheadAttentionQK,
    QKAttention,
    QKObserver,
    QKScaling,
    attention_logit_max,
    find_qk_attention,
    fused_qkv_project,
    fused_qkv_rows,
    qk_attention,
)
from .diagnostics.critical_batch import (
    CRITICAL_BATCH_METHODS,
    CriticalBatch,
    NoiseScale,
    momentum_noise_factor,
    muon_critical_batch_size,
    noise_scale,
    polar_deficits,
    polar_perturbation,
    polar_sensitivity,
)
from .diagnostics.per_example import (
    PerExampleNorms,
    conv_grad_norms,
    embedding_grad_norms,
    linear_grad_norms,
    norm_grad_norms,
    per_example_noise_scale,
)
from .diagnostics.spectral import (
    delta_p,
    delta_p_chance,
    effective_rank,
    frames_sin_theta,
    polar_misalignment,
    sin_theta,
    sin_theta_chance,
    singular_values,
    spectral_entropy,
    spectrum_entropy,
    stable_rank,
    top_frames,
    top_singular_value,
)
from .optim.functional import ADJUST_LR, adjusted_lr, apply_muon_update, muon_direction
from .optim.muon import Muon, NonFiniteGradientError
from .optim.newton_schulz import (
    GRAM_METHODS,
    METHODS,
    NS_PRESETS,
    GramVariant,
    NSPreset,
    ns_flops,
    orthogonalize,
    register_ns_method,
    singular_value_band,
)
from .optim.ns_dtype import NS_DTYPES, NSDtypeChoice, describe_device, ns_dtype_choice, resolve_ns_dtype
from .optim.qk_clip import qk_clip_, qk_clip_factors
from .optim.stochastic_rounding import MOMENTUM_DTYPES, stochastic_round
from .optim.variants import VARIANTS, Variant, VariantItem, register_variant
from .optim.variants.normuon import NorMuon, normuon_normalize
from .routing import (
    DEFAULT_EMBEDDING_NAMES,
    DEFAULT_HEAD_NAMES,
    DEFAULT_QKV_NAMES,
    MATRIX_RULES,
    SPLIT_QKV,
    MatrixView,
    Route,
    RoutingRules,
    matching_pattern,
    matrix_shape,
    matrix_view,
    matrix_view_for,
    muon_param_groups,
    route_named_parameters,
    route_parameters,
    routing_table,
    why_not_muon,
)

_deprecated.install()

__version__ = "0.1.0"

__all__ = [
    "ADJUST_LR",
    "adjusted_lr",
    "apply_muon_update",
    "attention_logit_max",
    "configure_muon",
    "conv_grad_norms",
    "CRITICAL_BATCH_METHODS",
    "CriticalBatch",
    "DEFAULT_EMBEDDING_NAMES",
    "DEFAULT_HEAD_NAMES",
    "DEFAULT_QKV_NAMES",
    "delta_p",
    "delta_p_chance",
    "describe_device",
    "effective_rank",
    "embedding_grad_norms",
    "find_qk_attention",
    "frames_sin_theta",
    "fused_qkv_project",
    "fused_qkv_rows",
    "GRAM_METHODS",
    "GramVariant",
    "linear_grad_norms",
    "lr_lambda",
    "matching_pattern",
    "MATRIX_RULES",
    "matrix_shape",
    "matrix_view",
    "matrix_view_for",
    "MatrixView",
    "METHODS",
    "MOMENTUM_DTYPES",
    "momentum_noise_factor",
    "MultiheadAttentionQK",
    "Muon",
    "muon_critical_batch_size",
    "muon_direction",
    "muon_optimizer",
    "muon_param_groups",
    "noise_scale",
    "NoiseScale",
    "NonFiniteGradientError",
    "norm_grad_norms",
    "NorMuon",
    "normuon_normalize",
    "ns_dtype_choice",
    "NS_DTYPES",
    "ns_flops",
    "NS_PRESETS",
    "NSDtypeChoice",
    "NSPreset",
    "orthogonalize",
    "per_example_noise_scale",
    "PerExampleNorms",
    "polar_deficits",
    "polar_misalignment",
    "polar_perturbation",
    "polar_sensitivity",
    "qk_attention",
    "qk_clip_",
    "qk_clip_factors",
    "QKAttention",
    "QKObserver",
    "QKScaling",
    "register_ns_method",
    "register_variant",
    "resolve_ns_dtype",
    "Route",
    "route_named_parameters",
    "route_parameters",
    "routing_table",
    "RoutingRules",
    "SCHEDULES",
    "sin_theta",
    "sin_theta_chance",
    "singular_value_band",
    "singular_values",
    "spectral_entropy",
    "spectrum_entropy",
    "SPLIT_QKV",
    "stable_rank",
    "stochastic_round",
    "top_frames",
    "top_singular_value",
    "Variant",
    "VariantItem",
    "VARIANTS",
    "why_not_muon",
]


def __getattr__(name: str):
    """``lightning_muon.<old module>`` (e.g. ``lightning_muon.newton_schulz``): the moved module, with a warning."""
    old = f"{__name__}.{name}"
    if old in _deprecated.MOVED:
        return _deprecated.load(old, stacklevel=3)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
