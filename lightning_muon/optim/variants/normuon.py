"""NorMuon: neuron-wise second-moment normalisation of Muon's orthogonalised update.

Plain torch (no Lightning), batched over leading dims. NorMuon (Li, Liu, Liang, Chen, Zhao,
arXiv 2510.05491) observes that the polar factor ``O`` of the momentum, though well conditioned,
gives some output neurons (rows) far larger updates than others. It keeps an EMA ``v`` of each
row's mean square, ``v <- beta2 * v + (1 - beta2) * mean_cols(O * O)``, divides row ``i`` by
``sqrt(v_i) + eps``, then rescales the whole matrix back to the Frobenius norm ``O`` had, so the
learning rate and the ``adjust_lr`` rule mean what they mean for Muon (with ``"match_rms_adamw"``
this is the paper's ``0.2 * lr * sqrt(m n) / ||O_hat||_F``). No bias correction, as in the paper.

Everything here works from the rows' sums of squares, so a caller whose rows are spread over
processes (tensor parallelism) can all-reduce those sums first and then rescale its own piece:
:class:`NorMuon`, the optimizer's variant (``Muon(variant="normuon")``), does so for DTensors.

Example:
    >>> import torch
    >>> O = torch.tensor([[3.0, 4.0], [0.0, 0.1]])
    >>> v = torch.zeros(2)
    >>> out = normuon_normalize(O, v, beta2=0.95, eps=1e-8)
    >>> torch.allclose(out.norm(), O.norm()), torch.allclose(out[0].norm(), out[1].norm())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ...parallel.dtensor import is_dtensor
from ...parallel.placement import global_index, sum_rows_over_mesh
from ...routing.matrix_view import MatrixView
from ...validation import check_number
from . import Variant, VariantItem, register_variant

__all__ = ["NORMUON_BETA2", "NORMUON_EPS", "NorMuon", "neuron_scale", "normuon_normalize", "normuon_rows"]

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


def normuon_rows(shape: tuple[int, ...], view: MatrixView) -> tuple[int, ...]:
    """Shape of NorMuon's per-row state of a parameter of ``shape``: the rows of its matrix view in
    storage order, ``(count * m,)``; for a stack ``(matrices, rows)``, so that each matrix of the
    stack keeps its own Frobenius norm (a split q/k/v weight is rescaled as a whole).

    Example:
        >>> normuon_rows((4, 8, 16), MatrixView("stack")), normuon_rows((48, 16), MatrixView.parse("split=3"))
        ((4, 8), (48,))
    """
    count, m, _ = view.matrices(tuple(shape))
    return (count, m) if view.rule == "stack" and count > 1 else (count * m,)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the parameter's dtype when wider (float64): NorMuon's statistics never in half precision."""
    return torch.promote_types(dtype, torch.float32)


class NorMuon(Variant):
    """``variant="normuon"``: each row of the orthogonalised update divided by the root of an EMA of
    its mean square, then rescaled to the update's Frobenius norm (see the module docstring).

    Options (``variant_options``): ``beta2`` (the EMA factor, default 0.95) and ``eps`` (added to
    the root, default 1e-8). State: ``neuron_second_moment``, one float32 per row of the matrix
    view (:func:`normuon_rows`), kept whole on every rank, also under FSDP2. The rows of DTensor
    updates are summed over their mesh with one ``all_reduce`` per process group, so every rank
    updates the same whole state and scales its own piece exactly as one process scales the whole.
    """

    name = "normuon"
    defaults = {"beta2": NORMUON_BETA2, "eps": NORMUON_EPS}

    def check_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        options = super().check_options(options, where)
        check_number(options["beta2"], "variant_options['beta2'] (NorMuon)", where, low=0, high=1, high_open=True)
        check_number(
            options["eps"],
            "variant_options['eps'] (NorMuon)",
            where,
            low=0,
            low_open=True,
            why=" (a zero row would divide 0 by 0)",
        )
        return options

    def state_shapes(self, param: Tensor, view: MatrixView) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {"neuron_second_moment": (torch.Size(normuon_rows(tuple(param.shape), view)), _wide(param.dtype))}

    def transform(self, items: Sequence[VariantItem], state: Mapping[Tensor, dict[str, Any]]) -> list[Tensor]:
        sums: dict[int, Tensor] = {}
        sharded = [(k, it) for k, it in enumerate(items) if is_dtensor(it.param)]
        for k, it in enumerate(items):
            if not is_dtensor(it.param):
                rows = normuon_rows(tuple(it.param.shape), it.view)
                seen = it.update.mT if it.view.transposed else it.update  # the (out, in) matrix Muon sees
                sums[k] = seen.reshape(*rows, -1).to(_wide(it.update.dtype)).square().sum(-1)
        if sharded:
            pieces = [(it.param, it.update, partial(it.view.row_of, tuple(it.param.shape))) for _, it in sharded]
            sums.update(zip([k for k, _ in sharded], sum_rows_over_mesh(pieces)))
        out = []
        for k, it in enumerate(items):
            shape = tuple(it.param.shape)
            cols = it.view.matrices(shape)[-1]
            v = state[it.param]["neuron_second_moment"]
            row = neuron_scale(sums[k].view(v.shape), cols, v, it.options["beta2"], it.options["eps"])
            if is_dtensor(it.param):  # this rank's elements, each with its row's factor
                factor = row.reshape(-1)[it.view.row_of(shape, global_index(it.param))]
            elif it.view.transposed:  # rows of the view are the stored columns
                factor = row.reshape(1, -1).expand(shape[0], -1)
            else:  # rows of the view in storage order: element i is in row i // cols
                factor = row.reshape(-1, 1).expand(-1, cols).reshape(it.update.shape)
            out.append(it.update.to(factor.dtype) * factor)
        return out


register_variant(NorMuon())
