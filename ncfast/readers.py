"""Read arrays from the files researchers already have, lazily and in row blocks.

Formats: ``.npy`` and ``.npz`` members stored uncompressed (memory-mapped,
pages released block by block; a member's CRC-32 is checked as its rows are
read in order), compressed ``.npz`` members (streamed sequentially), safetensors
(``safe_open`` slices), torch ``.pt``/``.pth`` (``torch.load(weights_only=True,
mmap=True)``: a tensor, or a dict of tensors, possibly nested) and HDF5
(``h5py`` datasets, possibly in groups). Nothing is loaded whole: a
``StoredArray`` reads the rows it is asked for, so files larger than memory
stream through ``ncfast.collapse`` one chunk at a time. Every failure to read
becomes a ``ValueError`` that names the file and says how to fix it; a path
that is not a regular file (a named pipe, a device) is refused before it is
opened, and a memory-mapped file cut short while it is read is an error, not
a crash.

Keys inside a file (``.npz``, safetensors, torch dicts, HDF5) say what each
array is: ``[SPLIT/]features[/LAYER]``, ``[SPLIT/]labels``,
``[SPLIT/]clean_labels``, ``weights`` and ``bias`` (``/`` or ``.`` separate
the parts; SPLIT defaults to ``train``, LAYER to ``features``). Two keys
naming the same array (``features`` and ``train/features``), and the
classifier's under a prefix (``fc/weights``), are refused. See
``file_layout``.
"""
import errno
import hashlib
import mmap
import os
import pickle
import re
import weakref
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from ncfast.inputs import (LARGE_NPY_HEADER, as_array, file_problem, is_large_npy_header,
                           plain_tensor, printable_line)

#: File suffix -> format name.
FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors", ".pt": "torch",
           ".pth": "torch", ".h5": "hdf5", ".hdf5": "hdf5"}

#: Bytes read per block when hashing a file.
HASH_BLOCK_BYTES = 8 << 20

_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
_ROLES = ("features", "labels", "clean_labels", "weights", "bias")
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32",
                       "F64": "float64", "I8": "int8", "I16": "int16", "I32": "int32",
                       "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                       "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
                       "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
                       "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu"}
