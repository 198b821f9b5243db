"""The benchmark scripts run, and what they report besides timings is right (no timing asserted)."""

import pytest
import torch

from benchmarks import orthogonalize as bench_ortho
from benchmarks import step as bench_step
from benchmarks._timing import markdown_table, state_bytes


@pytest.mark.requires_torch("2.9", "the benchmark's torch.optim.Muon baseline")
def test_state_bytes_match_the_optimizers_definitions():
    # Exact counts from the algorithms: Muon keeps one momentum buffer per matrix; AdamW two
    # moments per tensor plus a float32 step scalar (torch and ours alike).
    model = bench_step.GPTParams(layers=1, d=16, vocab=40, context=8)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts = bench_step.optimizers(model)
    for optimizer_list in opts.values():
        for o in optimizer_list:
            o.step()
    matrices = [p for b in model.blocks for p in b.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    expected_muon = 4 * numel(matrices) + 2 * 4 * numel(others) + 4 * len(others)
    assert sum(state_bytes(o) for o in opts["torch.optim.Muon + AdamW"]) == expected_muon
    assert state_bytes(opts["ours, quintic"][0]) == expected_muon
    all_params = list(model.parameters())  # the tied head counts once
    assert state_bytes(opts["torch.optim.AdamW alone"][0]) == 2 * 4 * numel(all_params) + 4 * len(all_params)


def test_matrix_sets_are_the_models_muon_matrices():
    # GPT-small: fused qkv, attention out, MLP in, MLP out per layer (nn.Linear shapes (out, in)).
    assert bench_ortho.matrix_set("gpt-small", 12)[:4] == [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    model = bench_step.GPTParams(layers=2, d=768, vocab=10, context=4)
    routed = [tuple(p.shape) for g in bench_step.muon_param_groups(model) if g["use_muon"] for _, p in g["params"]]
    assert sorted(routed) == sorted(bench_ortho.matrix_set("gpt-small", 2))


@pytest.mark.requires_torch("2.9", "the benchmark's torch.optim._muon baseline")
def test_orthogonalize_script_prints_a_table(capsys):
    bench_ortho.main(["--sets", "vit-small", "--repeats", "1", "--warmup", "0", "--mm-size", "64"])
    out = capsys.readouterr().out
    assert "| vit-small (16 matrices) | torch.optim.Muon NS (bf16, per matrix) |" in out
    assert out.count("| vit-small") == 6  # the peak probe, the matmul floor and four methods
    assert "| vit-small (16 matrices) | matmul floor (NS's products only), faster kernel |" in out


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 0.12345]]) == "| a | b |\n|---|---|\n| 1 | 0.123 |"


def test_run_header_names_the_hardware_and_dtype():
    from benchmarks._timing import run_header
    from lightning_muon import resolve_ns_dtype

    text = run_header(torch.device("cpu"), "auto")
    assert "threads" in text and torch.__version__ in text and "load average" in text
    assert f"auto -> {resolve_ns_dtype('cpu')}" in text
    assert "torch.bfloat16 (explicit)" in run_header(torch.device("cpu"), "bfloat16")


@pytest.mark.slow  # imports every installed peer library (timm, heavyball: ~10 s each on a loaded machine)
def test_peers_script_runs_and_reports_bands(capsys):
    import importlib.util

    from benchmarks import peers

    peers.main(
        [
            "--d",
            "32",
            "--layers",
            "1",
            "--vocab",
            "64",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--max-seconds",
            "5",
            "--settings",
            "defaults",
        ]
    )
    out = capsys.readouterr().out
    assert "machine:" in out and "ns_dtype: auto" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    names = ["lightning_muon.Muon", "torch.optim.Muon + AdamW(fused)"] + [
        name
        for module, name in (
            ("timm", "timm.optim.Muon"),
            ("pytorch_optimizer", "pytorch_optimizer.Muon"),
            ("heavyball", "heavyball.MuonAdamW"),
        )
        if importlib.util.find_spec(module)
    ]
    assert set(names) <= set(rows)
    # Ours at defaults (polar_express): the first update's direction is close to the exact polar
    # factor. The band is of the update over its least-squares scale onto P, so it straddles 1
    # (measured [0.47, 1.33], distance 0.11 at this size; a 32x32 Gaussian is partly below the
    # design range, hence the loose bounds).
    lo, hi = (float(x) for x in rows["lightning_muon.Muon"][5].strip("[]").split(", "))
    assert 0 < lo <= 1 <= hi < 1.5 and float(rows["lightning_muon.Muon"][6]) < 0.3


def test_peers_state_bytes_count_nested_state():
    from benchmarks import peers
    from benchmarks._timing import state_bytes as flat_state_bytes

    model = bench_step.GPTParams(layers=1, d=16, vocab=40, context=8)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = bench_step.optimizers(model)["ours, quintic"][0]
    opt.step()
    assert peers.state_bytes([opt]) == flat_state_bytes(opt) > 0
    opt.state[next(iter(opt.state))]["nested"] = {"a": [torch.zeros(3)]}
    assert peers.state_bytes([opt]) == flat_state_bytes(opt) + 12


def test_kernel_choice_script_prints_both_kernels_and_the_default(capsys):
    from benchmarks import kernel_choice
    from lightning_muon.optim.newton_schulz import default_kernel

    kernel_choice.main(
        ["--widths", "8", "16", "--layers", "1", "--repeats", "1", "--warmup", "0", "--dtype", "float32"]
    )
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 8 ") or line.startswith("| 16 ")
    ]
    assert [r[0].strip("| ") for r in rows] == ["8", "16"]
    for r in rows:  # 4 matrices per width (one block), both times, and the kernel the default picks
        assert r[1] == "4" and float(r[2]) > 0 and float(r[3]) > 0
        assert r[-1].strip(" |") == default_kernel("cpu", int(r[0].strip("| ")), torch.float32)


def test_cpu_kinds_limits_each_child_and_skips_kinds_the_host_lacks(monkeypatch, capsys):
    from benchmarks import cpu_kinds

    seen = []
    monkeypatch.setattr(cpu_kinds.subprocess, "run", lambda cmd, env, check: seen.append((cmd, env)) or _Done())
    monkeypatch.setattr(cpu_kinds, "host_flags", lambda: {"avx2": True, "avx512_bf16": True})  # no AMX
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX512")
    with pytest.raises(SystemExit) as done:
        cpu_kinds.main(["--", "orthogonalize", "--sets", "vit-small"])
    assert done.value.code == 0
    assert "CPU kind amx_bf16: not available here (this CPU lacks amx_bf16)" in capsys.readouterr().out
    (cmd2, env2), (cmd512, env512) = seen  # avx2 and avx512_bf16 ran, in that order
    assert cmd2[-4:] == ["-m", "benchmarks.orthogonalize", "--sets", "vit-small"]
    assert env2["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env2["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert env2["LIGHTNING_MUON_CPU_KIND"] == "avx2" and env512["LIGHTNING_MUON_CPU_KIND"] == "avx512_bf16"
    assert env512["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16" and "MKL_ENABLE_INSTRUCTIONS" not in env512


class _Done:
    returncode = 0
