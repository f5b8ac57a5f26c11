"""Measuring a model: metrics with confidence intervals, calibration and the operating point,
figures, and the ``evaluate`` command (run.py)."""
