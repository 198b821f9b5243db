"""Worker for tests/parallel/test_matrix_structure_distributed.py: a tiny GPT whose Muon matrices have structure.

Each block has a fused q/k/v projection with rows ordered (head, q/k/v, head_dim), declared in
``muon_qkv_layout`` and split by ``split_qkv``, and a bank of 3 expert matrices (a stack). Trains
EPOCHS epochs (4 optimizer steps each, global batch 8 split over the data-parallel ranks, no
shuffling, so every layout sees the same global batches) and writes to OUT_DIR:
  epoch{k}.pt     after epoch k: full parameters and optimizer state by name (rank 0)
  rank{r}.json    the (m, n) of every matrix this rank orthogonalised, and the routed matrix views

Usage: python structure_gpt.py OUT_DIR {single,ddp,fsdp,tp} EPOCHS [--split-qkv {true,per_head}]
("fsdp": FSDP2 over 2 ranks; "tp": ModelParallelStrategy(1, 2), q/k/v and MLP-in column-wise, then FSDP2.)
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

import lightning_muon.parallel.buckets as lmb  # noqa: E402
from lightning_muon import configure_muon  # noqa: E402

VOCAB, CONTEXT, DIM, HEADS, EXPERTS = 65, 16, 32, 4, 3  # 3 experts: uneven FSDP2 shards of the stack
SEQUENCES, GLOBAL_BATCH = 32, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.muon_qkv_layout = {"qkv.weight": f"split=3,heads={HEADS},order=heads"}
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = nn.Parameter(torch.randn(EXPERTS, DIM, DIM) / DIM**0.5)

    def forward(self, x):
        b, t, _ = x.shape  # qkv rows ordered (head, q/k/v, head_dim): a column split keeps whole heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, -1, 3, DIM // HEADS).permute(3, 0, 2, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ln2(x)
        gate = self.gate(h).softmax(-1)
        experts = self.experts.full_tensor() if hasattr(self.experts, "full_tensor") else self.experts
        return x + torch.einsum("bte,btd,edf->btf", gate, h, experts)


class TinyGPT(L.LightningModule):
    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded
        self.wte = nn.Embedding(VOCAB, DIM)
        self.wpe = nn.Embedding(CONTEXT, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if self.device_mesh["tensor_parallel"].size() > 1:
            for block in self.blocks:
                parallelize_module(
                    block, self.device_mesh["tensor_parallel"], {"qkv": ColwiseParallel(), "proj": RowwiseParallel()}
                )
        for block in self.blocks:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        opt = configure_muon(
            self,
            lr=0.02,
            adjust_lr="original",
            adamw_lr=3e-3,
            weight_decay=0.01,
            ns_dtype="float32",
            split_qkv=ARGS.split_qkv,
            adamw_names=["gate"],  # tiny (3 x 32) router: AdamW, as routers usually are
        )
        RECORD["views"] = opt.param_groups[0]["matrix_views"]
        return opt

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, VOCAB, (SEQUENCES, CONTEXT + 1), generator=g)
        ds = TensorDataset(data[:, :-1], data[:, 1:])
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}  # data-parallel ranks
        world, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def on_train_epoch_end(self) -> None:  # every rank: full_tensor() is a collective under FSDP2
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        opt = self.trainer.optimizers[0]
        result = {f"param.{n}": full(p.detach()).clone() for n, p in self.named_parameters()}
        for n, p in self.named_parameters():
            for key, value in opt.state[p].items():
                if key != "step":
                    result[f"{key}.{n}"] = full(value).clone()
        if self.trainer.global_rank == 0:
            torch.save(result, os.path.join(ARGS.out, f"epoch{self.current_epoch + 1}.pt"))
        with open(os.path.join(ARGS.out, f"rank{self.trainer.global_rank}.json"), "w") as f:
            json.dump(RECORD, f)


RECORD: dict = {"orthogonalized": []}


def main() -> None:
    L.seed_everything(0, verbose=False)
    original = lmb.polar_stack

    def counting(matrices, *args, **kwargs):  # calls through; records the matrices computed on this rank
        RECORD["orthogonalized"].extend([list(matrices[0].shape[-2:])] * len(matrices))
        return original(matrices, *args, **kwargs)

    lmb.polar_stack = counting
    if ARGS.strategy in ("fsdp", "tp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = (2, 1) if ARGS.strategy == "fsdp" else (1, 2)
        strategy, devices = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp), dp * tp
    else:
        strategy, devices = ("ddp", 2) if ARGS.strategy == "ddp" else ("auto", 1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=ARGS.epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyGPT(sharded=ARGS.strategy in ("fsdp", "tp")))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("strategy", choices=["single", "ddp", "fsdp", "tp"])
    parser.add_argument("epochs", type=int)
    parser.add_argument("--split-qkv", default="per_head", choices=["true", "per_head"])
    ARGS = parser.parse_args()
    ARGS.split_qkv = True if ARGS.split_qkv == "true" else ARGS.split_qkv
    main()