#: Float dtypes numpy lacks -> bytes per value: read through torch, upcast to float32.
_TORCH_FLOAT_ITEMSIZES = {"bfloat16": 2, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1,
                          "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1}
#: errno of an OSError met opening or reading a file -> what it means and how to fix it.
_OS_ERROR_HINTS = {
    errno.ENOENT: "no such file; check the path",
    errno.EACCES: "permission denied; make the file readable, and its folders searchable, by "
                  "this user"}


def file_sha256(path, on_bytes=None):
    """SHA-256 of a file's content, read in blocks.

    Parameters
    ----------
    path : str or PathLike
    on_bytes : callable, optional
        Called with the number of bytes of each block read (progress bars).

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK_BYTES):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def array_name(path, key):
    """An array in a file as messages name it: the file, with the key when it holds several."""
    return path if key is None else f"{path} [{key}]"


@dataclass(eq=False)
class StoredArray:
    """One array in a file, read in row blocks on demand.

    Attributes
    ----------
    path : str
        The file.
    key : str or None
        The array's key inside the file; None for single-array files.
    shape : tuple of int
    dtype : str
        numpy-style name (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``, ``"int64"``,
        ...).
    recorded_sha256 : str or None
        Content digest recorded when the file was written (run folders).
    """

    path: str
    key: str | None
    shape: tuple
    dtype: str
    _open: object = field(repr=False)
    recorded_sha256: str | None = None
    _handle: object = field(default=None, repr=False)

    @property
    def name(self):
        """The file, with the key when the file holds several arrays."""
        return array_name(self.path, self.key)

    @property
    def num_rows(self):
        return self.shape[0] if self.shape else 0

    @property
    def nbytes(self):
        itemsize = _TORCH_FLOAT_ITEMSIZES.get(self.dtype) or np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    @property
    def is_float(self):
        return self.dtype in _TORCH_FLOAT_ITEMSIZES or _dtype_kind(self.dtype) == "f"

    @property
    def is_integer(self):
        return _dtype_kind(self.dtype) in ("i", "u")

    def rows(self, start, stop):
        """Rows ``[start, stop)`` as a numpy array (bfloat16 and float8 become float32)."""
        stop = min(stop, self.num_rows)
        start = min(start, stop)
        try:
            if self._handle is None:
                problem = file_problem(self.path)  # it may have been replaced since read_file
                if problem is not None:
                    raise ValueError(f"{self.name}: {problem}")
                self._handle = self._open()
            return self._handle[start:stop]
        except Exception as error:  # third-party readers raise their own types on bad files
            raise read_error(self.name, f"cannot read rows {start}:{stop}", error) from None

    def read(self):
        """The whole array, copied into memory (for small arrays: labels, weights, bias).

        The file is closed afterwards; ``rows`` reopens it.
        """
        whole = np.array(self.rows(0, self.num_rows))
        self.close()
        return whole

    def check(self):
        """Check that the file still holds this array (files read at opening: nothing to do)."""

    def close(self):
        """Drop the open handle (file, memory map); ``rows`` reopens it."""
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()
        self._handle = None


def _dtype_kind(name):
    """numpy's kind code of a dtype name (``"f"``, ``"i"``, ``"u"``, ...); None when numpy
    has no such dtype (``"bfloat16"``, torch's float8 types)."""
    try:
        return np.dtype(name).kind
    except TypeError:
        return None


def read_error(name, failed, error):
    """``error``, met reading ``name``, as a one-line ValueError saying how to fix it.

    Parameters
    ----------
    name : str
        The file, with the key for an array in it, as messages name it.
    failed : str
        What failed, said when a reader finds the content damaged
        (``"not a readable npz file"``).
    error : Exception

    Returns
    -------
    ValueError or MemoryError
        ``error`` itself when it is ncfast's own (it names the file), or when memory,
        not the file, ran out.
    """
    if isinstance(error, ValueError) and name in str(error) or isinstance(error, MemoryError):
        return error
    if isinstance(error, OSError) and error.errno is not None:  # the system's, not the content's
        hint = _OS_ERROR_HINTS.get(
            error.errno, f"cannot be opened or read ({error.strerror}); check the path and the "
            "file system")
        return ValueError(f"{name}: {hint}")
    return ValueError(f"{name}: {failed} ({type(error).__name__}: {printable_line(error)}); it "
                      "may be truncated or corrupt: re-save it")


def read_file(path):
    """Every array in a file, as ``{key: StoredArray}`` (key None for one-array files).

    Parameters
    ----------
    path : str or PathLike
        A ``.npy``, ``.npz``, ``.safetensors``, ``.pt``/``.pth`` or
        ``.h5``/``.hdf5`` file.

    Raises
    ------
    ValueError
        The file is missing, unreadable, empty, not a regular file (a named
        pipe: opening it would wait for a writer), of an unknown suffix,
        truncated or corrupt.
    """
    path = os.fspath(path)
    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    try:
        open(path, "rb").close()
    except OSError as error:
        raise read_error(path, "cannot open it", error) from None
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{path}: unknown file type {suffix!r}; ncfast reads "
            f"{', '.join(sorted(FORMATS))} files and run folders with a manifest.json")
    reader = _READERS[FORMATS[suffix]]
    try:
        return reader(path)
    except Exception as error:  # third-party loaders raise their own types on corrupt files
        raise read_error(path, f"not a readable {FORMATS[suffix]} file", error) from None


def _check_not_shorter(name, file_bytes, needed, needed_as="the header needs"):
    """Raise the error of a mapped file cut short since it was opened: touching the mapping
    past its new end would kill the process (SIGBUS) instead. ``needed_as`` says where
    ``needed`` comes from, before it in the message."""
    if file_bytes < needed:
        raise ValueError(
            f"{name}: became shorter while being read ({file_bytes} bytes, {needed_as} "
            f"{needed}): was it rewritten during the analysis? Run it again once the file is "
            "complete")


class _FileSizeGuard:
    """The size of a file that a third-party reader (safetensors, torch) maps into memory,
    checked before each block is read, as ``_MappedRows`` checks its own mapping.

    It holds its own descriptor of the file, opened before the reader maps it, so that
    the size is the mapped file's even when the path is replaced meanwhile; the
    descriptor is closed by ``close`` or when the guard is collected.

    Parameters
    ----------
    path : str
    """

    def __init__(self, path):
        self.descriptor = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.descriptor).st_size
        self.close = weakref.finalize(self, os.close, self.descriptor)

    def check(self, name):
        """Raise a ValueError naming ``name`` (the array read) when the file is shorter now."""
        _check_not_shorter(name, os.fstat(self.descriptor).st_size, self.size,
                           "it had when opened")


