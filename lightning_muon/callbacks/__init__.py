"""Lightning callbacks over the spectral functions (see the diagnostics issue)."""
