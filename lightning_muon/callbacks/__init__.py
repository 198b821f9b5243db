"""Lightning callbacks that log Muon's spectral diagnostics (thin adapters over ``lightning_muon.diagnostics``).

Each works alone or with the others; together they share one decomposition per matrix per step.
New monitors subclass :class:`MonitorCallback` (layer selection, logging, checkpoint state) or
:class:`SpectralMonitor` (that plus a ``compute`` at each logging step); see ``docs/custom-monitors.md``.

Example:
    >>> import lightning as L
    >>> from lightning.pytorch.loggers import TensorBoardLogger
    >>> from lightning_muon.callbacks import SpectralEntropyMonitor, StableRankMonitor
    >>> trainer = L.Trainer(logger=TensorBoardLogger("logs"), max_steps=100, enable_progress_bar=False,
    ...                     callbacks=[SpectralEntropyMonitor(), StableRankMonitor()])
    >>> sorted(type(c).__name__ for c in trainer.callbacks if "Monitor" in type(c).__name__)
    ['SpectralEntropyMonitor', 'StableRankMonitor']
"""

from .attention_logit import AttentionLogitMonitor
from .base import AttentionCallback, MonitorCallback, SpectralMonitor
from .batch_size_warmup import BatchSizeWarmup
from .cache import CacheRequest, SpectralCache
from .critical_batch_size import CriticalBatchSizeMonitor
from .polar_misalignment import PolarMisalignmentMonitor
from .progress import RichStepProgressBar, StepProgressBar, step_progress_bar
from .qk_clip import QKClip
from .spectral_entropy import SpectralEntropyMonitor
from .stable_rank import StableRankMonitor

__all__ = [
    "AttentionCallback",
    "AttentionLogitMonitor",
    "BatchSizeWarmup",
    "CacheRequest",
    "CriticalBatchSizeMonitor",
    "MonitorCallback",
    "PolarMisalignmentMonitor",
    "QKClip",
    "RichStepProgressBar",
    "SpectralCache",
    "SpectralEntropyMonitor",
    "SpectralMonitor",
    "StableRankMonitor",
    "StepProgressBar",
    "step_progress_bar",
]
