"""Newton–Schulz on the weight matrices of GPT-small and a small ViT, against torch.optim.Muon's.

For each matrix set it times, in interleaved rounds (median of ``--repeats`` after ``--warmup``):
our ``orthogonalize`` per shape bucket (as the optimizer calls it) with each kernel, the
per-matrix NS inside ``torch.optim.Muon``, and one large ``torch.mm`` in the same dtype, whose
throughput is the machine's practical matmul limit. It prints a markdown table: ms, achieved
FLOP/s, that as a fraction of the ``torch.mm`` throughput, and the time relative to torch's NS.

Usage (from the repository root):
    python -m benchmarks.orthogonalize                      # CPU, ns dtype "auto", GPT-small x2 layers
    python -m benchmarks.orthogonalize --dtype bfloat16     # force bf16 (slow on CPUs without native bf16)
    python -m benchmarks.orthogonalize --device cuda --layers 12 --compile
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable

import torch

from benchmarks._timing import add_common_args, interleaved_medians, markdown_table, matmul_probe, run_header, setup
from lightning_muon import ns_flops, orthogonalize

NS_STEPS = 5
QUINTIC = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's default coefficients
TORCH = "torch.optim.Muon NS (bf16, per matrix)"


def matrix_set(name: str, layers: int) -> list[tuple[int, int]]:
    """Weight shapes (out, in) of the Muon matrices of one model: fused qkv, attention out, MLP in, MLP out."""
    d = {"gpt-small": 768, "vit-small": 128}[name]
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def buckets(shapes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    """One fp32 stack per distinct shape, as Muon's optimizer step builds them (momentum-like scale)."""
    stacks = []
    for shape in dict.fromkeys(shapes):
        k = shapes.count(shape)
        stacks.append(torch.randn(k, *shape, device=device) / shape[1] ** 0.5)
    return stacks


def candidates(
    stacks: list[torch.Tensor], dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Callable[[], object]]:
    def ours(method: str, **kw: object) -> Callable[[], object]:
        return lambda: [orthogonalize(s, method, NS_STEPS, dtype=dtype, **kw) for s in stacks]

    from torch.optim._muon import _zeropower_via_newtonschulz  # private, but it is the reference

    fns: dict[str, Callable[[], object]] = {
        "ours polar_express (default kernel)": ours("polar_express"),
        "ours quintic, looped": ours("quintic", kernel="looped"),
        "ours quintic, batched": ours("quintic", kernel="batched"),
    }
    if not args.skip_torch:
        fns[TORCH] = lambda: [_zeropower_via_newtonschulz(m, QUINTIC, NS_STEPS, 1e-7) for s in stacks for m in s]
    if args.compile:
        fns["ours quintic, compiled (default kernel)"] = ours("quintic", compile=True)
    if args.svd:
        fns["ours svd (fp32, exact)"] = lambda: [orthogonalize(s, "svd") for s in stacks]
    return fns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--sets", nargs="+", default=["gpt-small", "vit-small"], choices=["gpt-small", "vit-small"])
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="GPT-small layers (default 2 on CPU to stay under 2 minutes, 12 on GPU); the ViT has 4",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd NS (compiles first)")
    parser.add_argument("--svd", action="store_true", help="also time the exact SVD method")
    parser.add_argument(
        "--skip-torch",
        action="store_true",
        help="leave out torch.optim.Muon's NS (bf16 hard-coded: ~100x slow on CPUs without bf16)",
    )
    args = parser.parse_args(argv)
    device, dtype, mm_size = setup(args)
    gpt_layers = args.layers or (2 if device.type == "cpu" else 12)

    print(f"# orthogonalize benchmark, {datetime.date.today()}")
    print(run_header(device, args.dtype))
    print(f"NS and torch.mm in {dtype}; median of {args.repeats} after {args.warmup} warmup, interleaved")
    print(f"command: {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}\n")
    rows = []
    for name in args.sets:
        shapes = matrix_set(name, gpt_layers if name == "gpt-small" else 4)
        stacks = buckets(shapes, device)
        flops = sum(ns_flops(m, n, NS_STEPS) for m, n in shapes)
        mm, mm_flops = matmul_probe(mm_size, dtype, device)
        fns = {"torch.mm": mm, **candidates(stacks, dtype, args)}
        medians = interleaved_medians(fns, warmup=args.warmup, repeats=args.repeats, device=device)
        peak = mm_flops / medians.pop("torch.mm")
        ref = medians.get(TORCH)
        label = f"{name} ({len(shapes)} matrices)"
        rows.append([label, f"torch.mm {mm_size}^2 (peak)", "-", f"{peak / 1e12:.3f}", "100%", "-"])
        for method, t in medians.items():
            rate = "-" if "svd" in method else f"{flops / t / 1e12:.3f}"
            frac = "-" if "svd" in method else f"{flops / t / peak:.0%}"
            rows.append([label, method, f"{t * 1e3:.1f}", rate, frac, f"{t / ref:.2f}" if ref else "-"])
    print(markdown_table(["matrix set", "method", "ms", "TFLOP/s", "of mm peak", "time vs torch NS"], rows))
    print(
        "\nFLOPs count the three matmuls of each NS step (ns_flops); 'of mm peak' can exceed 100% "
        "when the probe itself was slowed by a neighbour. time vs torch NS < 1: ours is faster."
    )


if __name__ == "__main__":
    main()
