"""Compiled kernels of ncfast, installed as ``ncfast.kernels``.

``cpu``: Numba kernels; ``narrow``: pass 2 for few columns, without BLAS. ``cuda``: CuPy
kernels, imported only when the GPU backend is asked for.
"""
