"""Which dtype Newton–Schulz computes in on a device: ``ns_dtype="auto"``.

bfloat16 halves the cost of Newton–Schulz only where the hardware multiplies it natively; elsewhere
it is emulated and can be about 100x slower than float32 (an AVX2 CPU; numbers in
``benchmarks/RESULTS.md``). :func:`resolve_ns_dtype` picks, once per device and process:

* **bfloat16** where it is native: CUDA compute capability >= 8.0 (Ampere and later); x86 CPUs with
  AVX512-BF16 or AMX-BF16; Arm CPUs with the BF16 extension;
* **float16** on CUDA 7.x (V100, T4: fp16 tensor cores, no bf16 ones). Newton–Schulz normalises its
  input before casting to fp16 (:func:`lightning_muon.orthogonalize`), so fp16 keeps the singular
  value band of every method (tests/test_precision.py checks it against an exact SVD);
* **float32** on CPUs without native bf16 (AVX2, AVX-512 without BF16 when the probe says so).

Capability flags decide first (deterministic: identical machines resolve identically). Where they
are ambiguous (x86 AVX-512 without BF16, CUDA before 7.0, ROCm, other device types, unknown flags)
a one-off probe times a small matmul in each candidate dtype and in float32 (a few milliseconds)
and keeps the candidate only if it is at least ~10% faster. Results are cached per device.

To see what ``auto`` would choose on another CPU (or to test every path on one machine), set
the environment variable ``LIGHTNING_MUON_CPU_KIND`` to one of :data:`CPU_KINDS` (``avx2``,
``avx512``, ``avx512_bf16``, ``amx_bf16``): the flags are then that kind's instead of this CPU's.
It changes the choice, not the kernels; to run the matmuls as that CPU would, also limit oneDNN
before the process starts (``ONEDNN_MAX_CPU_ISA``, see ``docs/hardware.md``).

Distributed: Muon exchanges orthogonalised updates in the Newton–Schulz dtype, so every rank must
use the same one. :class:`lightning_muon.Muon` calls :func:`agree_ns_dtype` at its first step, one
``all_reduce`` over the data-parallel group that keeps the most conservative choice
(bf16 < fp16 < fp32 < fp64): ranks with mixed hardware all use what the least capable one chose.

Example:
    >>> import torch
    >>> from lightning_muon import resolve_ns_dtype
    >>> resolve_ns_dtype("cpu") in (torch.bfloat16, torch.float32)
    True
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.groups import rank

__all__ = [
    "CPU_KINDS",
    "CPU_KIND_VARIABLE",
    "NS_DTYPES",
    "NSDtypeChoice",
    "agree_ns_dtype",
    "describe_device",
    "ns_dtype_choice",
    "resolve_ns_dtype",
]

#: Values accepted for ``ns_dtype`` (``Muon``); "auto" resolves per device.
NS_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32", "float64")

#: The order in which ranks agree: the largest index any rank resolved wins.
_CONSERVATIVE = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

#: A candidate dtype must run the probe matmul in at most this fraction of float32's time.
PROBE_MARGIN = 0.9
PROBE_SIZE = 256

logger = logging.getLogger("lightning_muon")


@dataclass(frozen=True)
class NSDtypeChoice:
    """What ``ns_dtype="auto"`` resolved to on ``device``, and why.

    ``source`` is ``"flags"`` (capability flags decided) or ``"probe"`` (a timing probe decided;
    ``probe_ratio`` is the candidate's matmul time over float32's).
    """

    device: str
    dtype: torch.dtype
    source: str
    reason: str
    probe_ratio: float | None = None


_CACHE: dict[str, NSDtypeChoice] = {}

#: The environment variable that makes ``auto`` resolve as on another kind of CPU.
CPU_KIND_VARIABLE = "LIGHTNING_MUON_CPU_KIND"
#: The CPU kinds seen on this project's machines (and the Arm-free x86 ones users have), with the
#: flags torch's cpuinfo reports on each: what ``auto`` reads.
CPU_KINDS: dict[str, dict[str, object]] = {
    "avx2": {"capability": "AVX2", "avx2": True},  # AMD EPYC without bf16: bf16 emulated, ~150x slower
    "avx512": {"capability": "AVX512", "avx2": True, "avx512_f": True},  # no bf16 flag: the probe decides
    "avx512_bf16": {"capability": "AVX512", "avx2": True, "avx512_f": True, "avx512_bf16": True},
    "amx_bf16": {
        "capability": "AVX512",
        "avx2": True,
        "avx512_f": True,
        "avx512_bf16": True,
        "amx_tile": True,
        "amx_bf16": True,
    },
}


def simulated_cpu_kind() -> str | None:
    """The CPU kind named by ``LIGHTNING_MUON_CPU_KIND``, or None when unset.

    Raises:
        ValueError: the variable names no kind of :data:`CPU_KINDS`.

    Example:
        >>> import os
        >>> os.environ.get(CPU_KIND_VARIABLE) == simulated_cpu_kind()
        True
    """
    kind = os.environ.get(CPU_KIND_VARIABLE) or None
    if kind is not None and kind not in CPU_KINDS:
        raise ValueError(f"{CPU_KIND_VARIABLE}={kind!r}: expected one of {tuple(CPU_KINDS)} (or unset)")
    return kind


def _device_key(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_flags() -> dict[str, object]:
    """The flags ``auto`` reads: those of the kind ``LIGHTNING_MUON_CPU_KIND`` names, else this CPU's."""
    kind = simulated_cpu_kind()
    return {**CPU_KINDS[kind], "simulated": kind} if kind is not None else _host_flags()


