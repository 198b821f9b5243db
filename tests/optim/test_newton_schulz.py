"""orthogonalize against exact references: torch.linalg.svd, analytic cases, torch.optim.Muon."""

import pytest
import torch

from lightning_muon import NS_PRESETS, ns_flops, orthogonalize, singular_value_band
from lightning_muon.optim.newton_schulz import cpu_kind, default_kernel

# What this module tests depends on the dtype paths: .ci/run runs it again under every simulated CPU kind.
pytestmark = pytest.mark.cpu_kinds


def _exact_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (48, 12), (3, 5, 7), (2, 3, 20, 10)])
def test_svd_method_equals_uv_t(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    Q = orthogonalize(G, "svd")
    assert Q.shape == G.shape and Q.dtype == G.dtype
    torch.testing.assert_close(Q, _exact_polar(G), atol=1e-10, rtol=0)  # float64 SVD


@pytest.mark.parametrize("shape, steps", [((64, 128), 8), ((128, 64), 8), ((4, 96, 96), 16)])
def test_polar_express_converges_to_uv_t(shape, steps):
    G = torch.randn(*shape, dtype=torch.float64)
    ref = _exact_polar(G)
    # Rectangular Gaussian: s_min / ||G||_F > 1e-3, so 5 pinned steps + 3 refinement steps reach
    # fp32 accuracy. Square Gaussian: s_min / ||G||_F ~ 1e-4, below the design range, so the
    # refinement needs a few more steps. Tolerance 1e-5 relative (fp32 round-off).
    out = orthogonalize(G, "polar_express", steps=steps, dtype=torch.float32)
    assert (out - ref).norm() / ref.norm() < 1e-5
    out5 = orthogonalize(G, "polar_express", steps=5, dtype=torch.float32)
    assert (out5 - ref).norm() / ref.norm() < 0.15


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
def test_singular_values_in_documented_band(method):
    # Geometric spectrum between 1 and 1e-2 relative: inside the design range of both presets.
    U, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(96, 64, dtype=torch.float64))
    s = torch.logspace(0, -2, 64, dtype=torch.float64)
    G = (U * s) @ V.T
    lo, hi = singular_value_band(method)
    sv = torch.linalg.svdvals(orthogonalize(G, method, dtype=torch.float32).double())
    assert lo <= sv.min() and sv.max() <= hi, (sv.min(), sv.max())
    # Same singular vectors as the exact polar factor: O^T-projection onto U V^T is positive.
    assert (orthogonalize(G, method, dtype=torch.float32).double() * (U @ V.T)).sum() > 0.8 * 64


def test_scalar_composition_of_presets():
    # The defining property of each pinned list: the composed polynomial on [1e-3, 1].
    x = torch.logspace(-3, 0, 2001, dtype=torch.float64)
    for name, preset in NS_PRESETS.items():
        y = x / preset.norm_scale
        for a, b, c in preset.coefficients(5):
            y = a * y + b * y**3 + c * y**5
        lo, hi = preset.band
        assert lo <= y.min() and y.max() <= hi, name


@pytest.mark.parametrize("method", ["quintic", "polar_express", "svd"])
def test_zero_and_rank_deficient_give_no_nan(method):
    Z = torch.zeros(3, 8, 5)
    assert torch.equal(orthogonalize(Z, method), Z)
    u, v = torch.randn(8, 1), torch.randn(1, 5)
    out = orthogonalize(u @ v, method, dtype=torch.float32)  # rank 1
    assert torch.isfinite(out).all()
    # The polar factor of u v^T is u v^T / (|u| |v|); Newton–Schulz scales its one singular value
    # into the method's band, so compare directions. In fp32, round-off directions (~1e-7
    # relative) are amplified at most ~1e3 by 5 steps, so they stay far below 1e-2.
    lo, hi = singular_value_band(method)
    assert lo <= out.norm() <= hi
    torch.testing.assert_close(out / out.norm(), (u @ v) / (u.norm() * v.norm()), atol=1e-2, rtol=0)
    assert torch.isfinite(orthogonalize(u @ v, method)).all()  # default ("auto") dtype too
    if method != "svd":  # torch.linalg.svd has no bf16 kernel
        assert torch.isfinite(orthogonalize(u @ v, method, dtype=torch.bfloat16)).all()


def test_input_never_modified_and_dtype_kept():
    for dtype in (torch.float32, torch.bfloat16):
        G = torch.randn(2, 16, 32).to(dtype)
        before = G.clone()
        out = orthogonalize(G, "quintic", dtype=dtype)  # compute dtype == input dtype: no copy made by .to
        assert torch.equal(G, before)
        assert out.dtype == dtype and out.shape == G.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["looped", "batched"])
