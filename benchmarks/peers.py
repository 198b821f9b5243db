"""One optimizer step on GPT-small's parameters: lightning_muon.Muon against the Muon of other libraries.

Every optimizer gets its own copy of the same parameters and the same gradients, and the same
routing (Muon on the transformer blocks' matrices, AdamW on embeddings, gains and biases). Peers
(installed by ``pip install -e ".[bench]"``; missing ones are skipped):

* ``torch.optim.Muon`` + ``torch.optim.AdamW(fused=True)`` (two objects);
* ``timm.optim.Muon`` (``use_fallback`` groups for AdamW);
* ``pytorch_optimizer.Muon`` (``use_muon`` groups);
* ``heavyball.MuonAdamW``: it routes by ``ndim`` alone, so it gets the blocks' matrices and the 1-D
  tensors, and the embeddings go to a ``torch.optim.AdamW(fused=True)`` beside it; run eagerly
  (``heavyball.utils.compile_mode = None``: its default max-autotune compile takes minutes on CPU).

Two settings: each library's **defaults** (its own NS dtype, coefficients and update scale), and
**matched**: quintic coefficients, 5 steps, NS in bfloat16 (every peer hard-codes bf16) and in
float32 for ours and for the peers whose NS function takes a dtype argument
(timm, pytorch_optimizer: their default is patched for the run). Reported per optimizer: median
step time, wall and this process's CPU time (candidates interleaved round by round; one slower than
``--max-seconds`` in total sits out the remaining rounds; "vs fastest" uses CPU time on CPU), optimizer
state bytes, and the first step's update against the exact SVD polar factor ``P`` of the gradient:
the update divided by its least-squares scale onto ``P`` has singular values in [lo, hi] and
relative distance ``|U/a - P| / |P|`` (first step: every update is a multiple of NS(gradient)).

Usage (from the repository root):
    python -m benchmarks.peers                 # CPU: GPT-small, 1 layer
    python -m benchmarks.peers --small         # d = 256, 1 layer, vocab 8192: bf16 peers on AVX2 CPUs
    python -m benchmarks.peers --device cuda --layers 12
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks._timing import command_line, markdown_table, run_header, synchronize
from benchmarks.step import GPTParams
from lightning_muon import Muon, muon_param_groups, orthogonalize

LR, ADAMW_LR, WD = 0.02, 3e-4, 0.0  # no weight decay: the step's change is the update itself


def _nbytes(x: object) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in the optimizers' per-parameter state (nested containers included)."""
    return sum(_nbytes(s) for o in opts for s in o.state.values())


@contextlib.contextmanager
def patched_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Set the default compute dtype of timm's and pytorch_optimizer's NS functions (None: as is)."""
    targets = []
    if dtype is not None:
        if importlib.util.find_spec("timm"):
            import timm.optim.muon as tm

            targets.append((tm.zeropower_via_newtonschulz, 2))
        if importlib.util.find_spec("pytorch_optimizer"):
            import pytorch_optimizer.optimizer.utils.matrix as pm

            targets.append((pm.zero_power_via_newton_schulz_5, 4))
    saved = [fn.__defaults__ for fn, _ in targets]
    try:
        for fn, i in targets:
            d = list(fn.__defaults__)
            d[i] = dtype
            fn.__defaults__ = tuple(d)
        yield
    finally:
        for (fn, _), d in zip(targets, saved):
            fn.__defaults__ = d


def split(model: torch.nn.Module) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Our groups, and the tensors of: Muon matrices, 1-D tensors, embeddings (shared by all peers)."""
    groups = muon_param_groups(model)
    muon = [p for g in groups if g["use_muon"] for _, p in g["params"]]
    rest = [p for g in groups if not g["use_muon"] for _, p in g["params"]]
    return groups, muon, [p for p in rest if p.ndim < 2], [p for p in rest if p.ndim >= 2]