class _MappedRows:
    """Row slices of a C-ordered array stored raw at ``offset`` in a file, memory-mapped.

    Blocks are read-only views of the mapping (no copy). When the next block
    is asked for, the pages of the previous one are released with
    ``madvise(MADV_DONTNEED)``, so resident memory stays at about one block
    whatever the file size; a view still held re-reads the file if touched.
    Before each block the file's size is checked (one ``fstat``): touching
    pages of a mapping past the end of a file that was cut short since it was
    mapped kills the process (SIGBUS), whereas a file shorter than its header
    says is an error naming it. A file cut between that check and the
    reading of the block still kills it.

    Parameters
    ----------
    path : str
    dtype : numpy.dtype
    shape : tuple of int
    offset : int
        Byte offset of the array's first row.
    name : str, optional
        The array as messages name it (default: ``path``).
    """

    def __init__(self, path, dtype, shape, offset, name=None):
        self.name = path if name is None else name
        self.dtype, self.shape, self.offset = dtype, tuple(shape), offset
        self.row_bytes = dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self.size = offset + self.row_bytes * self.shape[0]
        self.mapping = None
        self.held = None  # byte range of the last block handed out
        if self.size > 0:
            with open(path, "rb") as stream:
                self.mapping = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
            if self.mapping.size() < self.size:
                self.close()
                raise EOFError(f"the file has {os.path.getsize(path)} bytes; its header "
                               f"promises {self.size}")
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                self.mapping.madvise(mmap.MADV_SEQUENTIAL)

    def __getitem__(self, rows):
        start, stop, _ = rows.indices(self.shape[0])
        self._release_held()
        count = max(stop - start, 0)
        if self.mapping is None or count == 0:
            return np.empty((count, *self.shape[1:]), self.dtype)
        _check_not_shorter(self.name, self.mapping.size(), self.size)  # its size now
        begin = self.offset + start * self.row_bytes
        self.held = (begin, begin + count * self.row_bytes)
        items = count * self.row_bytes // self.dtype.itemsize
        return np.frombuffer(self.mapping, self.dtype, items, begin).reshape(
            (count, *self.shape[1:]))

    def _release_held(self):
        if self.held is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = self.held[0] - self.held[0] % mmap.PAGESIZE
        self.mapping.madvise(mmap.MADV_DONTNEED, begin, self.held[1] - begin)
        self.held = None

    def close(self):
        if self.mapping is not None:
            self._release_held()
            try:
                self.mapping.close()
            except BufferError:  # a block view is still alive; the mapping closes with it
                pass
        self.mapping = None


def _npy_layout(path):
    """``(dtype, shape, data offset)`` of a ``.npy`` file, checked.

    The header is checked by memory-mapping the file (``ncfast.inputs``),
    which also catches truncated files.
    """
    array = as_array(path, "array")  # a clear ValueError when unreadable or truncated
    if array.ndim > 1 and not array.flags.c_contiguous:
        raise ValueError(f"{path}: the array is stored Fortran-ordered; re-save it C-ordered "
                         "(np.save(path, np.ascontiguousarray(array)))")
    return array.dtype, array.shape, array.offset


def open_npy_rows(path):
    """A checked ``.npy`` file, opened for reading row slices (``block = rows[a:b]``)."""
    path = os.fspath(path)
    return _MappedRows(path, *_npy_layout(path))


