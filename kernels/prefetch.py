"""Software prefetch from compiled kernels: ask the core to start loading rows it will read next.

A pass that computes between its reads (pass 2 multiplies each tile of
residuals by its columns while the memory bus waits) leaves the hardware
prefetcher too few misses in flight to keep one core's share of the memory
bandwidth busy. ``prefetch_share`` issues the loads of the next rows during
that computation, so that they have arrived when the pass reads them. A
prefetch never faults and never changes a value: it only moves cache lines.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Bytes of one cache line: one prefetch per line.
CACHE_LINE_BYTES = 64

#: LLVM's locality hint: 3 keeps the line in every cache level (``prefetcht0``).
_KEEP_IN_L1 = 3


@intrinsic
def _prefetch_element(typingctx, array, row, column):
    """Prefetch the cache line of ``array[row, column]`` for reading (no bounds check)."""
    if not (isinstance(array, types.Array) and array.ndim == 2):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array_value = context.make_array(array_type)(context, builder, args[0])
        indices = [context.cast(builder, value, value_type, types.intp)
                   for value, value_type in zip(args[1:], signature.args[1:])]
        pointer = cgutils.get_item_pointer(context, builder, array_type, array_value, indices)
        byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer.type, int32, int32, int32]),
            "llvm.prefetch.p0i8")
        # Arguments: address, 0 = read, locality, 1 = data cache.
        builder.call(function, [byte_pointer, int32(0), int32(_KEEP_IN_L1), int32(1)])
        return context.get_dummy_value()

    return types.void(array, row, column), codegen


@njit(nogil=True, cache=True, inline="always")
def share_bounds(num_lines, part, parts):
    """First and last (exclusive) of the ``num_lines`` lines in share ``part`` of ``parts``:
    consecutive shares, sizes differing by at most one, together every line once."""
    return part * num_lines // parts, (part + 1) * num_lines // parts


@njit(nogil=True, cache=True, inline="always")
def prefetch_share(array, part, parts):
    """Prefetch share ``part`` of ``parts`` of the cache lines of ``array``'s rows.

    A loop of ``parts`` steps that calls this once a step spreads the prefetches
    of the rows it reads next evenly over its own work, rather than issuing them
    in one burst.

    Parameters
    ----------
    array : 2-D array whose rows are contiguous (empty: nothing to do)
    part, parts : int, ``0 <= part < parts``
    """
    step = max(1, CACHE_LINE_BYTES // array.itemsize)
    lines_per_row = -(-array.shape[1] // step)
    num_lines = array.shape[0] * lines_per_row
    first, last = share_bounds(num_lines, part, parts)
    for line in range(first, last):
        _prefetch_element(array, line // lines_per_row, (line % lines_per_row) * step)
