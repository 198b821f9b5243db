"""NorMuon (``variant="normuon"``) against the paper's formulas computed here in float64.

The reference follows arXiv 2510.05491, Algorithm 1, with an exact polar factor (SVD) so no
Newton–Schulz error enters: ``M <- b1 M + (1 - b1) G``; ``Q = UV^T`` of ``M`` (of its Nesterov
form); ``v <- b2 v + (1 - b2) mean_cols(Q * Q)``; ``Q_hat = Q / (sqrt(v) + eps)`` per row;
``W <- W - lr * wd * W - 0.2 * lr * sqrt(m n) / ||Q_hat||_F * Q_hat``.
"""

import math

import pytest
import torch
from torch import nn

from lightning_muon import Muon, configure_muon, muon_param_groups
from lightning_muon.optim.variants.normuon import neuron_scale, normuon_normalize


def _polar(M: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def _paper_steps(W0, grads, lr, wd, b1, b2, eps, nesterov):
    """The paper's update, written from its formulas (RMS 0.2 learning-rate matching)."""
    W, M = W0.clone(), torch.zeros_like(W0)
    m, n = W0.shape[0], W0[0].numel()
    v = torch.zeros(m, dtype=W0.dtype)
    for G in grads:
        M = b1 * M + (1 - b1) * G
        D = (1 - b1) * G + b1 * M if nesterov else M
        Q = _polar(D.reshape(m, n))
        v = b2 * v + (1 - b2) * (Q * Q).mean(dim=1)
        Q_hat = Q / (v.sqrt() + eps)[:, None]
        eta_hat = 0.2 * lr * math.sqrt(m * n) / torch.linalg.matrix_norm(Q_hat)
        W = W - lr * wd * W - eta_hat * Q_hat.reshape(W.shape)
    return W, M, v


@pytest.mark.parametrize("shape", [(6, 10), (12, 5), (4, 3, 2, 2)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_normuon_steps_match_the_paper_in_float64(shape, nesterov):
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    # rows of very different scales: the normalisation has something to do
    row_scale = torch.logspace(-2, 1, shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * row_scale for _ in range(4)]
    W = nn.Parameter(W0.clone())
    kw = dict(lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    opt = Muon(
        [{"params": [W], "use_muon": True}],
        **kw,
        ns_method="svd",
        ns_dtype="float64",
        adjust_lr="match_rms_adamw",
        variant="normuon",
        variant_options={"beta2": 0.8, "eps": 1e-8},
    )
    for G in grads:
        W.grad = G.clone()
        opt.step()
    want_W, want_M, want_v = _paper_steps(W0, grads, 0.03, 0.1, 0.9, 0.8, 1e-8, nesterov)
    torch.testing.assert_close(W.detach(), want_W, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], want_M, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[W]["neuron_second_moment"], want_v, rtol=0, atol=1e-12)


def test_other_lr_rules_keep_the_muon_update_norm():
    # adjust_lr="original": the normalised update has the Frobenius norm of Q, times Muon's scale
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(16, 8, generator=g, dtype=torch.float64)
    G = torch.randn(16, 8, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)[:, None]
    W = nn.Parameter(W0.clone())
    opt = Muon(
        [W], lr=0.05, weight_decay=0.0, ns_method="svd", ns_dtype="float64", adjust_lr="original", variant="normuon"
    )
    W.grad = G
    opt.step()
    step = W0 - W.detach()
    assert math.isclose(float(step.norm()), 0.05 * math.sqrt(16 / 8) * math.sqrt(8), rel_tol=1e-10)
    # with beta2 = 0.95 after one step v is proportional to each row's mean square: rows equalised
    assert torch.allclose(step.norm(dim=1), step.norm(dim=1).mean(), rtol=1e-4)


def test_normalisation_balances_rows_and_keeps_the_frobenius_norm():
    Q = torch.randn(3, 32, 64, dtype=torch.float64) * torch.logspace(-3, 1, 32, dtype=torch.float64)[:, None]
    v = torch.zeros(3, 32, dtype=torch.float64)
    out = normuon_normalize(Q, v, beta2=0.0, eps=0.0)
    torch.testing.assert_close(torch.linalg.matrix_norm(out), torch.linalg.matrix_norm(Q))
    rows = out.norm(dim=-1)
    torch.testing.assert_close(rows, rows[..., :1].expand_as(rows))
    torch.testing.assert_close(v, (Q * Q).mean(-1))  # beta2 = 0: v is this step's mean square


def test_neuron_scale_is_the_ema_and_a_zero_matrix_stays_zero():
    v = torch.tensor([[1.0, 4.0], [0.0, 0.0]])
    row_sq = torch.tensor([[8.0, 2.0], [0.0, 0.0]])
    f = neuron_scale(row_sq, 2, v, beta2=0.5, eps=1e-8)
    torch.testing.assert_close(v, torch.tensor([[2.5, 2.5], [0.0, 0.0]]))
    assert torch.equal(f[1], torch.zeros(2)) and f.isfinite().all()
    torch.testing.assert_close((row_sq[0] * f[0] ** 2).sum(), row_sq[0].sum())


def test_zero_gradient_rows_give_no_nan():
    W = nn.Parameter(torch.randn(8, 6))
    opt = Muon([W], lr=0.02, variant="normuon")
    G = torch.randn(8, 6)
    G[:3] = 0  # dead neurons: zero rows of the update
    W.grad = G
    opt.step()
    assert W.isfinite().all() and opt.state[W]["neuron_second_moment"][:3].eq(0).all()


def _train(opt_kwargs, model, steps, opt=None):
    g = torch.Generator().manual_seed(3)
    opt = opt or Muon(model.named_parameters(), lr=0.02, **opt_kwargs)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("momentum_dtype", [None, "bfloat16"])
def test_state_dict_round_trip_resumes_exactly(momentum_dtype):
    kw = dict(variant="normuon", momentum_dtype=momentum_dtype, ns_dtype="float32")
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 2))  # noqa: E731
    straight = make()
    resumed = make()
    resumed.load_state_dict(straight.state_dict())
    # the straight run: 5 steps with the data stream continued in one generator
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 6, generator=g) for _ in range(5)]

    def run(model, opt, batch):
        for x in batch:
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    opt_a = Muon(straight.named_parameters(), lr=0.02, **kw)
    run(straight, opt_a, xs)
    opt_b = Muon(resumed.named_parameters(), lr=0.02, **kw)
    run(resumed, opt_b, xs[:2])
    saved = opt_b.state_dict()
    model_saved = {k: v.clone() for k, v in resumed.state_dict().items()}
    fresh = make()
    fresh.load_state_dict(model_saved)
    opt_c = Muon(fresh.named_parameters(), lr=0.02, **kw)
    opt_c.load_state_dict(saved)
    hidden = fresh[2].weight
    assert opt_c.state[hidden]["neuron_second_moment"].shape == (10,)
    want = torch.bfloat16 if momentum_dtype else torch.float32
    assert opt_c.state[hidden]["momentum_buffer"].dtype == want
    run(fresh, opt_c, xs[2:])
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_state_with_the_wrong_row_count_is_refused():
    a = Muon([nn.Parameter(torch.randn(4, 3))], variant="normuon")
    a.param_groups[0]["params"][0].grad = torch.randn(4, 3)
    a.step()
    sd = a.state_dict()
    sd["state"][0]["neuron_second_moment"] = torch.zeros(5)
    b = Muon([nn.Parameter(torch.randn(4, 3))], variant="normuon")
    with pytest.raises(ValueError, match="'neuron_second_moment' .* has shape \\(5,\\)"):
        b.load_state_dict(sd)
    assert not b.state


