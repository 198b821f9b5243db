"""The Hugging Face attention adapters without transformers: layouts written out here, logits by hand.

(With transformers installed, tests/zoo/test_hf_attention.py checks the real models against the
queries and keys they hand their own attention.)
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from helpers import ROOT
from torch import nn

from lightning_muon.diagnostics.attention import QKObserver, find_qk_attention
from lightning_muon.diagnostics.hf_attention import HFConv1DQK, HFProjectionsQK

FAKE = "transformers.models.fake.modeling_fake"


def _rotate(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.fixture
def modeling(monkeypatch):
    """A stand-in modeling file: where the adapter looks up ``apply_rotary_pos_emb``."""
    module = types.ModuleType(FAKE)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin

    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    monkeypatch.setitem(sys.modules, FAKE, module)
    return module


class FakeLlamaAttention(nn.Module):
    """Llama's attribute layout: q_proj/k_proj, head_dim, scaling, config.num_attention_heads, GQA."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.head_dim, self.is_causal = d // heads, True
        self.scaling = self.head_dim**-0.5
        self.config = types.SimpleNamespace(num_attention_heads=heads)
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=True), nn.Linear(d, kv_heads * self.head_dim, bias=True)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        return hidden_states


FakeLlamaAttention.__module__ = FAKE


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))


class FakeGPT2Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scaling, self.is_causal = heads, d // heads, 0.3, True
        self.c_attn = Conv1D(3 * d, d)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return hidden_states


FakeGPT2Attention.__module__ = FAKE


def _max_logits(q, k, scale, allowed):
    logits = (q @ k.transpose(-1, -2)) * scale
    return logits.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


def test_llama_layout_with_gqa_rotary_and_a_padding_mask(modeling):
    torch.manual_seed(0)
    attn = FakeLlamaAttention()
    (name, (module, adapter)), *_ = find_qk_attention(nn.ModuleDict({"attn": attn})).items()
    assert isinstance(adapter, HFProjectionsQK) and (adapter.n_head, adapter.kv_heads) == (4, 2)
    x = torch.randn(2, 5, 16)
    angles = torch.randn(2, 5, 2)  # head_dim 4: two rotation angles per position
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, :2] = torch.finfo(torch.float32).min  # padded keys of the second example
    got = adapter.qk_logit_max((x,), {"position_embeddings": (cos, sin), "attention_mask": mask})
    # by hand: project, rotate, repeat each key head for its 2 query heads
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(2, 5, 4, 4).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(2, 5, 2, 4).transpose(1, 2)
    c, s = cos[:, None], sin[:, None]
    q, k = q * c + _rotate(q) * s, k * c + _rotate(k) * s
    k = k[:, [0, 0, 1, 1]]
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[1, :, :, :2] = False
    torch.testing.assert_close(got, _max_logits(q, k, 0.5, allowed), rtol=1e-5, atol=1e-6)
    # no mask: causal
    got = adapter.qk_logit_max((x,), {"position_embeddings": (cos, sin)})
    torch.testing.assert_close(
        got, _max_logits(q, k, 0.5, torch.ones(5, 5, dtype=torch.bool).tril()), rtol=1e-5, atol=1e-6
    )
    # GQA: the query rows (and bias) take the whole factor, the shared keys none
    rows = adapter.qk_clip_rows()
    assert [(r.param is attn.q_proj.weight or r.param is attn.q_proj.bias, r.power) for r in rows] == [(True, 1.0)] * 2


def test_gpt2_layout_reads_the_stored_columns(modeling):
    torch.manual_seed(1)
    attn = FakeGPT2Attention()
    (_, adapter), *_ = find_qk_attention(attn).values()
    assert isinstance(adapter, HFConv1DQK)
    x = torch.randn(3, 6, 16)
    y = x @ attn.c_attn.weight + attn.c_attn.bias  # (B, T, 3d): columns [q; k; v]
    q, k = (y[..., i * 16 : (i + 1) * 16].view(3, 6, 4, 4).transpose(1, 2) for i in (0, 1))
    expect = _max_logits(q, k, 0.3, torch.ones(6, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(adapter.qk_logit_max((x,), {}), expect, rtol=1e-5, atol=1e-6)
    weight_rows = adapter.qk_clip_rows()[0]
    assert (
        weight_rows.dim == 1 and weight_rows.heads.tolist() == [h for h in range(4) for _ in range(4)] * 2 + [-1] * 16
    )


def test_modules_outside_transformers_are_not_adapted_and_observers_hook_them(modeling):
    class Mine(FakeLlamaAttention):
        pass

    Mine.__module__ = "my_project.models"
    assert find_qk_attention(Mine()) == {}
    attn = FakeLlamaAttention()
    observer = QKObserver(find_qk_attention(nn.ModuleDict({"attn": attn})))
    observer.enabled = True
    attn(torch.randn(1, 3, 16))
    observer.remove()
    assert observer.maxima["attn"].shape == (4,)


def test_discovery_never_imports_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # any import of it would now fail
        "import torch\n"
        "from lightning_muon.diagnostics.attention import find_qk_attention\n"
        "m = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 8))\n"
        "print(list(find_qk_attention(m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "['0']", out.stderr