def test_results_outlive_the_reused_workspace(dtype, kernel):
    # On CPU the iteration's buffers are reused from call to call; a result handed out must be its
    # own tensor (in the input dtype == compute dtype case too): a later call of the same shape
    # leaves it unchanged, and it is still the orthogonalisation of its input (within the dtype's
    # Newton–Schulz band around the exact polar factor: a result overwritten by the second call's
    # matrix would be ~1.4 away, relative).
    G1, G2 = torch.randn(3, 16, 40).to(dtype), torch.randn(3, 16, 40).to(dtype)
    first = orthogonalize(G1, "polar_express", dtype=dtype, kernel=kernel)
    snapshot = first.clone()
    second = orthogonalize(G2, "polar_express", dtype=dtype, kernel=kernel)
    assert torch.equal(first, snapshot) and first.data_ptr() != second.data_ptr()
    U, _, Vh = torch.linalg.svd(G1.double(), full_matrices=False)
    exact = U @ Vh
    assert (first.double() - exact).norm() / exact.norm() < 0.3


def test_batched_equals_looped():
    G = torch.randn(5, 24, 40)
    batched = orthogonalize(G, "polar_express", dtype=torch.float32)
    looped = torch.stack([orthogonalize(g, "polar_express", dtype=torch.float32) for g in G])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
def test_looped_and_batched_kernels_agree(method):
    # Same iteration, different matmul calls (mm/addmm per matrix vs bmm/baddbmm on the stack):
    # in float64 they may differ only by round-off (5 steps amplify 1e-16 by at most ~1e3).
    G = torch.randn(3, 24, 40, dtype=torch.float64)
    looped = orthogonalize(G, method, dtype=torch.float64, kernel="looped")
    batched = orthogonalize(G, method, dtype=torch.float64, kernel="batched")
    torch.testing.assert_close(looped, batched, atol=1e-12, rtol=0)
    # Both against the exact polar factor, at the accuracy the 5-step preset promises.
    assert (looped - _exact_polar(G)).norm() / _exact_polar(G).norm() < 0.3


def test_default_kernel_per_device_and_cpu_kind(monkeypatch):
    # The thresholds measured per kind (benchmarks/kernel_choice.py): AMX batches every width,
    # the others loop from a smaller side of 512 on; a GPU always batches.
    assert default_kernel(torch.device("cpu"), 768, kind="avx2") == "looped"
    assert default_kernel("cpu", 511, kind="avx512_bf16") == "batched"
    assert default_kernel("cpu", 512, kind="avx512_bf16") == "looped"
    assert default_kernel("cpu", 4096, kind="amx_bf16") == "batched"
    assert default_kernel("cuda", 768, kind="avx2") == "batched"  # no GPU needed to ask
    # Without kind: the kind LIGHTNING_MUON_CPU_KIND names (the flags ns_dtype="auto" reads).
    for kind, expected in (("avx2", "looped"), ("amx_bf16", "batched")):
        monkeypatch.setenv("LIGHTNING_MUON_CPU_KIND", kind)
        assert cpu_kind() == kind and default_kernel("cpu", 768) == expected


@pytest.mark.requires_torch("2.9", "torch.optim._muon")
def test_quintic_matches_torch_muon_newton_schulz():
    from torch.optim._muon import _zeropower_via_newtonschulz

    G = torch.randn(32, 80)
    ref = _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    ours = orthogonalize(G, "quintic", steps=5, dtype=torch.bfloat16).float()
    # Both bf16, rounded in different places (torch divides by a bf16-rounded norm, we scale by an
    # unrounded float32 factor), so two independent bf16 round-offs: over 30 Gaussian inputs of this
    # shape 1.9% apart (median, max 2.3%), each 1.6% from the float64 iteration (ours 1.58%, torch
    # 1.64%). Wrong coefficients or normalisation move it by far more than 3%.
    assert (ours - ref).norm() / ref.norm() < 3e-2
    exact = orthogonalize(G.double(), "quintic", steps=5, dtype=torch.float64)
    assert (ours - exact).norm() / exact.norm() < 2.5e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "newton"}, "unknown method"),
        ({"steps": 0}, "steps must be"),
        ({"steps": 2.5}, "steps must be"),
        ({"kernel": "fused"}, "kernel must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        orthogonalize(torch.randn(4, 4), **kwargs)
    with pytest.raises(ValueError, match="expected a"):
        orthogonalize(torch.randn(4))


def test_ns_flops():
    assert ns_flops(768, 3072, 5) == ns_flops(3072, 768, 5) == 5 * (4 * 768**2 * 3072 + 2 * 768**3)
