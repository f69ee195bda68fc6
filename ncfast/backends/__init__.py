"""Backends: where the passes and the pair sweep run.

A backend supplies only what differs by device (see ``ncfast.engine``):

- ``xp``: the array namespace of its arrays (numpy, cupy);
- ``pair_tile``, ``map_tasks(function, num_tasks)`` and
  ``reduce_tile(dots, tile, rows, cols)``: the pair sweep's tiles
  (``ncfast.sweep``);
- ``symmetric_eigh(matrix)``: the plan's eigendecomposition of a host symmetric
  matrix, returned to the host;
- ``source(features, labels, clean_labels, chunk_size)``: a chunk source for
  its inputs (``label_summary()``, ``num_features``, ``carries_clean_labels``,
  ``chunks(pass_number)``, ``context()``: a context manager around both passes,
  ``rereads``: whether each pass iterates a chunk source again, whose rows
  pass 2 then also sums by class to compare with pass 1's, and ``num_rows``:
  the rows of a pass, None when not known before it is read, the size of the
  progress bars);
- ``pass1_state(class_sums)`` / ``pass2_states(residual_pass, source)``: states
  that pass-1 and pass-2 chunks are added into (the public host states
  themselves on the CPU, device twins on the GPU), with ``update`` methods;
- ``finish_pass1(state, class_sums, source)`` / ``finish_pass2(states,
  residual_pass, source)``: add those into the public host states, raising
  for the first bad row (``ncfast.errors``).

``cpu`` (Numba, numpy) is always there; ``cuda`` (CuPy) is imported only when
a GPU is asked for or the features already live on one.
"""
import sys

DEVICES = ("auto", "cpu", "cuda")


def is_torch_cuda_tensor(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor) and obj.device.type == "cuda"


def is_cupy_array(obj):
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


def is_device_array(obj):
    """True for a CuPy array or a torch CUDA tensor (checked without importing either)."""
    return is_cupy_array(obj) or is_torch_cuda_tensor(obj)


def select_backend(device, features):
    """The backend that ``collapse`` runs on for this ``device`` and these features.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        "auto": where the features are (GPU arrays on their GPU, host data on
        the CPU); "cuda": on the GPU, streaming host data to it.
    features : the ``features`` argument of ``collapse``

    Raises
    ------
    RuntimeError
        ``device="cuda"`` without CuPy or without a usable GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; found {device!r}")
    on_device = is_device_array(features)
    if device == "cpu" and on_device:
        raise ValueError(
            "features are on a GPU but device='cpu'; pass device='cuda' (or 'auto'), or move "
            "them to host memory (.get() for CuPy, .cpu() for torch)")
    if device == "cuda" or on_device:
        from ncfast.backends.cuda import cuda_backend
        return cuda_backend()
    from ncfast.backends.cpu import CPU
    return CPU
