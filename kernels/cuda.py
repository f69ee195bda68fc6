"""CUDA kernels for the two streaming passes, compiled by CuPy, and their launchers.

Imported only when the GPU backend is asked for (``ncfast.cuda``): importing
this module imports CuPy. The CUDA C++ lives in ``CUDA_SOURCE``, one templated
``RawModule`` whose instantiations are listed in ``NAME_EXPRESSIONS``; the
compile test (tests/test_cuda_compile.py) builds the same text with ``nvcc``
for sm_90 without importing this module.

Each launcher adds one chunk's contribution into caller-owned device
accumulators, asynchronously on the current CuPy stream: nothing here waits
for the device. Like the Numba kernels (``ncfast.kernels.cpu``), kernels never
raise: the first bad row is recorded by global row index with ``atomicMin``
(pass 1: a label outside ``[0, C)``; pass 2: a label without a mean, a NaN or
an Inf) so that the host can name it after the pass. Pass 1 carries no value
check: a NaN or Inf shows in the sums, and the host then scans for its row.

Launch shapes are module attributes so that tests can shrink them and run
the multi-block paths on tiny inputs: ``THREADS_PER_BLOCK`` (a multiple of 32;
one warp per row in the row kernels), ``CLASS_SUM_COLUMNS`` (columns of a
pass-1 block, one thread each) and ``SHARED_STATE_BYTES`` (largest per-block
private state; beyond it the kernels add straight into global memory with
atomics).

The GEMMs are cuBLAS ``sgemm`` in the default math mode, true float32 (never
TF32: docs/algorithm.md's precision rules), and float64 ``dgemm`` for the scatter.
"""
import functools

import cupy
import numpy as np
from cupy_backends.cuda.libs import cublas

#: Threads per block of the row kernels (residuals, epilogue); a multiple of 32.
THREADS_PER_BLOCK = 256

#: Feature columns per pass-1 block: one thread per column, each owning its
#: column of the block's private C × columns float64 sums. Halved (down to 32)
#: until the private state fits ``SHARED_STATE_BYTES``.
CLASS_SUM_COLUMNS = 128

#: Largest private per-block state in shared memory (bytes), or less where the device lets a
#: block have less (``_shared_state_bytes``: 99 KB on sm_86 and sm_89, 64 KB on sm_75);
#: larger states (many classes) are added straight into global memory with atomics.
SHARED_STATE_BYTES = 112 << 10

#: Most row blocks whose float64 Grams one chunk computes side by side.
GRAM_BLOCKS = 64

