"""ns_dtype="auto": the choice per forced capability, explicit values winning, agreement over ranks,
and the accuracy contract (singular-value band vs an exact SVD) for every dtype auto can pick."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import DIST_SCRIPTS, ROOT
from torch import nn

import lightning_muon.optim.ns_dtype as precision
from lightning_muon import Muon, orthogonalize, resolve_ns_dtype, singular_value_band

# What this module tests depends on the dtype paths: .ci/run runs it again under every simulated CPU kind.
pytestmark = pytest.mark.cpu_kinds

AVX2 = {"capability": "AVX2", "avx2": True}
AVX512 = {"capability": "AVX512", "avx2": True, "avx512_f": True}
AVX512_BF16 = {**AVX512, "avx512_bf16": True}
AMX = {**AVX512, "amx_tile": True, "amx_bf16": True}
ARM_BF16 = {"capability": "DEFAULT", "neon": True, "bf16": True}
ARM = {"capability": "DEFAULT", "neon": True}


@pytest.fixture
def hardware(monkeypatch):
    """Pretend hardware: set CPU flags, a CUDA capability and the probe's answer; count probes."""
    precision._CACHE.clear()
    probes: list[tuple[str, torch.dtype]] = []
    state = {"ratio": 1.0}

    def probe(device, candidate):
        probes.append((str(device), candidate))
        return state["ratio"]

    def set_(cpu=None, cuda=None, ratio=1.0, rocm=False):
        state["ratio"] = ratio
        if cpu is not None:
            monkeypatch.setattr(precision, "_cpu_flags", lambda: dict(cpu))
        if cuda is not None:
            monkeypatch.setattr(precision, "_cuda_capability", lambda device: cuda)
        monkeypatch.setattr(precision, "_is_rocm", lambda: rocm)
        return probes

    monkeypatch.setattr(precision, "_probe", probe)
    yield set_
    precision._CACHE.clear()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (AVX512_BF16, torch.bfloat16),
        (AMX, torch.bfloat16),
        (ARM_BF16, torch.bfloat16),
        (AVX2, torch.float32),
        (ARM, torch.float32),
    ],
)
def test_cpu_flags_decide_without_probe(hardware, flags, expected):
    probes = hardware(cpu=flags, ratio=0.1)  # a probe would say bf16 is faster: it must not run
    choice = precision.ns_dtype_choice("cpu")
    assert (choice.dtype, choice.source, probes) == (expected, "flags", [])
    assert resolve_ns_dtype("cpu") == expected


@pytest.mark.parametrize("flags", [AVX512, {"capability": "VSX"}])
@pytest.mark.parametrize("ratio, expected", [(0.5, torch.bfloat16), (0.95, torch.float32), (40.0, torch.float32)])
def test_ambiguous_cpu_is_probed(hardware, flags, ratio, expected):
    # AVX-512 without BF16 (oneDNN may emulate bf16 well or badly) and unknown CPUs: the probe
    # keeps bf16 only if its matmul takes <= 0.9x the float32 time.
    probes = hardware(cpu=flags, ratio=ratio)
    choice = precision.ns_dtype_choice("cpu")
    assert (choice.dtype, choice.source, choice.probe_ratio) == (expected, "probe", ratio)
    assert probes == [("cpu", torch.bfloat16)]


@pytest.mark.parametrize(
    "capability, ratio, expected, source",
    [
        ((9, 0), 9.0, torch.bfloat16, "flags"),
        ((8, 0), 9.0, torch.bfloat16, "flags"),
        ((7, 5), 9.0, torch.float16, "flags"),
        ((7, 0), 9.0, torch.float16, "flags"),
        ((6, 0), 0.5, torch.float16, "probe"),
        ((6, 1), 9.0, torch.float32, "probe"),
    ],
)
def test_cuda_compute_capability(hardware, capability, ratio, expected, source):
    probes = hardware(cuda=capability, ratio=ratio)  # no GPU needed: the capability is pretended
    choice = precision.ns_dtype_choice("cuda:0")
    assert (choice.dtype, choice.source) == (expected, source)
    assert probes == ([] if source == "flags" else [("cuda:0", torch.float16)])


def test_rocm_and_other_devices_are_probed(hardware):
    probes = hardware(cuda=(9, 0), rocm=True, ratio=0.5)
    assert precision.ns_dtype_choice("cuda:1").dtype == torch.bfloat16
    assert precision.ns_dtype_choice("mps").dtype == torch.bfloat16
    assert probes == [("cuda:1", torch.bfloat16), ("mps", torch.bfloat16)]


