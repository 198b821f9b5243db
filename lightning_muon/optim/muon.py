"""``Muon``: one ``torch.optim.Optimizer`` with Muon groups and AdamW groups.

Hidden weight matrices get Muon (momentum orthogonalised by Newton–Schulz); everything else gets
AdamW, in the same optimizer object, so Lightning's automatic optimization, LR schedulers,
gradient clipping, checkpoints and LearningRateMonitor see a single optimizer. This class holds
the state and runs the step; building and checking groups is :mod:`.groups`, the arithmetic
:mod:`.functional` and :mod:`.adamw`, where each matrix is orthogonalised :mod:`lightning_muon.parallel`.

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

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..parallel.buckets import BucketKey, BucketPlan
from ..parallel.dtensor import UNSUPPORTED_STRATEGY, is_dtensor, local, local_grad
from ..parallel.groups import AUTO, all_finite, mesh_domain, process_group_of
from ..parallel.placement import global_index
from ..routing.matrix_view import MatrixView, matrix_view_for
from ..validation import check_choice
from . import groups as G
from .adamw import adamw_step
from .functional import apply_muon_update, muon_direction
from .ns_dtype import agree_ns_dtype, resolve_ns_dtype
from .stochastic_rounding import rounding_key, stochastic_round
from .variants import VARIANTS, VariantItem

__all__ = ["Muon", "NonFiniteGradientError"]

#: Seed of the stochastic rounding of low-precision momentum (the bits are a hash of it, the
#: parameter's position in the optimizer, its rounding step and each element's global index).
_ROUNDING_SEED = 0x5EED


@dataclass
class _Live:
    """A Muon parameter with a gradient this step: its group, matrix view and entry in the bucket plan."""

    group: dict
    param: Tensor
    view: MatrixView
    entry: int


class NonFiniteGradientError(FloatingPointError):
    """A gradient contained NaN or Inf; no parameter or optimizer state was changed."""


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
    where ``O`` is :func:`lightning_muon.orthogonalize` and ``scale`` the ``adjust_lr`` rule: the
    functions of :mod:`lightning_muon.optim.functional` (:func:`~lightning_muon.muon_direction`,
    :func:`~lightning_muon.apply_muon_update`), which this class calls per group. Each parameter is
    seen through its matrix view (a Muon group's ``matrix_views``, ``{name: view}``, set by
    :func:`lightning_muon.muon_param_groups`; see :mod:`lightning_muon.routing.matrix_view`): a conv kernel
    flattened to ``(out, rest)``, a stack of matrices or fused q/k/v blocks each orthogonalised and
    scaled on its own. Without a view, weights with more than 2 dims are flattened to
    ``(shape[0], rest)`` (:func:`~lightning_muon.matrix_view`). Same-shape matrices are
    orthogonalised together in one batched call.
    A group's ``variant`` (:mod:`lightning_muon.optim.variants`) may change ``O`` before it is
    scaled: with ``variant="normuon"`` each row of the matrix view is normalised by NorMuon's second
    moment (:func:`lightning_muon.normuon_normalize`, rescaled to ``O``'s Frobenius norm).

    Distributed (see :mod:`lightning_muon.parallel.buckets`): under DDP (``torch.distributed``
    initialised with world size > 1) each matrix is orthogonalised on one owner rank and shared
    with one collective per shape bucket; under FSDP2, tensor parallelism, FSDP2 x TP and HSDP
    (DTensor params) momentum stays sharded and each matrix is assembled once, on its owner. FSDP1
    and DeepSpeed ZeRO flat shards are refused.

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
        ns_method: ``"polar_express"``, ``"quintic"``, their Gram Newton–Schulz forms
            ``"gram_polar_express"``, ``"gram_quintic"`` (fewer FLOPs on rectangular matrices, see
            :data:`lightning_muon.GRAM_METHODS`), ``"svd"``, or the name of your own iteration
            registered with :func:`lightning_muon.register_ns_method`. On CPU in float32/float64 the first
            two already run as their Gram forms on matrices at least 3x as wide as tall or tall as
            wide (:func:`lightning_muon.optim.newton_schulz.default_gram`).
        ns_steps: Newton–Schulz iterations.
        ns_dtype: compute dtype of Newton–Schulz: ``"auto"`` (default: bfloat16 where the device
            computes it natively, float16 on pre-Ampere CUDA, else float32; resolved once per device,
            the same on every rank, see :mod:`lightning_muon.optim.ns_dtype` and :meth:`resolved_ns_dtype`),
            or ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``.
        adjust_lr: ``"original"``, ``"match_rms_adamw"`` or ``"spectral"``.
        variant: ``"muon"`` (default), ``"normuon"``, or any variant registered with
            :func:`lightning_muon.register_variant`. NorMuon (arXiv 2510.05491) divides each row
            (output neuron) of the orthogonalised update by the root of an EMA of its mean square,
            then restores the update's Frobenius norm, so ``lr`` and ``adjust_lr`` keep their
            meaning (:class:`lightning_muon.optim.variants.normuon.NorMuon`). Extra state: one
            float32 per row (``neuron_second_moment``, kept whole on every rank, also under FSDP2).
        variant_options: the variant's options, e.g. ``{"beta2": 0.95, "eps": 1e-8}`` for NorMuon
            (its defaults); unknown names are refused.
        momentum_dtype: dtype of the Muon momentum buffers: None (default) the parameter's,
            ``"float32"``, or ``"bfloat16"`` (half of float32's state), which is updated in float32
            and stored by stochastic rounding so that small changes are not lost (see
            :mod:`lightning_muon.optim.stochastic_rounding`); a ``torch.dtype`` is accepted. AdamW groups keep
            their moments in the parameters' dtype (this setting does not apply to them).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW groups' settings.
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` a :class:`NonFiniteGradientError`
            naming the parameters (default) or ``"skip"`` the whole step with a warning. Either
            way no parameter or state changes. Costs one host sync per step.
        foreach: the AdamW kernel. None (default): torch's fused kernel for plain float CPU/CUDA
            tensors (DTensors and other devices: torch decides); True/False: foreach or per-tensor.
        process_group: who shares the orthogonalisation of plain (DDP) matrices. ``"auto"``
            (default): every rank when ``torch.distributed`` runs with world size > 1; a
            ``ProcessGroup`` or 1-D ``DeviceMesh``: those ranks, which must step together; None:
            this process alone, no collective (a model trained on one rank only, or a different
            model per rank). DTensor (FSDP2) parameters always use their own mesh.
        maximize, capturable, differentiable, fused: torch optimizer options Muon does not
            implement; True raises a ValueError saying what to do instead.
        normuon_beta2, normuon_eps: deprecated spellings of ``variant_options={"beta2": ...,
            "eps": ...}`` (a DeprecationWarning; removed in the next release).

    ``self.defaults`` holds both families (Muon settings by name, AdamW settings as ``adamw_lr``,
    ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``, ``foreach``), from which
    :meth:`add_param_group` fills new groups.
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
        ns_dtype: str = "auto",
        adjust_lr: str = "match_rms_adamw",
        variant: str = "muon",
        variant_options: dict[str, Any] | None = None,
        momentum_dtype: str | torch.dtype | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        nonfinite: str = "raise",
        foreach: bool | None = None,
        process_group: Any = AUTO,
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        normuon_beta2: float | None = None,
        normuon_eps: float | None = None,
    ) -> None:
        G.refuse_unsupported(
            dict(maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused), "Muon"
        )
        self.nonfinite = check_choice(nonfinite, "nonfinite", "Muon", ("raise", "skip"))
        self.process_group = G.check_process_group(process_group)
        variant_options = _deprecated_normuon_options(variant_options, normuon_beta2, normuon_eps)
        defaults = G.muon_defaults(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_method=ns_method,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            adjust_lr=adjust_lr,
            variant=variant,
            variant_options=variant_options,
            momentum_dtype=momentum_dtype,
        )
        defaults |= G.adamw_defaults(lr, adamw_lr, adamw_betas, adamw_eps, weight_decay, adamw_weight_decay, foreach)
        super().__init__(G.as_groups(params), defaults)  # calls self.add_param_group per group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route, fill and validate ``param_group`` exactly as the constructor does, then add it.

        ``param_group["params"]`` may hold tensors or ``(name, tensor)`` pairs. With ``use_muon``
        the group is one family and missing settings come from ``self.defaults`` (an AdamW
        group's ``lr``, ``betas``, ``eps``, ``weight_decay`` from ``adamw_lr``, ...). Without it,
        the tensors are routed (by name and shape, or by shape alone) and a group holding both
        kinds is split: AdamW part(s) first, the Muon part last (so code that adjusts the group
        it just added via ``param_groups[-1]``, as Lightning's ``BackboneFinetuning`` does,
        reaches the hidden matrices). In a split group ``lr`` is the Muon part's; the AdamW part
        keeps the constructor's ``adamw_lr / lr`` ratio unless the dict sets ``adamw_lr`` (also
        ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``). Names: when the optimizer's
        groups carry parameter names and the new tensors have none, they are named
        ``"<group #i>"`` (torch refuses mixing); names given to an optimizer without names are
        dropped after routing. Every check runs before the optimizer changes
        (:func:`lightning_muon.optim.groups.build_groups`).

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            >>> opt = Muon([{"params": [model[1].weight], "use_muon": True}], lr=0.02)
            >>> opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.002})
            >>> [(g["name"], g["use_muon"], g["lr"]) for g in opt.param_groups]
            [('muon', True, 0.02), ('adamw', False, 0.002), ('muon_1', True, 0.002)]
        """
        self.param_groups.extend(G.build_groups(param_group, self.defaults, self.param_groups, self.process_group))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, process_group=self.process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore (unpickle, ``load_state_dict``): a group saved by an earlier release gets the
        settings it lacks from ``self.defaults`` (NorMuon's ``normuon_beta2``/``normuon_eps`` become
        its ``variant_options``); an AdamW ``step`` saved as a number becomes a tensor."""
        super().__setstate__(state)
        for group in self.param_groups:
            if group.get("use_muon"):
                legacy = {k: group.pop(f"normuon_{k}") for k in ("beta2", "eps") if f"normuon_{k}" in group}
                if legacy and group.get("variant") == "normuon":
                    group.setdefault("variant_options", legacy)
            if "use_muon" in group:
                for key, value in G.fill(group, self.defaults).items():
                    group.setdefault(key, value)
        for param_state in self.state.values():
            if "step" in param_state and not isinstance(param_state["step"], Tensor):
                param_state["step"] = torch.tensor(float(param_state["step"]), dtype=torch.float32)

    def resolved_ns_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        """The dtype Newton–Schulz runs in on ``device`` for groups with ``ns_dtype="auto"``.

        Default device: that of the first Muon parameter. After the first step this is the dtype
        the ranks agreed on; before it, this process's own resolution.

        Example:
            >>> opt = Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True}])
            >>> opt.resolved_ns_dtype() in (torch.bfloat16, torch.float16, torch.float32)
            True
        """
        if device is None:
            device = next((p.device for g in self.param_groups if g["use_muon"] for p in g["params"]), "cpu")
        device = torch.device(device)
        return self.__dict__.get("_auto_ns_dtypes", {}).get(device) or resolve_ns_dtype(device)

    def _compute_dtype(self, key: BucketKey, agree: bool = True) -> torch.dtype:
        """The dtype a bucket's Newton–Schulz runs in; ``"auto"`` resolved once per device and agreed
        over the ranks (``agree=False``: this rank's own resolution until that happened, no collective)."""
        if key.ns_dtype != "auto":
            dtype = getattr(torch, key.ns_dtype)
        elif key.method == "svd":  # torch.linalg.svd has no half-precision kernels
            dtype = torch.float32
        else:
            cache = self.__dict__.setdefault("_auto_ns_dtypes", {})
            if key.device not in cache and not agree:
                return resolve_ns_dtype(key.device)
            if key.device not in cache:  # first step: every rank reaches this with the same buckets
                group = mesh_domain(key.mesh).group if key.mesh is not None else process_group_of(self.process_group)
                cache[key.device] = agree_ns_dtype(resolve_ns_dtype(key.device), key.device, group)
            dtype = cache[key.device]
        return torch.promote_types(dtype, torch.float32) if key.method == "svd" else dtype

    def state_fields(self, group: dict, param: Tensor) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """The state tensors of ``param`` in ``group`` and their ``(shape, dtype)``: the momentum
        buffer and its variant's fields for a Muon group, AdamW's moments otherwise."""
        if not group["use_muon"]:
            return {"exp_avg": (param.shape, param.dtype), "exp_avg_sq": (param.shape, param.dtype)}
        names = group.get("param_names") or [None] * len(group["params"])
        name = next(n for p, n in zip(group["params"], names) if p is param)
        view = matrix_view_for(tuple(param.shape), (group.get("matrix_views") or {}).get(name))
        momentum_dtype = param.dtype if group["momentum_dtype"] is None else getattr(torch, group["momentum_dtype"])
        fields = {"momentum_buffer": (param.shape, momentum_dtype)}
        return fields | VARIANTS[group["variant"]].state_shapes(param, view)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by ``Muon``; check it fits before changing anything.

        Raises ValueError (and loads nothing) for a state dict from another optimizer, a different
        grouping, or state tensors whose shapes differ from the parameters' (a changed model).
        Muon's state keeps its own dtypes (torch would cast it to the parameter's).
        """
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Muon.load_state_dict: the state dict has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}; was it saved for another model or routing?"
            )
        fields = {}
        for i, (saved, own) in enumerate(zip(saved_groups, self.param_groups)):
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
            probe = {**own, **{k: saved[k] for k in ("matrix_views", "variant", "momentum_dtype") if k in saved}}
            if own["use_muon"]:
                G.check_views(probe, f"Muon.load_state_dict: param group {i}")
                if probe["variant"] not in VARIANTS:
                    raise ValueError(
                        f"Muon.load_state_dict: param group {i} uses variant {probe['variant']!r}, which is not "
                        f"registered here (registered: {tuple(VARIANTS)}); register it before loading"
                    )
            names = own.get("param_names") or [None] * len(own["params"])
            for key, p, name in zip(saved["params"], own["params"], names):
                fields[key] = want = self.state_fields(probe, p)
                for field, value in state_dict["state"].get(key, {}).items():
                    if field in want and isinstance(value, Tensor) and value.shape != want[field][0]:
                        raise ValueError(
                            f"Muon.load_state_dict: state {field!r} of parameter {name or f'#{key}'} has shape "
                            f"{tuple(value.shape)} but the parameter needs {tuple(want[field][0])}: the model "
                            "changed since the checkpoint was saved"
                        )
        if any(own["use_muon"] and "matrix_views" not in saved for saved, own in zip(saved_groups, self.param_groups)):
            # saved by a release before matrix views: keep this optimizer's
            state_dict = dict(state_dict)
            state_dict["param_groups"] = [
                {**saved, "matrix_views": own["matrix_views"]}
                if own["use_muon"] and "matrix_views" not in saved
                else saved
                for saved, own in zip(saved_groups, self.param_groups)
            ]
        super().load_state_dict(state_dict)
        for saved, own in zip(saved_groups, self.param_groups):
            if own["use_muon"]:  # torch cast floating state to the parameter's dtype: restore Muon's dtypes
                for key, p in zip(saved["params"], own["params"]):
                    state, loaded = self.state.get(p, {}), state_dict["state"].get(key, {})
                    for field, (_, dtype) in fields[key].items():
                        if field in state and field in loaded:
                            state[field] = loaded[field].to(device=state[field].device, dtype=dtype)

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
                adamw_step(group, self.state)
        self._muon_step([g for g in self.param_groups if g["use_muon"]])
        return loss

    def _check_grads(self) -> bool:
        """Validate every gradient before any update: False means skip the step."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        if any(g.is_sparse for g in grads):
            raise ValueError("Muon: sparse gradients are not supported (use nn.Embedding(sparse=False))")
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):  # DeepSpeed ZeRO's flat partitions
                what = f"Muon group {group['name']!r} holds a 1-D tensor at step time"
                raise ValueError(UNSUPPORTED_STRATEGY.format(what=what))
            if group["use_muon"]:  # e.g. matrix_views edited after construction
                G.check_views(group, f"Muon param group {group['name']!r}", strict=False)
            if isinstance(group["lr"], Tensor):  # e.g. assigned after construction
                raise ValueError(f"Muon param group {group['name']!r}: lr as a Tensor is not supported; use a float")
        if all_finite(grads):  # under FSDP2 also agreed over the ranks: all skip or none
            return True
        bad = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                if p.grad is not None and not bool(local(p.grad).isfinite().all()):
                    bad.append(name or f"<{group['name']} param of shape {tuple(p.shape)}>")
        where = f"Muon: non-finite gradient (NaN or Inf) in {', '.join(bad)}"
        advice = (
            "Lower the learning rate, check the loss for overflow (try precision='bf16-mixed' or "
            "gradient clipping), or pass nonfinite='skip' to skip such steps."
        )
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"{where}; no parameter or state was changed. {advice}")
        warnings.warn(f"{where}; step skipped, no parameter or state was changed. {advice}", stacklevel=3)
        return False

    def _muon_step(self, groups: list[dict]) -> None:
        """Every Muon group's update (:meth:`_updates`), scaled and applied with decoupled decay."""
        live, updates, _ = self._updates(groups, self.state, self.process_group, self._compute_dtype, in_place=True)
        for group in groups:
            mine = [x for x in live if x.group is group]
            apply_muon_update(
                [local(x.param) for x in mine],
                [updates[x.entry] for x in mine],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                adjust_lr=group["adjust_lr"],
                shapes=[x.view.scale_shape(tuple(x.param.shape)) for x in mine],  # each matrix's (fan_out, fan_in)
            )

    def _updates(
        self,
        groups: list[dict],
        state: dict[Tensor, dict[str, Any]],
        process_group: Any,
        compute_dtype: Callable[[BucketKey], torch.dtype],
        in_place: bool = False,
    ) -> tuple[list[_Live], list[Tensor], list[Tensor]]:
        """Momentum of every Muon parameter with a gradient (in ``state``), one orthogonalisation per
        bucket (:class:`~lightning_muon.parallel.BucketPlan`), then each variant's transform.
        Returns the live parameters, and per plan entry the update and the direction it came from
        (with ``in_place``, a direction that is a new tensor may hold its update instead)."""
        plan = BucketPlan()
        live: list[_Live] = []
        directions: list[Tensor] = []
        for group in groups:
            params = [(p, view) for p, view in G.views(group) if p.grad is not None]
            if not params:
                continue
            for p, _ in params:
                fields = state.setdefault(p, {})
                for field, (shape, dtype) in self.state_fields(group, p).items():
                    if field not in fields:  # the parameter's shape: laid out (sharded) like it
                        fields[field] = (
                            torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                            if shape == p.shape
                            else torch.zeros(shape, dtype=dtype, device=p.device)
                        )
            found = _momentum(group, [p for p, _ in params], state, self._positions())
            ns = (group["ns_method"], group["ns_steps"], group["ns_dtype"])
            for (p, view), d in zip(params, found):
                d = local(d)
                # A direction that is not the momentum buffer itself (Nesterov's is a new tensor) can
                # take its own update: no new tensor per step. preview returns the directions: keep them.
                scratch = in_place and d.data_ptr() != local(state[p]["momentum_buffer"]).data_ptr()
                live.append(_Live(group, p, view, plan.add(d, view, *ns, param=p, scratch=scratch)))
                directions.append(d)
        updates = plan.run(compute_dtype, process_group)
        for name, variant in VARIANTS.items():
            mine = [x for x in live if x.group["variant"] == name]
            if mine:
                items = [VariantItem(x.param, updates[x.entry], x.view, x.group["variant_options"]) for x in mine]
                for x, update in zip(mine, variant.transform(items, state)):
                    updates[x.entry] = update
        return live, updates, directions

    @torch.no_grad()
    def preview(self, params: Iterable[Tensor]) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """What the next :meth:`step` would do to each Muon parameter of ``params`` with the current
        gradients, without changing any parameter or state: ``{param: (direction, update)}``.

        ``direction`` is the matrix Muon orthogonalises (momentum, or its Nesterov form) and
        ``update`` the orthogonalised update after the group's variant, before the learning rate and
        its ``adjust_lr`` scale; both have the parameter's shape (for a DTensor, DTensors laid out as
        it is). The same functions as :meth:`step`, on copies of the state; plain tensors are
        orthogonalised here without collectives (one rank may call it alone, e.g. under DDP), DTensors
        over their mesh (every rank must call it).
        Parameters without a gradient or outside the Muon groups are left out.

        Example:
            >>> W = torch.nn.Parameter(torch.randn(4, 6))
            >>> opt = Muon([{"params": [W], "use_muon": True}], ns_method="svd")
            >>> W.grad = torch.randn(4, 6)
            >>> direction, update = opt.preview([W])[W]
            >>> torch.allclose(update @ update.T, torch.eye(4), atol=1e-5), len(opt.state)
            (True, 0)
        """
        wanted = {id(p) for p in params}
        groups = []
        for group in self.param_groups:
            keep = [i for i, p in enumerate(group["params"]) if group["use_muon"] and id(p) in wanted]
            if keep:
                names = group.get("param_names")
                groups.append(
                    {**group, "params": [group["params"][i] for i in keep]}
                    | ({"param_names": [names[i] for i in keep]} if names else {})
                )
        copies = {
            p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state.get(p, {}).items()}
            for g in groups
            for p in g["params"]
        }
        live, updates, directions = self._updates(
            groups, copies, None, lambda key: self._compute_dtype(key, agree=False)
        )
        out = {}
        for x in live:
            pair = (directions[x.entry], updates[x.entry].to(directions[x.entry].dtype))
            if is_dtensor(x.param):
                pair = tuple(_like(x.param, t) for t in pair)
            out[x.param] = pair
        return out

    def _positions(self) -> dict[Tensor, int]:
        """Each parameter's position in the optimizer (a key of its stochastic rounding)."""
        return {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}


