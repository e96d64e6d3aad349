"""Triton kernels of personvlad, installed as ``personvlad.kernels``."""