def test_configure_muon_passes_the_variant_per_group():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    opt = configure_muon(model, variant="normuon", variant_options={"beta2": 0.9}, momentum_dtype=torch.bfloat16)
    muon = [g for g in opt.param_groups if g["use_muon"]][0]
    assert (muon["variant"], muon["variant_options"], muon["momentum_dtype"]) == (
        "normuon",
        {"beta2": 0.9, "eps": 1e-8},
        "bfloat16",
    )
    assert all("variant" not in g for g in opt.param_groups if not g["use_muon"])
    # a group of its own can mix: plain Muon next to NorMuon
    extra = nn.Linear(8, 8)
    opt.add_param_group({"params": [extra.weight], "use_muon": True, "variant": "muon"})
    assert opt.param_groups[-1]["variant"] == "muon" and opt.param_groups[-1]["momentum_dtype"] == "bfloat16"


def test_lightning_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            return (self.net(x) - y).square().mean()

        def configure_optimizers(self):
            return configure_muon(self, lr=0.02, variant="normuon", momentum_dtype="bfloat16", ns_dtype="float32")

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)), 8)

    def fit(epochs, ckpt=None, root=None):
        L.seed_everything(0, verbose=False)
        model = Lit()
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            enable_checkpointing=root is not None,
        )
        trainer.fit(model, ckpt_path=ckpt)
        return model, trainer

    straight, _ = fit(3)
    _, first = fit(1, root=tmp_path)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    resumed, trainer = fit(3, ckpt=str(ckpt))
    opt = trainer.optimizers[0]
    state = opt.state[resumed.net[0].weight]  # the routing's Muon matrix here
    assert state["momentum_buffer"].dtype == torch.bfloat16 and int(state["step"]) == 12
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_example_gpt_takes_variant_and_momentum_dtype_through_its_optimizer():
    from examples.common import muon
    from examples.gpt import LitGPT

    optimizer = muon(variant="normuon", momentum_dtype="bfloat16")
    model = LitGPT(vocab_size=16, block_size=8, n_layer=1, n_embd=16, optimizer=optimizer)
    opt = model.configure_optimizers()
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert muon and all((g["variant"], g["momentum_dtype"]) == ("normuon", "bfloat16") for g in muon)


