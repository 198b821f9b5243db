"""The functional core (lightning_muon.optim.functional) against hand-written formulas and the optimizer's step."""

import math

import pytest
import torch
from torch import nn

from lightning_muon import (
    Muon,
    adjusted_lr,
    apply_muon_update,
    matrix_shape,
    matrix_view,
    muon_direction,
    orthogonalize,
)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_direction_matches_the_momentum_formulas(nesterov):
    """buf_t = beta buf_{t-1} + (1 - beta) g_t; direction (1 - beta) g_t + beta buf_t (Nesterov) or buf_t."""
    torch.manual_seed(0)
    beta = 0.9
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(3)]
    buf = torch.zeros(5, 3, dtype=torch.float64)
    expected_buf = torch.zeros(5, 3, dtype=torch.float64)
    for g in grads:
        (direction,) = muon_direction([g], [buf], beta, nesterov)
        expected_buf = beta * expected_buf + (1 - beta) * g
        expected = (1 - beta) * g + beta * expected_buf if nesterov else expected_buf
        torch.testing.assert_close(buf, expected_buf, atol=1e-14, rtol=0)
        torch.testing.assert_close(direction, expected, atol=1e-14, rtol=0)


def test_functional_step_reproduces_the_optimizer_step():
    """orthogonalize(muon_direction(...)) scaled by adjusted_lr is exactly what Muon.step applies."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(12, 20))
    opt = Muon(
        [{"params": [W], "use_muon": True}],
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        ns_method="svd",
        ns_dtype="float64",
        adjust_lr="spectral",
    )
    buf = torch.zeros_like(W)
    for _ in range(3):
        W.grad = torch.randn_like(W)
        (direction,) = muon_direction([W.grad.clone()], [buf], 0.9, True)
        expected = orthogonalize(direction, "svd")
        before = W.detach().clone()
        opt.step()
        applied = (before - W.detach()) / (0.1 * math.sqrt(12 / 20))
        torch.testing.assert_close(applied, expected, atol=1e-5, rtol=0)  # fp32 weights
        torch.testing.assert_close(opt.state[W]["momentum_buffer"], buf, atol=0, rtol=0)


def test_apply_muon_update_decays_then_steps_by_the_global_shape():
    """A local piece (here 2 of 8 rows) is scaled by the global shape's rule; decay is decoupled."""
    W = torch.ones(2, 6, dtype=torch.float64)
    update = torch.full((2, 6), 0.5, dtype=torch.float64)
    apply_muon_update([W], [update], lr=0.1, weight_decay=0.5, adjust_lr="original", shapes=[(8, 6)])
    scale = 0.1 * math.sqrt(8 / 6)
    torch.testing.assert_close(W, torch.full((2, 6), (1 - 0.1 * 0.5) - scale * 0.5, dtype=torch.float64))


def test_matrix_view_flattens_trailing_dims_and_shares_storage():
    K = torch.randn(6, 2, 3, 3)
    M = matrix_view(K)
    assert M.shape == (6, 18) and matrix_shape(K.shape) == (6, 18)
    assert M.data_ptr() == K.data_ptr()
    torch.testing.assert_close(M[1], K[1].flatten())
    assert adjusted_lr(1.0, K.shape, "spectral") == pytest.approx(math.sqrt(6 / 18))


@pytest.mark.parametrize("shape", [(), (5,)])
def test_matrix_rule_refuses_fewer_than_two_dims(shape):
    with pytest.raises(ValueError, match="matrix_view: expected a tensor with >= 2 dims"):
        matrix_view(torch.zeros(shape))
    with pytest.raises(ValueError, match="matrix_shape: expected a shape with >= 2 dims"):
        matrix_shape(shape)
