"""Newton–Schulz one matrix at a time (``looped``) or on the stack (``batched``), by width.

For each width ``d`` it builds the Muon matrices of ``--layers`` GPT blocks of that width (fused
qkv ``(3d, d)``, attention out ``(d, d)``, MLP in ``(4d, d)`` and out ``(d, 4d)``, so ``d`` is every
matrix's smaller side), and times ``orthogonalize`` per same-shape stack, as the optimizer's
buckets call it, with each kernel (quintic, 5 steps), in interleaved rounds (median of
``--repeats`` after ``--warmup``). It prints the two times and their ratio per width: the
evidence behind :data:`lightning_muon.optim.newton_schulz.LOOP_MIN_SIDE` for this CPU kind and
dtype (``benchmarks/cpu_kinds.py`` runs it as on each kind).

    python -m benchmarks.kernel_choice                        # dtype auto, widths 128 ... 1024
    python -m benchmarks.kernel_choice --dtype float32 --widths 256 512 768
"""

from __future__ import annotations

import argparse
import datetime

import torch

from benchmarks._timing import add_common_args, command_line, interleaved_medians, markdown_table, run_header, setup
from lightning_muon import orthogonalize
from lightning_muon.optim.newton_schulz import default_kernel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024])
    parser.add_argument("--layers", type=int, default=2, help="GPT blocks per width (matrices per stack)")
    args = parser.parse_args(argv)
    device, dtype, _ = setup(args)
    print(f"# Newton–Schulz kernel choice, {datetime.date.today()}")
    print(run_header(device, args.dtype))
    print(f"NS in {dtype}, quintic, 5 steps; median of {args.repeats} after {args.warmup} warmup, interleaved")
    print(f"command: {command_line()}\n")
    rows = []
    for d in args.widths:
        shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
        stacks = [torch.randn(args.layers, m, n, device=device) / n**0.5 for m, n in shapes]
        fns = {
            kernel: (lambda k=kernel, st=stacks: [orthogonalize(s, "quintic", 5, dtype=dtype, kernel=k) for s in st])
            for kernel in ("looped", "batched")
        }
        t = interleaved_medians(fns, warmup=args.warmup, repeats=args.repeats, device=device)
        chosen = default_kernel(device, d, dtype)
        rows.append(
            [d, len(shapes) * args.layers, f"{t['looped'] * 1e3:.1f}", f"{t['batched'] * 1e3:.1f}"]
            + [f"{t['batched'] / t['looped']:.2f}", chosen]
        )
    header = ["smaller side", "matrices", "looped ms", "batched ms", "batched / looped", "default_kernel"]
    print(markdown_table(header, rows))
    print("\nbatched / looped < 1: the stack is faster; default_kernel: what the default picks here.")


if __name__ == "__main__":
    main()
