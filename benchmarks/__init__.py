"""Benchmarks of lightning_muon. Run each from the repository root as ``python -m benchmarks.<name>``."""
