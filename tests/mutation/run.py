"""Mutation testing on demand (not in CI): does the test suite catch small realistic bugs?

Each entry of ``MUTATIONS`` is one named bug: an exact text replacement in one package file (the
old text must occur exactly once). Its tests are selected from imports: every test file that
imports the mutated module, directly (``from lightning_muon.optim.muon import ...``) or through
the package (``from lightning_muon import Muon``, resolved to the module that defines ``Muon``),
plus the module's own doctests and any test files the mutation names (run first). The runner
copies the repository to one temporary directory per worker, runs every selected test file once
unmutated (a test that already fails there is deselected, and said so), then for each mutation
writes the mutated file, runs ``pytest -x -q -m "not slow"`` on its tests (one torch thread),
restores the file and records:

* ``killed``: some test failed (or the run timed out, shown as ``killed (timeout)``);
* ``survived``: every test passed: the suite misses this bug (or the mutant is equivalent; say so
  in ``equivalent`` with the reason, shown as ``survived (equivalent)``);
* ``PATTERN NOT FOUND`` / ``pattern ambiguous``: the code changed under the mutation; not run, not
  counted in the score, listed before and after the table. Update the pattern (the mutations are
  text against the current code) and run again.

Score = killed / (killed + survived, not equivalent). Usage, from the repository root (the runner
takes ``/tmp/cpu.lock`` itself: exclusive with ``-j 2``, shared with ``-j 1``; do not wrap it in
``flock``)::

    python tests/mutation/run.py -j 2 --json results.json   # all mutations, 2 workers
    python tests/mutation/run.py --check                      # patterns only (seconds): after a merge
    python tests/mutation/run.py --list                       # names, files, selected tests
    python tests/mutation/run.py --only nesterov_weight ema_weight
    python tests/mutation/run.py --only nesterov_weight --tests tests/optim/test_optimizer.py  # another test set

Exit status 1 if a mutation survived that is not marked equivalent, 2 if a pattern was not found
(or matched more than once). Record the score and every survivor in docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "lightning_muon"
COPY = (
    "lightning_muon",
    "tests",
    "examples",
    "benchmarks",
    "docs",
    "pyproject.toml",
)  # docs: tests read the paper report
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "lightning_logs", ".pytest_cache")
LOCK = Path("/tmp/cpu.lock")
PYTEST_ARGS = ("-m", "not slow")

# package files (the layout of lightning_muon/: one constant per mutated module)
NS = "lightning_muon/optim/newton_schulz.py"
MUON = "lightning_muon/optim/muon.py"
GROUPS = "lightning_muon/optim/groups.py"
ADAMW = "lightning_muon/optim/adamw.py"
FUNC = "lightning_muon/optim/functional.py"
NS_DTYPE = "lightning_muon/optim/ns_dtype.py"
SR = "lightning_muon/optim/stochastic_rounding.py"
NORMUON = "lightning_muon/optim/variants/normuon.py"
QK_CLIP = "lightning_muon/optim/qk_clip.py"
SPEC = "lightning_muon/diagnostics/spectral.py"
CB = "lightning_muon/diagnostics/critical_batch.py"
PER_EX = "lightning_muon/diagnostics/per_example.py"
ATTN = "lightning_muon/diagnostics/attention.py"
BUCKETS = "lightning_muon/parallel/buckets.py"
PLACEMENT = "lightning_muon/parallel/placement.py"
DTENSOR = "lightning_muon/parallel/dtensor.py"
VIEW = "lightning_muon/routing/matrix_view.py"
RULES = "lightning_muon/routing/rules.py"
PATTERNS = "lightning_muon/routing/patterns.py"
TREE = "lightning_muon/routing/tree.py"
CBS = "lightning_muon/callbacks/critical_batch_size.py"
WARMUP = "lightning_muon/callbacks/batch_size_warmup.py"
MISALIGN = "lightning_muon/callbacks/polar_misalignment.py"
CB_QK = "lightning_muon/callbacks/qk_clip.py"
CACHE = "lightning_muon/callbacks/cache.py"
VALID = "lightning_muon/validation.py"
CONFIGURE = "lightning_muon/configure.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...] = ()  # test files to run first (besides those selected from imports)
    pytest_args: tuple[str, ...] = PYTEST_ARGS
    equivalent: str = ""  # why a survivor cannot be caught (same behaviour), if so
    only_named: bool = False  # run only `tests` (e.g. one slow file), not the selection from imports


def M(name: str, file: str, old: str, new: str, *tests: str, **kw) -> Mutation:
    return Mutation(name, file, old, new, tuple(tests), **kw)


# Test files a mutation names run first; the selection from imports adds every other test file that
# imports the mutated module (see select_tests).
T_NS = ("tests/optim/test_newton_schulz.py", "tests/optim/test_reference_updates.py")
T_OPT = ("tests/optim/test_optimizer.py", "tests/optim/test_reference_updates.py")
T_SPEC = ("tests/diagnostics/test_spectral.py",)
T_CB = ("tests/diagnostics/test_critical_batch.py", "tests/diagnostics/test_spectral.py")
T_CBS = ("tests/callbacks/test_critical_batch_size.py", "tests/callbacks/test_muon_b_crit.py")
T_ROUTING = ("tests/routing/test_routing_defaults.py", "tests/routing/test_routing.py")
T_GRAM = ("tests/optim/test_gram_newton_schulz.py",)
T_NORMUON = ("tests/optim/test_normuon.py",)
T_PER_EX = ("tests/diagnostics/test_per_example.py",)
T_VIEW = ("tests/routing/test_matrix_view.py",)
T_QK = ("tests/callbacks/test_qk_clip.py",)

MUTATIONS: list[Mutation] = [
    # ---- Newton–Schulz (optim/newton_schulz.py; short patterns: this file is often edited)
    M(
        "pe_coefficient_third_digit",
        NS,
        "(4.042929935166739, -2.808917465908714",
        "(4.052929935166739, -2.808917465908714",
        *T_NS,
    ),
    M("pe_norm_scale_1", NS, "norm_scale=1.02", "norm_scale=1.0", *T_NS),
    M("pe_norm_eps", NS, "norm_eps=1e-6", "norm_eps=1e-7", *T_NS),
    M("no_transpose_tall", NS, "tall = m > n", "tall = False", *T_NS),
    M("keller_coefficient", NS, "(3.4445, -4.7750, 2.0315)", "(3.4445, -4.7750, 2.0415)", *T_NS),
    M("ns5_tail_coefficient", NS, "(15 / 8, -10 / 8, 3 / 8)", "(15 / 8, -9 / 8, 3 / 8)", *T_NS),
    M("schedule_off_by_one", NS, "if i < len(self.schedule) else", "if i < len(self.schedule) - 1 else", *T_NS),
    M(
        "batched_kernel_b_c_swapped",
        NS,
        "baddbmm(A, A, A, beta=b, alpha=c, out=B)",
        "baddbmm(A, A, A, beta=c, alpha=b, out=B)",
        *T_NS,
    ),
    M(
        "looped_kernel_b_c_swapped",
        NS,
        "torch.addmm(A, A, A, beta=b, alpha=c, out=B)",
        "torch.addmm(A, A, A, beta=c, alpha=b, out=B)",
        *T_NS,
    ),
    # Gram Newton–Schulz and its default
    M("gram_b_c_swapped", NS, "addmm(R, R, R, beta=b, alpha=c)", "addmm(R, R, R, beta=c, alpha=b)", *T_GRAM),
    M("gram_q_update_no_a", NS, "addmm(Q, Q, Z, beta=a)", "addmm(Q, Q, Z)", *T_GRAM),
    M("gram_no_restart_rebuild", NS, "            X = left(Q, X)\n", "", *T_GRAM),
    M(
        "gram_aspect_boundary_exclusive",
        NS,
        "large >= GRAM_MIN_ASPECT * small",
        "large > GRAM_MIN_ASPECT * small",
        *T_GRAM,
    ),
    M("gram_side_boundary_exclusive", NS, "small >= GRAM_MIN_SIDE", "small > GRAM_MIN_SIDE", *T_GRAM),
    M("gram_default_in_16_bit", NS, "dtype in (torch.float32, torch.float64)", "dtype.is_floating_point", *T_GRAM),
    # ---- Muon step (optim/functional.py), AdamW (optim/adamw.py), groups (optim/groups.py)
    M("ema_weight", FUNC, "_foreach_lerp_(bufs, grads, 1 - beta)", "_foreach_lerp_(bufs, grads, beta)", *T_OPT),
    M(
        "nesterov_weight",
        FUNC,
        "_foreach_lerp(grads, bufs, beta) if",
        "_foreach_lerp(grads, bufs, 1 - beta) if",
        *T_OPT,
    ),
    M("nesterov_flag_inverted", FUNC, "if nesterov else bufs", "if not nesterov else bufs", *T_OPT),
    M("decay_sign", FUNC, "decay = 1 - lr * weight_decay", "decay = 1 + lr * weight_decay", *T_OPT),
    M("decay_without_lr", FUNC, "decay = 1 - lr * weight_decay", "decay = 1 - weight_decay", *T_OPT),
    M(
        "update_sign",
        FUNC,
        "alpha=-adjusted_lr(lr, shape, adjust_lr)",
        "alpha=adjusted_lr(lr, shape, adjust_lr)",
        *T_OPT,
    ),
    M("original_scale_transposed", FUNC, "math.sqrt(max(1.0, m / n))", "math.sqrt(max(1.0, n / m))", *T_OPT),
    M("match_rms_min_side", FUNC, "0.2 * math.sqrt(max(m, n))", "0.2 * math.sqrt(min(m, n))", *T_OPT),
    M("spectral_scale_transposed", FUNC, "lambda m, n: math.sqrt(m / n)", "lambda m, n: math.sqrt(n / m)", *T_OPT),
    M("adamw_betas_swapped", ADAMW, 'beta1, beta2 = group["betas"]', 'beta2, beta1 = group["betas"]', *T_OPT),
    M("adamw_lr_ignored", GROUPS, "lr=lr if adamw_lr is None else adamw_lr", "lr=lr", *T_OPT),
    # bf16 momentum (optim/muon.py: short patterns, often edited; optim/stochastic_rounding.py)
    M(
        "bf16_momentum_round_to_nearest",
        MUON,
        "buf.copy_(stochastic_round(value, global_index(p), key))",
        "buf.copy_(value)",
        "tests/optim/test_stochastic_rounding.py",
    ),
    M(
        "bf16_momentum_same_key_every_step",
        MUON,
        "positions[p], int(step))",
        "positions[p], 0)",
        "tests/optim/test_stochastic_rounding.py",
    ),
    M(
        "stochastic_round_truncates",
        SR,
        "(bits + random_bits16(index.reshape(x.shape), key)) & ~0xFFFF",
        "bits & ~0xFFFF",
        "tests/optim/test_stochastic_rounding.py",
    ),
    M("random_bits_15", SR, "return h >> 16", "return h >> 17", "tests/optim/test_stochastic_rounding.py"),
    # NorMuon (optim/variants/normuon.py)
    M("normuon_beta2_default", NORMUON, "NORMUON_BETA2 = 0.95", "NORMUON_BETA2 = 0.9", *T_NORMUON),
    M("normuon_eps_default", NORMUON, "NORMUON_EPS = 1e-8", "NORMUON_EPS = 1e-6", *T_NORMUON),
    M("normuon_ema_weight", NORMUON, "lerp_(row_sq / cols, 1 - beta2)", "lerp_(row_sq / cols, beta2)", *T_NORMUON),
    M("normuon_no_sqrt", NORMUON, "1 / (second_moment.sqrt() + eps)", "1 / (second_moment + eps)", *T_NORMUON),
    M("normuon_norm_not_restored", NORMUON, "return inv * ratio.sqrt()", "return inv * ratio", *T_NORMUON),
    # NS dtype choice (optim/ns_dtype.py)
    M(
        "ns_dtype_order_swapped",
        NS_DTYPE,
        "_CONSERVATIVE = (torch.bfloat16, torch.float16,",
        "_CONSERVATIVE = (torch.float16, torch.bfloat16,",
        "tests/optim/test_ns_dtype.py",
    ),
    M("ns_dtype_agree_min", NS_DTYPE, "op=dist.ReduceOp.MAX", "op=dist.ReduceOp.MIN", "tests/optim/test_ns_dtype.py"),
    M("ns_dtype_ampere_exclusive", NS_DTYPE, "if major >= 8:", "if major > 8:", "tests/optim/test_ns_dtype.py"),
    M(
        "ns_dtype_avx512_bf16_ignored",
        NS_DTYPE,
        'if flags.get("amx_bf16") or flags.get("avx512_bf16"):',
        'if flags.get("amx_bf16"):',
        "tests/optim/test_ns_dtype.py",
    ),
    M(
        "ns_dtype_probe_inverted",
        NS_DTYPE,
        "candidate if ratio <= PROBE_MARGIN else",
        "candidate if ratio >= PROBE_MARGIN else",
        "tests/optim/test_ns_dtype.py",
    ),
    # QK-clip (optim/qk_clip.py, diagnostics/attention.py)
    M("qk_clip_factor_sqrt", QK_CLIP, "tau / s.clamp_min(tau), torch", "(tau / s.clamp_min(tau)).sqrt(), torch", *T_QK),
    M("qk_clip_power_ignored", QK_CLIP, "gamma[heads[touched]] ** r.power", "gamma[heads[touched]]", *T_QK),
    M("attention_scale_1_over_d", ATTN, "scale = 1.0 / math.sqrt(d) if", "scale = 1.0 / d if", *T_QK),
    # ---- DDP / FSDP2 / tensor-parallel work split (parallel/buckets.py: short pattern; parallel/placement.py)
    M(
        "ddp_owner_most_loaded",
        BUCKETS,
        "rank = min(range(world),",
        "rank = max(range(world),",
        "tests/parallel/test_distributed.py",
        pytest_args=("-m", "not slow", "-k", "assign_owners or shard_rows"),
    ),
    M(
        "shard_rows_floor",
        PLACEMENT,
        "size = math.ceil(rows / world) if rows else 0",
        "size = rows // world if rows else 0",
        "tests/parallel/test_distributed.py",
    ),
    M(
        "tp_chunk_floor",
        PLACEMENT,
        "size = math.ceil(len(index) / parts) if",
        "size = len(index) // parts if",
        "tests/parallel/test_tensor_parallel.py",
    ),
    M(
        "tp_strided_shard_ignored",
        PLACEMENT,
        "torch.cat([_chunk(p, size, c) for p in pieces])",
        "_chunk(index[placement.dim], size, c)",
        "tests/parallel/test_tensor_parallel.py",
    ),
    # ---- matrix structure (routing/matrix_view.py)
    M(
        "conv_fan_in_not_flattened",
        VIEW,
        "return int(shape[0]), math.prod(int(s) for s in shape[1:])",
        "return int(shape[0]), int(shape[1])",
        *T_OPT,
    ),
    M(
        "conv_transpose_scale_not_swapped",
        VIEW,
        'return (n, m) if self.rule == "conv_transpose" else (m, n)',
        "return (m, n)",
        *T_VIEW,
    ),
    M("transposed_row_of", VIEW, "index % shape[1] if self.transposed", "index % shape[0] if self.transposed", *T_VIEW),
    M("per_head_order_regrouped", VIEW, "if not self.per_head:", "if self.per_head:", *T_VIEW),
    M("split_heads_parts_swapped", VIEW, "X.reshape(B, H, P,", "X.reshape(B, P, H,", *T_VIEW),
    M("part_rows_heads_order", VIEW, "(parts * h + part) * head_dim", "(heads * h + part) * head_dim", *T_VIEW),
    # ---- spectral diagnostics (diagnostics/spectral.py, diagnostics/critical_batch.py)
    M(
        "entropy_log2",
        SPEC,
        "H = -torch.special.xlogy(p, p).sum(-1)",
        "H = -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)",
        *T_SPEC,
    ),
    M(
        "entropy_of_squares",
        SPEC,
        "p = s / s.sum(-1, keepdim=True)",
        "p = s**2 / (s**2).sum(-1, keepdim=True)",
        *T_SPEC,
    ),
    M(
        "stable_rank_sigma_not_squared",
        SPEC,
        "return X.square().sum((-2, -1)) / sigma.square()",
        "return X.square().sum((-2, -1)) / sigma",
        *T_SPEC,
    ),
    M("stable_rank_3_iterations", SPEC, "num_iters: int = 30)", "num_iters: int = 3)", *T_SPEC),
    M(
        "sin_theta_no_sqrt",
        SPEC,
        "(k - (Ua.mT @ Ub).square().sum((-2, -1))).clamp_min(0).sqrt()",
        "(k - (Ua.mT @ Ub).square().sum((-2, -1))).clamp_min(0)",
        *T_SPEC,
    ),
    M("delta_p_no_half", SPEC, "num / (2 * W.norm(dim=(-2, -1))", "num / (W.norm(dim=(-2, -1))", *T_SPEC),
    M("noise_scale_trace_sign", CB, "(1 / b_small - 1 / b_big)", "(1 / b_small + 1 / b_big)", *T_CB),
    M(
        "sensitivity_diagonal_included",
        CB,
        "mask = mask & ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)",
        "mask = mask",
        *T_CB,
    ),
    M(
        "momentum_factor_ignores_steps",
        CB,
        "squares = (1 - b) ** 2 * (1 - tail) / (1 - b * b)",
        "squares = (1 - b) ** 2 / (1 - b * b)",
        *T_CB,
    ),
    M("nesterov_factor_power", CB, "older = 0.0 if steps == 1 else b**4", "older = 0.0 if steps == 1 else b**3", *T_CB),
    M("noise_edge_sqrt_of_sum", CB, "edge = e2.sqrt() * (m**0.5 + n**0.5)", "edge = e2.sqrt() * (m + n) ** 0.5", *T_CB),
    M(
        "paper_noise_edge_sqrt_of_sum",
        CB,
        "edge = eps2.sqrt().unsqueeze(-1) * (m**0.5 + n**0.5)",
        "edge = eps2.sqrt().unsqueeze(-1) * (m + n) ** 0.5",
        *T_CB,
    ),
    # ---- per-example norms (diagnostics/per_example.py)
    M("per_example_last_chunk_only", PER_EX, "total += c.sum(0)\n", "total = c.sum(0)\n", *T_PER_EX),
    M(
        "layernorm_features_last_dim",
        PER_EX,
        "feature = x.shape[x.ndim - normalized_ndim :].numel()",
        "feature = x.shape[-1]",
        *T_PER_EX,
    ),
    M("layernorm_no_centering", PER_EX, "xhat = (x - mean) * torch.rsqrt(", "xhat = x * torch.rsqrt(", *T_PER_EX),
    M(
        "ghost_norm_sqrt",
        PER_EX,
        "((a @ a.mT) * (g @ g.mT)).sum((-2, -1))",
        "((a @ a.mT) * (g @ g.mT)).sum((-2, -1)).sqrt()",
        *T_PER_EX,
    ),
    M(
        "embedding_example_index",
        PER_EX,
        "index_add_(0, unique // vocab, sq)",
        "index_add_(0, unique % vocab, sq)",
        *T_PER_EX,
    ),
    M("conv_groups_mean", PER_EX, "per_example_sq.view(b, G).sum(1)", "per_example_sq.view(b, G).mean(1)", *T_PER_EX),
    M(
        "per_example_b_simple_one_b",
        PER_EX,
        "noise_scale(B * B * sq.mean(-1)",
        "noise_scale(B * sq.mean(-1)",
        *T_PER_EX,
    ),
    # ---- the critical-batch-size monitor (callbacks/critical_batch_size.py)
    M(
        "bcrit_ignores_momentum",
        CBS,
        'beta, nesterov = float(group.get("momentum", 0.0)),',
        "beta, nesterov = 0.0,",
        *T_CBS,
    ),
    M(
        "micro_batch_scale_not_squared",
        CBS,
        "factor = (accumulate / (float(scaler.get_scale()) if scaler is not None else 1.0)) ** 2",
        "factor = (accumulate / (float(scaler.get_scale()) if scaler is not None else 1.0))",
        *T_CBS,
    ),
    M(
        "ema_bias_correction_off_by_one",
        CBS,
        "1 - self.ema**counts, torch.ones_like(counts)",
        "1 - self.ema ** (counts + 1), torch.ones_like(counts)",
        *T_CBS,
    ),
    M(
        "ema_weight_swapped",
        CBS,
        "self.ema_small.lerp(small, 1 - self.ema)",
        "self.ema_small.lerp(small, self.ema)",
        *T_CBS,
    ),
    M(
        "sigma2_per_row",
        CBS,
        "/ params[n].numel() for _, n in members",
        "/ params[n].shape[0] for _, n in members",
        *T_CBS,
    ),
    M(
        "bcrit_batch_without_accumulation",
        CBS,
        "B * trainer.accumulate_grad_batches * trainer.world_size",
        "B * trainer.world_size",
        *T_CBS,
    ),
    M(
        "bcrit_model_level_reads_max",
        CBS,
        'metrics.get(f"{self.prefix}b_crit", float("nan"))',
        'metrics.get(f"{self.prefix}b_crit/max", float("nan"))',
        *T_CBS,
    ),
    M("mean_gradient_weights_t", CBS, "total = 1 - beta ** (t + 1 if nesterov else t)", "total = 1 - beta**t", *T_CBS),
    M(
        "misalignment_uses_gradient",
        MISALIGN,
        'cache.matrices("update", n, direction, view)',
        'cache.matrices("update", n, p.grad, view)',
        "tests/callbacks/test_callbacks.py",
    ),
    # ---- BatchSizeWarmup (callbacks/batch_size_warmup.py)
    M("warmup_safety_default_1", WARMUP, "safety: float = 0.5,", "safety: float = 1.0,", *T_CBS),
    M("warmup_safety_ignored", WARMUP, "target = min(self.safety * estimate,", "target = min(estimate,", *T_CBS),
    M(
        "warmup_min_measurements_off_by_one",
        WARMUP,
        "self._monitor.ema_steps < self.min_measurements",
        "self._monitor.ema_steps <= self.min_measurements",
        *T_CBS,
    ),
    M(
        "warmup_min_interval_off_by_one",
        WARMUP,
        "self.last_change < self.min_interval",
        "self.last_change <= self.min_interval",
        *T_CBS,
    ),
    M("warmup_reads_b_simple", WARMUP, "last.get(self.source,", 'last.get("b_simple",', *T_CBS),
    M(
        "warmup_global_batch_no_world",
        WARMUP,
        "(accumulate or self.accumulate) * trainer.world_size",
        "(accumulate or self.accumulate)",
        *T_CBS,
    ),
    M("warmup_lr_rule_ignored", WARMUP, "mult = factor ** LR_RULES[self.lr_rule]", "mult = 1.0", *T_CBS),
    # ---- routing (routing/rules.py, routing/patterns.py)
    M(
        "head_pattern_dropped",
        RULES,
        '("lm_head", "head", "heads", "classifier", "fc_out", "out_head")',
        '("lm_head", "heads", "classifier", "fc_out", "out_head")',
        *T_ROUTING,
        "tests/integration/test_bad_inputs.py",
    ),
    M(
        "n_head_not_read",
        RULES,
        '("num_heads", "n_head", "num_attention_heads")',
        '("num_heads", "num_attention_heads")',
        *T_VIEW,
    ),
    M("qkv_name_c_attn_dropped", RULES, '("qkv", "c_attn", "in_proj",', '("qkv", "in_proj",', *T_VIEW),
    M("vector_like_matrix_one_side", PATTERNS, "if rows == 1 or cols == 1:", "if rows == 1:", *T_ROUTING),
    M(
        "no_decay_for_matrices",
        RULES,
        "group = ADAMW_NO_DECAY if param.ndim < 2 else ADAMW",
        "group = ADAMW_NO_DECAY if param.ndim <= 2 else ADAMW",
        *T_ROUTING,
    ),
    # ---- the shared argument checks (validation.py)
    M(
        "validation_high_open_ignored",
        VALID,
        "ok = value < high if high_open else value <= high",
        "ok = value <= high",
        "tests/integration/test_bad_inputs.py",
    ),
    M(
        "validation_minimum_exclusive",
        VALID,
        "not isinstance(value, int) or value < minimum:",
        "not isinstance(value, int) or value <= minimum:",
        "tests/integration/test_bad_inputs.py",
    ),
]


# ----------------------------------------------------------------------------- test selection
def _module_of(path: str) -> str:
    """``lightning_muon/optim/muon.py`` -> ``lightning_muon.optim.muon`` (a package: its ``__init__``)."""
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file_of(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _bindings(module: str) -> tuple[frozenset[str], dict[str, tuple[str, str]]]:
    """Names a package module defines itself, and those it imports: name -> (module, name there)."""
    path = _file_of(module)
    if path is None:
        return frozenset(), {}
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    defined: set[str] = set()
    imported: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: from .x import y / from . import x
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            for alias in node.names:
                imported[alias.asname or alias.name] = (source, alias.name)
    return frozenset(defined), imported


def origin(module: str, name: str, depth: int = 0) -> str:
    """The package module that defines ``name`` as seen from ``module`` (re-exports followed)."""
    if depth > 20 or not module.startswith(PKG):
        return module
    if _file_of(f"{module}.{name}") is not None:  # a submodule
        return f"{module}.{name}"
    defined, imported = _bindings(module)
    if name in defined or name not in imported:
        return module
    source, original = imported[name]
    return origin(source, original, depth + 1) if source.startswith(PKG) else module


@cache
def imported_modules(test_file: str) -> frozenset[str]:
    """Package modules a test file imports, directly or through the package (re-exports resolved)."""
    tree = ast.parse((ROOT / test_file).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith(PKG):
            found.add(node.module)
            for alias in node.names:
                if alias.name != "*":
                    found.add(origin(node.module, alias.name))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PKG))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == PKG:
            found.add(origin(PKG, node.attr))  # lightning_muon.X after `import lightning_muon`
    return frozenset(found)


def test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mutation" not in p.parts)


def select_tests(m: Mutation) -> list[str]:
    """The mutation's own test files first, then every test file importing the mutated module, then
    the module itself (its doctests)."""
    chosen = list(m.tests)
    if not m.only_named:
        module = _module_of(m.file)
        chosen += [f for f in test_files() if module in imported_modules(f) and f not in chosen]
        chosen.append(m.file)
    return chosen


# ----------------------------------------------------------------------------- running
def _env(copy: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=f"{copy}{os.pathsep}{copy / 'tests' / 'mutation'}",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )


def _pytest(copy: Path, args: list[str], timeout: float) -> tuple[int | None, float, list[str]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "one_thread", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, []
    return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr).strip().splitlines()


def _failed(lines: list[str]) -> list[str]:
    return [ln.split(" - ")[0].split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]


def _make_copy(tmp: Path, i: int) -> Path:
    copy = tmp / f"w{i}"
    copy.mkdir()
    for item in COPY:
        src = ROOT / item
        (shutil.copytree(src, copy / item, ignore=IGNORE) if src.is_dir() else shutil.copy2(src, copy / item))
    out = subprocess.run(
        [sys.executable, "-c", "import lightning_muon; print(lightning_muon.__file__)"],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy is not the package pytest imports ({out}); check the editable install")
    return copy


def check_patterns(mutations: list[Mutation]) -> dict[str, str]:
    """name -> problem, for every mutation whose old text is not in its file exactly once."""
    problems = {}
    for m in mutations:
        path = ROOT / m.file
        count = path.read_text().count(m.old) if path.is_file() else 0
        if count != 1:
            problems[m.name] = "PATTERN NOT FOUND" if count == 0 else f"pattern ambiguous ({count} matches)"
    return problems


def _print_pattern_problems(mutations: list[Mutation], problems: dict[str, str]) -> None:
    for m in mutations:
        if m.name in problems:
            print(f"{problems[m.name]}: {m.name} in {m.file}: {m.old!r}", flush=True)


def run(mutations: list[Mutation], jobs: int, timeout: float) -> list[dict]:
    """Baseline every selected test file, then every mutation, on ``jobs`` copies in parallel."""
    problems = check_patterns(mutations)
    runnable = [m for m in mutations if m.name not in problems]
    results = {
        m.name: {"name": m.name, "file": m.file, "status": problems[m.name], "seconds": 0.0, "detail": m.old}
        for m in mutations
        if m.name in problems
    }
    selections = {m.name: select_tests(m) for m in runnable}
    files = sorted({f for m in runnable for f in selections[m.name]})
    deselect: dict[str, list[str]] = {}  # test file -> node ids that fail unmutated
    broken: set[str] = set()  # files that cannot run unmutated at all
    lock = threading.Lock()
    work: queue.Queue = queue.Queue()
    for f in files:
        work.put(("baseline", f))
    baseline_left = [len(files)]
    baseline_done = threading.Event()
    if not files:
        baseline_done.set()
    for m in runnable:
        work.put(("mutation", m))

    def baseline(copy: Path, f: str) -> None:
        code, seconds, lines = _pytest(copy, [*PYTEST_ARGS, f], timeout)
        with lock:
            if code in (0, 5):  # 5: everything in it is slow (or no test): nothing to deselect
                pass
            elif code == 1:
                deselect[f] = _failed(lines)
                print(f"(baseline) {f}: {len(deselect[f])} test(s) fail unmutated, deselected: {deselect[f]}")
            else:
                broken.add(f)
                print(f"(baseline) {f}: cannot run unmutated (exit {code}); left out: {lines[-1:]}")
            print(f"(baseline) {f:60s} {seconds:6.1f}s", flush=True)
            baseline_left[0] -= 1
            if baseline_left[0] == 0:
                baseline_done.set()

    def mutate(copy: Path, m: Mutation) -> None:
        baseline_done.wait()
        chosen = [f for f in selections[m.name] if f not in broken]
        args = [*m.pytest_args, "-x", *chosen]
        for f in chosen:
            args += [a for node in deselect.get(f, []) for a in ("--deselect", node)]
        path = copy / m.file
        original = path.read_text()
        path.write_text(original.replace(m.old, m.new))
        try:
            code, seconds, lines = _pytest(copy, args, timeout)
        finally:
            path.write_text(original)
        failed = _failed(lines)
        # 1: a test failed; 2-4: the run broke (e.g. an import error the mutant caused): also killed;
        # 5: no test collected (a wrong -k or file list): not a result.
        if code is None:
            status = "killed (timeout)"
        else:
            status = {0: "survived", 1: "killed", 5: "no tests collected"}.get(code, "killed (error)")
        if status == "survived" and m.equivalent:
            status = "survived (equivalent)"
        detail = failed[0] if failed else (m.equivalent or (lines[-1] if lines else ""))
        row = {"name": m.name, "file": m.file, "status": status, "seconds": round(seconds, 1), "detail": detail}
        row["tests"] = len(chosen)
        with lock:
            results[m.name] = row
            print(f"{m.name:40s} {status:22s} {seconds:6.1f}s  {len(chosen):2d} files  {detail}", flush=True)

    def worker(copy: Path) -> None:
        while True:
            try:
                kind, item = work.get_nowait()
            except queue.Empty:
                return
            (baseline if kind == "baseline" else mutate)(copy, item)

    with tempfile.TemporaryDirectory(prefix="lm-mutation-") as tmp:
        copies = [_make_copy(Path(tmp), i) for i in range(jobs)]
        threads = [threading.Thread(target=worker, args=(c,)) for c in copies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [results[m.name] for m in mutations if m.name in results]


def summary(results: list[dict], seconds: float, jobs: int) -> str:
    killed = sum(r["status"].startswith("killed") for r in results)
    survived = [r for r in results if r["status"] == "survived"]
    equivalent = [r for r in results if r["status"] == "survived (equivalent)"]
    missing = [r for r in results if not r["status"].startswith(("killed", "survived"))]
    scored = killed + len(survived)
    lines = ["| mutation | file | result | caught by (first failing test) | test files | seconds |"]
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        file = r["file"].removeprefix(f"{PKG}/")
        lines.append(
            f"| {r['name']} | {file} | {r['status']} | {r['detail']} | {r.get('tests', '')} | {r['seconds']} |"
        )
    score = f"{killed}/{scored} killed ({100 * killed / scored:.1f}%)" if scored else "nothing scored"
    lines.append("")
    lines.append(
        f"Score: {score} of the non-equivalent mutations; {len(equivalent)} equivalent survivor(s); "
        f"{len(missing)} not run (pattern not found/ambiguous or no tests). "
        f"Wall time {seconds / 60:.1f} min with {jobs} worker(s)."
    )
    for r in missing:
        lines.append(f"NOT RUN: {r['name']} ({r['file']}): {r['status']}: {r['detail']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations with their tests and exit")
    parser.add_argument("--check", action="store_true", help="only check that every pattern is found, once")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="parallel workers (2 on the 2-core machine)")
    parser.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} (e.g. on a machine of your own)")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per pytest run (a timeout counts as killed)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--tests", nargs="*", help="run these test files instead of each mutation's selection (e.g. an older suite)"
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        parser.error(f"unknown mutation(s): {sorted(set(args.only) - {m.name for m in MUTATIONS})}")
    if args.tests:
        chosen = [replace(m, tests=tuple(args.tests), only_named=True) for m in chosen]
    names = [m.name for m in MUTATIONS]
    if len(names) != len(set(names)):
        raise SystemExit(f"duplicate mutation names: {sorted({n for n in names if names.count(n) > 1})}")
    problems = check_patterns(chosen)
    _print_pattern_problems(chosen, problems)
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:48s} {' '.join(select_tests(m))}")
    if args.check or args.list:
        print(f"{len(chosen) - len(problems)}/{len(chosen)} patterns found exactly once.")
        return 2 if problems else 0
    lock_file = None
    if not args.no_lock:  # the machine's convention: exclusive for parallel work, shared otherwise
        lock_file = open(LOCK, "a")  # noqa: SIM115 (held for the whole run)
        mode = fcntl.LOCK_EX if args.jobs > 1 else fcntl.LOCK_SH
        print(f"waiting for {'an exclusive' if args.jobs > 1 else 'a shared'} lock on {LOCK} ...", flush=True)
        fcntl.flock(lock_file, mode)
    start = time.perf_counter()
    try:
        results = run(chosen, max(1, args.jobs), args.timeout)
    finally:
        if lock_file is not None:
            lock_file.close()
    print()
    print(summary(results, time.perf_counter() - start, max(1, args.jobs)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if any(r["status"] == "survived" for r in results):
        return 1  # a survivor not explained as equivalent
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
