"""Run a benchmark once per kind of CPU, each in a fresh process limited to what that kind has.

Three kinds of x86 CPU have been seen on this project's machines (``docs/hardware.md``); one with
AMX can imitate the other two, because oneDNN (torch's bf16 matmuls), ATen's own kernels and MKL
(float32 matmuls) read an instruction-set limit when the process starts:

================  ==========================================================  ===============================
kind              environment of the child process                            behaves like
================  ==========================================================  ===============================
``avx2``          ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``        AMD EPYC without bf16: bf16
                  ``MKL_ENABLE_INSTRUCTIONS=AVX2``                            matmuls emulated, float32 by
                                                                              AVX2 FMA
``avx512_bf16``   ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 ATEN_CPU_CAPABILITY=avx512``  AMD EPYC with AVX512-BF16
``amx_bf16``      ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_AMX ATEN_CPU_CAPABILITY=avx512``   Intel Xeon with AMX-BF16
================  ==========================================================  ===============================

Each child also gets ``LIGHTNING_MUON_CPU_KIND=<kind>``, so ``ns_dtype="auto"`` (and the kernel
choice) resolve as on that kind. The first two rows are ``.ci/run``'s limits; MKL's keeps float32
matmuls off AVX-512 as on the AVX2 CPU. A kind the host cannot imitate (an instruction set it
lacks) is reported as not available and not run.

    python -m benchmarks.cpu_kinds -- orthogonalize --sets gpt-512 --repeats 5
    python -m benchmarks.cpu_kinds --kinds avx2 amx_bf16 -- peers --settings defaults
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

#: Per kind: the environment that limits the child process's kernels as on that CPU.
KINDS: dict[str, dict[str, str]] = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"},
    "amx_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "ATEN_CPU_CAPABILITY": "avx512"},
}
#: The host flag each kind needs (``torch.cpu.get_capabilities()``).
NEEDS = {"avx2": "avx2", "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16"}


def host_flags() -> dict[str, object]:
    """This CPU's flags as torch reports them."""
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    return dict(get()) if get is not None else {}


def available(kind: str, flags: dict[str, object]) -> bool:
    """Whether this host can imitate ``kind`` (it has the instruction set the kind needs)."""
    return bool(flags.get(NEEDS[kind]))


def run(kind: str, module: str, argv: list[str]) -> int:
    """Run ``python -m benchmarks.<module> argv`` as on ``kind``; returns its exit status."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_ENABLE_INSTRUCTIONS",)}
    env.update(KINDS[kind], LIGHTNING_MUON_CPU_KIND=kind)
    limits = " ".join(f"{k}={v}" for k, v in KINDS[kind].items())
    print(f"\n# CPU kind {kind}: {limits} LIGHTNING_MUON_CPU_KIND={kind}\n", flush=True)
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *argv], env=env, check=False).returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("benchmark", help="a module of benchmarks/, e.g. orthogonalize, peers, training_parts")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    flags = host_flags()
    status = 0
    for kind in args.kinds:
        if not available(kind, flags):
            print(f"\n# CPU kind {kind}: not available here (this CPU lacks {NEEDS[kind]}); not run\n")
            continue
        status = max(status, run(kind, args.benchmark, rest))
    raise SystemExit(status)


if __name__ == "__main__":
    main()
