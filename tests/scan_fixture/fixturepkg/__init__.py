"""A small package with custom derivative rules, some planted wrong, for tests/test_scan.py."""

from .rules import cube, ignored, mul_sin, scaled_sin, smooth_relu, softplus, ste_round, tanh_clipped_vjp

__all__ = ["cube", "ignored", "mul_sin", "scaled_sin", "smooth_relu", "softplus", "ste_round", "tanh_clipped_vjp"]