def _host_flags() -> dict[str, object]:
    """This CPU's feature flags as torch's cpuinfo reports them (``torch.cpu.get_capabilities``).

    Read once per process (a constant of the host, and the Newton–Schulz kernel choice asks at every
    call); returns a copy.
    """
    return dict(_read_host_flags())


@functools.cache
def _read_host_flags() -> dict[str, object]:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        flags = dict(get())
    else:  # older torch: the private per-feature checks
        flags = {
            name: bool(getattr(torch.cpu, f"_is_{check}_supported", lambda: False)())
            for name, check in (
                ("avx2", "avx2"),
                ("avx512_f", "avx512"),
                ("avx512_bf16", "avx512_bf16"),
                ("amx_tile", "amx_tile"),
            )
        }
    flags["capability"] = torch.backends.cpu.get_cpu_capability()
    return flags


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def _synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None) if device.type != "cpu" else None
    if sync is not None:
        sync(device)


def _probe(device: torch.device, candidate: torch.dtype) -> float:
    """Time of a ``PROBE_SIZE``-square matmul in ``candidate`` over float32 (best of 3 after a warmup).

    Stops early once the candidate is clearly slower (no 40 ms wait for emulated bf16). Returns
    ``inf`` if the device cannot multiply in ``candidate`` at all.
    """
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device)
    times: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, candidate):
        try:
            x = a.to(dtype)
            torch.mm(x, x)
            _synchronize(device)
        except RuntimeError:
            return float("inf")
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(x, x)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
            if dtype is candidate and best > 2 * times[torch.float32]:
                break
        times[dtype] = best
    return times[candidate] / max(times[torch.float32], 1e-9)


def _from_flags(device: torch.device) -> tuple[torch.dtype | None, torch.dtype, str]:
    """(decided dtype or None if ambiguous, candidate for the probe, reason)."""
    if device.type == "cpu":
        flags = _cpu_flags()
        cap = flags.get("capability", "?")
        if flags.get("amx_bf16") or flags.get("avx512_bf16"):
            return torch.bfloat16, torch.bfloat16, f"CPU ({cap}) has native bf16 (AVX512-BF16/AMX)"
        if flags.get("bf16") or flags.get("sve_bf16"):
            return torch.bfloat16, torch.bfloat16, f"Arm CPU ({cap}) has the BF16 extension"
        if flags.get("avx512_f") or cap == "AVX512":
            return None, torch.bfloat16, f"CPU ({cap}) has AVX-512 but no native bf16"
        if flags.get("avx2") or flags.get("neon") or cap in ("AVX2", "NO AVX", "DEFAULT", "SVE256"):
            return torch.float32, torch.bfloat16, f"CPU ({cap}) has no native bf16: bf16 would be emulated"
        return None, torch.bfloat16, f"CPU capability {cap!r} unknown"
    if device.type == "cuda":
        if _is_rocm():
            return None, torch.bfloat16, "ROCm GPU"
        major, minor = _cuda_capability(device)
        if major >= 8:
            return torch.bfloat16, torch.bfloat16, f"CUDA compute capability {major}.{minor} has bf16 tensor cores"
        if major == 7:
            return torch.float16, torch.float16, f"CUDA compute capability {major}.{minor}: fp16 tensor cores, no bf16"
        return None, torch.float16, f"CUDA compute capability {major}.{minor}: no tensor cores"
    return None, torch.bfloat16, f"device type {device.type!r}"