CUDA_SOURCE = r"""
#define NCFAST_NO_INDEX 0x7fffffff
#define NCFAST_ROWS_IN_FLIGHT 32
#define NCFAST_CLEAN_BIT (1 << 30)  // in a pass-1 row code: the clean label agrees
#define NCFAST_INFINITY __longlong_as_double(0x7ff0000000000000LL)  // NVRTC has no HUGE_VAL
#define NCFAST_MAX_RESIDUAL_SQ_NORM 1e40  // ncfast.kernels.cpu.MAX_RESIDUAL_SQ_NORM

// Pass 1, first: one int32 code per row, the label with NCFAST_CLEAN_BIT set when
// the clean label agrees (label-noise runs), or -1 for a label (or clean label)
// outside [0, C); the first such row is recorded in bad_row. Each thread walks
// its rows in increasing order, so its first bad row is its least.
__global__ void ncfast_label_codes(
        const long long* __restrict__ labels, const long long* __restrict__ clean_labels,
        long long num_rows, int num_classes, long long row_offset, int* __restrict__ codes,
        long long* bad_row) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    bool reported = false;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < num_rows;
         i += stride) {
        const long long label = labels[i];
        const long long clean = clean_labels == nullptr ? label : clean_labels[i];
        if (label < 0 || label >= num_classes || clean < 0 || clean >= num_classes) {
            codes[i] = -1;
            if (!reported) atomicMin(bad_row, row_offset + i);
            reported = true;
            continue;
        }
        codes[i] = (int)label | (clean_labels != nullptr && clean == label ? NCFAST_CLEAN_BIT : 0);
    }
}

// Pass 1: per-class row counts and float64 row sums.
//
// Block (x, y) covers the columns [x * blockDim.x, (x + 1) * blockDim.x) of the
// rows [y * rows_per_block, (y + 1) * rows_per_block). Each thread owns one
// column and, when PRIVATE, its own column of the block's C x blockDim.x sums
// in shared memory, so no two threads ever touch the same word: no atomics and
// no barriers until the merge into global memory. Thread 0 of the column-0
// blocks counts rows. Not PRIVATE (many classes): the thread adds into global
// memory with atomics. Rows coded -1 (bad labels) are skipped; NaN or Inf
// values show in the sums, so the loop carries no checks. When shift is given
// (float64 rows), each value is added less shift[column]: the sums stay near
// zero for rows far from the origin, whose running float64 sums would otherwise
// round by the ulp of their growing totals (the caller adds counts * shift back).
template <typename T, bool PRIVATE, bool TRACK_CLEAN>
__global__ void ncfast_class_sums(
        const T* __restrict__ features, long long num_rows, int num_features,
        const int* __restrict__ codes, int num_classes, long long rows_per_block,
        unsigned long long* counts, double* sums,
        unsigned long long* clean_counts, double* clean_sums,
        const double* __restrict__ shift) {
    extern __shared__ double ncfast_shared[];
    const int tile = blockDim.x;
    const int column = blockIdx.x * tile + threadIdx.x;
    const bool has_column = column < num_features;
    const double column_shift = shift != nullptr && has_column ? shift[column] : 0.0;
    const bool counts_rows = blockIdx.x == 0 && threadIdx.x == 0;
    const long long private_size = (long long)num_classes * tile;
    double* tile_sums = ncfast_shared;
    double* tile_clean_sums = tile_sums + private_size;
    unsigned long long* tile_counts =
        (unsigned long long*)(tile_clean_sums + (TRACK_CLEAN ? private_size : 0));
    unsigned long long* tile_clean_counts = tile_counts + num_classes;
    for (int c = 0; PRIVATE && c < num_classes; ++c) {
        tile_sums[c * tile + threadIdx.x] = 0.0;
        if (TRACK_CLEAN) tile_clean_sums[c * tile + threadIdx.x] = 0.0;
        if (counts_rows) {
            tile_counts[c] = 0;
            if (TRACK_CLEAN) tile_clean_counts[c] = 0;
        }
    }
    const long long start = blockIdx.y * rows_per_block;
    const long long stop = start + rows_per_block < num_rows ? start + rows_per_block : num_rows;
    const T* column_values = features + (has_column ? column : 0);
    for (long long base = start; base < stop; base += NCFAST_ROWS_IN_FLIGHT) {
        const int batch = stop - base < NCFAST_ROWS_IN_FLIGHT ? (int)(stop - base)
                                                                : NCFAST_ROWS_IN_FLIGHT;
        // Every load of a batch of rows first, so that many are in flight at once.
        T values[NCFAST_ROWS_IN_FLIGHT];
        int row_codes[NCFAST_ROWS_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < NCFAST_ROWS_IN_FLIGHT; ++u) {
            const long long row = base + (u < batch ? u : 0);
            values[u] = column_values[row * num_features];
            row_codes[u] = u < batch ? codes[row] : -1;
        }
#pragma unroll
        for (int u = 0; u < NCFAST_ROWS_IN_FLIGHT; ++u) {
            const int code = row_codes[u];
            if (code < 0) continue;
            const int label = code & (NCFAST_CLEAN_BIT - 1);
            const bool is_clean = TRACK_CLEAN && (code & NCFAST_CLEAN_BIT);
            const double value = has_column ? (double)values[u] - column_shift : 0.0;
            if (PRIVATE) {
                tile_sums[label * tile + threadIdx.x] += value;
                if (is_clean) tile_clean_sums[label * tile + threadIdx.x] += value;
                if (counts_rows) {
                    tile_counts[label] += 1;
                    if (is_clean) tile_clean_counts[label] += 1;
                }
            } else {
                if (has_column) {
                    atomicAdd(sums + (long long)label * num_features + column, value);
                    if (is_clean)
                        atomicAdd(clean_sums + (long long)label * num_features + column, value);
                }
                if (counts_rows) {
                    atomicAdd(counts + label, 1ULL);
                    if (is_clean) atomicAdd(clean_counts + label, 1ULL);
                }
            }
        }
    }
    // Each thread merges its own column (and thread 0 the counts): no barrier needed.
    for (int c = 0; PRIVATE && c < num_classes; ++c) {
        if (has_column) {
            const double value = tile_sums[c * tile + threadIdx.x];
            if (value != 0.0) atomicAdd(sums + (long long)c * num_features + column, value);
            if (TRACK_CLEAN) {
                const double clean_value = tile_clean_sums[c * tile + threadIdx.x];
                if (clean_value != 0.0)
                    atomicAdd(clean_sums + (long long)c * num_features + column, clean_value);
            }
        }
        if (counts_rows) {
            if (tile_counts[c]) atomicAdd(counts + c, tile_counts[c]);
            if (TRACK_CLEAN && tile_clean_counts[c])
                atomicAdd(clean_counts + c, tile_clean_counts[c]);
        }
    }
}

__device__ __forceinline__ double ncfast_warp_sum(double value) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// Warp-wide best (value, index): the smallest value when LOWEST, else the
// largest; ties go to the smaller index, as in the serial CPU loop.
template <bool LOWEST>
__device__ __forceinline__ int ncfast_warp_best(double value, int index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double other = __shfl_xor_sync(0xffffffffu, value, offset);
        const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
        const bool better = LOWEST ? other < value : other > value;
        if (better || (other == value && other_index < index)) {
            value = other;
            index = other_index;
        }
    }
    return index;
}

// Pass 2, stage 1: residuals r = h - mu_row in float64, stored as float32 (and,
// when residuals64 is given, as those float32 values widened to float64 for
// the D x D scatter), with ||r||^2 summed in float64. One warp per row.
// Without labels every row uses mean row 0 (centring by the global mean).
// Rows left out by `include` get a zero residual and ||r||^2 = -1; so do rows
// whose label has no mean, which are also reported in bad_row, as are rows
// with a NaN or Inf (||r||^2 = NaN).
template <typename T>
__global__ void ncfast_residuals(
        const T* __restrict__ features, long long num_rows, int num_features,
        const long long* __restrict__ labels, const unsigned char* __restrict__ include,
        const long long* __restrict__ label_rows, int num_classes,
        const double* __restrict__ means, long long row_offset,
        float* __restrict__ residuals, double* __restrict__ residuals64,
        double* __restrict__ sq_norms, long long* bad_row) {
    const int lane = threadIdx.x & 31;
    const int warps_per_block = blockDim.x >> 5;
    const long long warps = (long long)gridDim.x * warps_per_block;
    for (long long i = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
         i < num_rows; i += warps) {
        const bool included = include == nullptr || include[i] != 0;
        long long mean_row = 0;
        if (labels != nullptr) {
            const long long label = labels[i];
            mean_row = (label >= 0 && label < num_classes) ? label_rows[label] : -1;
        }
        float* out = residuals + i * num_features;
        double* out64 = residuals64 == nullptr ? nullptr : residuals64 + i * num_features;
        if (!included || mean_row < 0) {
            for (int j = lane; j < num_features; j += 32) {
                out[j] = 0.0f;
                if (out64 != nullptr) out64[j] = 0.0;
            }
            if (lane == 0) {
                sq_norms[i] = -1.0;
                if (included && bad_row != nullptr) atomicMin(bad_row, row_offset + i);
            }
            continue;
        }
        const T* row = features + i * num_features;
        const double* mean = means + mean_row * num_features;
        double sq_norm = 0.0;
        for (int j = lane; j < num_features; j += 32) {
            const double residual = (double)row[j] - mean[j];
            const float stored = (float)residual;
            out[j] = stored;
            if (out64 != nullptr) out64[j] = (double)stored;
            sq_norm += residual * residual;
        }
        sq_norm = ncfast_warp_sum(sq_norm);
        if (lane == 0) {
            if (!(sq_norm <= NCFAST_MAX_RESIDUAL_SQ_NORM)) {  // NaN, Inf or too large
                sq_norm = nan("");
                if (bad_row != nullptr) atomicMin(bad_row, row_offset + i);
            }
            sq_norms[i] = sq_norm;
        }
    }
}

// Pass 2, stage 3: the fused epilogue over the GEMM output, one warp per row.
// products row i: num_means projections z_k, then num_logits classifier columns.
// Squared distance to mean k (up to a per-row constant on the "features" route):
//   base + 2 (own - z_k) + distance_offsets[mean_row * distance_stride + k]
// with base = ||r||^2 and own = z_{mean_row} when residual_products (the
// "classes" route: z = M~ r, offsets ||mu_a - mu_b||^2), else base = own = 0
// (the "features" route: z = M~ h~, offsets ||mu~_k||^2, stride 0). Without mean
// columns (num_means = 0: rows inside their NCC radius, "features" route) the nearest
// class centre is the row's own class. Logit c is
// z_{num_means + c} + logit_offsets[mean_row * logit_stride + c]. Rows with ||r||^2 < 0 or NaN
// are skipped (left out, or reported bad).
// PRIVATE: per-class tallies are summed in shared memory, then merged.
template <bool PRIVATE>
__global__ void ncfast_epilogue(
        const float* __restrict__ products, long long num_rows, int num_columns,
        int num_means, int num_logits, const double* __restrict__ sq_norms,
        const long long* __restrict__ labels, const long long* __restrict__ label_rows,
        const long long* __restrict__ present_classes,
        const double* __restrict__ distance_offsets, int distance_stride, int residual_products,
        const double* __restrict__ logit_offsets, int logit_stride,
        const unsigned char* __restrict__ corrupted, int num_classes,
        unsigned long long* counts, double* sq_norm_sums, double* norm_sums,
        unsigned long long* ncc_hits, unsigned long long* classifier_hits,
        unsigned long long* totals) {
    extern __shared__ double ncfast_shared[];
    double* block_sq_sums = ncfast_shared;
    double* block_norm_sums = block_sq_sums + num_classes;
    unsigned long long* block_counts = (unsigned long long*)(block_norm_sums + num_classes);
    unsigned long long* block_ncc_hits = block_counts + num_classes;
    unsigned long long* block_classifier_hits = block_ncc_hits + num_classes;
    unsigned long long* block_totals = block_classifier_hits + num_classes;
    if (PRIVATE) {
        for (int c = threadIdx.x; c < num_classes; c += blockDim.x) {
            block_sq_sums[c] = 0.0;
            block_norm_sums[c] = 0.0;
            block_counts[c] = 0;
            block_ncc_hits[c] = 0;
            block_classifier_hits[c] = 0;
        }
        if (threadIdx.x < 3) block_totals[threadIdx.x] = 0;
        __syncthreads();
    } else {
        block_sq_sums = sq_norm_sums;
        block_norm_sums = norm_sums;
        block_counts = counts;
        block_ncc_hits = ncc_hits;
        block_classifier_hits = classifier_hits;
        block_totals = totals;
    }
    const int lane = threadIdx.x & 31;
    const int warps_per_block = blockDim.x >> 5;
    const long long warps = (long long)gridDim.x * warps_per_block;
    for (long long i = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
         i < num_rows; i += warps) {
        const double sq_norm = sq_norms[i];
        if (!(sq_norm >= 0.0)) continue;
        const long long label = labels[i];
        const long long mean_row = label_rows[label];
        const float* z = products + i * num_columns;
        const double own = residual_products ? (double)z[mean_row] : 0.0;
        const double base = residual_products ? sq_norm : 0.0;
        const double* offsets = distance_offsets + mean_row * distance_stride;
        double best = NCFAST_INFINITY;
        int best_k = NCFAST_NO_INDEX;
        for (int k = lane; k < num_means; k += 32) {
            const double projection = (double)z[k];
            const double distance = base + 2.0 * (own - projection) + offsets[k];
            if (distance < best) {
                best = distance;
                best_k = k;
            }
        }
        long long ncc_prediction = label;  // no mean columns: the row is inside its radius
        if (num_means > 0) {
            best_k = ncfast_warp_best<true>(best, best_k);
            ncc_prediction = present_classes[best_k == NCFAST_NO_INDEX ? 0 : best_k];
        }
        long long prediction = ncc_prediction;
        if (num_logits > 0) {
            const double* logit_row = logit_offsets + mean_row * logit_stride;
            double best_logit = -NCFAST_INFINITY;
            int best_c = NCFAST_NO_INDEX;
            for (int c = lane; c < num_logits; c += 32) {
                const double logit = (double)z[num_means + c] + logit_row[c];
                if (logit > best_logit) {
                    best_logit = logit;
                    best_c = c;
                }
            }
            best_c = ncfast_warp_best<false>(best_logit, best_c);
            prediction = best_c == NCFAST_NO_INDEX ? 0 : best_c;
        }
        if (lane == 0) {
            atomicAdd(block_counts + label, 1ULL);
            atomicAdd(block_sq_sums + label, sq_norm);
            atomicAdd(block_norm_sums + label, sqrt(sq_norm));
            if (ncc_prediction == label) atomicAdd(block_ncc_hits + label, 1ULL);
            if (num_logits > 0) {
                if (prediction == label) atomicAdd(block_classifier_hits + label, 1ULL);
                if (prediction != ncc_prediction) atomicAdd(block_totals, 1ULL);
            }
            if (corrupted != nullptr && corrupted[i]) {
                atomicAdd(block_totals + 1, 1ULL);
                if (prediction == label) atomicAdd(block_totals + 2, 1ULL);
            }
        }
    }
    if (!PRIVATE) return;
    __syncthreads();
    for (int c = threadIdx.x; c < num_classes; c += blockDim.x) {
        if (block_counts[c] == 0) continue;
        atomicAdd(counts + c, block_counts[c]);
        atomicAdd(sq_norm_sums + c, block_sq_sums[c]);
        atomicAdd(norm_sums + c, block_norm_sums[c]);
        if (block_ncc_hits[c]) atomicAdd(ncc_hits + c, block_ncc_hits[c]);
        if (block_classifier_hits[c]) atomicAdd(classifier_hits + c, block_classifier_hits[c]);
    }
    if (threadIdx.x < 3 && block_totals[threadIdx.x])
        atomicAdd(totals + threadIdx.x, block_totals[threadIdx.x]);
}
"""

