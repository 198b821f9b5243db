"""pytest plugin for the mutation runner: one torch thread (tests/conftest.py asks for 2, which on a
loaded shared machine made single tests 10-20x slower through OpenMP spin-waiting)."""

import pytest
import torch


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    torch.set_num_threads(1)