def ns_dtype_choice(device: torch.device | str | None = None) -> NSDtypeChoice:
    """The full :class:`NSDtypeChoice` for ``device`` (default CPU); resolved once, then cached.

    Example:
        >>> ns_dtype_choice("cpu").source in ("flags", "probe")
        True
    """
    device = _device_key(device)
    kind = simulated_cpu_kind() if device.type == "cpu" else None
    key = str(device) if kind is None else f"{device} as {kind}"  # the cache knows which CPU was asked about
    if key in _CACHE:
        return _CACHE[key]
    decided, candidate, reason = _from_flags(device)
    if kind is not None:
        reason += f" ({CPU_KIND_VARIABLE}={kind})"
    if decided is not None:
        choice = NSDtypeChoice(str(device), decided, "flags", reason)
    else:
        ratio = _probe(device, candidate)
        dtype = candidate if ratio <= PROBE_MARGIN else torch.float32
        verdict = "faster" if dtype is candidate else "not faster"
        choice = NSDtypeChoice(
            str(device),
            dtype,
            "probe",
            f"{reason}; probe: {candidate} matmul {ratio:.2g}x the float32 time ({verdict})",
            ratio,
        )
    _CACHE[key] = choice
    if rank() == 0:
        logger.info("lightning_muon: Newton–Schulz on %s runs in %s (%s)", key, choice.dtype, choice.reason)
    return choice


def resolve_ns_dtype(device: torch.device | str | None = None, ns_dtype: str = "auto") -> torch.dtype:
    """The dtype Newton–Schulz computes in on ``device`` for the setting ``ns_dtype``.

    An explicit name (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``) always wins;
    ``"auto"`` picks by hardware (see the module docstring), once per device and process.

    Example:
        >>> resolve_ns_dtype("cpu", "float64")
        torch.float64
    """
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"resolve_ns_dtype: ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")
    if ns_dtype != "auto":
        return getattr(torch, ns_dtype)
    return ns_dtype_choice(device).dtype


def agree_ns_dtype(dtype: torch.dtype, device: torch.device | str, group: dist.ProcessGroup | None) -> torch.dtype:
    """The most conservative of every rank's ``dtype`` (one ``all_reduce``); ``dtype`` without a group.

    Every rank of ``group`` must call it (collectively). Order: bf16 < fp16 < fp32 < fp64.
    """
    if group is None or dist.get_world_size(group) == 1:
        return dtype
    code = torch.tensor([_CONSERVATIVE.index(dtype)], dtype=torch.int32, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
    agreed = _CONSERVATIVE[int(code.item())]
    if agreed != dtype and rank() == 0:
        logger.info("lightning_muon: ranks resolved different Newton–Schulz dtypes; all use %s", agreed)
    return agreed


def describe_device(device: torch.device | str | None = None) -> str:
    """One line naming the hardware: CPU model, capability, native bf16 and threads, or GPU and capability.

    Example:
        >>> "threads" in describe_device("cpu")
        True
    """
    device = _device_key(device)
    if device.type == "cuda":
        major, minor = _cuda_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if device.type != "cpu":
        return str(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    flags = _host_flags()
    native = any(flags.get(k) for k in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))
    kind = simulated_cpu_kind()
    simulated = f", ns_dtype='auto' as on {kind}" if kind else ""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    limited = f", oneDNN limited to {isa}" if isa else ""
    return (
        f"{model or platform.processor() or platform.machine()} ({flags.get('capability')}, "
        f"{'native' if native else 'no native'} bf16, {os.cpu_count()} cores{simulated}{limited}), "
        f"{torch.get_num_threads()} threads"
    )
