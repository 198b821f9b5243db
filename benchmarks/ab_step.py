"""Interleaved A/B of ``Muon.step`` between two checkouts of the package, on the example GPT's shapes.

Each round runs one worker process per checkout, alternating A, B, A, B, ... (so a change in
machine load hits both alike); a worker imports ``lightning_muon`` from its checkout, builds the
parameters of the example GPT (``examples/gpt.py``: tied embedding ``wte``, ``wpe``, per block
LayerNorms, fused ``c_attn``, ``c_proj``, MLP ``c_fc`` and ``c_proj``; routed by name), fixes random
gradients, and reports the median CPU time (``time.process_time``, ``--threads`` threads, default 1)
of ``optimizer.step()`` over ``--steps`` steps after a warmup. ``--target orthogonalize`` times
instead one ``orthogonalize`` call per same-shape stack of the Muon matrices (quintic, the default
kernel), as the optimizer's buckets call it. The table gives the median over rounds per checkout
and the ratio B / A.

    python -m benchmarks.ab_step --a /path/to/main --b . --rounds 7
    python -m benchmarks.ab_step --a ../main --b . --config 12x768
    python -m benchmarks.ab_step --a ../main --b . --config 4x512 --target orthogonalize --ns-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: name -> (layers, width, vocabulary, context); 4x512 is the issue's matrix-heavy GPT, 1x768 GPT-small's block
CONFIGS = {
    "demo": (4, 128, 65, 128),
    "4x384": (4, 384, 65, 256),
    "4x512": (4, 512, 8192, 1024),
    "1x768": (1, 768, 50304, 1024),
    "12x768": (12, 768, 50304, 1024),
}


def worker(
    config: str, steps: int, warmup: int, target: str = "step", ns_dtype: str = "auto", threads: int = 1
) -> None:
    """Time ``Muon.step`` (or ``orthogonalize``) with the ``lightning_muon`` first on ``sys.path``; print JSON."""
    import torch

    from lightning_muon import Muon, orthogonalize

    torch.set_num_threads(threads)
    n_layer, c, vocab, block = CONFIGS[config]
    shapes = {"wte.weight": (vocab, c), "wpe.weight": (block, c), "ln_f.weight": (c,), "ln_f.bias": (c,)}
    for i in range(n_layer):
        for name, shape in {
            "ln_1.weight": (c,),
            "ln_1.bias": (c,),
            "attn.c_attn.weight": (3 * c, c),
            "attn.c_attn.bias": (3 * c,),
            "attn.c_proj.weight": (c, c),
            "attn.c_proj.bias": (c,),
            "ln_2.weight": (c,),
            "ln_2.bias": (c,),
            "mlp.c_fc.weight": (4 * c, c),
            "mlp.c_fc.bias": (4 * c,),
            "mlp.c_proj.weight": (c, 4 * c),
            "mlp.c_proj.bias": (c,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for n, s in shapes.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = Muon(list(params.items()), lr=0.02, adjust_lr="original", adamw_lr=1e-3, weight_decay=0.1, ns_dtype=ns_dtype)
    if target == "orthogonalize":
        dtype = opt.resolved_ns_dtype() if ns_dtype == "auto" else getattr(torch, ns_dtype)
        matrices = [p.grad for g in opt.param_groups if g["use_muon"] for p in g["params"]]
        shapes = list(dict.fromkeys(tuple(m.shape) for m in matrices))
        stacks = [torch.stack([m for m in matrices if tuple(m.shape) == s]) for s in shapes]

        def call() -> None:
            for stack in stacks:
                orthogonalize(stack, "quintic", 5, dtype=dtype)
    else:
        call = opt.step
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    print(json.dumps({"median_s": statistics.median(times), "file": sys.modules["lightning_muon"].__file__}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="root of checkout A (the baseline)")
    parser.add_argument("--b", required=True, help="root of checkout B")
    parser.add_argument("--config", choices=tuple(CONFIGS), default="demo", help="layers x width of the GPT")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--target", choices=("step", "orthogonalize"), default="step")
    parser.add_argument("--ns-dtype", default="auto", help="Muon's ns_dtype (default auto)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (CPU time is summed over them)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.config, args.steps, args.warmup, args.target, args.ns_dtype, args.threads)
        return
    roots = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    times: dict[str, list[float]] = {"A": [], "B": []}
    files = {}
    for r in range(args.rounds):
        for label in ("A", "B") if r % 2 == 0 else ("B", "A"):
            env = dict(os.environ, PYTHONPATH=roots[label], OMP_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--a", "", "--b", ""]
            cmd += ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--target", args.target, "--ns-dtype", args.ns_dtype, "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, cwd=roots[label], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            times[label].append(result["median_s"])
            files[label] = result["file"]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "Muon.step" if args.target == "step" else "orthogonalize per same-shape stack (quintic)"
    print(
        f"{what}, config {args.config} {CONFIGS[args.config]}, ns_dtype {args.ns_dtype}, {args.threads} thread(s); "
        f"{args.rounds} rounds x {args.steps} steps; load {load}"
    )
    for label in ("A", "B"):
        per_round = ", ".join(f"{t * 1e3:.2f}" for t in times[label])
        print(f"{label}: {files[label]}: median {med[label] * 1e3:.2f} ms ({per_round})")
    print(f"B / A = {med['B'] / med['A']:.3f}")


if __name__ == "__main__":
    main()
