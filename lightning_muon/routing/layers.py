"""Third-party layer conventions that routing, matrix views and the monitors must read the same way.

Plain torch (no Lightning), and no import of the libraries whose layers are recognised: a layer is
recognised by its class name and attributes, so nothing here needs ``transformers`` or ``timm``.

* Hugging Face's ``Conv1D`` (GPT-2, GPT, DecisionTransformer) computes ``x @ W + b`` with ``W``
  stored ``(in, out)``: the transpose of ``nn.Linear``. :func:`is_transposed_linear` finds it; its
  weight gets a ``transposed`` matrix view.
* Grouped convolutions (``groups > 1``) are block-diagonal maps, one block per group
  (:func:`conv_groups`); a depthwise one (one input channel per group, :func:`is_depthwise_conv`)
  is ``C`` separate ``k x k`` filters, not a map between feature spaces.
* A mixture-of-experts router (:func:`is_moe_router`): a ``gate``/``router`` weight next to a bank of
  experts; a fused gate/up projection (:func:`fused_gate_up`): the rows ``[W_gate; W_up]`` of two maps.

Example:
    >>> import torch.nn as nn
    >>> is_depthwise_conv(nn.Conv2d(8, 8, 3, groups=8)), conv_groups(nn.Conv2d(8, 16, 3, groups=4))
    (True, 4)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

__all__ = [
    "DEFAULT_GATE_UP_NAMES",
    "DEFAULT_ROUTER_NAMES",
    "conv_groups",
    "fused_gate_up",
    "is_depthwise_conv",
    "is_moe_router",
    "is_transposed_linear",
]

#: Module names (last component) of a mixture-of-experts router, when next to a bank of experts.
DEFAULT_ROUTER_NAMES: tuple[str, ...] = ("gate", "router", "*router")

#: Parameter or module names of fused gate/up projections ``[W_gate; W_up]`` (Mixtral, Qwen3-MoE,
#: OLMoE and Phi-3 in transformers 5), split in two when ``split_gate_up=True``.
DEFAULT_GATE_UP_NAMES: tuple[str, ...] = ("gate_up_proj",)


def is_transposed_linear(module: nn.Module | None) -> bool:
    """Whether ``module`` is a linear layer whose weight is stored ``(in, out)``: Hugging Face's
    ``Conv1D`` (``nf`` outputs, ``nx`` inputs, ``weight`` of shape ``(nx, nf)``).

    Example:
        >>> class Conv1D(nn.Module):  # the layout of transformers.pytorch_utils.Conv1D
        ...     def __init__(self, nf, nx):
        ...         super().__init__()
        ...         self.nf, self.nx = nf, nx
        ...         self.weight = nn.Parameter(torch.zeros(nx, nf))
        >>> import torch
        >>> is_transposed_linear(Conv1D(256, 64)), is_transposed_linear(nn.Linear(64, 256))
        (True, False)
    """
    if module is None or type(module).__name__ != "Conv1D" or isinstance(module, nn.modules.conv._ConvNd):
        return False
    weight = getattr(module, "weight", None)
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    return isinstance(weight, Tensor) and weight.ndim == 2 and tuple(weight.shape) == (nx, nf)


def conv_groups(module: nn.Module | None) -> int:
    """``groups`` of an ``nn.Conv*`` / ``nn.ConvTranspose*`` (1 for anything else)."""
    return int(module.groups) if isinstance(module, nn.modules.conv._ConvNd) else 1


def is_depthwise_conv(module: nn.Module | None) -> bool:
    """A grouped conv with one input channel per group: ``C`` (times a multiplier) separate filters."""
    return conv_groups(module) > 1 and module.in_channels // module.groups == 1


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def is_moe_router(module_name: str, modules: Mapping[str, nn.Module], patterns: Sequence[str]) -> bool:
    """Whether the module ``module_name`` is a mixture-of-experts router: its name (last component)
    matches ``patterns`` and its parent holds a bank of experts (an ``experts`` child, or a
    ``num_experts`` attribute).

    Example:
        >>> moe = nn.ModuleDict({"gate": nn.Linear(8, 4), "experts": nn.ModuleList([nn.Linear(8, 8)] * 4)})
        >>> modules = dict(nn.ModuleDict({"mlp": moe}).named_modules())
        >>> is_moe_router("mlp.gate", modules, DEFAULT_ROUTER_NAMES), is_moe_router("mlp", modules, ["mlp"])
        (True, False)
    """
    last = module_name.rpartition(".")[2]
    if not module_name or not any(fnmatch.fnmatchcase(last, p) for p in patterns):
        return False
    parent = modules.get(_parent(module_name))
    if parent is None:
        return False
    return hasattr(parent, "experts") or isinstance(getattr(parent, "num_experts", None), int)


def fused_gate_up(name: str, param: Tensor, named_params: Mapping[str, Tensor]) -> bool:
    """Whether parameter ``name`` is a fused ``[W_gate; W_up]`` projection whose halves are rows:
    named like :data:`DEFAULT_GATE_UP_NAMES`, with ``2 I`` rows where its sibling ``down_proj`` reads
    ``I`` inputs (``(E, 2I, H)`` next to ``(E, H, I)``, or ``(2I, H)`` next to a ``(H, I)`` weight).
    A layout that differs (GPT-OSS stores ``(E, H, 2I)`` with gate and up interleaved) is not matched.

    Example:
        >>> import torch
        >>> ps = {"mlp.experts.gate_up_proj": torch.zeros(4, 32, 8), "mlp.experts.down_proj": torch.zeros(4, 8, 16)}
        >>> fused_gate_up("mlp.experts.gate_up_proj", ps["mlp.experts.gate_up_proj"], ps)
        True
        >>> fused_gate_up("weight", torch.zeros(4, 4), {})  # a bare module's own weight
        False
    """
    parts = name.split(".")
    in_module = parts[-1] == "weight"  # (2I, H) weight of a Linear, else a parameter held by the experts module
    if in_module and len(parts) < 2:
        return False
    own = parts[-2] if in_module else parts[-1]
    if not any(fnmatch.fnmatchcase(own, pat) for pat in DEFAULT_GATE_UP_NAMES):
        return False
    sibling = parts[:-2] + ["down_proj", "weight"] if in_module else parts[:-1] + ["down_proj"]
    down = named_params.get(".".join(sibling))
    if down is None or down.ndim != param.ndim or param.ndim < 2:
        return False
    return param.shape[-2] == 2 * down.shape[-1] and param.shape[-1] == down.shape[-2]
