"""The paper's words, verbatim: the only source of the report's "paper" column.

Every entry is one or more fragments copied character for character from the paper's summary
(``shared/paper/spectral-dynamics-of-muon-summary.txt``: the abstract and the figure captions as
extracted from the PDF), joined with " … " where we skip words. Anything a report row says about
the paper's setting that is not here is our choice and is labelled so.
``tests/examples/test_paper.py`` checks every fragment against the summary when it is present.

Example:
    >>> quote("fig5")
    'Figure 5: NanoGPT (124M) layerwise spectral profiling, Muon vs. AdamW over 5,000 steps.'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["QUOTES", "quote", "summary_path"]

#: key -> verbatim fragments (figure number first, as "Figure N: ...")
QUOTES: dict[str, tuple[str, ...]] = {
    "fig1_vit": ("while AdamW wins in a matched small", "ViT/CIFAR-10 control."),
    "abstract_vit": ("in a matched small-ViT control, the ranking reverses.",),
    "abstract_srank": ("In small NanoGPT pretraining, Muon preserves stable rank,",),
    "abstract_plateau": ("has a broad learning-rate plateau,",),
    "abstract_loss": ("and improves validation loss relative to AdamW;",),
    "fig2_left": (
        "Left: singular-value trajectories under the projected self-polar flow of Theorem 1; rates αi ∈ [0, 1] are "
        "determined by the measurement geometry.",
    ),
    "fig2_right": (
        "on the Frobenius sphere; the Rpw-minimizer coincides with the flat-spectrum point, while the nuclear-norm "
        "minimizer lies at a corner.",
    ),
    "fig3_large": (
        "Left: large instance (p=50, d=20); Muon stabilizes at ∥WMuon∥∗ ≈ 20.3 vs. CVXPY minimum 14.1 (1.44×, "
        "non-diminishing).",
    ),
    "fig3_family": (
        "Right: 10-seed family (p=n=6, d=10); gap ranges 1.29×–2.02× (mean 1.59×). Zero seeds converge to the "
        "nuclear-norm minimum.",
    ),
    "abstract_flatten": (
        "Controlled matrix-sensing experiments separate the effect from simple gradient rescaling, show that "
        "norm-matched gradient descent does not reproduce Muon, and recover the predicted flattening trend across "
        "broad ablations.",
    ),
    "fig4a": ("(a) S(µ) formula matches r(r−1)/(4σ", "at r ∈ {2, 4, 8, 16} (algebraic verification, not a"),
    "fig4b": ("(b) AR(1) momentum factor (1−β)/(1+β) vs. naive (1−β)", "for β = 0.95."),
    "fig4c": ("(c) Bcrit = 2σ", "across spectrum types."),
    "fig5": ("Figure 5: NanoGPT (124M) layerwise spectral profiling, Muon vs. AdamW over 5,000 steps.",),
    "fig6": ("Figure 6: Sanity check of Theorem 1 dynamics in the general affine matrix-sensing setting (",),
    "fig7": (
        "Frame alignment ∥ sin Θ∥F during Muon training across configurations (d ∈ {10, 20, 50}, 10 seeds each). "
        "Misalignment remains < 0.1 post-transient.",
    ),
    "fig8_early": (
        "Spectral-flattening sign quantity P i αiqi tracked over training. Negative on average during the early "
        "flattening phase, then fluctuates near zero with magnitude ∼ 10−6 once the spectrum is near-flat (where "
        "qi → 0);",
    ),
    "fig8_late": ("per-seed positive-fraction counts in the second half of training are roughly 51%, 49%, 45%,",),
    "fig9_coupled": ("Left: coupled decay; ATSR explodes at λ ≥ 10−2 .",),
    "fig9_decoupled": ("Right: decoupled decay; ATSR nearly constant for λ ≤ 10−2 .",),
    "fig10_numbers": ("7.54× (coupled) 2.28× (decoupled)",),
    "fig11": (
        "Diagnostics panel: combined view of ∥ sin Θ∥F , P i αiqi , and per-step singular-value increments across "
        "training, supporting the assumptions of Theorems 1–3.",
    ),
    "fig12": (
        "Placeholder: figures/fig delta P.pdf not yet generated; see CHANGES.md. Expected content: δP (t) "
        "trajectories across 10 seeds",
    ),
}

_SUMMARY = "spectral-dynamics-of-muon-summary.txt"


def quote(key: str) -> str:
    """The verbatim quote ``key`` (fragments joined with " … ").

    Raises:
        KeyError: ``key`` is not in :data:`QUOTES` (the message lists the keys).
    """
    if key not in QUOTES:
        raise KeyError(f"no quote {key!r}; the paper's words we have are {sorted(QUOTES)}")
    return " … ".join(QUOTES[key])


def summary_path() -> Path | None:
    """The paper's summary when it is on this machine: ``$MUON_PAPER_DIR``, or ``shared/paper``
    beside the repository or one level above it; ``None`` when absent."""
    root = Path(__file__).resolve().parents[2]
    candidates = [Path(os.environ["MUON_PAPER_DIR"])] if "MUON_PAPER_DIR" in os.environ else []
    candidates += [root.parent / "shared" / "paper", root.parent.parent / "shared" / "paper"]
    for c in candidates:
        if (c / _SUMMARY).is_file():
            return c / _SUMMARY
    return None