def _read_npy(path):
    dtype, shape, offset = _npy_layout(path)
    return {None: StoredArray(path, None, shape, str(dtype),
                              _bind(_MappedRows, path, dtype, shape, offset))}


def _read_npz(path):
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-len(".npy")]
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in _NPY_HEADER_READERS:
                    raise ValueError(
                        f"{array_name(path, key)}: .npy format version {version} is not supported; "
                        "re-save it with numpy.savez")
                try:
                    shape, fortran, dtype = _NPY_HEADER_READERS[version](member)
                except ValueError as error:
                    if not is_large_npy_header(error):
                        raise
                    raise ValueError(f"{array_name(path, key)}: {LARGE_NPY_HEADER}") from None
                header_bytes = member.tell()
            if fortran or dtype.hasobject:
                raise ValueError(
                    f"{array_name(path, key)}: the array is Fortran-ordered or holds objects; "
                    "re-save it C-ordered with numpy.savez (np.ascontiguousarray)")
            if info.compress_type == zipfile.ZIP_STORED:
                opener = _bind(_StoredMemberRows, path, key, dtype, shape,
                               _member_data_offset(path, info), header_bytes, info.CRC)
            else:
                opener = _bind(_SequentialRows, path, info.filename, dtype, shape, header_bytes)
            arrays[key] = StoredArray(path, key, tuple(shape), str(dtype), opener)
    return arrays


def _member_data_offset(path, info):
    """Byte offset of a stored zip member's data: after its local file header."""
    with open(path, "rb") as stream:
        stream.seek(info.header_offset)
        header = stream.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: corrupt zip entry {info.filename!r}; re-save the .npz")
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


class _StoredMemberRows(_MappedRows):
    """Row slices of an uncompressed ``.npz`` member, memory-mapped, checked against its CRC-32.

    Blocks handed out in order from the first row extend a running CRC-32 of
    the member (its ``.npy`` header included); the block that completes the
    member raises if the archive records another, before the consumer sees
    it. One pass in row order (``read``, a pass of ``collapse``) thus checks
    the member without reading it again; blocks out of order are not checked.
    """

    def __init__(self, path, key, dtype, shape, member_offset, header_bytes, recorded_crc):
        super().__init__(path, dtype, shape, member_offset + header_bytes,
                         array_name(path, key))
        self.recorded_crc = recorded_crc
        self.crc = zlib.crc32(self.mapping[member_offset:self.offset])
        self.checked_until = self.offset  # the CRC covers the member up to this byte
        self._check_if_complete()

    def __getitem__(self, rows):
        self._check_if_complete()  # a member found corrupt stays refused
        block = super().__getitem__(rows)
        if self.held is not None and self.held[0] == self.checked_until:
            self.crc = zlib.crc32(block, self.crc)
            self.checked_until = self.held[1]
            self._check_if_complete()
        return block

    def _check_if_complete(self):
        if self.checked_until == self.size and self.crc != self.recorded_crc:
            raise ValueError(f"{self.name}: the member's bytes do not match the CRC-32 that the "
                             "archive records: the file is corrupt; re-save it")


class _SequentialRows:
    """Row slices of a compressed ``.npz`` member, read forward through the stream.

    A slice that starts before the current position reopens the member: each
    pass of ``collapse`` reads it once from the start.
    """

    def __init__(self, path, member, dtype, shape, header_bytes):
        self.path, self.member, self.dtype, self.shape = path, member, dtype, shape
        self.header_bytes = header_bytes
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self.archive = self.stream = None
        self.position = 0

    def _rewind(self):
        self.close()
        self.archive = zipfile.ZipFile(self.path)
        self.stream = self.archive.open(self.member)
        self.stream.read(self.header_bytes)
        self.position = 0

    def __getitem__(self, rows):
        start, stop, _ = rows.indices(self.shape[0])
        if self.stream is None or start < self.position:
            self._rewind()
        if start > self.position:
            self._read(start - self.position)
        block = np.frombuffer(self._read(max(stop - start, 0)), dtype=self.dtype)
        return block.reshape((-1, *self.shape[1:]))

    def _read(self, num_rows):
        wanted = num_rows * self.row_bytes
        data = self.stream.read(wanted)
        if len(data) != wanted:
            raise EOFError(f"member {self.member!r} ends early")
        self.position += num_rows
        return data

    def close(self):
        if self.archive is not None:
            self.stream.close()
            self.archive.close()
        self.archive = self.stream = None