def builders(matched: str | None) -> dict[str, Callable[[torch.nn.Module], list[torch.optim.Optimizer]]]:
    """name -> function(model) -> optimizers. ``matched``: None (defaults), "bfloat16" or "float32"."""

    def ours(model):
        groups, *_ = split(model)
        kw = {} if matched is None else dict(ns_method="quintic", ns_steps=5, ns_dtype=matched)
        return [Muon(groups, lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR, **kw)]

    def torch_muon(model):
        _, muon, flat, emb = split(model)
        return [
            torch.optim.Muon(muon, lr=LR, weight_decay=WD),
            torch.optim.AdamW(flat + emb, lr=ADAMW_LR, weight_decay=WD, fused=True),
        ]

    def timm_muon(model):
        from timm.optim import Muon as TimmMuon

        _, muon, flat, emb = split(model)
        kw = {} if matched is None else dict(ns_coefficients="quintic", ns_steps=5)
        return [
            TimmMuon(
                [{"params": muon}, {"params": flat + emb, "use_fallback": True}],
                lr=LR,
                weight_decay=WD,
                fallback_lr_scale=ADAMW_LR / LR,
                **kw,
            )
        ]

    def po_muon(model):
        from pytorch_optimizer import Muon as POMuon

        _, muon, flat, emb = split(model)
        kw = {} if matched is None else dict(ns_coeffs="original", ns_steps=5)
        return [
            POMuon(
                [{"params": muon, "use_muon": True}, {"params": flat + emb, "use_muon": False}],
                lr=LR,
                weight_decay=WD,
                adamw_lr=ADAMW_LR,
                **kw,
            )
        ]

    def heavyball_muon(model):
        import heavyball

        heavyball.utils.compile_mode = None
        _, muon, flat, emb = split(model)
        return [
            heavyball.MuonAdamW(muon + flat, lr=LR, weight_decay=WD),
            torch.optim.AdamW(emb, lr=ADAMW_LR, weight_decay=WD, fused=True),
        ]

    out = {"lightning_muon.Muon": ours, "torch.optim.Muon + AdamW(fused)": torch_muon}
    available = {
        "timm": ("timm.optim.Muon", timm_muon),
        "pytorch_optimizer": ("pytorch_optimizer.Muon", po_muon),
        "heavyball": ("heavyball.MuonAdamW", heavyball_muon),
    }
    for module, (name, fn) in available.items():
        if importlib.util.find_spec(module) is None:
            print(f"({module} not installed: skipped)")
            continue
        if matched == "float32" and module in ("heavyball",):
            continue  # bf16 hard-coded: no float32 run to match
        out[name] = fn
    if matched == "float32":
        del out["torch.optim.Muon + AdamW(fused)"]  # bf16 hard-coded
    return out


