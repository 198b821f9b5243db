"""Newton–Schulz on the weight matrices of GPT-small and a small ViT, against torch.optim.Muon's.

For each matrix set it times, in interleaved rounds (median of ``--repeats`` after ``--warmup``):
our ``orthogonalize`` per shape bucket (as the optimizer calls it) with each kernel, the
per-matrix NS inside ``torch.optim.Muon``, one large ``torch.mm`` in the same dtype (the machine's
practical matmul limit), and the **matmul floor**: the same three products per NS step on the same
matrices, with nothing else (no scaling, casts or additions), one matrix at a time and batched;
the faster of the two is the matmul throughput these shapes allow. It prints a markdown table: ms,
achieved FLOP/s, that as a fraction of the ``torch.mm`` throughput and of the matmul floor's, and
the time relative to torch's NS.

Usage (from the repository root):
    python -m benchmarks.orthogonalize                      # CPU, ns dtype "auto", GPT d=512 and d=768, ViT
    python -m benchmarks.orthogonalize --dtype bfloat16     # force bf16 (slow on CPUs without native bf16)
    python -m benchmarks.orthogonalize --device cuda --layers 12 --compile
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import torch

from benchmarks._timing import (
    add_common_args,
    command_line,
    interleaved_medians,
    markdown_table,
    matmul_probe,
    run_header,
    setup,
)
from lightning_muon import ns_flops, orthogonalize

NS_STEPS = 5
QUINTIC = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's default coefficients
TORCH = "torch.optim.Muon NS (bf16, per matrix)"


WIDTHS = {"gpt-512": 512, "gpt-small": 768, "vit-small": 128}
FLOOR = "matmul floor (NS's products only)"


def matrix_set(name: str, layers: int) -> list[tuple[int, int]]:
    """Weight shapes (out, in) of the Muon matrices of one model: fused qkv, attention out, MLP in, MLP out."""
    d = WIDTHS[name]
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def matmul_floor(stacks: list[torch.Tensor], dtype: torch.dtype, batched: bool) -> Callable[[], object]:
    """The products of ``NS_STEPS`` Newton–Schulz steps on ``stacks`` and nothing else.

    Per step and matrix (k its smaller side): the k x k Gram product, its square, and the k x k
    times k x n product, as ``mm`` per matrix or ``bmm`` per stack, into preallocated outputs.
    Its throughput is what matmuls of these shapes reach on this machine: the limit for any
    Newton–Schulz implementation on them.
    """
    work = []
    for s in stacks:
        X = s.to(dtype).contiguous()
        tall = X.shape[-2] > X.shape[-1]
        k = min(X.shape[-2:])
        A = X.new_empty(X.shape[0], k, k)
        work.append((X, tall, A, torch.empty_like(A), torch.empty_like(X)))

    mm = torch.bmm if batched else torch.mm

    def products(x: torch.Tensor, tall: bool, a: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> None:
        for _ in range(NS_STEPS):
            mm(x.mT, x, out=a) if tall else mm(x, x.mT, out=a)
            mm(a, a, out=p)
            mm(x, p, out=y) if tall else mm(p, x, out=y)

    def run() -> None:
        for X, tall, A, P, Y in work:
            if batched:
                products(X, tall, A, P, Y)
            else:
                for x, a, p, y in zip(X, A, P, Y):
                    products(x, tall, a, p, y)

    return run


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
        f"{FLOOR}, looped": matmul_floor(stacks, dtype, batched=False),
        f"{FLOOR}, batched": matmul_floor(stacks, dtype, batched=True),
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
    parser.add_argument("--sets", nargs="+", default=["gpt-512", "gpt-small", "vit-small"], choices=list(WIDTHS))
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="GPT layers (default 2 on CPU to stay under 2 minutes, 12 on GPU); the ViT has 4",
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
    print(f"command: {command_line()}\n")
    rows = []
    for name in args.sets:
        shapes = matrix_set(name, 4 if name == "vit-small" else gpt_layers)
        stacks = buckets(shapes, device)
        flops = sum(ns_flops(m, n, NS_STEPS) for m, n in shapes)
        mm, mm_flops = matmul_probe(mm_size, dtype, device)
        fns = {"torch.mm": mm, **candidates(stacks, dtype, args)}
        medians = interleaved_medians(fns, warmup=args.warmup, repeats=args.repeats, device=device)
        peak = mm_flops / medians.pop("torch.mm")
        floor = min(medians.pop(f"{FLOOR}, looped"), medians.pop(f"{FLOOR}, batched"))
        ref = medians.get(TORCH)
        label = f"{name} ({len(shapes)} matrices)"
        rows.append([label, f"torch.mm {mm_size}^2 (peak)", "-", f"{peak / 1e12:.3f}", "100%", "-", "-"])
        rows.append(
            [label, f"{FLOOR}, faster kernel", f"{floor * 1e3:.1f}", f"{flops / floor / 1e12:.3f}"]
            + [f"{flops / floor / peak:.0%}", "100%", f"{floor / ref:.2f}" if ref else "-"]
        )
        for method, t in medians.items():
            exact = "svd" in method
            rate = "-" if exact else f"{flops / t / 1e12:.3f}"
            frac = "-" if exact else f"{flops / t / peak:.0%}"
            of_floor = "-" if exact else f"{floor / t:.0%}"
            rows.append([label, method, f"{t * 1e3:.1f}", rate, frac, of_floor, f"{t / ref:.2f}" if ref else "-"])
    header = ["matrix set", "method", "ms", "TFLOP/s", "of mm peak", "of matmul floor", "time vs torch NS"]
    print(markdown_table(header, rows))
    print(
        "\nFLOPs count the three matmuls of each NS step (ns_flops); 'of mm peak' can exceed 100% "
        "when the probe itself was slowed by a neighbour. 'of matmul floor': the time of the same "
        "products alone over the method's time. time vs torch NS < 1: ours is faster."
    )


if __name__ == "__main__":
    main()
