"""What the example LightningModules share: the optimizer they are given, and FSDP2 sharding.

Each example module takes ``optimizer: OptimizerCallable`` (LightningCLI's injection: a class path
and its arguments in YAML or on the command line) plus the LR schedule, and hands both to
:func:`lightning_muon.configure_muon`, which routes the parameters into named groups (``muon``,
``adamw``, ``adamw_no_decay``) whichever optimizer is injected. So the AdamW baseline is the same
module, the same groups and the same schedule with ``torch.optim.AdamW`` injected instead of Muon.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_muon import Muon
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> type(configure_optimizer(net, muon())).__name__, type(configure_optimizer(net, adamw())).__name__
    ('Muon', 'AdamW')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_muon import Muon, configure_muon

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]

__all__ = ["OptimizerFactory", "adamw", "configure_optimizer", "fully_shard_blocks", "muon"]


def muon(lr: float = 0.02, adamw_lr: float = 1e-3, **kwargs: Any) -> OptimizerFactory:
    """The examples' Muon: Keller Jordan's ``adjust_lr="original"`` at ``lr`` for the hidden
    matrices, AdamW at ``adamw_lr`` for the rest, no weight decay (the paper's settings); what
    the configs under ``examples/configs`` write out as ``model.optimizer``."""
    settings = dict(lr=lr, adamw_lr=adamw_lr, adjust_lr="original", weight_decay=0.0, momentum=0.95)
    return partial(Muon, **{**settings, **kwargs})


def adamw(lr: float = 1e-3, **kwargs: Any) -> OptimizerFactory:
    """The examples' AdamW baseline: every parameter at ``lr``, betas (0.9, 0.95), no weight decay
    (the no-decay group keeps weight decay 0 either way); what ``examples/configs/adamw.yaml`` sets.
    Pass ``fused=True`` for torch's fused kernel (plain CPU/CUDA tensors only, not DTensors), as Muon
    uses for its own AdamW groups, when timings are compared."""
    settings = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return partial(torch.optim.AdamW, **{**settings, **kwargs})


def configure_optimizer(
    module: nn.Module,
    optimizer: OptimizerFactory,
    warmup_steps: int = 0,
    schedule: str = "constant",
    split_qkv: bool | str = False,
) -> torch.optim.Optimizer | dict[str, Any]:
    """``configure_muon(module, optimizer=optimizer, ...)``: Muon's routing and named groups, and one
    LR schedule over every group, for whichever optimizer the module was given. ``split_qkv``
    (Muon only): orthogonalise fused q, k, v projections as blocks (True) or per head
    (``"per_head"``), see :func:`lightning_muon.route_parameters`."""
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a callable that takes param groups (an OptimizerCallable such as "
            f"lightning_muon.Muon or torch.optim.AdamW), got {optimizer!r}"
        )
    return configure_muon(
        module, optimizer=optimizer, warmup_steps=warmup_steps, schedule=schedule, split_qkv=split_qkv
    )


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
