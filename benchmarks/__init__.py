"""Benchmarks of lightning_muon (run from the repository root: ``PYTHONPATH=. python benchmarks/<name>.py``)."""
