"""``Muon``: one ``torch.optim.Optimizer`` with Muon groups and AdamW groups.

Hidden weight matrices get Muon (momentum orthogonalised by Newton–Schulz); everything else gets
AdamW, in the same optimizer object, so Lightning's automatic optimization, LR schedulers,
gradient clipping, checkpoints and LearningRateMonitor see a single optimizer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_muon import Muon, muon_param_groups
    >>> model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    >>> optimizer = Muon(muon_param_groups(model), lr=0.02, adjust_lr="original", adamw_lr=3e-4)
    >>> [(g["name"], len(g["params"])) for g in optimizer.param_groups]
    [('muon', 1), ('adamw', 2), ('adamw_no_decay', 2)]
    >>> x = torch.tensor([1, 2, 3])
    >>> loss = model(x).sum(); loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_functional

from .distributed import (
    UNSUPPORTED_STRATEGY,
    Bucket,
    all_finite,
    check_dtensor_param,
    check_not_flat_shard,
    local_tensor,
    orthogonalize_buckets,
)
from .newton_schulz import METHODS
from .routing import groups_from_routes, route_named_parameters, why_not_muon

__all__ = ["Muon", "ADJUST_LR", "adjusted_lr", "NonFiniteGradientError"]

#: Update-scale rules; m = fan_out (rows), n = fan_in (columns of the flattened weight).
ADJUST_LR: dict[str, Callable[[int, int], float]] = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),  # Keller Jordan
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),  # Moonlight: update RMS 0.2
    "spectral": lambda m, n: math.sqrt(m / n),  # Bernstein: spectral-norm condition
}
_NS_DTYPES = ("bfloat16", "float32", "float64")
_NONFINITE = ("raise", "skip")


class NonFiniteGradientError(FloatingPointError):
    """A gradient contained NaN or Inf; no parameter or optimizer state was changed."""


def adjusted_lr(lr: float, shape: torch.Size | tuple[int, ...], rule: str) -> float:
    """The learning rate Muon applies to a weight of ``shape`` (flattened to (shape[0], rest))."""
    m = shape[0]
    n = math.prod(shape[1:])
    return lr * ADJUST_LR[rule](m, n)


def _flat_matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices and AdamW for the rest, in one optimizer.

    Each param group has a ``use_muon`` flag. ``params`` may be

    * group dicts (e.g. from :func:`lightning_muon.muon_param_groups`); a dict without
      ``use_muon`` is Muon if all its tensors are matrices, AdamW if none is;
    * ``(name, tensor)`` pairs (``model.named_parameters()``): routed by name and shape;
    * plain tensors (``model.parameters()``, as LightningCLI's ``optimizer:`` passes): routed by
      shape only, with a warning, because an embedding or output head cannot be told apart from a
      hidden matrix that way.

    Muon groups: ``buf <- momentum * buf + (1 - momentum) * g``; ``u = lerp(g, buf, momentum)``
    with Nesterov, else ``buf``; ``W <- (1 - lr * weight_decay) W - lr * scale(m, n) * O(u)``
    where ``O`` is :func:`lightning_muon.orthogonalize` and ``scale`` the ``adjust_lr`` rule.
    Weights with more than 2 dims are flattened to ``(shape[0], rest)``. Same-shape updates are
    orthogonalised together in one batched call.

    Distributed (see :mod:`lightning_muon.distributed`): under DDP (``torch.distributed``
    initialised with world size > 1) each matrix is orthogonalised on one owner rank and shared
    with one collective per shape bucket; under FSDP2 (DTensor params) momentum stays sharded and
    each matrix is gathered once, on its owner. FSDP1 and DeepSpeed ZeRO flat shards are refused.

    AdamW groups run ``torch.optim.AdamW``'s own functional kernel with ``adamw_lr``,
    ``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay``.

    Defaults and one LR schedule: ``adjust_lr="match_rms_adamw"`` scales every Muon update to an
    RMS of ``0.2 * lr``, about that of an AdamW update, so one ``lr`` and one ``weight_decay``
    serve both kinds of group (``adamw_lr`` and ``adamw_weight_decay`` default to them), and a
    scheduler's multiplicative factor moves both together. For Keller Jordan's convention use
    ``adjust_lr="original"`` with ``lr=0.02`` and an explicit ``adamw_lr`` (e.g. 3e-4 to 1e-3);
    schedulers scale each group's own initial lr, so the ratio between them is kept.

    Args:
        params: see above.
        lr: learning rate of the Muon groups (and of AdamW groups when ``adamw_lr`` is None).
        momentum: Muon momentum ``beta`` in [0, 1).
        nesterov: use the Nesterov form ``lerp(g, buf, beta)``.
        weight_decay: decoupled weight decay (also AdamW's when ``adamw_weight_decay`` is None).
        ns_method: ``"polar_express"``, ``"quintic"`` or ``"svd"``.
        ns_steps: Newton–Schulz iterations.
        ns_dtype: compute dtype of Newton–Schulz: ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        adjust_lr: ``"original"``, ``"match_rms_adamw"`` or ``"spectral"``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW groups' settings.
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` a :class:`NonFiniteGradientError`
            naming the parameters (default) or ``"skip"`` the whole step with a warning. Either
            way no parameter or state changes. Costs one host sync per step.
        foreach: the AdamW kernel. None (default): torch's fused kernel for plain float CPU/CUDA
            tensors (DTensors and other devices: torch decides); True/False: foreach or per-tensor.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.01,
        ns_method: str = "polar_express",
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
        adjust_lr: str = "match_rms_adamw",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        nonfinite: str = "raise",
        foreach: bool | None = None,
    ) -> None:
        if nonfinite not in _NONFINITE:
            raise ValueError(f"Muon: nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        muon_defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            ns_method=ns_method, ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr,
        )
        adamw_defaults = dict(
            lr=lr if adamw_lr is None else adamw_lr,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            foreach=foreach,
        )
        _validate(muon_defaults, "Muon")
        _validate(adamw_defaults, "Muon (AdamW settings)", adamw=True)
        groups = _as_groups(params)
        for i, group in enumerate(groups):
            own = adamw_defaults if not group["use_muon"] else muon_defaults
            for key, value in own.items():
                group.setdefault(key, value)
            group.setdefault("name", "muon" if group["use_muon"] else "adamw")
            _validate(group, f"Muon param group {i} ({group['name']!r})", adamw=not group["use_muon"])
        super().__init__(groups, {"use_muon": True})
        for group in self.param_groups:  # first, so FSDP1/DeepSpeed get the strategy error
            for p in group["params"]:
                check_not_flat_shard(p, f"a parameter of group {group['name']!r}")
        for group in self.param_groups:
            _check_group_params(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by ``Muon``; check it fits before changing anything.

        Raises ValueError (and loads nothing) for a state dict from another optimizer, a different
        grouping, or state tensors whose shapes differ from the parameters' (a changed model).
        """
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"Muon.load_state_dict: the state dict has {len(groups)} param groups, this optimizer "
                f"{len(self.param_groups)}; was it saved for another model or routing?"
            )
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if "use_muon" not in saved:
                raise ValueError(
                    f"Muon.load_state_dict: param group {i} has no 'use_muon' key: this state dict was "
                    "not saved by lightning_muon.Muon (another optimizer's state cannot be converted)"
                )
            if saved["use_muon"] != own["use_muon"] or len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"Muon.load_state_dict: param group {i} ({own['name']!r}) does not match: saved "
                    f"use_muon={saved['use_muon']} with {len(saved['params'])} params, here "
                    f"use_muon={own['use_muon']} with {len(own['params'])}"
                )
            names = own.get("param_names") or [None] * len(own["params"])
            for key, p, name in zip(saved["params"], own["params"], names):
                for field, value in state_dict["state"].get(key, {}).items():
                    if field != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                        label = name or f"#{key}"
                        raise ValueError(
                            f"Muon.load_state_dict: state {field!r} of parameter {label} has shape "
                            f"{tuple(value.shape)} but the parameter has {tuple(p.shape)}: the model "
                            "changed since the checkpoint was saved"
                        )
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the loss (Lightning passes one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_grads():
            return loss
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_group(group)
        self._muon_groups([g for g in self.param_groups if g["use_muon"]])
        return loss

    def _check_grads(self) -> bool:
        """Validate every gradient before any update: False means skip the step."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        if any(g.is_sparse for g in grads):
            raise ValueError("Muon: sparse gradients are not supported (use nn.Embedding(sparse=False))")
        for group in self.param_groups:  # DeepSpeed ZeRO-1/2 swap flat partitions in after __init__
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                what = f"Muon group {group['name']!r} holds a 1-D tensor at step time"
                raise ValueError(UNSUPPORTED_STRATEGY.format(what=what))
        if all_finite(grads):  # under FSDP2 also agreed over the ranks: all skip or none
            return True
        bad = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                if p.grad is not None and not bool(local_tensor(p.grad).isfinite().all()):
                    bad.append(name or f"<{group['name']} param of shape {tuple(p.shape)}>")
        message = (
            f"Muon: non-finite gradient (NaN or Inf) in {', '.join(bad)}; no parameter or state "
            "was changed. Lower the learning rate, check the loss for overflow (try "
            "precision='bf16-mixed' or gradient clipping), or pass nonfinite='skip' to skip such steps."
        )
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(message)
        warnings.warn(message.replace("; no parameter", "; step skipped, no parameter"), stacklevel=3)
        return False

    def _adamw_group(self, group: dict) -> None:
        live = [p for p in group["params"] if p.grad is not None]
        if not live:
            return
        # torch's fused AdamW kernel for plain float CPU/CUDA tensors unless foreach is set: on
        # CPU about 10x faster than the per-tensor loop torch picks by default (benchmarks/step.py).
        fused = group["foreach"] is None and all(_fusable(p) for p in live)
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in live:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if fused and state["step"].device != p.device:  # the fused kernel wants it on p's device
                state["step"] = state["step"].to(p.device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _adamw_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=None if fused else group["foreach"], fused=fused or None, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False, has_complex=any(p.is_complex() for p in params),
        )

    def _muon_groups(self, groups: list[dict]) -> None:
        """Momentum for every Muon param (foreach), then one orthogonalisation per shape bucket."""
        buckets: dict[tuple, list[tuple[Tensor, Tensor, dict]]] = defaultdict(list)
        for group in groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            for p in live:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Local tensors throughout: under FSDP2 the state stays a sharded DTensor.
            bufs = [local_tensor(self.state[p]["momentum_buffer"]) for p in live]
            grads = [local_tensor(p.grad).to(b.dtype) for p, b in zip(live, bufs)]
            beta = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - beta)
            updates = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
            for p, update in zip(live, updates):
                mesh = getattr(p, "device_mesh", None)  # a DTensor's mesh; None for a plain tensor
                key = (_flat_matrix(p).shape, p.device, mesh, group["ns_method"], group["ns_steps"], group["ns_dtype"])
                buckets[key].append((p, update, group))
        plan = [
            Bucket([u for _, u, _ in items], tuple(shape), method, steps, getattr(torch, dtype), mesh)
            for (shape, _, mesh, method, steps, dtype), items in buckets.items()
        ]
        for items, ortho in zip(buckets.values(), orthogonalize_buckets(plan)):
            for (p, _, group), o in zip(items, ortho):
                lr = group["lr"]
                w = local_tensor(p)
                w.mul_(1 - lr * group["weight_decay"])
                w.add_(o.view_as(w).to(w.dtype), alpha=-adjusted_lr(lr, p.shape, group["adjust_lr"]))


def _fusable(p: Tensor) -> bool:
    """Whether torch's fused AdamW kernel takes ``p``: a plain (not DTensor) float CPU/CUDA tensor."""
    return type(p.data) is Tensor and p.device.type in ("cpu", "cuda") and p.dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64
    )


