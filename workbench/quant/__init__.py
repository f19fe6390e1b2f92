"""Calibration, sensitivity analysis and precision plans: built in the quantization issue."""
