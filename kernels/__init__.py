"""Compiled kernels of ncfast, installed as ``ncfast.kernels``.

``cpu``: Numba kernels. ``cuda``: CuPy kernels, imported only when the GPU
backend is asked for.
"""
