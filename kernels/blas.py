"""The float32 GEMM that the pass-2 kernels call: numpy's own BLAS, from compiled code.

Numba's ``np.dot`` calls SciPy's BLAS. Where numpy and SciPy bundle different
OpenBLAS builds the two run at different rates: on this project's development
machine a 256 × 2048 by 2048 × 1000 float32 product ran at 102 GFLOP/s per
thread through SciPy's (OpenBLAS 0.3.30) and 129–140 through numpy's (0.3.31),
the BLAS the floor of ``bench/`` is measured with. So ``sgemm`` calls numpy's
``cblas_sgemm`` by name from the compiled kernels: at import this module gives
LLVM's symbol table the address of the function in numpy's bundled OpenBLAS
(an ILP64 ``scipy_openblas64_`` build, as in numpy's wheels). Without one,
the name points to a compiled fallback that calls Numba's ``np.dot``. The
kernels stay in Numba's on-disk cache either way: they name the symbol, and
its address is set again in every process before they load.
"""
import ctypes
import glob
import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

#: The symbol the kernels call: ``cblas_sgemm`` with 64-bit integers.
SYMBOL = "ncfast_cblas_sgemm64"

#: ``cblas_sgemm``'s constants for row-major storage and no transposition.
_ROW_MAJOR, _NO_TRANSPOSE = 101, 111

_SIGNATURE = types.void(types.int32, types.int32, types.int32, types.int64, types.int64,
                        types.int64, types.float32, types.CPointer(types.float32), types.int64,
                        types.CPointer(types.float32), types.int64, types.float32,
                        types.CPointer(types.float32), types.int64)


@cfunc(_SIGNATURE, cache=True)
def _numba_sgemm(order, transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
                 ldc):
    """``c = a @ b`` through Numba's ``np.dot`` (SciPy's BLAS), for the calls ``sgemm``
    makes: row-major, no transposition, ``alpha`` 1, ``beta`` 0, packed rows."""
    np.dot(carray(a, (m, k)), carray(b, (k, n)), carray(c, (m, n)))


def numpy_sgemm_address():
    """Address of ``cblas_sgemm`` in the OpenBLAS that numpy's wheel bundles, or None.

    Returns
    -------
    int or None
        None when numpy carries no ILP64 scipy-openblas build (numpy built
        against MKL or a system BLAS, say).
    """
    package = os.path.dirname(np.__file__)
    for folder in (package + ".libs", os.path.join(package, ".dylibs")):
        for path in sorted(glob.glob(os.path.join(folder, "libscipy_openblas64_*"))):
            try:
                function = ctypes.CDLL(path).scipy_cblas_sgemm64_
            except (OSError, AttributeError):
                continue
            return ctypes.cast(function, ctypes.c_void_p).value
    return None


_numpy_address = numpy_sgemm_address()
#: Which BLAS ``sgemm`` calls: "numpy" (its bundled OpenBLAS) or "numba" (the fallback).
SOURCE = "numba" if _numpy_address is None else "numpy"
llvm.add_symbol(SYMBOL, _numba_sgemm.address if _numpy_address is None else _numpy_address)


def _is_packed_float32(array_type):
    return (isinstance(array_type, types.Array) and array_type.ndim == 2
            and array_type.dtype == types.float32 and array_type.layout == "C")


@intrinsic
def _call_sgemm(typingctx, rows, matrix, out):
    """``out = rows @ matrix`` by one call of ``SYMBOL``."""
    if not all(map(_is_packed_float32, (rows, matrix, out))):
        raise TypingError(f"sgemm takes C-contiguous 2-D float32 arrays; found {rows}, "
                          f"{matrix}, {out}")

    def codegen(context, builder, signature, args):
        int32, int64, float32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        pointer = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [int32, int32, int32, int64, int64, int64, float32, pointer, int64,
                            pointer, int64, float32, pointer, int64]), SYMBOL)
        rows_, matrix_, out_ = (context.make_array(array_type)(context, builder, value)
                                for array_type, value in zip(signature.args, args))
        m, k = cgutils.unpack_tuple(builder, rows_.shape)
        n = builder.extract_value(matrix_.shape, 1)
        builder.call(function, [
            int32(_ROW_MAJOR), int32(_NO_TRANSPOSE), int32(_NO_TRANSPOSE), m, n, k,
            float32(1.0), builder.bitcast(rows_.data, pointer), k,
            builder.bitcast(matrix_.data, pointer), n, float32(0.0),
            builder.bitcast(out_.data, pointer), n])
        return context.get_dummy_value()
    return types.void(rows, matrix, out), codegen


@njit(nogil=True, cache=True)
def sgemm(rows, matrix, out):
    """``out = rows @ matrix`` in float32 by BLAS, without the GIL.

    Parameters
    ----------
    rows : float32 array of shape (m, k), C-contiguous
    matrix : float32 array of shape (k, n), C-contiguous
    out : float32 array of shape (m, n), C-contiguous, written

    Raises
    ------
    ValueError
        When the shapes do not match (a bug of the caller: nothing is written).
    """
    if matrix.shape[0] != rows.shape[1] or out.shape[0] != rows.shape[0] \
            or out.shape[1] != matrix.shape[1]:
        raise ValueError("sgemm: the shapes of rows, matrix and out do not match")
    if rows.shape[1] == 0:  # BLAS refuses a leading dimension of 0
        out[:] = 0.0
    elif out.size > 0:
        _call_sgemm(rows, matrix, out)
