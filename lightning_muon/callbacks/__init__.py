"""Lightning callbacks that log Muon's spectral diagnostics (thin adapters over ``lightning_muon.spectral``).

Each works alone or with the others; together they share one decomposition per matrix per step.

Example:
    >>> from lightning_muon.callbacks import SpectralEntropyMonitor, StableRankMonitor
    >>> trainer = L.Trainer(logger=TensorBoardLogger("logs"),
    ...                     callbacks=[SpectralEntropyMonitor(), StableRankMonitor()])
"""

from .batch_size_warmup import BatchSizeWarmup
from .critical_batch_size import CriticalBatchSizeMonitor
from .polar_misalignment import PolarMisalignmentMonitor
from .spectral_entropy import SpectralEntropyMonitor
from .stable_rank import StableRankMonitor

__all__ = [
    "BatchSizeWarmup",
    "CriticalBatchSizeMonitor",
    "PolarMisalignmentMonitor",
    "SpectralEntropyMonitor",
    "StableRankMonitor",
]
