"""Mixed precision (HAWQ-v2): per-layer bit widths from Hessian traces, or given per scope."""
from .controller import MixedPrecisionController
from .hessian import TraceEstimate, estimate_average_traces, hessian_vector_products
from .precision import MixedPrecision
from .selection import Selection, compression_ratio, monotone_configurations, select_bitwidths

__all__ = ["MixedPrecision", "MixedPrecisionController", "TraceEstimate", "estimate_average_traces",
           "hessian_vector_products", "Selection", "select_bitwidths", "monotone_configurations",
           "compression_ratio"]
