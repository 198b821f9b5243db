"""QK-clip (MuonClip): max attention logits against q k^T / sqrt(d) computed by hand, the per-head
rescaling, the two callbacks in real Trainer runs, and DDP/FSDP2 against one process."""

from __future__ import annotations

import math
import sys

import lightning as L
import pytest
import torch
from helpers import DIST_SCRIPTS
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from examples.common import muon
from examples.gpt import CausalSelfAttention, GPTConfig, LitGPT
from lightning_muon import (
    QKScaling,
    attention_logit_max,
    find_qk_attention,
    fused_qkv_rows,
    qk_attention,
    qk_clip_,
    qk_clip_factors,
)
from lightning_muon.callbacks import AttentionLogitMonitor, QKClip

sys.path.insert(0, str(DIST_SCRIPTS))
from _launch import launch, wait  # noqa: E402


# ----------------------------------------------------------------------------- references by hand
def gpt_logits_by_hand(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) causal logits with the forward's own layout: c_attn(x).view(B, T, H, 3, hd)."""
    B, T, _ = x.shape
    qkv = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).view(B, T, attn.n_head, 3, attn.head_dim)
    q, k = qkv[..., 0, :].transpose(1, 2), qkv[..., 1, :].transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, -math.inf)


def mha_logits_by_hand(m: nn.MultiheadAttention, query, key, key_padding_mask=None) -> torch.Tensor:
    """(B, H, L, S) logits from the documented in_proj layout [W_q; W_k; W_v], batch_first inputs."""
    e, h = m.embed_dim, m.num_heads
    wq, wk = (
        (m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e])
        if m._qkv_same_embed_dim
        else (
            m.q_proj_weight,
            m.k_proj_weight,
        )
    )
    bq = bk = None
    if m.in_proj_bias is not None:
        bq, bk = m.in_proj_bias[:e], m.in_proj_bias[e : 2 * e]
    q = (query @ wq.T + (0 if bq is None else bq)).view(query.shape[0], query.shape[1], h, -1).transpose(1, 2)
    k = (key @ wk.T + (0 if bk is None else bk)).view(key.shape[0], key.shape[1], h, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    return logits


def per_head_max(logits: torch.Tensor) -> torch.Tensor:
    return logits.transpose(0, 1).reshape(logits.shape[1], -1).amax(dim=1)


def gpt_attention(seed: int = 0, n_head: int = 4, n_embd: int = 32, bias: bool = False) -> CausalSelfAttention:
    torch.manual_seed(seed)
    attn = CausalSelfAttention(GPTConfig(n_head=n_head, n_embd=n_embd, bias=bias))
    with torch.no_grad():  # heads of clearly different sizes
        w = attn.c_attn.weight.view(n_head, 3, -1, n_embd)
        w.mul_(torch.linspace(0.5, 3.0, n_head).view(-1, 1, 1, 1))
    return attn


# ----------------------------------------------------------------------------- the math
@pytest.mark.parametrize("causal", [False, True])
def test_attention_logit_max_matches_hand_computed(causal: bool) -> None:
    q, k = torch.randn(2, 3, 7, 5), torch.randn(2, 3, 9, 5)
    allowed = torch.rand(2, 1, 7, 9) > 0.3
    logits = q @ k.transpose(-1, -2) / math.sqrt(5)
    mask = allowed & (torch.ones(7, 9, dtype=torch.bool).tril() if causal else True)
    want = per_head_max(logits.masked_fill(~mask, -math.inf))
    for chunk in (1, 3, 1024):  # the query blocks do not change the result
        got = attention_logit_max(q, k, is_causal=causal, allowed=allowed, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    scaled = attention_logit_max(q, k, scale=0.25, allowed=allowed)
    torch.testing.assert_close(scaled, per_head_max((0.25 * q @ k.transpose(-1, -2)).masked_fill(~allowed, -math.inf)))


def test_gpt_attention_logits_match_hand_computed() -> None:
    attn = gpt_attention(bias=True)
    nn.init.normal_(attn.c_attn.bias)
    x = torch.randn(3, 11, 32)
    got = qk_attention(attn).qk_logit_max((x,), {})
    torch.testing.assert_close(got, per_head_max(gpt_logits_by_hand(attn, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fused", "kdim", "batch_second", "padding", "bias_kv"])
def test_multihead_attention_logits_match_hand_computed(kind: str) -> None:
    kw = {"kdim": 12, "vdim": 12} if kind == "kdim" else {"add_bias_kv": True} if kind == "bias_kv" else {}
    m = nn.MultiheadAttention(16, 4, batch_first=kind != "batch_second", **kw)
    nn.init.normal_(m.in_proj_bias)
    query = torch.randn(2, 5, 16)
    key = torch.randn(2, 6, 12 if kind == "kdim" else 16)
    pad = torch.rand(2, 6) > 0.5 if kind == "padding" else None
    if pad is not None:
        pad[:, 0] = False
    want = mha_logits_by_hand(m, query, key, pad)
    if kind == "bias_kv":  # one more key: bias_k through no projection
        kb = m.bias_k.view(4, 1, 4)
        q = (query @ m.in_proj_weight[:16].T + m.in_proj_bias[:16]).view(2, 5, 4, 4).transpose(1, 2)
        extra = torch.einsum("bhld,hsd->bhls", q, kb) / 2.0
        want = torch.cat([want, extra], dim=-1)
    args = (
        (query, key, key)
        if kind != "batch_second"
        else (query.transpose(0, 1), key.transpose(0, 1), key.transpose(0, 1))
    )
    got = qk_attention(m).qk_logit_max(args, {"key_padding_mask": pad})
    torch.testing.assert_close(got, per_head_max(want), rtol=1e-5, atol=1e-5)
    m(*args, key_padding_mask=pad)  # the module accepts the same call


def test_clip_factors_follow_kimi_rule() -> None:
    s = torch.tensor([250.0, 100.0, 99.0, -5.0, 1e4])
    torch.testing.assert_close(qk_clip_factors(s, tau=100.0), torch.tensor([0.4, 1.0, 1.0, 1.0, 0.01]))


@pytest.mark.parametrize("kind", ["gpt", "mha", "mha_kdim"])
def test_clip_caps_logits_at_tau(kind: str) -> None:
    if kind == "gpt":
        module = gpt_attention(bias=True)
        nn.init.normal_(module.c_attn.bias, std=0.3)
        x = torch.randn(4, 10, 32)
        args = (x,)
    else:
        module = nn.MultiheadAttention(
            32, 4, batch_first=True, **({"kdim": 24, "vdim": 24} if kind == "mha_kdim" else {})
        )
        nn.init.normal_(module.in_proj_bias, std=0.3)
        query, key = torch.randn(4, 10, 32), torch.randn(4, 10, 24 if kind == "mha_kdim" else 32)
        args = (query, key, key)
    adapter = qk_attention(module)
    before = adapter.qk_logit_max(args, {})
    tau = float(before.median())
    clipped = qk_clip_(adapter.qk_clip_rows(), before, tau)
    after = adapter.qk_logit_max(args, {})
    assert clipped.tolist() == (before > tau).tolist() and 0 < clipped.sum() < 4
    assert (after <= tau * (1 + 1e-5)).all()
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-5, atol=0)
    torch.testing.assert_close(after[~clipped], before[~clipped], rtol=0, atol=0)


def test_nothing_changes_below_tau() -> None:
    for module in (gpt_attention(), nn.MultiheadAttention(16, 4, add_bias_kv=True)):
        adapter = qk_attention(module)
        x = torch.randn(2, 6, module.c_attn.in_features if hasattr(module, "c_attn") else 16)
        args = (x,) if hasattr(module, "c_attn") else (x, x, x)
        s = adapter.qk_logit_max(args, {})
        state = {k: v.clone() for k, v in module.state_dict().items()}
        assert not qk_clip_(adapter.qk_clip_rows(), s, float(s.max()) + 1e-3).any()
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())  # bit for bit


def test_only_the_offending_heads_change() -> None:
    attn = gpt_attention(bias=True)
    nn.init.normal_(attn.c_attn.bias)
    x = torch.randn(2, 8, 32)
    s = per_head_max(gpt_logits_by_hand(attn, x))
    tau = float(s.sort().values[1:3].mean())  # heads 2 and 3 (the largest) above
    w, b = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    proj = attn.c_proj.weight.detach().clone()
    qk_clip_(qk_attention(attn).qk_clip_rows(), qk_attention(attn).qk_logit_max((x,), {}), tau)
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))
    factor = torch.ones(4, 3, 8)  # (head, q/k/v, head_dim): the GPT layout
    factor[:, :2] = gamma.sqrt().view(4, 1, 1)
    torch.testing.assert_close(attn.c_attn.weight, w * factor.reshape(-1, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(attn.c_attn.bias, b * factor.reshape(-1), rtol=1e-6, atol=0)
    untouched = (factor == 1).reshape(-1)
    assert (s > tau).tolist() == [False, False, True, True]
    assert torch.equal(attn.c_attn.weight[untouched], w[untouched]) and torch.equal(attn.c_proj.weight, proj)


def test_fused_orders_place_q_and_k_rows() -> None:
    (qkv_head,) = fused_qkv_rows(torch.zeros(12, 4), None, 2, "split=3,heads=2")
    (head_qkv,) = fused_qkv_rows(torch.zeros(12, 4), None, 2, "split=3,heads=2,order=heads")
    with pytest.warns(DeprecationWarning, match="order='head_qkv' is deprecated"):  # the earlier names still work
        (legacy,) = fused_qkv_rows(torch.zeros(12, 4), None, 2, "head_qkv")
    assert torch.equal(legacy.heads, head_qkv.heads)
    assert qkv_head.heads.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, -1, -1, -1, -1]
    assert head_qkv.heads.tolist() == [0, 0, 0, 0, -1, -1, 1, 1, 1, 1, -1, -1]


def test_query_only_rows_take_the_whole_factor() -> None:
    # GQA / MLA's shared key: the query of head h takes gamma_h, the shared key is left alone
    wq, wk = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(2, 6))  # 2 heads of dim 2, one key
    x = torch.randn(3, 5, 6)
    logits = lambda: torch.einsum("bthd,bsd->bhts", (x @ wq.T).view(3, 5, 2, 2), x @ wk.T) / math.sqrt(2)
    s = per_head_max(logits())
    wk0 = wk.detach().clone()
    rows = [QKScaling(wq, torch.tensor([0, 0, 1, 1]), power=1.0)]
    qk_clip_(rows, s, tau=float(s.min()))
    assert torch.equal(wk, wk0)
    torch.testing.assert_close(per_head_max(logits()), torch.full((2,), float(s.min())), rtol=1e-5, atol=0)


def test_bad_inputs_change_nothing() -> None:
    w = nn.Parameter(torch.ones(4, 2))
    rows = [QKScaling(w, torch.tensor([0, 1, 0, 1]))]
    for tau in (0.0, -1.0, math.inf, math.nan, True, "100"):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            qk_clip_(rows, torch.tensor([400.0, 10.0]), tau)
    with pytest.raises(ValueError, match="max_logits must be finite"):
        qk_clip_(rows, torch.tensor([400.0, math.nan]), 1.0)
    bad = [QKScaling(w, torch.tensor([0, 1])), *rows]
    with pytest.raises(ValueError, match="one entry in"):
        qk_clip_(rows + [QKScaling(w, torch.tensor([0, 1, 2, 0]))], torch.tensor([400.0, 10.0]), 1.0)
    with pytest.raises(ValueError, match="one entry in"):
        qk_clip_(bad[::-1], torch.tensor([400.0, 10.0]), 1.0)
    assert torch.equal(w, torch.ones(4, 2))  # checks before any update
    with pytest.raises(ValueError, match="must agree in heads and d"):
        attention_logit_max(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="boolean mask"):
        attention_logit_max(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), allowed=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="3 x n_head"):
        fused_qkv_rows(torch.zeros(10, 4), None, n_head=2)
    for cls, kwargs, match in [
        (QKClip, {"tau": 0}, "tau must be"),
        (QKClip, {"tau": math.nan}, "tau must be"),
        (QKClip, {"include": "attn"}, "include must be a list"),
        (AttentionLogitMonitor, {"every_n_steps": 0}, "every_n_steps must be"),
        (AttentionLogitMonitor, {"exclude": [1]}, "exclude must be a list"),
    ]:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