class _SafetensorsRows:
    """Row slices of one safetensors tensor through ``safe_open(...).get_slice``, the
    file's size checked first (``_FileSizeGuard``)."""

    def __init__(self, path, key, dtype):
        from safetensors import safe_open

        self.upcast = dtype in _TORCH_FLOAT_ITEMSIZES
        self.name = array_name(path, key)
        self.guard = _FileSizeGuard(path)
        self.file = safe_open(path, framework="pt" if self.upcast else "numpy")
        self.slice = self.file.get_slice(key)

    def __getitem__(self, rows):
        self.guard.check(self.name)
        block = self.slice[rows]
        return block.float().numpy() if self.upcast else block

    def close(self):
        self.guard.close()


def _read_safetensors(path):
    from safetensors import safe_open

    arrays = {}
    with safe_open(path, framework="numpy") as tensors:
        for key in tensors.keys():
            info = tensors.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype().lower())
            arrays[key] = StoredArray(path, key, tuple(info.get_shape()), dtype,
                                      _bind(_SafetensorsRows, path, key, dtype))
    return arrays


def _bind(factory, *args):
    return lambda: factory(*args)


class _TorchRows:
    """Row slices of a memory-mapped torch tensor, as numpy (a parameter's too, detached;
    dtypes numpy lacks upcast to float32), the file's size checked first (``guard``, a
    ``_FileSizeGuard`` shared by the file's tensors; ``name``, the tensor in messages)."""

    def __init__(self, tensor, guard, name):
        self.tensor = tensor
        self.guard = guard
        self.name = name

    def __getitem__(self, rows):
        self.guard.check(self.name)
        block = plain_tensor(self.tensor[rows], "the tensor")
        if str(block.dtype).removeprefix("torch.") in _TORCH_FLOAT_ITEMSIZES:
            block = block.float()
        return block.numpy()


def _read_torch(path):
    import torch

    guard = _FileSizeGuard(path)  # before torch maps the file
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise
        raise ValueError(
            f"{path}: holds objects other than tensors ({refused[1]}), which ncfast does not "
            "load: it reads .pt files with torch.load(weights_only=True), which runs no code "
            "from the file; re-save the arrays as torch tensors (torch.from_numpy) or as "
            ".npz/.safetensors") from None
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # torch says this of every file that is not a zip archive, torch's or not.
        if not _is_legacy_torch_file(path, torch):
            raise ValueError(
                f"{path}: not a torch file (neither the zip archive torch.save writes nor "
                "torch's legacy format); it may be corrupt or of another format: re-save it "
                "with torch.save") from None
        raise ValueError(
            f"{path}: saved in torch's legacy format, which cannot be memory-mapped "
            f"({printable_line(error)}); re-save it with torch.save (torch >= 1.6 zip "
            "format)") from None
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        # torch's zip reader seeking past the end of a cut file, not the file system
        raise ValueError(f"{path}: not a readable torch file (its zip archive ends early or is "
                         "damaged); it may be truncated or corrupt: re-save it") from None
    tensors = {}
    _flatten_tensors(path, loaded, None, tensors, torch)
    if not tensors:
        raise ValueError(f"{path}: holds no tensors; save a tensor or a dict of tensors")
    for key, tensor in tensors.items():
        if tensor.layout != torch.strided:
            name = array_name(path, key)
            raise ValueError(f"{name}: is a {tensor.layout} tensor; re-save it dense "
                             "(tensor.to_dense())")
    return {key: StoredArray(path, key, tuple(tensor.shape), str(tensor.dtype).split(".")[-1],
                             _bind(_TorchRows, tensor, guard, array_name(path, key)))
            for key, tensor in tensors.items()}


