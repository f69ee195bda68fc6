"""Compiled kernels of ncfast, installed as ``ncfast.kernels``.

``cpu``: Numba kernels; ``narrow``: pass 2 for few columns, without BLAS; ``blas``: the
float32 GEMM the Numba kernels call (numpy's BLAS); ``pairs`` and ``tiles``: the pair sweep
and the "features" route's tiles. ``cuda``: CuPy kernels, imported only when the GPU
backend is asked for.
"""
