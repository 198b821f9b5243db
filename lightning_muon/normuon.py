"""NorMuon: neuron-wise second-moment normalisation of Muon's orthogonalised update.

Plain torch (no Lightning), batched over leading dims. NorMuon (Li, Liu, Liang, Chen, Zhao,
arXiv 2510.05491) observes that the polar factor ``O`` of the momentum, though well conditioned,
gives some output neurons (rows) far larger updates than others. It keeps an EMA ``v`` of each
row's mean square, ``v <- beta2 * v + (1 - beta2) * mean_cols(O * O)``, divides row ``i`` by
``sqrt(v_i) + eps``, then rescales the whole matrix back to the Frobenius norm ``O`` had, so the
learning rate and the ``adjust_lr`` rule mean what they mean for Muon (with ``"match_rms_adamw"``
this is the paper's ``0.2 * lr * sqrt(m n) / ||O_hat||_F``). No bias correction, as in the paper.

Everything here works from the rows' sums of squares, so a caller whose rows are spread over
processes (tensor parallelism) can all-reduce those sums first and then rescale its own piece.

Example:
    >>> import torch
    >>> O = torch.tensor([[3.0, 4.0], [0.0, 0.1]])
    >>> v = torch.zeros(2)
    >>> out = normuon_normalize(O, v, beta2=0.95, eps=1e-8)
    >>> torch.allclose(out.norm(), O.norm()), torch.allclose(out[0].norm(), out[1].norm())
    (True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORMUON_BETA2", "NORMUON_EPS", "VARIANTS", "neuron_scale", "normuon_normalize"]

#: Update rules of a Muon group: plain Muon, or Muon followed by neuron-wise normalisation.
VARIANTS = ("muon", "normuon")
#: Defaults of the paper and its reference implementations (beta2 0.95; eps 1e-8 as microsoft/dion).
NORMUON_BETA2 = 0.95
NORMUON_EPS = 1e-8


def neuron_scale(row_sq: Tensor, cols: int, second_moment: Tensor, beta2: float, eps: float) -> Tensor:
    """Per-row factors of NorMuon from the rows' sums of squares; updates ``second_moment`` in place.

    ``row_sq`` (..., m): sum over the ``cols`` columns of ``O * O`` for each row of each matrix;
    ``second_moment`` (..., m) float32 (or wider): the EMA ``v``. Returns (..., m) factors ``f``
    such that ``O * f[..., None]`` is the normalised update with ``O``'s Frobenius norm (an
    all-zero matrix stays zero).

    Example:
        >>> v = torch.zeros(2)
        >>> neuron_scale(torch.tensor([4.0, 1.0]), 1, v, 0.0, 0.0), v
        (tensor([0.7906, 1.5811]), tensor([4., 1.]))
    """
    row_sq = row_sq.to(second_moment.dtype)
    second_moment.lerp_(row_sq / cols, 1 - beta2)
    inv = 1 / (second_moment.sqrt() + eps)
    before = row_sq.sum(-1, keepdim=True)
    after = (row_sq * inv * inv).sum(-1, keepdim=True)
    ratio = torch.where(after > 0, before / after.clamp_min(torch.finfo(after.dtype).tiny), 0.0)
    return inv * ratio.sqrt()


def normuon_normalize(update: Tensor, second_moment: Tensor, beta2: float, eps: float) -> Tensor:
    """``update`` (..., m, n), an orthogonalised Muon update, normalised per row (output neuron).

    ``second_moment`` (..., m) is updated in place. The result has ``update``'s dtype and, per
    matrix, its Frobenius norm. See the module docstring for the rule.

    Example:
        >>> O = torch.linalg.qr(torch.randn(6, 4)).Q.T  # 4 x 6, orthonormal rows
        >>> v = torch.zeros(4)
        >>> torch.allclose(normuon_normalize(O, v, 0.95, 1e-8), O, atol=1e-5)  # balanced rows stay
        True
    """
    row_sq = update.to(second_moment.dtype).square().sum(-1)
    factor = neuron_scale(row_sq, update.shape[-1], second_moment, beta2, eps)
    return (update.to(factor.dtype) * factor.unsqueeze(-1)).to(update.dtype)
