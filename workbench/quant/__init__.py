"""Precision calibration: observers, calibration statistics, precision plans and applying them.

    stats = calibrate(program, calibration_ids(tokenizer))        # quant/calibrate.py
    plan = PrecisionPlan.uniform(program.graph, "fp8")              # quant/plan.py: plain, editable JSON
    fast = quantized_program(program, plan, stats)                  # quant/apply.py
"""

from .apply import quantize_graph, quantized_program
from .calibrate import CalibrationStats, calibrate, calibration_ids
from .observers import OBSERVERS, make_observer
from .plan import FORMATS, PrecisionPlan, linear_groups, model_fingerprint

__all__ = ["CalibrationStats", "FORMATS", "OBSERVERS", "PrecisionPlan", "calibrate", "calibration_ids",
           "linear_groups", "make_observer", "model_fingerprint", "quantize_graph", "quantized_program"]
