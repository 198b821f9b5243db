"""The monitors analyse the matrices Muon orthogonalises, never log NaN, and log units and chance levels.

References: exact SVD of each expert / q-k-v block / conv view of the weights and of the gradient
recomputed by hand, the numpy re-implementation of Muon's B_crit in ``test_muon_b_crit.py``, and the
chance-level closed forms (themselves checked by Monte Carlo in ``tests/diagnostics/test_chance.py``).
"""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import cpu_trainer
from test_muon_b_crit import MemoryLogger, _reference_b_crit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_muon import configure_muon, delta_p, delta_p_chance, momentum_noise_factor
from lightning_muon.callbacks import (
    CriticalBatchSizeMonitor,
    PolarMisalignmentMonitor,
    SpectralEntropyMonitor,
    StableRankMonitor,
)

MICRO, E, H, I2, HEADS = 16, 4, 12, 24, 2


class Block(pl.LightningModule):
    """A fused q/k/v projection (``c_attn``, split per head by Muon), a stacked expert bank (E, 2I, H)
    (each expert a matrix), a conv kernel and a head; sequences of 8 tokens (``block_size`` in hparams)."""

    def __init__(self, split_qkv="per_head", block_size=8):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.n_head = HEADS
        self.c_attn = nn.Linear(H, 3 * H, bias=False)
        self.experts = nn.Parameter(torch.empty(E, I2, H))
        for e in range(E):  # orthogonal experts: stable rank H = 12 each, as a flattened (E, rest) matrix about E
            nn.init.orthogonal_(self.experts.data[e])
        self.conv = nn.Conv1d(3 * H, H, kernel_size=3, padding=1, bias=False)
        self.head = nn.Linear(H, 2)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8 * MICRO, block_size, H, generator=g)
        self.y = torch.randn(8 * MICRO, block_size, 2, generator=g)

    def forward(self, x):
        qkv = self.c_attn(x)  # (B, T, 3H)
        h = self.conv(qkv.transpose(1, 2)).transpose(1, 2)  # (B, T, H)
        route = torch.arange(h.shape[1]) % E  # token t -> expert t mod E
        hidden = torch.einsum("bth,tih->bti", h, self.experts[route]).relu()  # (B, T, 2I)
        return self.head(h + hidden[..., :H])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=MICRO, shuffle=False)

    def configure_optimizers(self):
        return configure_muon(
            self, lr=0.02, ns_method="svd", ns_dtype="float32", weight_decay=0.0, split_qkv=self.hparams.split_qkv
        )


def _fit(tmp_path, model, callbacks, steps=1, **kw):
    logger = MemoryLogger()
    trainer = cpu_trainer(
        tmp_path, logger=logger, callbacks=callbacks, max_steps=steps, enable_checkpointing=False, **kw
    )
    trainer.fit(model)
    return trainer, logger.metrics


def _step0(model, accumulate=2):
    """Weights, accumulated gradient and mean squared micro-batch gradient of step 0, by hand."""
    ref = copy.deepcopy(model)
    grads, small = {}, {}
    for j in range(accumulate):
        ref.zero_grad()
        x, y = ref.x[j * MICRO : (j + 1) * MICRO], ref.y[j * MICRO : (j + 1) * MICRO]
        nn.functional.mse_loss(ref(x), y).backward()
        for n, p in ref.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad.detach().double() / accumulate
            small[n] = small.get(n, 0) + p.grad.double().square().sum().item() / accumulate
    return {n: p.detach().double() for n, p in ref.named_parameters()}, grads, small


def _stable_rank(M):
    s = torch.linalg.svdvals(M)
    return float((s**2).sum() / s[0] ** 2)


def _blocks(W):
    """The 6 per-head blocks of c_attn as Muon's 'split=3,heads=2,per_head' view orders them: q, k, v by head."""
    hd = H // HEADS
    return {
        f"{'qkv'[p]}.h{h}": W[(p * HEADS + h) * hd : (p * HEADS + h + 1) * hd] for p in range(3) for h in range(HEADS)
    }


def test_spectral_monitors_see_each_expert_head_and_conv_view(tmp_path):
    model = Block()
    W0, G0, _ = _step0(model, accumulate=1)
    monitors = [
        StableRankMonitor(every_n_steps=1),
        SpectralEntropyMonitor(every_n_steps=1),
        PolarMisalignmentMonitor(every_n_steps=1, k=2),
    ]
    _, metrics = _fit(tmp_path, model, monitors)
    expected = {f"experts/{e}": W0["experts"][e] for e in range(E)}
    expected.update({f"c_attn.weight/{label}": W for label, W in _blocks(W0["c_attn.weight"]).items()})
    expected["conv.weight"] = W0["conv.weight"].reshape(H, -1)  # (out, in * k)
    grads = {f"experts/{e}": G0["experts"][e] for e in range(E)}
    grads.update({f"c_attn.weight/{label}": G for label, G in _blocks(G0["c_attn.weight"]).items()})
    grads["conv.weight"] = G0["conv.weight"].reshape(H, -1)
    stable = {key: metrics[f"per_layer/stable_rank/{key}"][0] for key in expected}
    for key, W in expected.items():
        # fp32 Gram eigenvalues (stable rank from the shared spectrum): rel 1e-4
        assert stable[key] == pytest.approx(_stable_rank(W), rel=1e-4), key
        U, _, Vh = torch.linalg.svd(grads[key], full_matrices=False)
        assert metrics[f"per_layer/polar_misalignment/grad_delta_p/{key}"][0] == pytest.approx(
            float(delta_p(W, U @ Vh)), rel=1e-4
        )
    # the old reading of the bank as one (E, rest) matrix gives at most E = 4
    assert _stable_rank(W0["experts"].reshape(E, -1)) <= E < 10 < min(stable[f"experts/{e}"] for e in range(E))
    assert "per_layer/stable_rank/experts" not in metrics and "per_layer/stable_rank/c_attn.weight" not in metrics
    assert metrics["stable_rank/mean"][0] == pytest.approx(sum(stable.values()) / len(stable), rel=1e-5)
    # chance levels next to delta_P: per shape, and the mean ratio over the matrices
    ratios = [
        metrics[f"per_layer/polar_misalignment/grad_delta_p/{k}"][0] / delta_p_chance(*grads[k].shape) for k in grads
    ]
    assert metrics["polar_misalignment/chance/delta_p/24x12"][0] == pytest.approx(delta_p_chance(24, 12), rel=1e-6)
    assert metrics["polar_misalignment/grad_delta_p/vs_chance"][0] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)