#: Every kernel instantiation the module compiles.
NAME_EXPRESSIONS = tuple(
    [f"ncfast_class_sums<{t}, {p}, {c}>" for t in ("float", "double")
     for p in ("true", "false") for c in ("true", "false")]
    + ["ncfast_label_codes"]
    + [f"ncfast_residuals<{t}>" for t in ("float", "double")]
    + [f"ncfast_epilogue<{p}>" for p in ("true", "false")]
)

_MODULE = cupy.RawModule(code=CUDA_SOURCE, options=("--std=c++17",),
                         name_expressions=NAME_EXPRESSIONS)

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_NULL = np.uint64(0)  # a null pointer argument
_ONE = {np.float32: np.array(1.0, np.float32), np.float64: np.array(1.0, np.float64)}
_ZERO_F32 = np.array(0.0, np.float32)
_ZERO_F64 = np.array(0.0, np.float64)


def _kernel(name, shared_bytes):
    kernel = _function(name)
    if shared_bytes > 48 << 10:  # beyond the default limit of dynamic shared memory
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


@functools.lru_cache(maxsize=None)
def _function(name):
    return _MODULE.get_function(name)


def _pointer(array):
    return _NULL if array is None else array


def _multiprocessors():
    return _device_multiprocessors(cupy.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(device_id):
    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


@functools.lru_cache(maxsize=None)
def _device_shared_memory(device_id):
    """Bytes of dynamic shared memory one block may ask for, and one multiprocessor holds.

    A request beyond the first fails the launch (``cudaErrorInvalidValue``): the
    H100's 227 KB is 99 KB on sm_86 and sm_89, 64 KB on sm_75.
    """
    attributes = cupy.cuda.Device(device_id).attributes
    return (attributes["MaxSharedMemoryPerBlockOptin"],
            attributes["MaxSharedMemoryPerMultiprocessor"])


def _shared_state_bytes():
    """Largest private per-block state on the current device: ``SHARED_STATE_BYTES`` or
    what a block may have there, whichever is less."""
    return min(SHARED_STATE_BYTES, _device_shared_memory(cupy.cuda.Device().id)[0])


def _row_grid(num_rows):
    """Blocks of the one-warp-per-row kernels: enough to fill the device, no more."""
    warps_per_block = THREADS_PER_BLOCK // 32
    return max(1, min(-(-num_rows // warps_per_block), 8 * _multiprocessors()))


def label_codes(labels, clean_labels, num_classes, row_offset, out_codes, bad_row):
    """Pass-1 row codes: the label, flagged when the clean label agrees; -1 for a bad row.

    Parameters
    ----------
    labels : cupy int64 array of shape (n,)
    clean_labels : cupy int64 array of shape (n,), or None
    num_classes : int
        C, below 2**30.
    row_offset : int
        Global index of the chunk's first row.
    out_codes : cupy int32 array of shape (n,), written
    bad_row : cupy int64 array of shape (1,), updated with ``min``: the first row
        whose label or clean label is outside ``[0, C)``.
    """
    num_rows = labels.shape[0]
    if num_rows == 0:
        return
    _kernel("ncfast_label_codes", 0)(
        (min(-(-num_rows // THREADS_PER_BLOCK), 8 * _multiprocessors()),), (THREADS_PER_BLOCK,),
        (labels, _pointer(clean_labels), np.int64(num_rows), np.int32(num_classes),
         np.int64(row_offset), out_codes, bad_row))


def _class_sums_shared_bytes(num_classes, columns, copies):
    """Private pass-1 state of a block: C x columns sums and C counts, per copy."""
    return copies * 8 * num_classes * (columns + 1)


def class_sums(features, codes, counts, sums, clean_counts, clean_sums, shift=None):
    """Add per-class counts and float64 sums of one chunk (pass 1).

    Rows coded -1 are skipped; a NaN or Inf value makes its class's sums
    non-finite.

    Parameters
    ----------
    features : cupy float32 or float64 array of shape (n, D), C-contiguous
    codes : cupy int32 array of shape (n,), from ``label_codes``
    counts : cupy uint64 array of shape (C,), updated
    sums : cupy float64 array of shape (C, D), updated
    clean_counts, clean_sums : same shapes, or None; when given, the rows whose
        clean label agrees are added there too
    shift : cupy float64 array of shape (D,), optional
        Added are the rows less ``shift`` (the caller adds ``counts × shift``
        back once): see ``ncfast.backends.cuda.DeviceClassSums``.
    """
    num_rows, num_features = features.shape
    if num_rows == 0:
        return
    num_classes = counts.shape[0]
    track_clean = clean_counts is not None
    copies = 2 if track_clean else 1
    columns = CLASS_SUM_COLUMNS
    limit = _shared_state_bytes()
    while columns > 32 and _class_sums_shared_bytes(num_classes, columns, copies) > limit:
        columns //= 2
    shared_bytes = _class_sums_shared_bytes(num_classes, columns, copies)
    private = shared_bytes <= limit
    if not private:
        shared_bytes = 0
    column_tiles = -(-num_features // columns)
    per_multiprocessor = _device_shared_memory(cupy.cuda.Device().id)[1]
    blocks_per_sm = max(1, min(2048 // columns, per_multiprocessor // max(shared_bytes, 1)))
    row_blocks = max(1, -(-_multiprocessors() * blocks_per_sm // column_tiles))
    rows_per_block = -(-num_rows // row_blocks)
    row_blocks = -(-num_rows // rows_per_block)
    name = (f"ncfast_class_sums<{_CTYPES[features.dtype]}, {str(private).lower()}, "
            f"{str(track_clean).lower()}>")
    _kernel(name, shared_bytes)(
        (column_tiles, row_blocks), (columns,),
        (features, np.int64(num_rows), np.int32(num_features), codes, np.int32(num_classes),
         np.int64(rows_per_block), counts, sums, _pointer(clean_counts), _pointer(clean_sums),
         _pointer(shift)),
        shared_mem=shared_bytes)


def residuals(features, labels, include, label_rows, means, row_offset, out_residuals,
              out_residuals64, out_sq_norms, bad_row):
    """Residuals ``r = h - mu`` from float64 means, with ``||r||^2`` in float64.

    Parameters
    ----------
    features : cupy float32 or float64 array of shape (n, D), C-contiguous
    labels : cupy int64 array of shape (n,), or None
        Class of each row; None: every row uses ``means[0]`` (centring).
    include : cupy uint8 array of shape (n,), or None
        Rows to use; the others get a zero residual and ``||r||^2 = -1``.
    label_rows : cupy int64 array of shape (C,)
        Row of ``means`` for each class, -1 for a class without a mean.
    means : cupy float64 array of shape (C', D)
    row_offset : int
        Global index of the chunk's first row (bad-row reports).
    out_residuals : cupy float32 array of shape (n, D), written
    out_residuals64 : cupy float64 array of shape (n, D), or None
        Written with the float32 residuals widened to float64.
    out_sq_norms : cupy float64 array of shape (n,), written: ``||r||^2``,
        -1 for rows left out or whose label has no mean, NaN for a NaN or Inf.
    bad_row : cupy int64 array of shape (1,), or None; updated with ``min``
        First row (global index) whose label has no mean or that holds a NaN
        or Inf.
    """
    num_rows, num_features = features.shape
    if num_rows == 0:
        return
    _kernel(f"ncfast_residuals<{_CTYPES[features.dtype]}>", 0)(
        (_row_grid(num_rows),), (THREADS_PER_BLOCK,),
        (features, np.int64(num_rows), np.int32(num_features), _pointer(labels),
         _pointer(include), label_rows, np.int32(label_rows.shape[0]), means,
         np.int64(row_offset), out_residuals, _pointer(out_residuals64), out_sq_norms,
         _pointer(bad_row)))


def epilogue(products, num_means, sq_norms, labels, label_rows, present_classes,
             distance_offsets, residual_products, logit_offsets, corrupted, tallies):
    """Fused pass over the GEMM output: NCC argmin, classifier argmax, tallies.

    Parameters
    ----------
    products : cupy float32 array of shape (n, C' + C_w)
        Projections on the C' centred means, then ``C_w`` logit columns.
    num_means : int
        C', or 0 for rows inside their NCC radius (then ``products`` holds only the
        logits, and each row's nearest class centre is its own class).
    sq_norms : cupy float64 array of shape (n,), ``||r||^2`` (rows with a
        negative or NaN value are skipped)
    labels : cupy int64 array of shape (n,)
    label_rows : cupy int64 array of shape (C,)
    present_classes : cupy int64 array of shape (C',)
    distance_offsets : cupy float64 array of shape (C', C') or (C',)
        ``||mu_a - mu_b||^2`` when ``residual_products`` ("classes" route:
        products of residuals), else ``||mu~_k||^2`` (products of centred rows).
    residual_products : bool
    logit_offsets : cupy float64 array of shape (C', C_w) or (C_w,)
        ``W mu_a + b`` per mean row, or ``W mu_G + b`` for centred rows.
    corrupted : cupy uint8 array of shape (n,), or None
    tallies : dict of cupy arrays, updated
        ``counts``, ``ncc_hits``, ``classifier_hits`` (uint64, (C,)),
        ``sq_norm_sums``, ``norm_sums`` (float64, (C,)), ``totals`` (uint64,
        (3,): disagreements, corrupted rows, corrupted rows fitted).
    """
    num_rows, num_columns = products.shape
    if num_rows == 0:
        return
    num_classes = label_rows.shape[0]
    num_logits = num_columns - num_means
    shared_bytes = 40 * num_classes + 24
    private = shared_bytes <= _shared_state_bytes()
    name = f"ncfast_epilogue<{'true' if private else 'false'}>"
    _kernel(name, shared_bytes if private else 0)(
        (_row_grid(num_rows),), (THREADS_PER_BLOCK,),
        (products, np.int64(num_rows), np.int32(num_columns), np.int32(num_means),
         np.int32(num_logits), sq_norms, labels, label_rows, present_classes, distance_offsets,
         np.int32(num_means if distance_offsets.ndim == 2 else 0), np.int32(residual_products),
         logit_offsets, np.int32(num_logits if logit_offsets.ndim == 2 else 0),
         _pointer(corrupted), np.int32(num_classes),
         tallies["counts"], tallies["sq_norm_sums"], tallies["norm_sums"], tallies["ncc_hits"],
         tallies["classifier_hits"], tallies["totals"]),
        shared_mem=shared_bytes if private else 0)


#: ``CUBLAS_DEFAULT_MATH`` (cublas_api.h): float32 routines compute in float32.
CUBLAS_DEFAULT_MATH = 0


class _DefaultMath:
    """Context: cuBLAS in its default math mode, so that float32 GEMMs are true
    float32 whatever CuPy's TF32 setting (``CUPY_TF32``) left on the handle."""

    def __enter__(self):
        self.handle = cupy.cuda.device.get_cublas_handle()
        self.previous = cublas.getMathMode(self.handle)
        cublas.setMathMode(self.handle, CUBLAS_DEFAULT_MATH)
        return self.handle

    def __exit__(self, *exc):
        cublas.setMathMode(self.handle, self.previous)


def matmul_f32(rows, matrix, out):
    """``out = rows @ matrix`` in true float32 (cuBLAS sgemm, no TF32).

    Parameters
    ----------
    rows : cupy float32 array of shape (n, d), C-contiguous
    matrix : cupy float32 array of shape (d, k), C-contiguous
    out : cupy float32 array of shape (n, k), C-contiguous, written
    """
    num_rows, depth = rows.shape
    width = matrix.shape[1]
    if num_rows == 0:
        return
    # Row-major out = rows @ matrix is column-major out^T = matrix^T rows^T.
    with _DefaultMath() as handle:
        cublas.sgemm(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, width, num_rows, depth,
                     _ONE[np.float32].ctypes.data, matrix.data.ptr, width, rows.data.ptr,
                     depth, _ZERO_F32.ctypes.data, out.data.ptr, width)


def add_gram(rows, out):
    """``out += rows^T rows`` in float64 (cuBLAS dgemm).

    A chunk's rows are split into up to ``GRAM_BLOCKS`` blocks whose Grams are
    computed side by side (strided batched GEMM) and then summed: a D×D output
    alone would leave most of the device idle.

    Parameters
    ----------
    rows : cupy float64 array of shape (n, k), C-contiguous
    out : cupy float64 array of shape (k, k), updated
    """
    num_rows, width = rows.shape
    if num_rows == 0:
        return
    blocks = max(1, min(GRAM_BLOCKS, num_rows // max(4 * width, 256)))
    block_rows = num_rows // blocks
    partial = cupy.empty((blocks, width, width))
    one, zero = _ONE[np.float64].ctypes.data, _ZERO_F64.ctypes.data
    # Row-major rows is column-major X = rows^T (k x n), and X X^T = rows^T rows.
    handle = cupy.cuda.device.get_cublas_handle()
    block_stride = block_rows * width
    cublas.dgemmStridedBatched(
        handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T, width, width, block_rows, one,
        rows.data.ptr, width, block_stride, rows.data.ptr, width, block_stride, zero,
        partial.data.ptr, width, width * width, blocks)
    remainder = num_rows - blocks * block_rows
    if remainder:
        tail = rows.data.ptr + blocks * block_stride * rows.itemsize
        cublas.dgemm(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T, width, width, remainder,
                     one, tail, width, tail, width, one, partial.data.ptr, width)
    out += partial.sum(axis=0)
