"""Tiny configs of third-party models (random init, nothing downloaded), their data and their loss.

Each :class:`Spec` builds one model of ``transformers``, ``timm`` or ``litgpt`` small enough for a
CPU test, makes a fixed dataset (random tokens or pixels: the tests need a loss that goes down on
memorised batches, not a task) and computes the loss of a batch. The libraries are imported when a
model is built, so this module imports without them. Dropout is off everywhere: a resumed run must
match an uninterrupted one bit for bit, and Lightning does not checkpoint the RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, IMAGE, CLASSES = 96, 12, 32, 10


@dataclass(frozen=True)
class Spec:
    name: str
    library: str  # the package the test needs: "transformers", "timm" or "litgpt"
    build: Callable[[], nn.Module]
    kind: str  # "causal_lm", "masked_lm", "seq2seq", "image"

    def data(self, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            return torch.randn(n, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        if self.kind == "seq2seq":
            return ids, torch.randint(0, VOCAB, (n, SEQ // 2), generator=g)
        return (ids,)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.kind == "image":
            x, y = batch
            out = model(pixel_values=x) if self.library == "transformers" else model(x)
            logits = out.logits if hasattr(out, "logits") else out
            return F.cross_entropy(logits, y)
        (ids, *rest) = batch
        if self.kind == "seq2seq":
            return model(input_ids=ids, labels=rest[0]).loss
        if self.kind == "masked_lm":  # every position predicts its own token (a task it can memorise)
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        logits = model(input_ids=ids).logits if self.library == "transformers" else model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# ----------------------------------------------------------------------------- transformers
def _hf(config_cls: str, model_cls: str, **config) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**config)
    return getattr(transformers, model_cls)(cfg)


_LM = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
_DECODER = dict(
    _LM, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=64
)


def gpt2() -> nn.Module:
    return _hf(
        "GPT2Config",
        "GPT2LMHeadModel",
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_LM,
    )


def llama(tied: bool = False) -> nn.Module:
    return _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=tied, **_DECODER)


def mixtral() -> nn.Module:
    return _hf(
        "MixtralConfig",
        "MixtralForCausalLM",
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        **_DECODER,
    )


def qwen3_moe() -> nn.Module:
    return _hf(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        head_dim=8,
        **_DECODER,
    )


def bert() -> nn.Module:
    return _hf(
        "BertConfig",
        "BertForMaskedLM",
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab_size=VOCAB,
        pad_token_id=2,
    )


def hf_vit() -> nn.Module:
    return _hf(
        "ViTConfig",
        "ViTForImageClassification",
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=8,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def t5() -> nn.Module:
    return _hf(
        "T5Config",
        "T5ForConditionalGeneration",
        num_layers=2,
        num_decoder_layers=2,
        d_model=32,
        d_ff=64,
        num_heads=4,
        d_kv=8,
        dropout_rate=0.0,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


# ----------------------------------------------------------------------------- timm
def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=CLASSES)


def timm_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    # zero_init_last=False: timm zeroes the last BatchNorm gain of each block by default, which makes the
    # residual branches' gradients exactly zero at step 0 (their singular frames, hence the polar
    # misalignment, are then undefined: NaN, as documented for a zero gradient)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES, channels=(16, 32, 64, 128), zero_init_last=False)


def timm_convnext() -> nn.Module:
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=CLASSES)


def timm_efficientnet() -> nn.Module:
    from timm.models.efficientnet import _gen_efficientnet

    torch.manual_seed(0)
    return _gen_efficientnet(
        "efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, pretrained=False, num_classes=CLASSES
    )


# ----------------------------------------------------------------------------- litgpt
def litgpt_gpt() -> nn.Module:
    from litgpt.config import Config
    from litgpt.model import GPT

    torch.manual_seed(0)
    cfg = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=64, bias=True)
    return GPT(cfg)


SPECS = {
    s.name: s
    for s in [
        Spec("hf_gpt2", "transformers", gpt2, "causal_lm"),
        Spec("hf_llama", "transformers", llama, "causal_lm"),
        Spec("hf_bert", "transformers", bert, "masked_lm"),
        Spec("hf_vit", "transformers", hf_vit, "image"),
        Spec("hf_mixtral", "transformers", mixtral, "causal_lm"),
        Spec("hf_qwen3_moe", "transformers", qwen3_moe, "causal_lm"),
        Spec("hf_t5", "transformers", t5, "seq2seq"),
        Spec("timm_vit", "timm", timm_vit, "image"),
        Spec("timm_resnet", "timm", timm_resnet, "image"),
        Spec("timm_convnext", "timm", timm_convnext, "image"),
        Spec("timm_efficientnet", "timm", timm_efficientnet, "image"),
        Spec("litgpt_gpt", "litgpt", litgpt_gpt, "causal_lm"),
    ]
}