def test_normuon_on_a_stack_normalises_each_matrix_on_its_own():
    """A (3, 8, 5) weight routed as a stack of matrices: NorMuon's rows are each matrix's rows and
    each matrix keeps its own Frobenius norm, as if the three were separate parameters."""

    class Bank(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.Parameter(torch.randn(3, 8, 5, dtype=torch.float64))

    torch.manual_seed(0)
    bank = Bank()
    singles = [nn.Parameter(bank.experts[e].detach().clone()) for e in range(3)]
    kw = dict(lr=0.05, weight_decay=0.0, ns_method="svd", ns_dtype="float64", adjust_lr="original", variant="normuon")
    opt = Muon(muon_param_groups(bank), **kw)
    ref = Muon([{"params": singles, "use_muon": True}], **kw)
    assert [g for g in opt.param_groups if g["use_muon"]][0]["params"] == [bank.experts]
    for _ in range(3):
        G = torch.randn(3, 8, 5, dtype=torch.float64)
        G[1] *= 10  # matrices of different scales: a rescale over the whole bank would differ
        bank.experts.grad = G.clone()
        for e, p in enumerate(singles):
            p.grad = G[e].clone()
        opt.step()
        ref.step()
    for e, p in enumerate(singles):
        torch.testing.assert_close(bank.experts[e], p, rtol=0, atol=1e-12)
    assert opt.state[bank.experts]["neuron_second_moment"].shape == (3, 8)


def test_the_old_normuon_keywords_still_work_with_a_warning():
    W = nn.Parameter(torch.randn(4, 6))
    with pytest.warns(DeprecationWarning, match=r"normuon_beta2/normuon_eps are deprecated; pass variant_options"):
        opt = Muon([{"params": [W], "use_muon": True}], variant="normuon", normuon_beta2=0.8, normuon_eps=1e-6)
    assert opt.param_groups[0]["variant_options"] == {"beta2": 0.8, "eps": 1e-6}


def test_default_built_normuon_is_the_paper_rule_with_beta2_095():
    # No variant_options: the paper's defaults (beta2 = 0.95, eps = 1e-8) with Muon's defaults
    # (momentum 0.95, Nesterov, weight decay 0.01, RMS matching); tolerance as above (float64, SVD).
    # The first step does not depend on beta2 (v is proportional to it, the norm cancels): four steps.
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(8, 12, generator=g, dtype=torch.float64)
    row_scale = torch.logspace(-2, 1, 8, dtype=torch.float64)[:, None]
    grads = [torch.randn(8, 12, generator=g, dtype=torch.float64) * row_scale for _ in range(4)]
    W = nn.Parameter(W0.clone())
    opt = Muon([{"params": [W], "use_muon": True}], lr=0.03, ns_method="svd", ns_dtype="float64", variant="normuon")
    for G in grads:
        W.grad = G.clone()
        opt.step()
    want_W, _, want_v = _paper_steps(W0, grads, 0.03, 0.01, 0.95, 0.95, 1e-8, True)
    torch.testing.assert_close(W.detach(), want_W, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.state[W]["neuron_second_moment"], want_v, rtol=0, atol=1e-12)
