"""Triton kernels, one module per op; imported by slmfast/ops/<op>.py only when triton is installed."""
