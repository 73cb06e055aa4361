"""Kernels, each with its sequential reference beside it."""
from .linear_scan import linear_scan
from .scan_reference import linear_scan_reference

__all__ = ["linear_scan", "linear_scan_reference"]
