"""What the example LightningModules share: the Muon/AdamW switch with one LR schedule."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lightning_muon import configure_muon, lr_lambda, muon_param_groups
from lightning_muon.distributed import is_dtensor

OPTIMIZERS = ("muon", "adamw")


def configure_example_optimizer(
    module: nn.Module,
    *,
    optimizer: str = "muon",
    lr: float = 0.02,
    adamw_lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    adjust_lr: str = "original",
    ns_method: str = "polar_express",
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_steps: int = 0,
    schedule: str = "constant",
    max_steps: int | None = None,
    variant: str = "muon",
    momentum_dtype: str | None = None,
    split_qkv: bool | str = False,
) -> dict[str, Any] | torch.optim.Optimizer:
    """Muon (hidden matrices at ``lr``, the rest AdamW at ``adamw_lr``) or AdamW everywhere at
    ``adamw_lr``, under the same warmup and schedule, so a comparison changes one thing.
    ``variant`` (``"normuon"``) and ``momentum_dtype`` (``"bfloat16"``) go to Muon."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "muon":
        return configure_muon(
            module,
            lr=lr,
            adamw_lr=adamw_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adjust_lr=adjust_lr,
            ns_method=ns_method,
            adamw_betas=betas,
            warmup_steps=warmup_steps,
            schedule=schedule,
            max_steps=max_steps,
            variant=variant,
            momentum_dtype=momentum_dtype,
            split_qkv=split_qkv,
        )
    groups = muon_param_groups(module)  # same decay / no-decay split as the Muon run
    for group in groups:
        group.pop("use_muon")
        group.setdefault("weight_decay", weight_decay)
    # torch's fused kernel, as Muon uses for its own AdamW groups, so timings compare like for
    # like (DTensor params under FSDP2 keep torch's default kernel choice)
    fused = all(not is_dtensor(p) and p.device.type in ("cpu", "cuda") for p in module.parameters())
    opt = torch.optim.AdamW(groups, lr=adamw_lr, betas=betas, fused=fused or None)
    if schedule == "constant" and warmup_steps == 0:
        return opt
    if max_steps is None and schedule != "constant":
        max_steps = int(module.trainer.estimated_stepping_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, warmup_steps, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def configure_from_hparams(module: Any) -> dict[str, Any] | torch.optim.Optimizer:
    """:func:`configure_example_optimizer` with the module's saved hyperparameters of the same
    names (``self.save_hyperparameters()``), so a LightningModule's ``configure_optimizers`` is
    one line and its ``__init__`` arguments are what LightningCLI exposes."""
    names = set(inspect.signature(configure_example_optimizer).parameters) - {"module"}
    kwargs = {k: v for k, v in module.hparams.items() if k in names}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])  # YAML gives a list
    return configure_example_optimizer(module, **kwargs)


def fully_shard_blocks(lightning_module: Any, model: nn.Module, blocks: Any) -> None:
    """For ``configure_model``: under ``ModelParallelStrategy`` (FSDP2) shard each block, then the
    whole model, over the data-parallel mesh; under any other strategy do nothing."""
    mesh = lightning_module.device_mesh
    if mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