def _is_legacy_torch_file(path, torch):
    """Whether a file starts as torch's legacy (before 1.6) format does: with torch's magic
    number, pickled by any protocol (``torch.save(..., _use_new_zipfile_serialization=False,
    pickle_protocol=...)``). Compared as bytes: nothing of the file is unpickled."""
    starts = [pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol)
              for protocol in range(pickle.HIGHEST_PROTOCOL + 1)]
    with open(path, "rb") as stream:
        head = stream.read(max(map(len, starts)))
    return any(head.startswith(start) for start in starts)


def _flatten_tensors(path, value, prefix, tensors, torch):
    """Gather the tensors of a loaded ``.pt`` object into ``tensors``, keyed by their path in
    nested dicts (``"train/features"``).

    Lists and tuples, and values other than tensors and dicts under a key that names an array
    (``features``, ``labels``, ``clean_labels``, ``weights``, ``bias``), are refused: dropped,
    they would leave out what they hold without a word. Other values (``"epoch": 5``) are
    ignored.
    """
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten_tensors(path, item, str(key) if prefix is None else f"{prefix}/{key}",
                             tensors, torch)
    elif isinstance(value, (list, tuple)) or (prefix is not None and any(
            part in _ROLES for part in _key_parts(prefix))):
        name = path if prefix is None else f"{path} [{prefix}]"
        raise ValueError(
            f"{name}: is a {type(value).__name__}, not a tensor; ncfast reads tensors, alone or "
            "in dicts: save it as one tensor (torch.stack(values) for a list of tensors, "
            "torch.tensor(values) for numbers)")


def _read_hdf5(path):
    import h5py

    shapes = {}
    with h5py.File(path, "r") as archive:
        archive.visititems(lambda key, item: shapes.__setitem__(key, (item.shape, item.dtype))
                           if isinstance(item, h5py.Dataset) else None)
    return {key: StoredArray(path, key, tuple(shape), str(dtype), _bind(_Hdf5Rows, path, key))
            for key, (shape, dtype) in shapes.items()}


class _Hdf5Rows:
    """Row slices of one HDF5 dataset; keeps the file open between slices."""

    def __init__(self, path, key):
        import h5py

        self.file = h5py.File(path, "r")
        self.dataset = self.file[key]

    def __getitem__(self, rows):
        return self.dataset[rows]

    def close(self):
        self.file.close()


_READERS = {"npy": _read_npy, "npz": _read_npz, "safetensors": _read_safetensors,
            "torch": _read_torch, "hdf5": _read_hdf5}


@dataclass
class SplitArrays:
    """The arrays of one split (train, test, ...) of one checkpoint.

    Attributes
    ----------
    features : dict of str to StoredArray
        Layer name -> features of shape (n_samples, n_features).
    labels : StoredArray of shape (n_samples,)
    clean_labels : StoredArray of shape (n_samples,), or None
    """

    features: dict
    labels: StoredArray | None
    clean_labels: StoredArray | None = None


@dataclass
class CheckpointArrays:
    """The arrays of one checkpoint: splits, layers, classifier.

    Attributes
    ----------
    splits : dict of str to SplitArrays
    weights : StoredArray of shape (C, D), or None
    bias : StoredArray of shape (C,), or None
    classifier_layer : str or None
        Layer whose features the classifier reads.
    epoch : int or None
    num_classes : int or None
        When the source records it (run folders); else found from the labels.
    """

    splits: dict
    weights: StoredArray | None = None
    bias: StoredArray | None = None
    classifier_layer: str | None = None
    epoch: int | None = None
    num_classes: int | None = None


_ARRAY_NAMES = ("name arrays '[split/]features[/layer]', '[split/]labels', "
                "'[split/]clean_labels', 'weights', 'bias'")


def _key_parts(key):
    """The parts of an array's key: split on ``/`` and ``.``, empty parts dropped."""
    return [part for part in re.split(r"[./]", key) if part]


def _slot_name(split, role, layer):
    """What an array's (split, role, layer) is, in words (``"the train split's labels"``)."""
    if split is None:
        return f"the classifier's {role}"
    what = role.replace("_", " ")
    return f"the {split} split's {what}" + ("" if layer in (None, "features") else
                                            f" of layer {layer!r}")


