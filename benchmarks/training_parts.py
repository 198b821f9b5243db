"""Training-step ratio Muon / AdamW of the example GPT from the CPU time of its parts.

``benchmarks/training.py`` times whole Lightning steps by wall clock; on a shared, oversubscribed
machine wall time mostly measures the neighbours. This script times, in this process's CPU time
(``time.process_time``, 1 thread by default, interleaved rounds), the parts of one step of
``examples.gpt.LitGPT``: forward + backward, the Muon optimizer step (NS in ``ns_dtype="auto"``
and, for comparison, forced bf16), and the fused AdamW step of the AdamW baseline; then reports
``(fwd+bwd + Muon step) / (fwd+bwd + AdamW step)``. It leaves out the data loader and Lightning's
own overhead (the same for both), so the ratio is slightly pessimistic.

    python -m benchmarks.training_parts                                  # demo and paper batch
    python -m benchmarks.training_parts --batches 16x128 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._timing import markdown_table, run_header
from examples.gpt import LitGPT
from lightning_muon import Muon, muon_param_groups


def cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", default=["16x128", "64x256"], help="sequences x tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bf16", action="store_true", help="skip the forced-bf16 Muon step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run_header(torch.device("cpu"), "auto"))
    rows = []
    for spec in args.batches:
        batch, block = (int(x) for x in spec.split("x"))
        torch.manual_seed(0)
        model = LitGPT(vocab_size=65, block_size=block, n_layer=4, n_head=4, n_embd=128)
        x = torch.randint(0, 65, (batch, block))
        y = torch.randint(0, 65, (batch, block))

        def fwd_bwd(model=model, x=x, y=y) -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()

        groups = muon_param_groups(model)
        kw = dict(lr=0.02, adjust_lr="original", adamw_lr=1e-3, weight_decay=0.0)
        opts = {"muon (auto)": Muon(groups, **kw)}
        if not args.no_bf16:
            opts["muon (bf16 forced)"] = Muon(groups, ns_dtype="bfloat16", **kw)
        plain = [{"params": [p for _, p in g["params"]]} for g in groups]
        opts["adamw (fused)"] = torch.optim.AdamW(plain, lr=1e-3, betas=(0.9, 0.95), fused=True)
        fwd_bwd()
        for o in opts.values():
            o.step()  # state allocated outside the timing
        times: dict[str, list[float]] = {"fwd+bwd": [], **{k: [] for k in opts}}
        for _ in range(args.rounds):
            times["fwd+bwd"].append(cpu_time(fwd_bwd))
            for name, o in opts.items():
                times[name].append(cpu_time(o.step))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["fwd+bwd"] + med["adamw (fused)"]
        for name in opts:
            rows.append(
                [
                    f"{batch} x {block} = {batch * block} tokens",
                    name,
                    f"{med['fwd+bwd'] * 1e3:.0f}",
                    f"{med[name] * 1e3:.0f}",
                    f"{(med['fwd+bwd'] + med[name]) / base:.3f}",
                ]
            )
    print(
        f"resolved NS dtype: {opts['muon (auto)'].resolved_ns_dtype()}; {args.threads} thread(s); "
        f"median of {args.rounds} interleaved rounds; CPU time of this process"
    )
    print(markdown_table(["batch", "optimizer", "fwd+bwd CPU ms", "optimizer step CPU ms", "step vs AdamW step"], rows))


if __name__ == "__main__":
    main()
