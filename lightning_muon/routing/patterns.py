"""What every routing decision reads: whether a tensor can be a Muon matrix, and name patterns.

Example:
    >>> import torch
    >>> why_not_muon(torch.zeros(3)), matching_pattern("blocks.0.attn.qkv.weight", ["qkv"])
    ('1-D (gain or bias)', 'qkv')
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import Tensor

from .matrix_view import matrix_shape

__all__ = ["matching_pattern", "why_not_muon"]


def why_not_muon(param: Tensor) -> str | None:
    """Why ``param`` cannot be a Muon matrix judging by the tensor alone, or ``None`` if it can.

    A tensor is a Muon matrix when, flattened to ``(shape[0], rest)`` as conv kernels are, both
    sides exceed 1 and it is real-valued and non-empty.

    Example:
        >>> import torch
        >>> why_not_muon(torch.zeros(1, 197, 768))
        'vector-like: flattens to 1 x 151296 (e.g. a positional embedding or class token)'
        >>> why_not_muon(torch.zeros(64, 3, 7, 7)) is None  # a conv kernel: a 64 x 147 matrix
        True
    """
    if param.is_complex():
        return "complex dtype (Muon is defined for real matrices)"
    if param.ndim < 2:
        return "scalar" if param.ndim == 0 else "1-D (gain or bias)"
    if param.numel() == 0:
        return f"empty tensor of shape {tuple(param.shape)}"
    rows, cols = matrix_shape(param.shape)
    if rows == 1 or cols == 1:
        return f"vector-like: flattens to {rows} x {cols} (e.g. a positional embedding or class token)"
    return None


def matching_pattern(name: str, patterns: Sequence[str]) -> str | None:
    """The first fnmatch pattern matching the dotted parameter ``name``, one of its components, or a
    module prefix (``"decoder.proj"`` matches ``decoder.proj.weight``); None if none does.

    This is how ``adamw_names``, ``muon_names``, ``embedding_names``, ``head_names`` and the
    monitors' ``include``/``exclude`` read their patterns.

    Example:
        >>> matching_pattern("decoder.proj.weight", ["*embed*", "decoder.proj"])
        'decoder.proj'
        >>> matching_pattern("blocks.0.attn.weight", ["head"]) is None
        True
    """
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(2, len(parts))]
    for pattern in patterns:
        if (
            fnmatch.fnmatchcase(name, pattern)
            or any(fnmatch.fnmatchcase(p, pattern) for p in parts)
            or any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        ):
            return pattern
    return None
