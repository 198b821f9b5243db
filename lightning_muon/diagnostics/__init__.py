"""What the monitors compute, as plain torch functions on tensors (no Lightning).

* :mod:`.spectral`: singular values, stable rank, spectral entropy, frame misalignment ``sin Theta``
  and the basis-free ``delta_P``; batched over leading dims;
* :mod:`.critical_batch`: the gradient noise scale ``B_simple`` and Muon's ``B_crit``;
* :mod:`.per_example`: per-example gradient norms from a layer's activations and output gradients
  (Linear, conv, Hugging Face Conv1D, embedding, norm layers);
* :mod:`.attention`: each head's largest attention logit, and which rows of the weights are whose;
* :mod:`.hf_attention`: that protocol for Hugging Face attention modules (without importing transformers).
"""

from .attention import (
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
from .critical_batch import (
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
from .hf_attention import HFConv1DQK, HFProjectionsQK, hf_qk_attention
from .per_example import (
    PerExampleNorms,
    conv_grad_norms,
    embedding_grad_norms,
    linear_grad_norms,
    norm_grad_norms,
    per_example_noise_scale,
)
from .spectral import (
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

__all__ = [
    "attention_logit_max",
    "conv_grad_norms",
    "CRITICAL_BATCH_METHODS",
    "CriticalBatch",
    "delta_p",
    "delta_p_chance",
    "effective_rank",
    "embedding_grad_norms",
    "find_qk_attention",
    "frames_sin_theta",
    "fused_qkv_project",
    "fused_qkv_rows",
    "hf_qk_attention",
    "HFConv1DQK",
    "HFProjectionsQK",
    "linear_grad_norms",
    "momentum_noise_factor",
    "MultiheadAttentionQK",
    "muon_critical_batch_size",
    "noise_scale",
    "NoiseScale",
    "norm_grad_norms",
    "per_example_noise_scale",
    "PerExampleNorms",
    "polar_deficits",
    "polar_misalignment",
    "polar_perturbation",
    "polar_sensitivity",
    "qk_attention",
    "QKAttention",
    "QKObserver",
    "QKScaling",
    "sin_theta",
    "sin_theta_chance",
    "singular_values",
    "spectral_entropy",
    "spectrum_entropy",
    "stable_rank",
    "top_frames",
    "top_singular_value",
]
