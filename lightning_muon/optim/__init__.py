"""The optimizer: Muon's step, its Newton–Schulz iterations, variants and state precision.

Plain torch (no Lightning):

* :mod:`.muon`: :class:`Muon`, one ``torch.optim.Optimizer`` with Muon and AdamW groups;
* :mod:`.groups`: how a param group is routed, filled from the defaults and validated;
* :mod:`.functional`: one step as functions on lists of tensors (momentum, update);
* :mod:`.newton_schulz`: :func:`orthogonalize` and its presets (Polar Express, quintic, Gram forms, SVD);
* :mod:`.ns_dtype`: which dtype Newton–Schulz runs in on a device (``ns_dtype="auto"``);
* :mod:`.variants`: what a variant changes after orthogonalisation (NorMuon);
* :mod:`.stochastic_rounding`: bfloat16 momentum without stalls;
* :mod:`.qk_clip`: QK-clip, the rescaling of query/key weights after a step.
"""

from .functional import ADJUST_LR, adjusted_lr, apply_muon_update, muon_direction
from .muon import Muon, NonFiniteGradientError
from .newton_schulz import (
    GRAM_METHODS,
    METHODS,
    NS_PRESETS,
    GramVariant,
    NSPreset,
    ns_flops,
    orthogonalize,
    register_ns_method,
)
from .ns_dtype import NS_DTYPES, NSDtypeChoice, describe_device, ns_dtype_choice, resolve_ns_dtype
from .qk_clip import qk_clip_, qk_clip_factors
from .stochastic_rounding import MOMENTUM_DTYPES, stochastic_round
from .variants import VARIANTS, Variant, VariantItem, register_variant

__all__ = [
    "ADJUST_LR",
    "GRAM_METHODS",
    "GramVariant",
    "METHODS",
    "MOMENTUM_DTYPES",
    "Muon",
    "NSDtypeChoice",
    "NSPreset",
    "NS_DTYPES",
    "NS_PRESETS",
    "NonFiniteGradientError",
    "adjusted_lr",
    "apply_muon_update",
    "describe_device",
    "muon_direction",
    "ns_dtype_choice",
    "ns_flops",
    "orthogonalize",
    "qk_clip_",
    "qk_clip_factors",
    "resolve_ns_dtype",
    "register_ns_method",
    "register_variant",
    "stochastic_round",
    "VARIANTS",
    "Variant",
    "VariantItem",
]
