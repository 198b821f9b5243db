"""Low-precision optimizer state: Muon momentum kept in bfloat16 with stochastic rounding.

Plain torch (no Lightning). A bfloat16 momentum buffer halves Muon's state (2 instead of 4 bytes
per weight), but rounding it to nearest after every ``buf <- beta * buf + (1 - beta) * g`` loses
any change smaller than half a bfloat16 ulp (``2**-9`` of the value): with ``beta = 0.95`` a
buffer whose gradient moves slowly stops following it (it *stalls*). Two cures exist: an error
term that carries the rounding residue to the next step, or stochastic rounding. The residue has
to be stored too, and stored in bfloat16 it brings the state back to 4 bytes per weight, the size
of the float32 buffer it was meant to replace; stochastic rounding needs no extra state and is
unbiased (``E[round(x)] = x``), so small changes accumulate in expectation. It is used here.

The random bits are a hash of (seed, step, the element's index in the *whole* tensor), not a
generator's stream: every rank computes the same bits for the same element whatever the
sharding, so training under DDP or FSDP2 rounds exactly as one process does, and a resumed run
as an uninterrupted one.

Example:
    >>> x = torch.full((100_000,), 1.0 + 2**-10)  # a quarter of the way to the next bfloat16
    >>> x.to(torch.bfloat16).float().mean().item()  # round to nearest: always 1.0
    1.0
    >>> y = stochastic_round(x, torch.arange(100_000), key=7)
    >>> y.dtype, abs(y.float().mean().item() - (1.0 + 2**-10)) < 1e-4
    (torch.bfloat16, True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["MOMENTUM_DTYPES", "check_momentum_dtype", "random_bits16", "rounding_key", "stochastic_round"]

#: ``momentum_dtype`` values: None keeps the parameter's dtype.
MOMENTUM_DTYPES = (None, "float32", "bfloat16")
_MASK32 = 0xFFFFFFFF


def check_momentum_dtype(value: Any, where: str) -> str | None:
    """``value`` (None, a name or a torch dtype) as one of :data:`MOMENTUM_DTYPES`; ValueError if not.

    Example:
        >>> check_momentum_dtype(torch.bfloat16, "Muon"), check_momentum_dtype("float32", "Muon")
        ('bfloat16', 'float32')
    """
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if name not in MOMENTUM_DTYPES:
        hint = " (float16's range is too small for momentum; use bfloat16)" if name == "float16" else ""
        raise ValueError(
            f"{where}: momentum_dtype must be None, 'float32' or 'bfloat16' (or torch.float32 / "
            f"torch.bfloat16), got {value!r}{hint}"
        )
    return name


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 values in [0, 2**32).

    The multipliers are below 2**31, so no int64 product overflows.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def rounding_key(seed: int, salt: int, step: int) -> int:
    """One 32-bit key per (seed, tensor, step): the hash of the three, mixed in turn.

    Example:
        >>> rounding_key(0, 1, 2) != rounding_key(0, 1, 3)
        True
    """
    k = torch.tensor([seed & _MASK32], dtype=torch.int64)
    for part in (salt, step):
        k = _mix32((k + (part & _MASK32) + 0x3C6EF372) & _MASK32)
    return int(k)


def random_bits16(index: Tensor, key: int) -> Tensor:
    """16 pseudo-random bits (int64 in [0, 65536)) for each int64 ``index``, a function of (index, key).

    Indices above 2**32 wrap (tensors of more than 4 G elements share bits between elements
    2**32 apart, which costs nothing in expectation).

    Example:
        >>> bits = random_bits16(torch.arange(8), key=1)
        >>> bool(((bits >= 0) & (bits < 65536)).all()), torch.equal(bits, random_bits16(torch.arange(8), 1))
        (True, True)
    """
    h = _mix32((_mix32(index & _MASK32) + (key & _MASK32)) & _MASK32)
    return h >> 16


def stochastic_round(x: Tensor, index: Tensor, key: int) -> Tensor:
    """``x`` (float32) rounded to bfloat16 up or down with probabilities that make it unbiased.

    Adds 16 random bits (:func:`random_bits16` of ``index``, the elements' global indices, same
    shape as ``x``) to the float32 bit pattern below bfloat16's last bit, then truncates: ``x``
    rounds away from zero with probability equal to its distance from the lower neighbour in
    bfloat16 ulps. Exact bfloat16 values are kept; NaN/Inf must not occur (Muon checks gradients).

    Example:
        >>> stochastic_round(torch.tensor([1.5, -2.0]), torch.arange(2), key=0)
        tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round: x must be float32, got {x.dtype}")
    bits = x.view(torch.int32).to(torch.int64)  # the sign is bit 31 of the pattern: added noise never reaches it
    noisy = (bits + random_bits16(index.reshape(x.shape), key)) & ~0xFFFF
    return noisy.to(torch.int32).view(torch.float32).to(torch.bfloat16)
