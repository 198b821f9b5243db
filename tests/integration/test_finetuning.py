"""Lightning's ``BackboneFinetuning`` with ``configure_muon`` in a real ``Trainer.fit``.

The callback freezes the backbone before ``configure_optimizers`` and, at epoch N, unfreezes it
with ``optimizer.add_param_group({"params": [plain tensors], "lr": lr})``. Muon splits that group:
the backbone's gains and biases go to an AdamW group, its hidden matrices to a Muon group (last,
so the callback's per-epoch lr ramp on ``param_groups[-1]`` reaches them).
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon import Muon, configure_muon

UNFREEZE_AT = 1


class Transfer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.neck = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.neck(self.backbone(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)

    def configure_optimizers(self):
        return configure_muon(self, lr=0.02, adjust_lr="original", adamw_lr=2e-3, ns_dtype="float32")


class Snapshots(Callback):
    """Backbone parameters and group count at the start of every epoch (after the finetuning callback)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[torch.Tensor]]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        groups = len(trainer.optimizers[0].param_groups)
        self.seen.append((groups, [p.detach().clone() for p in pl_module.backbone.parameters()]))


def _trainer(tmp_path, epochs: int, *callbacks) -> L.Trainer:
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_AT, lambda_func=lambda epoch: 1.5)
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[finetuning, *callbacks],
        default_root_dir=tmp_path,
    )


@pytest.mark.slow
def test_backbone_finetuning_unfreezes_into_muon_and_adamw_groups(tmp_path):
    torch.manual_seed(0)
    module = Transfer()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    initial = [p.detach().clone() for p in module.backbone.parameters()]
    snapshots = Snapshots()
    trainer = _trainer(tmp_path, 3, snapshots)
    with pytest.warns(UserWarning, match="by shape"):  # plain tensors: routed by shape, and it says so
        trainer.fit(module)

    opt = trainer.optimizers[0]
    assert isinstance(opt, Muon)
    (groups0, params0), (groups1, params1), _ = snapshots.seen
    assert groups0 == 3 and groups1 == 5  # muon, adamw, adamw_no_decay; then the backbone's two parts
    assert all(torch.equal(a, b) for a, b in zip(initial, params1))  # frozen through epoch 0

    adamw, muon = opt.param_groups[3:]
    backbone = list(module.backbone.parameters())
    matrices = [module.backbone[0].weight, module.backbone[3].weight]
    assert (muon["use_muon"], muon["params"]) == (True, matrices)
    assert (adamw["use_muon"], adamw["params"]) == (False, [p for p in backbone if p.ndim == 1])
    for p in matrices:
        assert set(opt.state[p]) == {"momentum_buffer"}
    for p in adamw["params"]:
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(not torch.equal(a, b) for a, b in zip(initial, module.backbone.parameters()))  # all trained

    # lr: the callback starts the backbone at 0.1 x the first group's lr and multiplies the last
    # group's by 1.5 per epoch; the AdamW part keeps the constructor's adamw_lr / lr ratio.
    assert muon["lr"] == pytest.approx(0.02 * 0.1 * 1.5)
    assert adamw["lr"] == pytest.approx(0.02 * 0.1 * 2e-3 / 0.02)
    assert len({g["name"] for g in opt.param_groups}) == 5

    # Resume after the unfreezing epoch: BaseFinetuning restores the 5 groups (assigning
    # param_groups) and Muon loads its state into them. (Lightning's callback does not set
    # requires_grad again on resume, for any optimizer, so the run itself is not compared.)
    resumed = Transfer()
    resumed.load_state_dict(start)
    first = _trainer(tmp_path, 2)
    with pytest.warns(UserWarning, match="by shape"):
        first.fit(resumed)
    first.save_checkpoint(tmp_path / "epoch2.ckpt")
    saved = first.optimizers[0]
    expected = {i: {k: v.clone() for k, v in saved.state[p].items()} for i, p in enumerate(resumed.parameters())}
    loaded = Loaded()
    _trainer(tmp_path, 3, loaded).fit(Transfer(), ckpt_path=tmp_path / "epoch2.ckpt")
    assert loaded.use_muon == [True, False, False, False, True]
    assert loaded.state.keys() == expected.keys()
    for i, state in expected.items():
        assert state.keys() == loaded.state[i].keys()
        assert all(torch.equal(v, loaded.state[i][k]) for k, v in state.items())


class Loaded(Callback):
    """The optimizer's groups and per-parameter state (by parameter position) when training resumes."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.use_muon = [g["use_muon"] for g in opt.param_groups]
        self.state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(pl_module.parameters())}
