"""Mutation testing on demand (not in CI): does the test suite catch small realistic bugs?

Each entry of ``MUTATIONS`` is one named bug: an exact text replacement in one package file (the
old text must occur exactly once) and the test files that should catch it. The runner copies the
repository to a temporary directory once, checks that the selected tests pass on the unmodified
copy, then for each mutation writes the mutated file, runs ``pytest -x -q`` on its tests (one torch
thread), restores the file and records:

* ``killed``: some test failed (or the run timed out, shown as ``killed (timeout)``);
* ``survived``: every test passed: the suite misses this bug (or the mutant is equivalent; say so
  in ``equivalent`` with the reason);
* ``pattern not found`` / ``pattern ambiguous``: the code changed under the mutation; not counted
  in the score. Update the pattern (the mutations are text against the current code).

Score = killed / (killed + survived). Usage, from the repository root::

    OMP_NUM_THREADS=1 python tests/mutation/run.py               # all mutations
    python tests/mutation/run.py --list                           # names, files, tests
    python tests/mutation/run.py --only nesterov_weight ema_weight --json results.json
    python tests/mutation/run.py --only nesterov_weight --tests tests/optim/test_optimizer.py   # another test set

Exit status 1 if a mutation survived that is not marked equivalent. Record the score and every
survivor in docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPY = ("lightning_muon", "tests", "examples", "benchmarks", "pyproject.toml")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "lightning_logs", ".pytest_cache")

NS = "lightning_muon/optim/newton_schulz.py"
OPT = "lightning_muon/optimizer.py"
FUNC = "lightning_muon/optim/functional.py"
SPEC = "lightning_muon/spectral.py"
BUCKETS = "lightning_muon/parallel/buckets.py"
SHARDED = "lightning_muon/parallel/placement.py"
CBS = "lightning_muon/callbacks/critical_batch_size.py"
ROUTING = "lightning_muon/routing.py"
MISALIGN = "lightning_muon/callbacks/polar_misalignment.py"

T_NS = ["tests/optim/test_newton_schulz.py", "tests/optim/test_reference_updates.py"]
T_OPT = ["tests/optim/test_optimizer.py", "tests/optim/test_reference_updates.py"]
T_SPEC = ["tests/diagnostics/test_spectral.py"]
T_CBS = [
    "tests/diagnostics/test_critical_batch.py",
    "tests/callbacks/test_callbacks.py",
    "tests/diagnostics/test_spectral.py",
]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: list[str] = field(default_factory=list)
    pytest_args: tuple[str, ...] = ("-m", "not slow")
    equivalent: str = ""  # why a survivor cannot be caught (same behaviour), if so


MUTATIONS: list[Mutation] = [
    # ---- Newton–Schulz (lightning_muon/optim/newton_schulz.py)
    Mutation(
        "pe_coefficient_third_digit",
        NS,
        "(4.042929935166739, -2.808917465908714, 0.5000178451051316)",
        "(4.052929935166739, -2.808917465908714, 0.5000178451051316)",
        T_NS,
    ),
    Mutation("pe_norm_scale_1", NS, "norm_scale=1.02", "norm_scale=1.0", T_NS),
    Mutation("pe_norm_eps", NS, "norm_eps=1e-6", "norm_eps=1e-7", T_NS),
    Mutation("no_transpose_tall", NS, "transpose = m > n", "transpose = False", T_NS),
    Mutation(
        "keller_coefficient",
        NS,
        "_KELLER: Coefficients = (3.4445, -4.7750, 2.0315)",
        "_KELLER: Coefficients = (3.4445, -4.7750, 2.0415)",
        T_NS,
    ),
    Mutation("ns5_tail_coefficient", NS, "(15 / 8, -10 / 8, 3 / 8)", "(15 / 8, -9 / 8, 3 / 8)", T_NS),
    Mutation("schedule_off_by_one", NS, "if i < len(self.schedule) else", "if i < len(self.schedule) - 1 else", T_NS),
    Mutation(
        "batched_kernel_b_c_swapped",
        NS,
        "torch.baddbmm(A, A, A, beta=b, alpha=c)",
        "torch.baddbmm(A, A, A, beta=c, alpha=b)",
        T_NS,
    ),
    Mutation(
        "looped_kernel_b_c_swapped",
        NS,
        "torch.addmm(A, A, A, beta=b, alpha=c)",
        "torch.addmm(A, A, A, beta=c, alpha=b)",
        T_NS,
    ),
    # ---- Muon step (lightning_muon/optim/functional.py; AdamW settings in lightning_muon/optimizer.py)
    Mutation(
        "ema_weight",
        FUNC,
        "torch._foreach_lerp_(bufs, grads, 1 - beta)",
        "torch._foreach_lerp_(bufs, grads, beta)",
        T_OPT,
    ),
    Mutation(
        "nesterov_weight",
        FUNC,
        "torch._foreach_lerp(grads, bufs, beta) if",
        "torch._foreach_lerp(grads, bufs, 1 - beta) if",
        T_OPT,
    ),
    Mutation("nesterov_flag_inverted", FUNC, "if nesterov else bufs", "if not nesterov else bufs", T_OPT),
    Mutation("decay_sign", FUNC, "w.mul_(1 - lr * weight_decay)", "w.mul_(1 + lr * weight_decay)", T_OPT),
    Mutation("decay_without_lr", FUNC, "w.mul_(1 - lr * weight_decay)", "w.mul_(1 - weight_decay)", T_OPT),
    Mutation(
        "update_sign",
        FUNC,
        "alpha=-adjusted_lr(lr, shape, adjust_lr)",
        "alpha=adjusted_lr(lr, shape, adjust_lr)",
        T_OPT,
    ),
    Mutation("original_scale_transposed", FUNC, "math.sqrt(max(1.0, m / n))", "math.sqrt(max(1.0, n / m))", T_OPT),
    Mutation("match_rms_min_side", FUNC, "0.2 * math.sqrt(max(m, n))", "0.2 * math.sqrt(min(m, n))", T_OPT),
    Mutation(
        "spectral_scale_transposed", FUNC, "lambda m, n: math.sqrt(m / n)", "lambda m, n: math.sqrt(n / m)", T_OPT
    ),
    Mutation(
        "conv_fan_in_not_flattened",
        FUNC,
        "return int(shape[0]), math.prod(int(s) for s in shape[1:])",
        "return int(shape[0]), int(shape[1])",
        T_OPT,
    ),
    Mutation("adamw_betas_swapped", OPT, 'beta1, beta2 = group["betas"]', 'beta2, beta1 = group["betas"]', T_OPT),
    Mutation("adamw_lr_ignored", OPT, "lr=lr if adamw_lr is None else adamw_lr", "lr=lr", T_OPT),
    # ---- DDP / FSDP2 work split (lightning_muon/parallel/buckets.py, lightning_muon/parallel/placement.py)
    Mutation(
        "ddp_owner_most_loaded",
        BUCKETS,
        "rank = min(range(world), key=lambda r: (load[r], r))",
        "rank = max(range(world), key=lambda r: (load[r], r))",
        ["tests/parallel/test_distributed.py"],
        ("-k", "assign_owners or shard_rows"),
    ),
    Mutation(
        "shard_rows_floor",
        SHARDED,
        "size = math.ceil(rows / world) if rows else 0",
        "size = rows // world if rows else 0",
        ["tests/parallel/test_distributed.py"],
        ("-k", "assign_owners or shard_rows"),
    ),
    # ---- spectral diagnostics (lightning_muon/spectral.py)
    Mutation(
        "entropy_log2",
        SPEC,
        "H = -torch.special.xlogy(p, p).sum(-1)",
        "H = -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)",
        T_SPEC,
    ),
    Mutation(
        "entropy_of_squares", SPEC, "p = s / s.sum(-1, keepdim=True)", "p = s**2 / (s**2).sum(-1, keepdim=True)", T_SPEC
    ),
    Mutation(
        "stable_rank_sigma_not_squared",
        SPEC,
        "return X.square().sum((-2, -1)) / sigma.square()",
        "return X.square().sum((-2, -1)) / sigma",
        T_SPEC,
    ),
    Mutation(
        "sin_theta_no_sqrt",
        SPEC,
        "(k - (Ua.mT @ Ub).square().sum((-2, -1))).clamp_min(0).sqrt()",
        "(k - (Ua.mT @ Ub).square().sum((-2, -1))).clamp_min(0)",
        T_SPEC,
    ),
    Mutation("delta_p_no_half", SPEC, "num / (2 * W.norm(dim=(-2, -1))", "num / (W.norm(dim=(-2, -1))", T_SPEC),
    Mutation("noise_scale_trace_sign", SPEC, "(1 / b_small - 1 / b_big)", "(1 / b_small + 1 / b_big)", T_SPEC),
    Mutation(
        "sensitivity_diagonal_included",
        SPEC,
        "mask = mask & ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)",
        "mask = mask",
        T_SPEC,
    ),
    Mutation("momentum_factor_naive", SPEC, "((1 - momentum) / (1 + momentum))", "((1 - momentum) ** 2)", T_SPEC),
    Mutation("noise_edge_sqrt_of_sum", SPEC, "(m**0.5 + n**0.5)", "(m + n) ** 0.5", T_CBS),
    # ---- monitors (lightning_muon/callbacks/)
    Mutation(
        "bcrit_ignores_momentum",
        CBS,
        'beta = group.get("momentum", 0.0) if group.get("use_muon") else 0.0',
        "beta = 0.0",
        T_CBS,
    ),
    Mutation(
        "micro_batch_scale_not_squared",
        CBS,
        "factor = (accumulate / (float(scaler.get_scale()) if scaler is not None else 1.0)) ** 2",
        "factor = (accumulate / (float(scaler.get_scale()) if scaler is not None else 1.0))",
        T_CBS,
    ),
    Mutation(
        "ema_bias_correction_off_by_one",
        CBS,
        "1 - self.ema**counts, torch.ones_like(counts)",
        "1 - self.ema ** (counts + 1), torch.ones_like(counts)",
        T_CBS,
    ),
    Mutation(
        "sigma2_per_row",
        CBS,
        "sigma2 = per_slot.trace_sigma[index[n]] / G.numel()",
        "sigma2 = per_slot.trace_sigma[index[n]] / G.shape[0]",
        T_CBS,
    ),
    Mutation(
        "misalignment_ignores_nesterov",
        MISALIGN,
        'group["momentum"], group.get("nesterov", False))[0]',
        'group["momentum"], False)[0]',
        ["tests/callbacks/test_callbacks.py"],
    ),
    # ---- routing (lightning_muon/routing.py)
    Mutation(
        "head_pattern_dropped",
        ROUTING,
        '("lm_head", "head", "heads", "classifier", "fc_out", "out_head")',
        '("lm_head", "heads", "classifier", "fc_out", "out_head")',
        [
            "tests/routing/test_routing_defaults.py",
            "tests/routing/test_routing.py",
            "tests/integration/test_bad_inputs.py",
        ],
    ),
]


def _pytest(copy: Path, m: Mutation, timeout: float) -> tuple[str, float, str]:
    env = dict(
        os.environ,
        PYTHONPATH=f"{copy}{os.pathsep}{copy / 'tests' / 'mutation'}",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "one_thread",
        *m.pytest_args,
        *m.tests,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - start, ""
    lines = (done.stdout + done.stderr).strip().splitlines()
    failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    detail = failed[0] if failed else (lines[-1] if lines else "")  # the test that killed it
    # 1: a test failed; 2-4: the run broke (e.g. an import error the mutant caused): also killed;
    # 5: no test collected (a wrong -k or file list): not a result.
    status = {0: "survived", 1: "killed", 5: "no tests collected"}.get(done.returncode, "killed (error)")
    return status, time.perf_counter() - start, detail


def _check_imports_copy(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy))
    out = subprocess.run(
        [sys.executable, "-c", "import lightning_muon; print(lightning_muon.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy is not the package pytest imports ({out}); check the editable install")


def run(mutations: list[Mutation], timeout: float) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="lm-mutation-") as tmp:
        copy = Path(tmp)
        for item in COPY:
            src = ROOT / item
            (shutil.copytree(src, copy / item, ignore=IGNORE) if src.is_dir() else shutil.copy2(src, copy / item))
        _check_imports_copy(copy)
        baselines: dict[tuple, str] = {}
        for m in mutations:
            path = copy / m.file
            original = path.read_text()
            count = original.count(m.old)
            row = {"name": m.name, "file": m.file, "tests": " ".join(m.tests), "seconds": 0.0, "detail": ""}
            if count != 1:
                row["status"] = "pattern not found" if count == 0 else f"pattern ambiguous ({count} matches)"
                results.append(row)
                print(f"{m.name:38s} {row['status']}", flush=True)
                continue
            key = (*m.pytest_args, *m.tests)
            if key not in baselines:  # the unmutated copy must pass these tests, else nothing is measured
                base = Mutation("baseline", m.file, "", "", m.tests, m.pytest_args)
                status, seconds, tail = _pytest(copy, base, timeout)
                baselines[key] = status
                print(f"{'(baseline) ' + ' '.join(key):38s} {status} {seconds:.0f}s {tail}", flush=True)
            if baselines[key] != "survived":
                row["status"] = "baseline fails"
                results.append(row)
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                status, seconds, tail = _pytest(copy, m, timeout)
            finally:
                path.write_text(original)
            if status == "survived" and m.equivalent:
                status = "survived (equivalent)"
            row.update(status=status, seconds=round(seconds, 1), detail=tail)
            results.append(row)
            print(f"{m.name:38s} {status:18s} {seconds:6.1f}s  {tail}", flush=True)
    return results


def summary(results: list[dict]) -> str:
    killed = sum(r["status"].startswith("killed") for r in results)
    survived = [r for r in results if r["status"].startswith("survived")]
    equivalent = [r for r in survived if "equivalent" in r["status"]]
    missing = [r for r in results if r["status"].startswith(("pattern", "baseline", "no tests"))]
    scored = killed + len(survived)
    lines = ["| mutation | file | result | caught by | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['file']} | {r['status']} | {r['detail']} | {r['seconds']} |" for r in results]
    score = f"{killed}/{scored} killed ({100 * killed / scored:.0f}%)" if scored else "nothing scored"
    lines.append("")
    lines.append(
        f"Score: {score}; {len(equivalent)} equivalent survivors; {len(missing)} not run (pattern or baseline)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per pytest run (a timeout counts as killed)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--tests", nargs="*", help="run these test files instead of each mutation's own (e.g. an older suite)"
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.tests:
        chosen = [replace(m, tests=list(args.tests), pytest_args=("-m", "not slow")) for m in chosen]
    if args.only and len(chosen) != len(set(args.only)):
        parser.error(f"unknown mutation(s): {sorted(set(args.only) - {m.name for m in MUTATIONS})}")
    if args.list:
        for m in chosen:
            print(f"{m.name:38s} {m.file:45s} {' '.join(m.tests)}")
        return 0
    results = run(chosen, args.timeout)
    print()
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["status"] == "survived" for r in results) else 0  # a survivor not explained as equivalent


if __name__ == "__main__":
    sys.exit(main())
