"""The comparison script end to end on tiny budgets: both optimizers, report and plot written."""

from examples.compare import main, read_scalars


def test_compare_writes_report_and_plot(tmp_path):
    main(["--tasks", "vit", "--steps", "2", "--val-every", "2", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "| vit | muon |" in report and "| vit | adamw |" in report
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    muon = read_scalars(tmp_path / "vit_muon" / "version_0")
    assert len(muon["val/loss"]) == 1 and 0 < muon["val/loss"][0][1] < 10 and "stable_rank/mean" in muon