def file_layout(path):
    """Read a file and sort its arrays into splits, layers and a classifier.

    Keys are split on ``/`` and ``.``; the part naming a role (``features``,
    ``labels``, ``clean_labels``, ``weights``, ``bias``) decides what an array
    is, the parts before it name the split (default ``train``) and, for
    features, the parts after it name the layer (default ``features``). A file
    holds one classifier, read by every split: its arrays are named
    ``weights`` and ``bias`` alone. A file holding one unnamed array
    (``.npy``, a bare torch tensor) gives features without labels: the caller
    supplies them.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    CheckpointArrays
        ``classifier_layer`` is the one layer whose width matches the
        weights, when there are weights.

    Raises
    ------
    ValueError
        Beyond ``read_file``'s: no features; an array of another name; two
        keys naming the same array (``features`` and ``train/features``,
        ``features/a.b`` and ``features/a/b``); parts after ``labels`` or
        ``clean_labels``, or around ``weights`` or ``bias`` (``fc/weights``,
        ``test/bias``).
    """
    arrays = read_file(path)
    if list(arrays) == [None]:
        return CheckpointArrays({"train": SplitArrays({"features": arrays[None]}, None)})
    path = os.fspath(path)
    splits, classifier, unknown = {}, {}, []
    slots = {}  # (split, role, layer) -> the key naming it; split None for the classifier
    for key, array in arrays.items():
        parts = _key_parts(key)
        roles = [index for index, part in enumerate(parts) if part in _ROLES]
        if not roles:
            unknown.append(key)
            continue
        index = roles[0]
        role, split, after = parts[index], ".".join(parts[:index]) or "train", \
            ".".join(parts[index + 1:])
        if role in ("weights", "bias"):
            if len(parts) > 1:
                raise ValueError(
                    f"{path}: key {key!r} names the classifier's {role} with other parts; a "
                    "file holds one classifier, read by every split, named 'weights' and "
                    f"'bias': rename it {role!r} (and leave out any other classifier)")
            slot = (None, role, None)
        elif role == "features":
            slot = (split, role, after or "features")
        elif after:
            raise ValueError(
                f"{path}: key {key!r} has parts after {role!r}; a split has one {role!r} "
                f"array, for all its layers, named '[split/]{role}': rename it "
                f"{'/'.join(parts[:index + 1])!r}")
        else:
            slot = (split, role, None)
        if slot in slots:
            raise ValueError(f"{path}: keys {slots[slot]!r} and {key!r} both name "
                             f"{_slot_name(*slot)}; keep one")
        slots[slot] = key
        split, _, layer = slot
        if split is None:
            classifier[role] = array
            continue
        entry = splits.setdefault(split, SplitArrays({}, None))
        if role == "features":
            entry.features[layer] = array
        elif role == "labels":
            entry.labels = array
        else:
            entry.clean_labels = array
    if not any(split.features for split in splits.values()):
        found = ", ".join(repr(key) for key in arrays) or "nothing"
        raise ValueError(f"{path}: found no features (keys: {found}); {_ARRAY_NAMES}")
    if unknown:  # a misspelt clean-labels or weights array would drop its metrics silently
        shown = ", ".join(repr(key) for key in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{path}: holds arrays ncfast does not read ({shown}); "
                         f"{_ARRAY_NAMES} (re-save the file without other arrays)")
    weights = classifier.get("weights")
    return CheckpointArrays(splits, weights, classifier.get("bias"),
                            _classifier_layer(path, splits, weights))


def _classifier_layer(path, splits, weights):
    """The one layer whose width equals the classifier's input width."""
    if weights is None:
        return None
    widths = {layer: array.shape[-1] for split in splits.values()
              for layer, array in split.features.items()}
    matching = sorted(layer for layer, width in widths.items()
                      if len(weights.shape) == 2 and width == weights.shape[1])
    if len(matching) != 1:
        raise ValueError(
            f"{os.fspath(path)}: weights of shape {weights.shape} match "
            f"{'no layer' if not matching else 'layers ' + ', '.join(matching)} (widths "
            f"{widths}); the classifier must read exactly one layer of width weights.shape[1]")
    return matching[0]