# ----------------------------------------------------------------------------- Lightning
class TinyGPT(LitGPT):
    """The example GPT, 2 layers of 4 heads, on a fixed set of random token sequences."""

    def __init__(self, lr: float = 0.05, batches: int = 4, **muon_kwargs) -> None:
        optimizer = muon(lr=lr, **muon_kwargs)
        super().__init__(vocab_size=32, block_size=12, n_layer=2, n_head=4, n_embd=32, optimizer=optimizer)
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, 32, (4 * batches, 13), generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.data[:, :-1], self.data[:, 1:]), batch_size=4)


class AttentionInputs(L.Callback):
    """Snapshots for the reference: the attention inputs of each forward (pre-hooks) and c_attn weights."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module):
        for name, m in pl_module.named_modules():
            if isinstance(m, CausalSelfAttention):
                m.register_forward_pre_hook(lambda mod, args, n=name: self._keep(n, args[0]))

    def _keep(self, name, x):
        if not self.inputs or name in self.inputs[-1]:
            self.inputs.append({})
        self.inputs[-1][name] = x.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({n: m.c_attn.weight.detach().clone() for n, m in _gpt_attn(pl_module).items()})


def _gpt_attn(pl_module) -> dict[str, CausalSelfAttention]:
    return {n: m for n, m in pl_module.named_modules() if isinstance(m, CausalSelfAttention)}


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    kw = {"max_steps": 4, "logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_clip_callback_applies_the_rule_after_each_real_step(tmp_path, accumulate: int) -> None:
    """Muon at lr 0.05: the weights after QKClip equal the ones after the optimizer step times
    sqrt(min(1, tau / S_h)) on each head's q and k rows, S_h computed by hand from the step's
    forward inputs (every micro-batch) and the weights before the step."""
    model = TinyGPT(lr=0.05, batches=8)
    mid, post = AttentionInputs(), AttentionInputs()
    trainer = _trainer(tmp_path, [mid, QKClip(tau=0.03), post], accumulate_grad_batches=accumulate)
    # the weights before the first step
    init = {n: m.c_attn.weight.detach().clone() for n, m in _gpt_attn(model).items()}
    trainer.fit(model)
    clip = next(c for c in trainer.callbacks if isinstance(c, QKClip))
    assert len(mid.inputs) == 4 * accumulate
    before, clipped = init, 0
    for step in range(4):
        micro = range(step * accumulate, (step + 1) * accumulate)
        if accumulate > 1:  # no clip between micro-batches
            for i in micro[:-1]:
                assert all(torch.equal(post.weights[i][n], before[n]) for n in before)
        last = micro[-1]
        for n in _gpt_attn(model):
            attn = CausalSelfAttention(GPTConfig(n_head=4, n_embd=32))
            with torch.no_grad():
                attn.c_attn.weight.copy_(before[n])
            s = torch.stack([per_head_max(gpt_logits_by_hand(attn, mid.inputs[i][n])) for i in micro]).amax(0)
            gamma = torch.where(s > 0.03, 0.03 / s, torch.ones_like(s))
            clipped += int((gamma < 1).sum())
            factor = torch.ones(4, 3, 8)
            factor[:, :2] = gamma.sqrt().view(4, 1, 1)
            want = mid.weights[last][n] * factor.reshape(-1, 1)
            torch.testing.assert_close(post.weights[last][n], want, rtol=1e-5, atol=1e-7)
        before = post.weights[last]
    assert clip.clipped_total == clipped and 0 < clipped < 4 * 2 * 4


def test_clip_callback_caps_the_step_logits_at_tau_when_weights_do_not_move(tmp_path) -> None:
    """lr 0 (the optimizer changes nothing): after the step, each layer's logits on that step's
    inputs are at most tau, exactly tau for the heads that were above it, unchanged for the others."""
    model = TinyGPT(lr=0.0, adamw_lr=0.0, batches=1)
    inputs = AttentionInputs()
    trainer = _trainer(tmp_path, [inputs, QKClip(tau=0.05)], max_steps=1)
    trainer.fit(model)
    above = 0
    for n, attn in _gpt_attn(model).items():
        x = inputs.inputs[0][n]
        reference = CausalSelfAttention(GPTConfig(n_head=4, n_embd=32))
        with torch.no_grad():
            reference.c_attn.weight.copy_(inputs.weights[0][n])  # after the (null) step, before the clip
        before = per_head_max(gpt_logits_by_hand(reference, x))
        after = per_head_max(gpt_logits_by_hand(attn, x))
        hit = before > 0.05
        above += int(hit.sum())
        assert (after <= 0.05 * (1 + 1e-5)).all()
        torch.testing.assert_close(after[hit], torch.full_like(after[hit], 0.05), rtol=1e-5, atol=0)
        assert torch.equal(after[~hit], before[~hit])
    assert 0 < above < 8


def test_monitor_logs_every_head_to_tensorboard_for_the_vit(tmp_path) -> None:
    """torchvision's ViT (nn.MultiheadAttention) with both callbacks: the logged step-0 values equal
    the logits computed by hand from the first batch and the initial weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision.models.vision_transformer import EncoderBlock

    from examples.vit import LitViT

    class TinyViT(LitViT):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            return DataLoader(TensorDataset(x, y), batch_size=8)

    vit = dict(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)
    model = TinyViT(**vit, optimizer=muon())  # the examples' Muon settings (lr 0.02)
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:  # the first forward's input of each attention
        inputs.setdefault(name, x.detach().clone())

    for name, m in model.named_modules():
        if isinstance(m, EncoderBlock):
            m.self_attention.register_forward_pre_hook(lambda mod, args, n=f"{name}.self_attention": keep(n, args[0]))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(
        tmp_path, [AttentionLogitMonitor(every_n_steps=1), QKClip(tau=1e-3)], logger=logger, log_every_n_steps=1
    )
    trainer.fit(model)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    reference = TinyViT(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)
    reference.load_state_dict(init)
    layers = [n for n, m in reference.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(layers) == 2 and set(inputs) == set(layers)
    overall = -math.inf
    for layer in layers:
        mha = reference.get_submodule(layer)
        x = inputs[layer]
        want = per_head_max(mha_logits_by_hand(mha, x, x))
        for h in range(2):
            got = [e.value for e in events.Scalars(f"attn_logit_max/{layer}/head_{h}") if e.step == 0]
            assert got == pytest.approx([float(want[h])], rel=1e-5)
        assert f"attn_logit_max/{layer}/max" in tags
        overall = max(overall, float(want.max()))
    assert [e.value for e in events.Scalars("attn_logit_max/max") if e.step == 0] == pytest.approx([overall], rel=1e-5)
    assert len(events.Scalars("attn_logit_max/max")) == 4 and "qk_clip/clipped_heads" in tags
    clipped = events.Scalars("qk_clip/clipped_heads_total")[-1].value
    assert clipped == 16  # tau far below every logit: every head of both layers, at each of the 4 steps


def test_misconfigured_trainers_are_refused(tmp_path) -> None:
    class NoAttention(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2)

    with pytest.raises(MisconfigurationException, match="no attention module"):
        _trainer(tmp_path, [QKClip()]).fit(NoAttention())
    with pytest.raises(MisconfigurationException, match="no attention module"):
        _trainer(tmp_path, [QKClip(include=["nothing_*"])]).fit(TinyGPT())
    with pytest.raises(MisconfigurationException, match="no logger"):
        _trainer(tmp_path, [AttentionLogitMonitor()]).fit(TinyGPT())


def test_find_qk_attention_finds_the_example_gpt_and_mha() -> None:
    found = find_qk_attention(TinyGPT())
    assert list(found) == ["model.h.0.attn", "model.h.1.attn"]
    assert qk_attention(nn.Linear(2, 2)) is None


# ----------------------------------------------------------------------------- DDP / FSDP2
@pytest.mark.slow
def test_ddp_and_fsdp2_clip_like_one_process(tmp_path) -> None:
    """Example GPT, Muon, QKClip(tau=0.07) and AttentionLogitMonitor: 2-process DDP and FSDP2
    (gloo) against one process on the same global batches (max logits MAX-reduced over ranks)."""
    dirs = {m: tmp_path / m for m in ("single", "ddp", "fsdp")}
    for d in dirs.values():
        d.mkdir()
    wait([launch("qk_clip_gpt.py", str(d), m, "0.07") for m, d in dirs.items()])
    r = {m: torch.load(d / "result.pt", weights_only=False) for m, d in dirs.items()}
    assert r["single"]["clipped_total"] > 0
    for m in ("ddp", "fsdp"):
        assert r[m]["clipped_total"] == r["single"]["clipped_total"], m
        for k, v in r["single"]["params"].items():
            torch.testing.assert_close(r[m]["params"][k], v, rtol=0, atol=1e-5, msg=f"{m} {k}")
        assert r[m]["logged"].keys() == r["single"]["logged"].keys()
        for step, metrics in r["single"]["logged"].items():
            assert metrics.keys() == r[m]["logged"][step].keys()
            for k, v in metrics.items():
                assert r[m]["logged"][step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (m, step, k)


@pytest.fixture
def single_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_tensor_parallel_attention_is_refused_before_any_change(single_rank_group) -> None:
    """c_attn split column-wise (Megatron TP, as examples/gpt.py's tensor_parallelize does): each rank
    would see only its heads, so the observer refuses at the first watched forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lightning_muon import QKObserver

    attn = gpt_attention()
    parallelize_module(attn, init_device_mesh("cpu", (1,)), {"c_attn": ColwiseParallel()})
    obs = QKObserver(find_qk_attention(nn.ModuleDict({"attn": attn})))
    obs.enabled = True
    state = {
        k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone() for k, v in attn.state_dict().items()
    }
    with pytest.raises(RuntimeError, match="tensor-parallel heads; not supported"):
        attn(torch.randn(2, 5, 32))
    for k, v in attn.state_dict().items():
        assert torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, state[k])
    assert not obs.maxima


class StoredMaxAttention(nn.Module):
    """A user's attention implementing the protocol the cheap way: its forward materialises the
    logits and keeps their per-head max; separate q/k/v projections with biases."""

    def __init__(self, d: int = 16, n_head: int = 4, poison_head: int | None = None) -> None:
        super().__init__()
        self.n_head, self.poison_head = n_head, poison_head
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.last_max = torch.zeros(n_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.n_head, -1)).transpose(1, 2)  # (B, H, T, hd)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        self.last_max = logits.detach().transpose(0, 1).flatten(1).amax(1)
        if self.poison_head is not None:  # an overflowed head, as a reported value
            self.last_max[self.poison_head] = math.nan
        return (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)

    def qk_logit_max(self, args, kwargs):
        return self.last_max

    def qk_clip_rows(self):
        owner = torch.arange(self.n_head).repeat_interleave(self.q.out_features // self.n_head)
        return [QKScaling(p, owner) for p in (self.q.weight, self.q.bias, self.k.weight, self.k.bias)]


class StoredMaxModel(L.LightningModule):
    def __init__(self, poison_head: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = StoredMaxAttention(poison_head=poison_head)
        with torch.no_grad():
            self.attn.q.weight.mul_(torch.linspace(1, 8, 16)[:, None])  # heads of different sizes
        self.x = torch.randn(8, 6, 16)

    def training_step(self, batch, batch_idx):
        return self.attn(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=8)


def test_any_module_implementing_the_protocol_is_clipped(tmp_path) -> None:
    model = StoredMaxModel()
    model.attn(model.x)
    s = model.attn.last_max.clone()  # S_h on the one batch
    tau = float(s.median())
    _trainer(tmp_path, [QKClip(tau=tau)], max_steps=2).fit(model)
    model.attn(model.x)
    after = model.attn.last_max
    hit = s > tau
    assert 0 < hit.sum() < 4
    torch.testing.assert_close(after[hit], torch.full_like(after[hit], tau), rtol=1e-5, atol=0)
    assert torch.equal(after[~hit], s[~hit])


def test_clip_skips_and_warns_on_a_non_finite_max_logit(tmp_path) -> None:
    model = StoredMaxModel(poison_head=3)  # head 3 has the largest logits, reported as NaN
    rows = [r.param.detach().clone() for r in model.attn.qk_clip_rows()]
    with pytest.warns(UserWarning, match=r"non-finite max logit in attn heads \[3\]"):
        _trainer(tmp_path, [QKClip(tau=1e-6)], max_steps=1).fit(model)
    for r, old in zip(model.attn.qk_clip_rows(), rows):
        heads = r.heads
        assert torch.equal(r.param[heads == 3], old[heads == 3])  # the NaN head: untouched
        assert not torch.equal(r.param[heads == 0], old[heads == 0])  # the others: clipped
