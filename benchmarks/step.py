"""A whole optimizer step on GPT-small's parameters: ours vs torch.optim.Muon + AdamW vs AdamW.

Builds GPT-small's parameters (d = 768, GPT-2 vocabulary, tied head; ``--layers`` blocks of fused
qkv, attention out, MLP in and out, two LayerNorms), routes them with ``muon_param_groups`` and
times ``optimizer.step()`` with fixed random gradients, in interleaved rounds (median of
``--repeats`` after ``--warmup``), for:

* ours: :class:`lightning_muon.Muon` (Muon on hidden matrices, AdamW on the rest, one object);
* ``torch.optim.Muon`` on the same matrices + ``torch.optim.AdamW`` on the rest (two objects);
* ``torch.optim.AdamW`` alone on everything;
* the two torch rows again with ``AdamW(fused=True)`` (not torch's default on CPU).

All share one parameter set (each keeps its own state), and the same settings: Muon lr 0.02,
momentum 0.95, Nesterov, 5 NS steps, "original" shape scaling; AdamW lr 3e-4, betas (0.9, 0.95);
weight decay 0.1 (0 on gains and biases). torch.optim.Muon runs NS in bf16 (hard-coded), ours in
``--dtype`` (default "auto": bf16 only where the hardware has it natively). It also prints the bytes of optimizer
state and the NS time a matmul running at the ``torch.mm`` throughput measured in the same rounds
would need (the floor for a Muon step).

Usage (from the repository root):
    python -m benchmarks.step                 # CPU, 2 layers
    python -m benchmarks.step --device cuda --layers 12
"""

from __future__ import annotations

import argparse
import datetime

import torch
from torch import nn

from benchmarks._timing import (
    add_common_args,
    command_line,
    interleaved_medians,
    markdown_table,
    matmul_probe,
    run_header,
    setup,
    state_bytes,
)
from lightning_muon import Muon, muon_param_groups, ns_flops

MUON_LR, ADAMW_LR, MOMENTUM, WEIGHT_DECAY, BETAS = 0.02, 3e-4, 0.95, 0.1, (0.9, 0.95)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp_in, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPTParams(nn.Module):
    """GPT-small's parameters (no forward: only the optimizer is timed)."""

    def __init__(self, layers: int, d: int = 768, vocab: int = 50257, context: int = 1024) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2


def tensor_groups(groups: list[dict]) -> list[dict]:
    """Plain-tensor param groups (torch optimizers), keeping the weight-decay split."""
    return [
        {"params": [p for _, p in g["params"]], **({"weight_decay": g["weight_decay"]} if "weight_decay" in g else {})}
        for g in groups
    ]


def optimizers(model: nn.Module, ns_dtype: str = "auto") -> dict[str, list[torch.optim.Optimizer]]:
    groups = muon_param_groups(model)
    muon = tensor_groups([g for g in groups if g["use_muon"]])
    rest = tensor_groups([g for g in groups if not g["use_muon"]])
    common = dict(
        lr=MUON_LR,
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=WEIGHT_DECAY,
        adjust_lr="original",
        adamw_lr=ADAMW_LR,
        adamw_betas=BETAS,
        ns_dtype=ns_dtype,
    )
    return {
        "ours, quintic": [Muon(groups, ns_method="quintic", **common)],
        "ours, polar_express (default)": [Muon(groups, **common)],
        "torch.optim.Muon + AdamW": [
            torch.optim.Muon(
                muon, lr=MUON_LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True, adjust_lr_fn="original"
            ),
            torch.optim.AdamW(rest, lr=ADAMW_LR, betas=BETAS, weight_decay=WEIGHT_DECAY),
        ],
        "torch.optim.Muon + AdamW(fused=True)": [
            torch.optim.Muon(
                muon, lr=MUON_LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True, adjust_lr_fn="original"
            ),
            torch.optim.AdamW(rest, lr=ADAMW_LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True),
        ],
        "torch.optim.AdamW alone": [
            torch.optim.AdamW(tensor_groups(groups), lr=ADAMW_LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        ],
        "torch.optim.AdamW(fused=True) alone": [
            torch.optim.AdamW(tensor_groups(groups), lr=ADAMW_LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks (default 2 on CPU to stay under 2 minutes, 12 on GPU)",
    )
    parser.add_argument("--vocab", type=int, default=50257, help="embedding rows (GPT-2: 50257)")
    args = parser.parse_args(argv)
    device, dtype, mm_size = setup(args)
    layers = args.layers or (2 if device.type == "cpu" else 12)

    torch.manual_seed(0)
    model = GPTParams(layers, vocab=args.vocab).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = optimizers(model, args.dtype)
    mm, mm_flops = matmul_probe(mm_size, dtype, device)
    fns = {"torch.mm": mm} | {name: (lambda os=os: [o.step() for o in os]) for name, os in opts.items()}
    medians = interleaved_medians(fns, warmup=max(1, args.warmup), repeats=args.repeats, device=device)
    peak = mm_flops / medians.pop("torch.mm")
    matrices = [p for o in opts["torch.optim.Muon + AdamW"][:1] for g in o.param_groups for p in g["params"]]
    ns_floor = sum(ns_flops(*p.shape, 5) for p in matrices) / peak

    n_params = sum(p.numel() for p in model.parameters())
    print(f"# optimizer step benchmark, {datetime.date.today()}")
    print(run_header(device, args.dtype))
    print(
        f"GPT-small, {layers} layers, "
        f"{n_params / 1e6:.1f} M params ({len(matrices)} Muon matrices); "
        f"median of {args.repeats} after {max(1, args.warmup)} warmup, interleaved"
    )
    print(f"command: {command_line()}")
    print(
        f"torch.mm {mm_size}^2 in {dtype}: {peak / 1e12:.3f} TFLOP/s; "
        f"NS of the Muon matrices at that rate: {ns_floor * 1e3:.1f} ms\n"
    )
    ref, adamw = medians["torch.optim.Muon + AdamW"], medians["torch.optim.AdamW alone"]
    rows = [
        [
            name,
            f"{t * 1e3:.1f}",
            f"{t / ref:.2f}",
            f"{t / adamw:.2f}",
            f"{sum(state_bytes(o) for o in opts[name]) / 2**20:.1f}",
        ]
        for name, t in medians.items()
    ]
    print(markdown_table(["optimizer", "step ms", "vs torch Muon+AdamW", "vs AdamW (default)", "state MiB"], rows))


if __name__ == "__main__":
    main()
