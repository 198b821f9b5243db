"""Worker for tests/parallel/test_distributed.py: a tiny GPT trained by Muon under Lightning on CPU/gloo.

Trains EPOCHS epochs (4 optimizer steps each, global batch 8 split over the ranks with a
non-shuffling DistributedSampler, so every world size sees the same global batches), optionally
resuming from ``--resume``, and writes to OUT_DIR:
  epoch{k}.pt     after epoch k (1-based): full parameters and Muon/AdamW state by name (rank 0)
  e{k-1}.ckpt     Lightning's checkpoint after epoch k (a file; a DCP directory under FSDP2)
  rank{r}.json    matrices this rank orthogonalised, and collectives per optimizer step

Usage: python lightning_gpt.py OUT_DIR {single,ddp,fsdp,tp} EPOCHS [--resume CKPT] [--dp N --tp M] [--hidden H]
       [--muon JSON]   (more configure_muon settings, e.g. '{"variant": "normuon"}')
("tp": ModelParallelStrategy(N, M), tensor parallel blocks as in examples/gpt.py, then FSDP2;
"hsdp": 4 processes, fully_shard over a (replicate 2, shard 2) mesh built in configure_model.)
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
from _launch import record_orthogonalized  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from lightning_muon import Muon, configure_muon  # noqa: E402

VOCAB, CONTEXT, DIM, HEADS = 65, 16, 32, 2
HIDDEN = 97  # odd: uneven FSDP2 row shards; --hidden 98 for tensor parallelism (49 per TP rank, uneven FSDP2)
SEQUENCES, GLOBAL_BATCH = 32, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.fc, self.out = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        b, t, _ = x.shape  # qkv rows ordered (head, q/k/v, head_dim): a column split keeps whole heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, -1, 3, DIM // HEADS).permute(3, 0, 2, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(L.LightningModule):
    def __init__(self, fsdp: bool) -> None:
        super().__init__()
        self.fsdp = fsdp
        self.wte = nn.Embedding(VOCAB, DIM)
        self.wpe = nn.Embedding(CONTEXT, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def configure_model(self) -> None:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            if self.device_mesh["tensor_parallel"].size() > 1:
                plan = {
                    "qkv": ColwiseParallel(),
                    "proj": RowwiseParallel(),
                    "fc": ColwiseParallel(),
                    "out": RowwiseParallel(),
                }
                for block in self.blocks:
                    parallelize_module(block, self.device_mesh["tensor_parallel"], plan)
            mesh = self.device_mesh["data_parallel"]
            if ARGS.strategy == "hsdp":  # HSDP, built by the user: replicate over 2 x shard over 2
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            for block in self.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return configure_muon(
            self,
            lr=0.02,
            adjust_lr="original",
            adamw_lr=3e-3,
            weight_decay=0.01,
            ns_dtype=ARGS.ns_dtype,
            **json.loads(ARGS.muon),
        )

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


def count_work_and_comms(out: str, rank_of) -> None:
    """Record what this rank orthogonalises and the collectives inside each optimizer step."""
    from torch.distributed.tensor.debug import CommDebugMode

    record = {"orthogonalized": record_orthogonalized(), "comms": []}
    original_step = Muon.step

    def step(self, closure=None):  # forward/backward outside, the optimizer's own work inside
        loss = closure() if closure is not None else None
        with CommDebugMode() as comm:
            original_step(self)
        record["comms"].append({str(k): v for k, v in comm.get_comm_counts().items()})
        with open(os.path.join(out, f"rank{rank_of()}.json"), "w") as f:
            json.dump(record, f)
        return loss

    Muon.step = step


def main() -> None:
    L.seed_everything(0, verbose=False)
    if ARGS.strategy in ("fsdp", "tp", "hsdp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = {"fsdp": (2, 1), "hsdp": (4, 1)}.get(ARGS.strategy, (ARGS.dp, ARGS.tp))
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
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(ARGS.out, "e{epoch}", save_top_k=-1, auto_insert_metric_name=False)
        ],
    )
    count_work_and_comms(ARGS.out, lambda: trainer.global_rank)
    model = TinyGPT(fsdp=ARGS.strategy in ("fsdp", "tp", "hsdp"))
    trainer.fit(model, ckpt_path=ARGS.resume)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("strategy", choices=["single", "ddp", "fsdp", "tp", "hsdp"])
    parser.add_argument("epochs", type=int)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ns-dtype", default="float32", help="float32: parity is not blurred by bf16")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--muon", default="{}", help="JSON dict of more configure_muon settings")
    ARGS = parser.parse_args()
    HIDDEN = ARGS.hidden
    main()
