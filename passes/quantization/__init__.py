"""Quantization: the Quantize pass, its placement policy, range initialization, controller and lowering."""
