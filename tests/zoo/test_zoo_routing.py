"""Routing of third-party models (transformers, timm, litgpt) against hand-written expected tables,
including where timm's own Muon (``timm.optim.muon``) selects differently, with our reason.

Tiny configs build in well under a second; full-size configs are routed on the meta device (no
memory, no fit: the table is all that is checked). Skipped, with the reason, when a library is missing.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from zoo_models import SPECS

from lightning_muon import route_parameters

# (regex searched in the parameter name, group, regex the reason must match); first match wins.
_NORMS = (r"(norm|ln_|LayerNorm|bn\d|gamma)|\.bias$", "adamw_no_decay", r"^1-D")  # gains and biases
EXPECTED: dict[str, list[tuple[str, str, str]]] = {
    "hf_gpt2": [
        (r"wte\.weight", "adamw", r"^embedding \(Embedding\) \(tied: lm_head\.weight\)$"),
        (r"wpe\.weight", "adamw", r"^embedding \(Embedding\)$"),
        (r"c_attn\.weight", "muon", r"^hidden matrix: matrix 96 x 32, stored \(in, out\) \(Hugging Face Conv1D\)$"),
        (r"attn\.c_proj\.weight", "muon", r"matrix 32 x 32, stored \(in, out\)"),
        (r"c_fc\.weight", "muon", r"matrix 128 x 32, stored \(in, out\)"),  # a 32 -> 128 map
        (r"mlp\.c_proj\.weight", "muon", r"matrix 32 x 128, stored \(in, out\)"),  # 128 -> 32
        _NORMS,
    ],
    "hf_llama": [
        (r"embed_tokens", "adamw", r"^embedding \(Embedding\)$"),
        (r"lm_head", "adamw", r"^output head \(name matches 'lm_head'\)$"),
        (r"self_attn\.[qkvo]_proj\.weight", "muon", r"^hidden matrix$"),
        (r"mlp\.(gate|up|down)_proj\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
    "hf_bert": [
        (r"word_embeddings", "adamw", r"^embedding \(Embedding\) \(tied: cls\.predictions\.decoder\.weight\)$"),
        (r"(position|token_type)_embeddings", "adamw", r"^embedding \(Embedding\)$"),
        (
            r"cls\.predictions\.bias",
            "adamw_no_decay",
            r"^1-D \(gain or bias\) \(tied: cls\.predictions\.decoder\.bias\)$",
        ),
        (r"(query|key|value|dense)\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
    "hf_vit": [
        (r"cls_token|position_embeddings", "adamw", r"^vector-like"),
        (r"patch_embeddings\.projection\.weight", "adamw", r"^embedding \(name matches '\*embed\*'\)$"),
        (r"classifier\.weight", "adamw", r"^output head \(name matches 'classifier'\)$"),
        (
            r"attention\.[qkvo]_proj\.weight|mlp\.fc[12]\.weight|attention\.(query|key|value)\.weight|dense\.weight",
            "muon",
            r"^hidden matrix$",
        ),
        _NORMS,
    ],
    "hf_mixtral": [
        (r"embed_tokens", "adamw", r"^embedding"),
        (r"lm_head", "adamw", r"^output head"),
        (r"mlp\.gate\.weight", "adamw", r"^MoE router \(4 expert logits; router='adamw'\)$"),
        (r"experts\.gate_up_proj", "muon", r"^hidden matrix: stack of 4 x 2 row blocks \(64 x 32\) \(split_gate_up"),
        (r"experts\.down_proj", "muon", r"^hidden matrix: stack of 4 \(32 x 64\)$"),
        (r"self_attn\.[qkvo]_proj\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
    "hf_qwen3_moe": [
        (r"embed_tokens", "adamw", r"^embedding"),
        (r"lm_head", "adamw", r"^output head"),
        (r"mlp\.gate\.weight", "adamw", r"^MoE router \(4 expert logits"),
        (r"experts\.gate_up_proj", "muon", r"stack of 4 x 2 row blocks \(16 x 32\)"),
        (r"experts\.down_proj", "muon", r"stack of 4 \(32 x 16\)"),
        (r"self_attn\.[qkvo]_proj\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
    "hf_t5": [
        (
            r"^shared\.weight",
            "adamw",
            r"^embedding \(Embedding\) \(tied: encoder\.embed_tokens\.weight, decoder\.embed_tokens\.weight, "
            r"lm_head\.weight\)$",
        ),
        (r"relative_attention_bias", "adamw", r"^embedding \(Embedding\)$"),
        (r"Attention\.[qkvo]\.weight|DenseReluDense\.w[io]\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
    "timm_vit": [
        (r"cls_token|pos_embed", "adamw", r"^vector-like"),
        (r"patch_embed\.proj\.weight", "adamw", r"^embedding \(name matches '\*embed\*'\)$"),
        (r"^head\.weight", "adamw", r"^output head \(name matches 'head'\)$"),
        (r"attn\.(qkv|proj)\.weight|mlp\.fc[12]\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
    "timm_resnet": [
        (r"^conv1\.weight", "adamw", r"^input stem \(first layer, before the repeated blocks\)$"),
        (r"^fc\.weight", "adamw", r"^output head \(last layer outside the repeated blocks\)$"),
        (r"(conv\d|downsample\.0)\.weight", "muon", r"^hidden conv kernel: conv \(out, rest\)"),
        _NORMS,
        (r"downsample\.1\.weight", "adamw_no_decay", r"^1-D"),
    ],
    "timm_convnext": [
        (r"^stem\.0\.weight", "adamw", r"^input stem"),
        (r"conv_dw\.weight", "adamw", r"^depthwise conv \(groups=\d+, one input channel per group\): separate 7x7"),
        (r"^head\.fc\.weight", "adamw", r"^output head \(name matches 'head'\)$"),
        (r"mlp\.fc[12]\.weight", "muon", r"^hidden matrix$"),
        (r"downsample\.1\.weight", "muon", r"^hidden conv kernel: conv \(out, rest\)"),
        _NORMS,
        (r"(stem\.1|downsample\.0)\.weight", "adamw_no_decay", r"^1-D"),
    ],
    "timm_efficientnet": [
        (r"^conv_stem\.weight", "adamw", r"^input stem"),
        (
            r"conv_dw\.weight",
            "adamw",
            r"^depthwise conv \(groups=\d+, one input channel per group\): separate [35]x[35]",
        ),
        (r"^classifier\.weight", "adamw", r"^output head \(name matches 'classifier'\)$"),
        (r"(conv_pw|conv_pwl|conv_reduce|conv_expand|conv_head)\.weight", "muon", r"^hidden conv kernel: conv \(out"),
        _NORMS,
    ],
    "litgpt_gpt": [
        (r"lm_head", "adamw", r"^output head \(name matches 'lm_head'\)$"),
        (r"wte", "adamw", r"^embedding \(Embedding\)$"),
        (r"attn\.(qkv|proj)\.weight|mlp\.(fc|proj)\.weight", "muon", r"^hidden matrix$"),
        _NORMS,
    ],
}

# Where timm's own Muon (timm.optim.muon._is_suitable_for_muon, its default selection) decides otherwise,
# and why we do not follow it: (regex, our group).
TIMM_DISAGREES: dict[str, list[tuple[str, str, str]]] = {
    "embedding": (
        "embed|wte|wpe|shared\\.weight|relative_attention_bias",
        "adamw",
        "an embedding is a lookup table, not a map: Muon's flat spectrum has no meaning for its rows",
    ),
    "head": (
        "lm_head|classifier\\.weight|^head(\\.fc)?\\.weight|^fc\\.weight|cls\\.predictions\\.decoder",
        "adamw",
        "the output head maps to logits; Keller Jordan's Muon and ours keep it on AdamW",
    ),
    "stem": (
        "^conv1\\.weight|^stem\\.0\\.weight|^conv_stem\\.weight",
        "adamw",
        "the input stem reads pixels; kept on AdamW (stem='muon' changes it; benchmarks/routing_choices.py)",
    ),
    "router": ("mlp\\.gate\\.weight", "adamw", "an MoE router's logits pick experts (router='adamw', measured)"),
    "stack": (
        "experts\\.(gate_up|down)_proj",
        "muon",
        "a bank of expert matrices: each expert orthogonalised on its own; timm flattens the bank to one "
        "(E * 2I) x H matrix and finds its aspect ratio extreme",
    ),
    "small": (
        "se\\.conv_(reduce|expand)\\.weight",
        "muon",
        "a 2 x 8 squeeze-excite map is still a map between feature spaces; timm keeps a side < 4 on AdamW",
    ),
}
TIMM_EXPECTED = {
    "hf_gpt2": ["embedding"],
    "hf_llama": ["embedding", "head"],
    "hf_bert": ["embedding"],
    "hf_vit": ["embedding", "head"],
    "hf_mixtral": ["embedding", "head", "router", "stack"],
    "hf_qwen3_moe": ["embedding", "head", "router", "stack"],
    "hf_t5": ["embedding"],
    "timm_vit": ["embedding", "head"],
    "timm_resnet": ["stem", "head"],
    "timm_convnext": ["stem", "head"],
    "timm_efficientnet": ["stem", "head", "small"],
    "litgpt_gpt": ["embedding", "head"],
}


def _build(name: str) -> torch.nn.Module:
    spec = SPECS[name]
    pytest.importorskip(spec.library, reason=f"the zoo extra ({spec.library}) is not installed")
    return spec.build()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_routing_table_matches_the_expected_one(name):
    routes = route_parameters(_build(name), warn=False)
    used = set()
    for r in routes:
        rule = next((i for i, (pattern, _, _) in enumerate(EXPECTED[name]) if re.search(pattern, r.name)), None)
        assert rule is not None, f"{name}: no expected rule for {r.name} ({r.group}: {r.reason})"
        _, group, reason = EXPECTED[name][rule]
        assert r.group == group and re.search(reason, r.reason), f"{name}: {r.name} is {r.group} ({r.reason})"
        used.add(rule)
    assert used == set(range(len(EXPECTED[name]))), (
        f"{name}: rules matching no parameter: {set(range(len(EXPECTED[name]))) - used}"
    )


@pytest.mark.parametrize("name", list(TIMM_EXPECTED))
def test_where_timms_own_muon_selects_otherwise_and_why(name):
    timm_muon = pytest.importorskip("timm.optim.muon", reason="timm is not installed")
    suitable = getattr(timm_muon, "_is_suitable_for_muon", None)
    if suitable is None:
        pytest.skip("this timm has no _is_suitable_for_muon (timm.optim.muon's selection)")
    routes = route_parameters(_build(name), warn=False)
    differ = {r.name: r for r in routes if suitable(r.param) != r.use_muon}
    kinds = {kind: TIMM_DISAGREES[kind] for kind in TIMM_EXPECTED[name]}
    seen = set()
    for pname, r in differ.items():
        kind = next((k for k, (pattern, _, _) in kinds.items() if re.search(pattern, pname)), None)
        assert kind is not None, f"{name}: timm disagrees on {pname} ({r.group}: {r.reason}), not listed"
        assert r.group == kinds[kind][1], pname
        seen.add(kind)
    assert seen == set(kinds), f"{name}: listed disagreements that did not occur: {set(kinds) - seen}"


def test_tied_and_untied_llama_heads():
    from zoo_models import llama

    pytest.importorskip("transformers", reason="the zoo extra (transformers) is not installed")
    tied = {r.name: r for r in route_parameters(llama(tied=True), warn=False)}
    assert "lm_head.weight" not in tied  # one tensor, routed once through either name
    assert tied["model.embed_tokens.weight"].group == "adamw"
    assert tied["model.embed_tokens.weight"].reason == "embedding (Embedding) (tied: lm_head.weight)"
    untied = {r.name: r for r in route_parameters(llama(tied=False), warn=False)}
    assert untied["lm_head.weight"].group == "adamw" and untied["model.embed_tokens.weight"].group == "adamw"


def test_gpt2_split_qkv_splits_the_fused_conv1d():
    pytest.importorskip("transformers", reason="the zoo extra (transformers) is not installed")
    routes = {r.name: r for r in route_parameters(_build("hf_gpt2"), split_qkv="per_head", warn=False)}
    r = routes["transformer.h.0.attn.c_attn.weight"]
    assert r.matrix == "split=3,heads=4,per_head,transposed"
    assert "split qkv per head 12 x (8 x 32), stored (in, out)" in r.reason


def _meta(config_cls: str, model_cls: str, **config) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers", reason="the zoo extra (transformers) is not installed")
    with torch.device("meta"):
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))


def test_full_size_models_on_the_meta_device():
    # GPT-2 124M, a Llama-2-7B-shaped and a Mixtral-8x7B-shaped model: no memory, no warning, every
    # hidden matrix on Muon and only those.
    models = {
        "gpt2": _meta("GPT2Config", "GPT2LMHeadModel"),
        "llama": _meta("LlamaConfig", "LlamaForCausalLM", num_hidden_layers=2),
        "mixtral": _meta("MixtralConfig", "MixtralForCausalLM", num_hidden_layers=2),
    }

    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither "no head found" nor "looks like an embedding"
            routes = route_parameters(model)
        muon = {re.sub(r"\.\d+\.", ".N.", r.name) for r in routes if r.use_muon}
        expect = {
            "gpt2": {f"transformer.h.N.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
            "llama": {
                f"model.layers.N.{m}.weight"
                for m in (
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            },
            "mixtral": {f"model.layers.N.self_attn.{m}_proj.weight" for m in "qkvo"}
            | {"model.layers.N.mlp.experts.gate_up_proj", "model.layers.N.mlp.experts.down_proj"},
        }[name]
        assert muon == expect, name
    gpt2 = {r.name: r for r in route_parameters(models["gpt2"], warn=False)}
    assert gpt2["transformer.h.0.mlp.c_fc.weight"].reason.startswith(
        "hidden matrix: matrix 3072 x 768, stored (in, out)"
    )
