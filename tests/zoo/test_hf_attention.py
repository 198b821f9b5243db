"""QK-clip and the attention-logit monitor on Hugging Face attention, against the model's own logits.

Reference: the queries and keys the model itself hands to its attention function, captured by
wrapping the modeling file's ``eager_attention_forward`` (``attn_implementation="eager"``), turned
into logits by hand: ``scaling * q k^T`` with grouped keys repeated, masked where the model's mask
masks, max over batch and positions per head. The adapters recompute q and k from the layer's
inputs, independently of that path; under ``"sdpa"`` (no logits to capture) they must give the same.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from zoo_models import SPECS

from lightning_muon.diagnostics.attention import QKObserver, find_qk_attention
from lightning_muon.optim.qk_clip import qk_clip_

transformers = pytest.importorskip("transformers", reason="the zoo extra (transformers) is not installed")

MODELS = ["hf_gpt2", "hf_llama", "hf_bert", "hf_vit", "hf_mixtral", "hf_qwen3_moe"]
ADAPTER = {
    "hf_gpt2": "HFConv1DQK",
    "hf_llama": "HFProjectionsQK",
    "hf_bert": "HFProjectionsQK",
    "hf_vit": "HFProjectionsQK",
    "hf_mixtral": "HFProjectionsQK",
    "hf_qwen3_moe": "HFProjectionsQK",
}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "hf_vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second example: masked keys
    return {"input_ids": torch.randint(3, 90, (2, 9), generator=g), "attention_mask": mask}


@pytest.fixture
def capture(monkeypatch):
    """Wrap ``eager_attention_forward`` of a modeling file: records (module, q, k, mask, scaling)."""
    calls = []

    def install(model: torch.nn.Module) -> list:
        modeling = importlib.import_module(type(model).__module__)
        original = modeling.eager_attention_forward

        def recording(module, query, key, value, attention_mask, scaling=None, **kwargs):
            calls.append((module, query.detach(), key.detach(), attention_mask, scaling))
            return original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

        monkeypatch.setattr(modeling, "eager_attention_forward", recording)
        return calls

    return install


def _by_hand(calls) -> dict[int, torch.Tensor]:
    out = {}
    for module, q, k, mask, scaling in calls:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # HF's repeat_kv: head h reads kv head h // g
        logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
        if mask is not None:
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            logits = logits.masked_fill(~allowed, float("-inf"))
        out[id(module)] = logits.amax(dim=(0, 2, 3))
    return out


def _observe(model, inputs) -> dict[str, torch.Tensor]:
    observer = QKObserver(find_qk_attention(model))
    observer.enabled = True
    with torch.no_grad():
        model(**inputs)
    observer.remove()
    return observer.maxima


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_the_models_own_queries_and_keys(name, capture):
    model = SPECS[name].build().eval()
    found = find_qk_attention(model)
    assert len(found) == 2 and {type(a).__name__ for _, a in found.values()} == {ADAPTER[name]}
    model.set_attn_implementation("eager")
    calls = capture(model)
    inputs = _inputs(name)
    eager = _observe(model, inputs)
    reference = _by_hand(calls)
    assert len(reference) == 2
    for layer, (module, _) in found.items():
        # the same float32 products in another order: 1e-5 relative
        torch.testing.assert_close(eager[layer], reference[id(module)], rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("sdpa")
    sdpa = _observe(model, inputs)
    for layer in found:
        torch.testing.assert_close(sdpa[layer], eager[layer], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "hf_bert", "hf_mixtral"])
def test_clipping_scales_exactly_the_heads_above_tau(name, capture):
    # MHA (GPT-2, BERT): q and k rows of a head take sqrt(gamma) each; GQA (Llama, Mixtral): q rows gamma.
    model = SPECS[name].build().eval()
    with torch.no_grad():  # larger logits, so that some heads exceed tau and others do not
        for _, adapter in find_qk_attention(model).values():
            for r in adapter.qk_clip_rows():
                r.param.mul_(3.0)
    model.set_attn_implementation("eager")
    calls = capture(model)
    inputs = _inputs(name)
    with torch.no_grad():
        model(**inputs)
    before = _by_hand(calls)
    # the first attention layer: its inputs do not depend on any attention weight, so its logits after
    # clipping follow from its own weights alone
    module, adapter = next(iter(find_qk_attention(model).values()))
    s_before = before[id(module)]
    tau = float(s_before.median())
    clipped = qk_clip_(adapter.qk_clip_rows(), s_before, tau)
    assert clipped.any() and not clipped.all()
    calls.clear()
    with torch.no_grad():
        model(**inputs)
    after = _by_hand(calls)[id(module)]
    # clipped heads land on tau (gamma = tau / S_h exactly), the others are untouched
    torch.testing.assert_close(after, torch.minimum(s_before, torch.tensor(tau)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[~clipped], s_before[~clipped], rtol=0, atol=0)


def test_qk_norm_models_are_measured_but_not_clipped():
    model = SPECS["hf_qwen3_moe"].build()
    (_, adapter), *_ = find_qk_attention(model).values()
    assert "q_norm, k_norm" in adapter.qk_clip_refusal
    with pytest.raises(RuntimeError, match="cannot clip Qwen3MoeAttention"):
        adapter.qk_clip_rows()