def test_resolved_once_per_device_and_logged_once(hardware, caplog):
    probes = hardware(cpu=AVX512, ratio=2.0)
    with caplog.at_level(logging.INFO, logger="lightning_muon"):
        first = [resolve_ns_dtype("cpu") for _ in range(3)]
    assert first == [torch.float32] * 3 and len(probes) == 1
    lines = [r.getMessage() for r in caplog.records if "Newton–Schulz on cpu" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0] and "AVX512" in lines[0]


def test_real_probe_and_flags_on_this_machine(monkeypatch):
    # The real capability query and probe (not patched, no simulated kind) return sane values on
    # whatever runs CI: the one test here that reads the host on purpose.
    monkeypatch.delenv(precision.CPU_KIND_VARIABLE, raising=False)
    precision._CACHE.clear()
    flags = precision._cpu_flags()
    assert isinstance(flags["capability"], str)
    ratio = precision._probe(torch.device("cpu"), torch.bfloat16)
    assert 0 < ratio < float("inf")
    choice = precision.ns_dtype_choice("cpu")
    assert choice.dtype in (torch.bfloat16, torch.float32)
    native = bool(flags.get("avx512_bf16") or flags.get("amx_bf16") or flags.get("bf16"))
    if native or not flags.get("avx512_f"):  # the flags decide on this machine
        assert choice.dtype == (torch.bfloat16 if native else torch.float32) and choice.source == "flags"
    assert "threads" in precision.describe_device("cpu")


def _one_step(**kwargs) -> tuple[torch.Tensor, Muon]:
    g = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(16, 32, generator=g))
    W.grad = torch.randn(16, 32, generator=g)
    opt = Muon(
        [{"params": [W], "use_muon": True}],
        lr=0.1,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        adjust_lr="spectral",
        **kwargs,
    )
    opt.step()
    return W.detach(), opt


@pytest.mark.parametrize("flags, expected", [(AVX512_BF16, torch.bfloat16), (AVX2, torch.float32)])
def test_muon_auto_uses_the_resolved_dtype(hardware, flags, expected):
    hardware(cpu=flags)
    W, opt = _one_step()  # ns_dtype="auto" by default
    assert opt.resolved_ns_dtype() == expected == opt.resolved_ns_dtype("cpu")
    g = torch.Generator().manual_seed(0)
    W0, G = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    update = 0.1 * (16 / 32) ** 0.5 * orthogonalize(G, "polar_express", dtype=expected)
    torch.testing.assert_close(W, W0 - update, atol=1e-6, rtol=0)
    other = torch.float32 if expected == torch.bfloat16 else torch.bfloat16
    assert (W - (W0 - 0.1 * (16 / 32) ** 0.5 * orthogonalize(G, "polar_express", dtype=other))).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kind, flags, expected",
    [("avx2", AVX2, torch.float32), ("avx512_bf16", AVX512_BF16, torch.bfloat16), ("amx_bf16", AMX, torch.bfloat16)],
)
def test_a_simulated_cpu_kind_resolves_as_that_cpu(monkeypatch, kind, flags, expected):
    # LIGHTNING_MUON_CPU_KIND replaces the host's flags with the kind's: auto resolves as there, the
    # cache keeps kinds apart, and the real flags of this host are not read at all.
    monkeypatch.setattr(precision, "_host_flags", lambda: pytest.fail("the host's flags were read"))
    monkeypatch.setenv(precision.CPU_KIND_VARIABLE, kind)
    precision._CACHE.clear()
    assert flags.items() <= precision._cpu_flags().items()  # the kind's flags as torch reports them there
    choice = precision.ns_dtype_choice("cpu")
    assert (choice.dtype, choice.source, choice.device) == (expected, "flags", "cpu")
    assert f"LIGHTNING_MUON_CPU_KIND={kind}" in choice.reason
    other = "amx_bf16" if kind == "avx2" else "avx2"
    monkeypatch.setenv(precision.CPU_KIND_VARIABLE, other)
    assert precision.ns_dtype_choice("cpu").dtype != expected  # not the cached answer for the first kind
    monkeypatch.setenv(precision.CPU_KIND_VARIABLE, "pentium")
    with pytest.raises(ValueError, match=r"LIGHTNING_MUON_CPU_KIND='pentium': expected one of \('avx2'"):
        precision.ns_dtype_choice("cpu")
    precision._CACHE.clear()


def test_explicit_ns_dtype_wins(hardware):
    hardware(cpu=AVX2)  # auto would pick float32
    W_bf16, opt = _one_step(ns_dtype="bfloat16")
    W_auto, _ = _one_step()
    assert opt.resolved_ns_dtype() == torch.float32  # what auto would be; the group says bf16
    assert (W_bf16 - W_auto).abs().max() > 1e-4  # the bf16 group really ran in bf16
    assert resolve_ns_dtype("cpu", "bfloat16") == torch.bfloat16
    assert resolve_ns_dtype("cpu", "float16") == torch.float16
    W_svd, _ = _one_step(ns_method="svd")  # auto + svd: float32 (no half-precision SVD)
    assert torch.isfinite(W_svd).all()


