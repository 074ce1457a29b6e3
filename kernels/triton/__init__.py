"""Triton fast paths for the kernels/ torch references (CUDA; CPU only under TRITON_INTERPRET=1).

Importing a module of this package imports `triton`; the references never do. `batonserve.kernels.dispatch`
decides, per call, whether a kernel here or the reference runs.
"""