def band(before: list[torch.Tensor], after: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[float, ...]:
    """Worst (lowest lo, highest hi, largest distance) over the matrices: scale-free update vs polar(grad)."""
    lo, hi, dist = float("inf"), 0.0, 0.0
    for w0, w1, g in zip(before, after, grads):
        U = (w0 - w1).double().reshape(w0.shape[0], -1)
        P = orthogonalize(g.double().reshape(g.shape[0], -1), "svd")
        a = (U * P).sum() / (P * P).sum()
        sv = torch.linalg.svdvals(U / a)
        lo, hi = min(lo, float(sv.min())), max(hi, float(sv.max()))
        dist = max(dist, float((U / a - P).norm() / P.norm()))
    return lo, hi, dist


class Candidate:
    """One optimizer (set) on its own copy of the parameters, timed step by step."""

    def __init__(self, name: str, build, model_fn, init, grads) -> None:
        self.name, self.model = name, model_fn()
        self.params = list(self.model.parameters())
        with torch.no_grad():
            for p, x in zip(self.params, init):
                p.copy_(x)
        self.grads = grads
        self.opts = build(self.model)
        _, muon, _, _ = split(self.model)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.muon, self.muon_grads = muon, [grads[index[id(p)]] for p in muon]
        self.timed: list[tuple[float, float]] = []  # (wall, CPU) seconds per step
        self.warm: list[tuple[float, float]] = []
        self.band: tuple[float, ...] = ()

    def step(self, device: torch.device, record: bool) -> None:
        for p, g in zip(self.params, self.grads):  # some optimizers (heavyball) clear .grad in step()
            p.grad = g
        before = [p.detach().clone() for p in self.muon] if not self.band else None
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for o in self.opts:
            o.step()
        synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if before is not None:
            self.band = band(before, [p.detach() for p in self.muon], self.muon_grads)
        (self.timed if record else self.warm).append((wall, cpu))

    def row(self) -> list[object]:
        lo, hi, dist = self.band
        steps = self.timed or self.warm  # a candidate that only ran its warmup reports that step
        wall, cpu = (statistics.median(x) for x in zip(*steps))
        return [
            self.name,
            f"{wall * 1e3:.1f}",
            f"{cpu * 1e3:.1f}",
            len(steps),
            f"{state_bytes(self.opts) / 2**20:.1f}",
            f"[{lo:.3f}, {hi:.3f}]",
            f"{dist:.3f}",
        ]


def run_interleaved(candidates: list[Candidate], args, device) -> list[list[object]]:
    """Round-robin: warmup, then one step of each candidate per round; a candidate whose total time
    passes ``--max-seconds`` sits out the remaining rounds (bf16 peers on CPUs without bf16)."""
    spent = {c.name: 0.0 for c in candidates}
    for i in range(args.warmup + args.repeats):
        for c in candidates:
            if spent[c.name] > args.max_seconds:
                continue
            start = time.perf_counter()
            c.step(device, record=i >= args.warmup)
            spent[c.name] += time.perf_counter() - start
    return [c.row() for c in candidates]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default 1 on CPU, 12 on GPU)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--small", action="store_true", help="d = 256, 1 layer, vocab 8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="per candidate and setting: stop timing after this (bf16 peers on CPUs without bf16)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["defaults", "bfloat16", "float32"],
        choices=["defaults", "bfloat16", "float32"],
        help="defaults and matched NS dtypes",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.small:
        args.d, args.layers, args.vocab = 256, args.layers or 1, 8192
    layers = args.layers or (1 if device.type == "cpu" else 12)

    def make_model() -> torch.nn.Module:
        return GPTParams(layers, d=args.d, vocab=args.vocab).to(device)

    torch.manual_seed(0)
    model = make_model()
    init = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    print(f"# peer optimizers, one step, {datetime.date.today()}")
    print(run_header(device, "auto"))
    print(
        f"GPT params: d={args.d}, {layers} layers, vocab {args.vocab}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; median of <= {args.repeats} "
        f"after {args.warmup} warmup, <= {args.max_seconds:g} s per candidate"
    )
    print(f"command: {command_line()}\n")
    header = [
        "optimizer",
        "step ms (wall)",
        "step ms (CPU)",
        "steps timed",
        "state MiB",
        "update sv / scale",
        "dist to polar",
    ]
    for setting in args.settings:
        matched = None if setting == "defaults" else setting
        with patched_dtype(torch.float32 if matched == "float32" else None):
            candidates = [Candidate(name, build, make_model, init, grads) for name, build in builders(matched).items()]
            rows = run_interleaved(candidates, args, device)
        label = "each library's defaults" if matched is None else f"matched: quintic, 5 steps, NS in {matched}"
        col = 2 if device.type == "cpu" else 1  # CPU time: robust to other jobs on a shared CPU
        fastest = min(float(r[col]) for r in rows)
        for r in rows:
            r.append(f"{float(r[col]) / fastest:.2f}")
        print(f"## {label}\n")
        print(markdown_table([*header, "vs fastest"], rows))
        print()


if __name__ == "__main__":
    main()