def _check_group_params(group: dict) -> None:
    """Tensors a group cannot train: non-matrices in Muon groups, fp16 with a too-small AdamW eps."""
    names = group.get("param_names") or [None] * len(group["params"])
    labels = [repr(n) if n else f"of shape {tuple(p.shape)}" for n, p in zip(names, group["params"])]
    if group["use_muon"]:
        for label, p in zip(labels, group["params"]):
            check_dtensor_param(p, f"parameter {label}")
            if reason := why_not_muon(p):
                raise ValueError(
                    f"Muon: parameter {label} in Muon group {group['name']!r} cannot be "
                    f"orthogonalised: {reason}. Put it in a group with use_muon=False."
                )
        return
    tiny = torch.finfo(torch.float16).tiny
    half = [label for label, p in zip(labels, group["params"]) if p.dtype == torch.float16]
    if half and group["eps"] < tiny:
        raise ValueError(
            f"Muon: float16 parameters in AdamW group {group['name']!r} ({', '.join(half[:3])}) "
            f"with adamw_eps={group['eps']}: eps underflows in float16 and a zero gradient gives "
            "0/0 = NaN. Keep fp32 weights (precision='16-mixed'), use bfloat16, or set "
            f"adamw_eps >= {tiny:.2g}."
        )


def _as_groups(params: Iterable[Any]) -> list[dict]:
    """Normalise the three accepted forms of ``params`` into group dicts with ``use_muon``."""
    if isinstance(params, Tensor):
        raise TypeError("Muon: params must be an iterable of tensors, (name, tensor) pairs or dicts")
    items = list(params)
    if not items:
        raise ValueError("Muon: empty parameter list; pass model.parameters() or param groups")
    if all(isinstance(x, dict) for x in items):
        groups = []
        for i, group in enumerate(items):
            group = dict(group)
            group_params = group["params"]
            group_params = [group_params] if isinstance(group_params, Tensor) else list(group_params)
            group["params"] = group_params
            if "use_muon" not in group:
                tensors = [x[1] if isinstance(x, tuple) else x for x in group_params]
                kinds = {why_not_muon(t) is None for t in tensors}
                if len(kinds) > 1:
                    raise ValueError(
                        f"Muon: param group {i} mixes matrices and non-matrices and has no "
                        "'use_muon' key; set use_muon=True or False, or use muon_param_groups()."
                    )
                group["use_muon"] = kinds == {True}
            groups.append(group)
        return groups
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return groups_from_routes(route_named_parameters(items))
    if all(isinstance(x, Tensor) for x in items):
        muon = [p for p in items if why_not_muon(p) is None]
        other = [p for p in items if why_not_muon(p) is not None]
        if muon:
            warnings.warn(
                f"Muon received {len(items)} unnamed parameters and routed them by shape: "
                f"{len(muon)} tensors with >= 2 dims to Muon, {len(other)} to AdamW. Shape alone "
                "cannot tell an embedding or output head from a hidden matrix, so those are "
                "trained by Muon here. Pass model.named_parameters() or "
                "lightning_muon.muon_param_groups(model) for name-aware routing.",
                stacklevel=3,
            )
        groups = [{"name": "muon", "params": muon, "use_muon": True}] if muon else []
        if other:
            groups.append({"name": "adamw", "params": other, "use_muon": False})
        return groups
    raise TypeError("Muon: params must be all tensors, all (name, tensor) pairs, or all dicts")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(group: dict, where: str, adamw: bool = False) -> None:
    """Raise ValueError naming the offending argument; nothing is constructed on failure."""

    def fail(key: str, expected: str) -> None:
        raise ValueError(f"{where}: {'adamw_' if adamw and key != 'lr' else ''}{key} must be {expected}, got {group[key]!r}")

    if not _number(group["lr"]) or group["lr"] < 0:
        fail("lr", "a finite number >= 0")
    if not _number(group["weight_decay"]) or group["weight_decay"] < 0:
        fail("weight_decay", "a finite number >= 0")
    if adamw:
        betas = group["betas"]
        if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
            fail("betas", "two numbers in [0, 1)")
        if not _number(group["eps"]) or group["eps"] < 0:
            fail("eps", "a finite number >= 0")
        return
    if not _number(group["momentum"]) or not 0 <= group["momentum"] < 1:
        fail("momentum", "in [0, 1)")
    if group["ns_method"] not in METHODS:
        fail("ns_method", f"one of {METHODS}")
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        fail("ns_steps", "an integer >= 1")
    if group["ns_dtype"] not in _NS_DTYPES:
        fail("ns_dtype", f"one of {_NS_DTYPES}")
    if group["adjust_lr"] not in ADJUST_LR:
        fail("adjust_lr", f"one of {tuple(ADJUST_LR)}")
    if not isinstance(group["nesterov"], bool):
        fail("nesterov", "a bool")