def test_orthogonalize_default_is_auto(hardware):
    hardware(cpu=AVX512_BF16)
    G = torch.randn(3, 16, 24)
    assert torch.equal(orthogonalize(G), orthogonalize(G, dtype=torch.bfloat16))
    precision._CACHE.clear()
    hardware(cpu=AVX2)
    assert torch.equal(orthogonalize(G), orthogonalize(G, dtype=torch.float32))


def test_bad_ns_dtype_raises():
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        resolve_ns_dtype("cpu", "half")
    with pytest.raises(ValueError, match="ns_dtype must be"):
        Muon([{"params": [nn.Parameter(torch.randn(4, 4))], "use_muon": True}], ns_dtype=torch.bfloat16)


def test_agree_without_group_is_identity():
    assert precision.agree_ns_dtype(torch.bfloat16, "cpu", None) == torch.bfloat16


# ------------------------------------------------ accuracy contract for every dtype auto can pick
def _exact_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["quintic", "polar_express"])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e6])
def test_band_and_direction_vs_exact_svd(dtype, method, scale):
    # Geometric spectrum 1..1e-2 (inside both presets' design range), at tiny and huge scales
    # (fp16 overflows above 65504 and loses entries below 6e-5 unless normalised before the cast).
    # Band: the method's documented band, +-0.01 for half-precision round-off (measured: bf16
    # [0.857, 1.143] and fp16 [0.859, 1.141] for polar_express's [0.8, 1.2]).
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64))
    G = ((U * torch.logspace(0, -2, 64, dtype=torch.float64)) @ V.T * scale).float()
    out = orthogonalize(G, method, dtype=dtype)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    sv = torch.linalg.svdvals(out.double())
    lo, hi = singular_value_band(method)
    assert lo - 0.01 <= sv.min() and sv.max() <= hi + 0.01, (sv.min(), sv.max())
    # Direction: the projection on the exact polar factor U V^T, as in the fp32 test (> 0.8 per
    # singular direction), and the relative distance to it no worse than fp32's + 0.02.
    ref = _exact_polar(G)
    assert (out.double() * ref).sum() > 0.8 * 64
    err = (out.double() - ref).norm() / ref.norm()
    err32 = (orthogonalize(G, method, dtype=torch.float32).double() - ref).norm() / ref.norm()
    assert err <= err32 + 0.02, (err, err32)


# ------------------------------------------------ heterogeneous ranks agree (2 gloo processes)
def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_mixed_hardware_ranks_agree_on_float32(tmp_path):
    # Rank 0 resolves bf16 (native), rank 1 float32 (AVX2): both must run float32, and the result
    # must equal one process in float32 on the same gradients (DDP and FSDP2 layouts).
    sys.path.insert(0, str(DIST_SCRIPTS))
    import mixed_hardware

    env = dict(os.environ, PYTHONPATH=str(ROOT), PORT=_free_port(), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(DIST_SCRIPTS / "mixed_hardware.py"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    init, grads = mixed_hardware.make()
    params = [nn.Parameter(p.clone()) for p in init]
    ref = Muon([{"params": params, "use_muon": True}], lr=0.05, weight_decay=0.0, ns_dtype="float32")
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        ref.step()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    for mode in ("ddp", "fsdp"):
        ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in range(2)]
        assert [r["own"] for r in ranks] == [torch.bfloat16, torch.float32]
        assert [r["agreed"] for r in ranks] == [torch.float32, torch.float32]
        for r in ranks:
            for a, b in zip(r["params"], params):
                torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mine, other, expected",
    [
        (torch.bfloat16, torch.float16, torch.float16),  # bf16 rank + fp16 rank: both fp16
        (torch.float16, torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.float16, torch.float16, torch.float16),
    ],
)
def test_agree_keeps_the_most_conservative_over_two_ranks(monkeypatch, mine, other, expected):
    # One process standing for two: the all_reduce(MAX) sees the other rank's code for its dtype.
    # Reference: the documented order bf16 < fp16 < fp32 < fp64, written here.
    def all_reduce(code, op, group):
        assert op == precision.dist.ReduceOp.MAX
        code.copy_(torch.maximum(code, torch.tensor([precision._CONSERVATIVE.index(other)], dtype=code.dtype)))

    monkeypatch.setattr(precision.dist, "get_world_size", lambda group: 2)
    monkeypatch.setattr(precision.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(precision, "rank", lambda: 1)
    assert precision.agree_ns_dtype(mine, "cpu", object()) == expected
