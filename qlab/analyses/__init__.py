"""Analyses over a loaded model or a catalog architecture: the sweep, sensitivity (full and quick), mixed
precision, the memory planner, the roofline, calibration, the Overview's verdict, and the teaching views.

Each is a module; importing this package loads none of them (they pull in transformers and friends).
"""

__all__ = ["activations", "calibration", "claims", "explain", "memory", "mixed", "qat", "roofline", "runtimes",
           "sensitivity", "sweep", "sweep_benchmark", "weights"]