def test_critical_batch_size_per_expert_in_examples_and_tokens(tmp_path):
    # two_batch (accumulation 2): the bank has no per-example form. Per expert: the formula on the
    # expert's slice of the step-0 gradient, with the parameter's per-entry noise.
    model = Block(split_qkv=True)
    _, G0, small = _step0(model)
    monitor = CriticalBatchSizeMonitor(every_n_steps=1, estimator="two_batch", include=["experts", "c_attn"])
    _, metrics = _fit(tmp_path, model, [monitor], accumulate_grad_batches=2)
    factor = momentum_noise_factor(0.95, nesterov=True)
    b, B = MICRO, 2 * MICRO
    sigma2 = (small["experts"] - float(G0["experts"].square().sum())) / (1 / b - 1 / B) / G0["experts"].numel()
    assert metrics["per_layer/critical_batch_size/sigma2/experts"][0] == pytest.approx(sigma2, rel=1e-3)
    G_qkv = G0["c_attn.weight"]
    sigma2_qkv = (small["c_attn.weight"] - float(G_qkv.square().sum())) / (1 / b - 1 / B) / G_qkv.numel()
    blocks = {f"experts/{e}": (G0["experts"][e], sigma2) for e in range(E)}
    blocks.update({f"c_attn.weight/{p}": (G_qkv[i * H : (i + 1) * H], sigma2_qkv) for i, p in enumerate("qkv")})
    found = 0
    for key, (G, s2) in blocks.items():
        expected, r = _reference_b_crit(G.numpy(), s2, B, factor)
        assert metrics[f"per_layer/critical_batch_size/rank/{key}"][0] == r, key
        if r == 0:  # nothing above the noise edge: no estimate, not NaN
            assert f"per_layer/critical_batch_size/b_crit/{key}" not in metrics
        else:
            found += 1
            assert metrics[f"per_layer/critical_batch_size/b_crit/{key}"][0] == pytest.approx(expected, rel=2e-3), key
    assert found >= 4
    # tokens: the module's block_size (8 tokens per sequence); b_simple is left out while not positive
    assert "critical_batch_size/b_crit" in metrics
    for tag in ("b_simple", "b_crit"):
        examples = metrics.get(f"critical_batch_size/{tag}", {})
        assert metrics.get(f"critical_batch_size/{tag}_tokens", {}).keys() == examples.keys()
        for step, value in examples.items():
            assert metrics[f"critical_batch_size/{tag}_tokens"][step] == pytest.approx(8 * value)


class ZeroInit(pl.LightningModule):
    """``a`` gets an exactly zero gradient (a zero-initialised gain after it, as timm's ResNets do);
    ``b`` is zero-initialised itself (no spectrum until its first update)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8, bias=False)
        self.gain = nn.Parameter(torch.zeros(8))
        self.skip = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        nn.init.zeros_(self.b.weight)
        self.head = nn.Linear(8, 2)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g)

    def forward(self, x):
        h = torch.tanh(self.skip(x)) + self.gain * self.a(x)
        return self.head(h + self.b(h))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=MICRO)

    def configure_optimizers(self):
        return configure_muon(self, lr=0.02, ns_method="svd", ns_dtype="float32")


def test_zero_gradients_and_zero_weights_log_nothing_never_nan(tmp_path):
    model = ZeroInit()
    monitors = [
        StableRankMonitor(every_n_steps=1),
        SpectralEntropyMonitor(every_n_steps=1, log_spectra=False),
        PolarMisalignmentMonitor(every_n_steps=1, k=2),
        CriticalBatchSizeMonitor(every_n_steps=1),
    ]
    trainer, metrics = _fit(tmp_path, model, monitors, steps=3)
    assert all(math.isfinite(v) for values in metrics.values() for v in values.values())
    assert all(math.isfinite(float(v)) for v in trainer.callback_metrics.values())
    # a: zero gradient at step 0 (its gain is 0 until AdamW moves it)
    for tag in (
        "per_layer/polar_misalignment/grad_delta_p/a.weight",
        "per_layer/critical_batch_size/b_crit/a.weight",
        "per_layer/critical_batch_size/b_simple/a.weight",
    ):
        assert 0 not in metrics.get(tag, {}), tag
    assert 0 in metrics["per_layer/stable_rank/a.weight"]  # its weight is fine
    # b: zero weight at step 0, updated by Muon after it
    assert 0 not in metrics.get("per_layer/stable_rank/b.weight", {}) and 1 in metrics["per_layer/stable_rank/b.weight"]
    assert 0 not in metrics.get("per_layer/spectral_entropy/b.weight", {})
    # the aggregates are over the defined values
    assert metrics["stable_rank/mean"][0] == pytest.approx(
        (metrics["per_layer/stable_rank/a.weight"][0] + metrics["per_layer/stable_rank/skip.weight"][0]) / 2, rel=1e-6
    )