def _momentum(
    group: dict, params: list[Tensor], state: dict[Tensor, dict[str, Any]], positions: dict[Tensor, int]
) -> list[Tensor]:
    """Update the momentum buffers of ``params`` in ``state`` and return the directions to orthogonalise.

    ``buf <- lerp(buf, g, 1 - beta)``; direction ``lerp(g, buf, beta)`` with Nesterov, else
    ``buf``. Local tensors throughout (under FSDP2 the state stays a sharded DTensor). A bfloat16
    buffer under ``momentum_dtype="bfloat16"`` is updated in float32 and stored by stochastic
    rounding, its bits keyed by the parameter's position, its ``step`` and each element's global
    index (the same on every rank and world size).
    """
    bufs = [local(state[p]["momentum_buffer"]) for p in params]
    rounded = group["momentum_dtype"] == "bfloat16"
    work = [b.float() if rounded else b for b in bufs]
    grads = [local_grad(p).to(b.dtype) for p, b in zip(params, work)]
    directions = muon_direction(grads, work, group["momentum"], group["nesterov"])
    if rounded:
        for p, buf, value in zip(params, bufs, work):
            fields = state[p]
            step = fields.setdefault("step", torch.zeros((), dtype=torch.int64))
            key = rounding_key(_ROUNDING_SEED, positions[p], int(step))
            buf.copy_(stochastic_round(value, global_index(p), key))
            step += 1
    return directions


def _like(param: Tensor, piece: Tensor) -> Tensor:
    """This rank's ``piece`` of a tensor laid out as the DTensor ``param``, as such a DTensor."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(piece, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def _deprecated_normuon_options(
    options: dict[str, Any] | None, beta2: float | None, eps: float | None
) -> dict[str, Any] | None:
    """``variant_options`` with the deprecated ``normuon_beta2``/``normuon_eps`` folded in (with a warning)."""
    legacy = {k: v for k, v in (("beta2", beta2), ("eps", eps)) if v is not None}
    if not legacy:
        return options
    warnings.warn(
        f"Muon: normuon_beta2/normuon_eps are deprecated; pass variant_options={legacy!r} instead",
        DeprecationWarning,
        stacklevel=3,
    )
    return {**legacy, **(options or {})}
