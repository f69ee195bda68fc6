"""Turn what callers hold into a re-iterable stream of validated chunks.

Accepted features: numpy arrays and ``np.memmap`` (any float dtype), paths of
``.npy`` files (memory-mapped, read chunk by chunk), torch CPU tensors (viewed
without a copy), and re-iterable sources of ``(features, labels)`` or
``(features, labels, clean_labels)`` chunks. Nothing here modifies an input:
chunks are views, or copies where a dtype or layout must change.
"""
import numbers
import os
import re
import stat
import sys
import zipfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ncfast.errors import CLEAN_LABEL, LABEL
from ncfast.kernels.cpu import largest_label, mark_labels

#: Feature dtypes the kernels read directly; other float dtypes are upcast per chunk.
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: Bytes of float32 rows per chunk that the automatic chunk size aims at (see
#: ``default_chunk_rows``).
CHUNK_TARGET_BYTES = 256 << 20

#: Characters of another library's error message that ncfast's messages quote at most.
QUOTED_MESSAGE_CHARS = 300

#: ``stat`` test -> what a path that is not a regular file is.
_SPECIAL_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"))


class LabelSummary(NamedTuple):
    """What C is inferred from (``label_summary`` of a source; ``engine.resolve_num_classes``).

    Attributes
    ----------
    max_label : int
        The largest label or clean label.
    max_row : int
        Index (in the whole input) of the first row holding it.
    max_kind : str
        ``ncfast.errors.LABEL``, or ``CLEAN_LABEL`` when only a clean label holds it.
    labelled : int
        Distinct non-negative values among the labels and clean labels.
    """

    max_label: int
    max_row: int
    max_kind: str
    labelled: int


@dataclass(frozen=True)
class Chunk:
    """One validated block of rows.

    Attributes
    ----------
    features : float32 or float64 array of shape (n, D), C-contiguous
    labels : int64 array of shape (n,)
    clean_labels : int64 array of shape (n,), or None
    offset : int
        Index of the chunk's first row in the whole input, to name bad rows.
    """

    features: np.ndarray
    labels: np.ndarray
    clean_labels: np.ndarray | None
    offset: int


def default_chunk_rows(num_features, target_bytes=CHUNK_TARGET_BYTES):
    """Rows per chunk so that a chunk of float32 rows is about ``target_bytes``.

    The kernels stream a chunk in cache-sized blocks with buffers of their
    own (``ncfast.kernels.cpu.block_rows``), so a chunk sets how often Python
    hands rows to the kernel threads, and the scratch memory of a chunk that
    must be copied (upcast float16, strided rows). Each chunk ends with the
    threads waiting for one another and for Python (every chunk is added all
    or nothing): with chunks of 64 MiB that cost 8–10% of ``collapse`` on 1e6
    × 512 rows of 10 classes (0.45–0.46 s against 0.41–0.44 s at 256 MiB), 4%
    at 1e5 × 2048 × 1000 (1.90–1.97 s against 1.84–1.86 s) and 2–5% at 1e6 ×
    768 × 1000, on the 2-core development machine.

    Parameters
    ----------
    num_features : int
    target_bytes : int
        ``CHUNK_TARGET_BYTES`` by default.

    Returns
    -------
    int
        Between 256 and 2^20 rows.
    """
    return int(np.clip(target_bytes // (4 * max(num_features, 1)), 256, 1 << 20))


def is_torch_tensor(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def plain_tensor(tensor, what):
    """A torch tensor as dense values numpy can view: detached, with any lazy negation or
    conjugation applied; a sparse, nested (or other non-strided) tensor, or one on the meta
    device, is refused."""
    if tensor.is_nested:
        raise TypeError(f"{what} is a nested torch tensor; pass one dense tensor "
                        "(torch.cat of its parts, or tensor.to_padded_tensor)")
    if tensor.device.type == "meta":
        raise ValueError(f"{what} is a torch tensor on the meta device, which holds no values; "
                         "pass a tensor with data")
    if tensor.layout != sys.modules["torch"].strided:
        raise TypeError(f"{what} is a {tensor.layout} torch tensor; pass dense values "
                        "(tensor.to_dense())")
    return tensor.detach().resolve_conj().resolve_neg()


def file_problem(path):
    """Why ``path`` cannot be read as a file of arrays, or None when it is a non-empty regular
    file (symbolic links are followed).

    Checked before opening: opening a named pipe blocks until something writes to it, and a
    device can be read forever. A path that cannot be examined gives None: opening it then
    reports the system's error.

    Returns
    -------
    str or None
        A phrase to follow the file's name: ``"is a named pipe (FIFO), not a regular file;
        ..."``, saying how to fix it.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(status.st_mode):
        return "is a directory, not a file; pass one of the files in it"
    if not stat.S_ISREG(status.st_mode):
        kind = next((kind for is_kind, kind in _SPECIAL_FILE_KINDS if is_kind(status.st_mode)),
                    "a special file")
        return (f"is {kind}, not a regular file, and reading it could wait forever; write the "
                "arrays to a file and pass that")
    if status.st_size == 0:
        return "is empty (0 bytes): it was not written, or not completely; write it again"
    return None


#: Terminal escape sequences and other control characters, which ``one_line`` drops.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x1f\x7f]")


def one_line(message):
    """A message (or an error) on one line of plain text: terminal escapes and control
    characters become spaces, runs of whitespace one space (third-party messages span
    lines and carry colour codes)."""
    return " ".join(_CONTROL.sub(" ", str(message)).split())


def plain_markup(message):
    """``message`` as one line of plain text (``one_line``) that rich prints as it is: paths
    in it may hold newlines, terminal escapes or square brackets, which rich would read as
    markup."""
    from rich.markup import escape

    return escape(one_line(message))


def tell(errors, message, *, style=None):
    """Print a command's message on ``errors`` (a rich console on stderr) as one line of
    plain text (``plain_markup``), in the rich ``style`` given ("red" for errors)."""
    text = plain_markup(message)
    errors.print(f"[{style}]{text}[/{style}]" if style else text, highlight=False,
                 soft_wrap=True)


def printable_line(message):
    """Another library's error message as one line of printable ASCII text.

    ``one_line``, with other characters escaped (``\\xd8``: a damaged file's bytes echoed
    in the message), and a message longer than ``QUOTED_MESSAGE_CHARS`` cut.
    """
    text = one_line(message).encode("ascii", "backslashreplace").decode("ascii")
    if len(text) > QUOTED_MESSAGE_CHARS:
        text = text[:QUOTED_MESSAGE_CHARS - 3] + "..."
    return text


#: What a ``.npy`` header too large for numpy to read safely means (after the file's name).
LARGE_NPY_HEADER = ("has a .npy header larger than numpy reads without trusting the file (its "
                    "max_header_size): numpy.save writes small headers, so the file is damaged "
                    "or was made otherwise; re-save the array with numpy.save")


def is_large_npy_header(error):
    """Whether ``error`` is numpy's refusal of a ``.npy`` header beyond its ``max_header_size``
    (whose advice, to load with ``allow_pickle=True``, would let a file run code)."""
    return isinstance(error, ValueError) and "max_header_size" in str(error)


def _load_npy(path, what):
    """Memory-map a ``.npy`` file, turning every failure into a clear ValueError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{what} file {path!r} does not exist")
    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"{what} file {path!r} {problem}")
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        if is_large_npy_header(error):
            raise ValueError(f"{what} file {path!r} {LARGE_NPY_HEADER}") from None
        if "pickle" in str(error) or "Python objects" in str(error):
            # Not numpy's advice to load it unsafely: a pickle can run code.
            raise ValueError(
                f"{what} file {path!r} is not a numeric .npy array (it holds pickled Python "
                "objects, or is not a .npy file at all); ncfast does not unpickle files: save "
                "the array with numpy.save as numbers") from None
        raise ValueError(
            f"{what} file {path!r} is not a readable .npy array file "
            f"({printable_line(error)}); it may be truncated, corrupt or of another format: "
            "re-save it with numpy.save"
        ) from None
    if not isinstance(loaded, np.ndarray):
        members = loaded.files
        loaded.close()
        found = (f"{what} file {path!r} is a .npz archive of arrays ({', '.join(members)}), "
                 "not one .npy array")
        if not members:
            raise ValueError(f"{what} file {path!r} is an empty .npz archive (no arrays); save "
                             "the array with numpy.save")
        member = what if what in members else members[0]
        if not path.lower().endswith(".npz"):
            raise ValueError(
                f"{found}: rename it with the .npz suffix, which `ncfast analyze` reads, or, in "
                f"Python, pass one of its arrays: np.load(path)[{member!r}]")
        raise ValueError(
            f"{found}; in Python, ncfast takes the path of a .npy file or an array: pass one of "
            f"its arrays, np.load(path)[{member!r}], or read the archive with `ncfast analyze`")
    return loaded


def as_array(obj, what):
    """A numpy (or torch) view of ``obj`` without copying its data.

    Parameters
    ----------
    obj : array-like, path of a ``.npy`` file, or torch CPU tensor
    what : str
        Name used in error messages ("features", "labels", ...).
    """
    if isinstance(obj, (str, os.PathLike)):
        return _load_npy(obj, what)
    if isinstance(obj, (bytes, bytearray)):
        raise TypeError(f"{what} is {type(obj).__name__}; ncfast takes no bytes: pass a path as "
                        "a str or pathlib.Path (path.decode()), or an array")
    if is_torch_tensor(obj):
        tensor = plain_tensor(obj, what)  # refuses the meta device, which .cpu() cannot leave
        if tensor.device.type != "cpu":
            raise ValueError(
                f"{what} is a torch tensor on {tensor.device}; the CPU backend needs host "
                "memory: move it with .cpu()"
            )
        return tensor
    if isinstance(obj, np.ma.MaskedArray):
        if np.ma.is_masked(obj):
            raise ValueError(
                f"{what} is a masked array with {int(np.ma.count_masked(obj))} masked entries; "
                "ncfast reads every value: drop the masked rows, or fill them "
                "(array.filled(value)), and pass a plain array")
        return obj.data
    if isinstance(obj, np.ndarray):
        return obj
    try:
        array = np.asarray(obj)
    except ValueError as error:
        if "setting an array element with a sequence" not in str(error):
            raise
        raise _ragged_error(obj, what) from None
    if array.dtype == object:
        raise TypeError(f"{what} must be an array of numbers; found {type(obj).__name__}")
    return array


def _ragged_error(obj, what):
    """The ValueError for a nested sequence whose items numpy cannot stack into one array:
    rows of different lengths, or ``(features, labels)`` chunk tuples passed as features."""
    first = obj[0] if isinstance(obj, (list, tuple)) and obj else None
    if what == "features" and isinstance(first, tuple) and len(first) in (2, 3) and \
            hasattr(first[0], "__len__"):
        return ValueError(
            f"features is a {type(obj).__name__} of (features, labels) chunk tuples, and labels "
            "were passed too; a chunk source carries its labels in its tuples: pass "
            "labels=None, and num_classes=")
    return ValueError(
        f"{what} is a ragged nested {type(obj).__name__}: its rows have different lengths, so "
        "it is not an array; pass a rectangular array, every row of the same length")


def numpy_view(tensor, what):
    """A torch CPU tensor as a numpy array, checked as ``as_array`` checks it, for libraries
    that cannot read tensors (Dask): a view without a copy, except of bfloat16, which numpy
    lacks (copied to float32, as ``to_kernel_features`` copies each chunk of it)."""
    tensor = as_array(tensor, what)
    if tensor.dtype == sys.modules["torch"].bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def host_array(obj, what):
    """A small array (weights, bias, means) as numpy, copied off torch if need be."""
    if is_torch_tensor(obj):
        obj = plain_tensor(obj, what).cpu()
        return (obj.double() if obj.is_floating_point() else obj).numpy()
    return as_array(obj, what)


def _dtype_name(array):
    return str(array.dtype).replace("torch.", "")


def check_features(features, *, allow_empty=False):
    """Check rank and dtype of a feature array (numpy or torch); return (N, D).

    Zero rows are an error unless ``allow_empty`` (one empty chunk of many).
    """
    shape = tuple(features.shape)
    if len(shape) != 2:
        if len(shape) == 0:
            hint = ("a single value, not rows of features; pass an array of shape (n_samples, "
                    "n_features) or the path of a .npy file holding one")
        elif len(shape) == 1:
            hint = ("if each row has one feature use features[:, None]; if it is one sample use "
                    "features[None, :]")
        else:
            hint = "flatten the trailing axes with features.reshape(len(features), -1)"
        raise ValueError(
            f"features must be 2-D (n_samples, n_features); found {len(shape)}-D with shape "
            f"{shape}: {hint}"
        )
    if is_torch_tensor(features):
        floating = features.is_floating_point()
    else:
        floating = np.issubdtype(features.dtype, np.floating)
    if not floating:
        raise TypeError(
            f"features must be floating point; found dtype {_dtype_name(features)}: convert with "
            ".astype(np.float32)"
        )
    if shape[0] == 0 and not allow_empty:
        raise ValueError(f"features has no rows (shape {shape}); pass at least one row per class")
    if shape[1] == 0:
        raise ValueError(f"features has no columns (shape {shape})")
    return shape


def holds_class_indices(labels):
    """Whether a 1-D numpy array or torch tensor of labels has an integer dtype, or holds no
    label at all (``np.asarray([])`` is float64, and no label is no wrong class)."""
    if len(labels) == 0:
        return True
    if is_torch_tensor(labels):
        return not labels.is_floating_point() and not labels.is_complex() and \
            labels.dtype != sys.modules["torch"].bool
    return np.issubdtype(labels.dtype, np.integer)


def check_labels(labels, num_rows, what="labels"):
    """Check rank, dtype and length of a label array; return it unchanged."""
    shape = tuple(labels.shape)
    if len(shape) != 1:
        raise ValueError(f"{what} must be 1-D (n_samples,); found shape {shape}")
    if not holds_class_indices(labels):
        raise TypeError(
            f"{what} must be integer class indices; found dtype {_dtype_name(labels)}: convert "
            "with .astype(np.int64) (one-hot labels: labels.argmax(axis=1))"
        )
    if shape[0] != num_rows:
        raise ValueError(
            f"{what} has {shape[0]} entries but features has {num_rows} rows; pass one label "
            "per feature row"
        )
    return labels


def to_kernel_features(block):
    """A C-contiguous float32/float64 numpy array of the rows in ``block``."""
    if is_torch_tensor(block):
        torch = sys.modules["torch"]
        if block.dtype not in (torch.float32, torch.float64):
            block = block.float()
        block = block.numpy()
    block = np.asarray(block)  # drops the np.memmap subclass, no copy
    if block.dtype not in KERNEL_DTYPES or not block.dtype.isnative:
        block = block.astype(np.float32 if block.dtype.itemsize <= 4 else np.float64)
    return np.ascontiguousarray(block)


def to_kernel_labels(block, what="labels", row_offset=0):
    """An int64 numpy array of the labels in ``block``.

    ``row_offset`` is the index of the block's first row in the whole input,
    for naming a bad row.
    """
    if is_torch_tensor(block):
        block = block.numpy()
    block = np.asarray(block)
    if block.dtype.kind == "u" and block.dtype.itemsize == 8 and block.size and \
            block.max() > np.iinfo(np.int64).max:  # either byte order
        row = int(np.argmax(block > np.iinfo(np.int64).max))
        name = what.replace("_", " ").removesuffix("s")
        raise ValueError(f"row {row_offset + row} has {name} {block[row]}, beyond any class "
                         "index: labels must be class indices in [0, num_classes)")
    return np.ascontiguousarray(block, dtype=np.int64)


class ArraySource:
    """Chunks of in-memory or memory-mapped arrays, re-iterable.

    ``row_offset`` is the index of the arrays' first row in the whole input
    (when they are one part of a chunk source): chunk offsets and error
    messages count from it.
    """

    def __init__(self, features, labels, clean_labels=None, *, chunk_size=None,
                 allow_empty=False, row_offset=0):
        self.row_offset = row_offset
        self.features = as_array(features, "features")
        self.num_rows, self.num_features = check_features(self.features, allow_empty=allow_empty)
        self.labels = check_labels(as_array(labels, "labels"), self.num_rows)
        self.clean_labels = None
        if clean_labels is not None:
            self.clean_labels = check_labels(
                as_array(clean_labels, "clean_labels"), self.num_rows, "clean_labels")
        self.chunk_size = check_chunk_size(chunk_size, self.num_features)

    def _label_blocks(self):
        """``(kind, offset, int64 labels)`` blocks of the labels and clean labels, 4M at a
        time (``kind``: ``ncfast.errors.LABEL`` or ``CLEAN_LABEL``)."""
        for array, what, kind in ((self.labels, "labels", LABEL),
                                  (self.clean_labels, "clean_labels", CLEAN_LABEL)):
            for start in range(0, 0 if array is None else self.num_rows, 1 << 22):
                yield kind, start, to_kernel_labels(array[start:start + (1 << 22)], what,
                                                    self.row_offset + start)

    def label_summary(self):
        """The largest label (and clean label), its first row, and how many classes have rows.

        Read in blocks by compiled loops (1e6 labels out of cache: 6.6 ms,
        against 9.8 ms with numpy's max, argmax, mask and copy): the
        classes with rows are counted in memory O(number of rows), never
        O(largest label), so that one stray huge label cannot allocate
        per-class arrays of its size.

        Returns
        -------
        LabelSummary
        """
        max_label, max_row, max_kind = -1, 0, LABEL
        for kind, start, block in self._label_blocks():
            block_max, block_row = largest_label(block)
            if block_max > max_label:
                max_label, max_row, max_kind = block_max, self.row_offset + start + block_row, kind
        if max_label + 1 <= 4 * max(self.num_rows, 1 << 16):
            seen = np.zeros(max_label + 1, bool)
            for _, _, block in self._label_blocks():
                mark_labels(block, seen)
            return LabelSummary(max_label, max_row, max_kind, int(seen.sum()))
        distinct = np.zeros(0, np.int64)
        for _, _, block in self._label_blocks():
            distinct = np.union1d(distinct, block[block >= 0])
        return LabelSummary(max_label, max_row, max_kind, int(distinct.size))

    def __iter__(self):
        for start in range(0, self.num_rows, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_rows)
            offset = self.row_offset + start
            clean = None
            if self.clean_labels is not None:
                clean = to_kernel_labels(self.clean_labels[start:stop], "clean_labels", offset)
            yield Chunk(to_kernel_features(self.features[start:stop]),
                        to_kernel_labels(self.labels[start:stop], row_offset=offset), clean, offset)


class IterableSource:
    """Chunks from a re-iterable of ``(features, labels[, clean_labels])`` tuples.

    Chunks are re-split to ``chunk_size`` rows when they are larger.
    """

    def __init__(self, chunks, *, chunk_size=None):
        if iter(chunks) is chunks:
            raise TypeError(
                "the chunk source is a one-shot iterator (e.g. a generator), but ncfast reads "
                "the data twice; pass a re-iterable such as a list, or an object whose "
                "__iter__ returns a fresh iterator"
            )
        self.chunks = chunks
        # Checked before any chunk is read; None is chosen per chunk, from its width.
        self.chunk_size = None if chunk_size is None else check_chunk_size(chunk_size, None)
        self.num_features = None

    @property
    def rereads(self):
        """Whether iterating again may yield other rows: not for a list or tuple of
        chunks, which holds the same arrays each time."""
        return not isinstance(self.chunks, (list, tuple))

    def __iter__(self):
        offset = 0
        for index, item in enumerate(self.chunks):
            if index == 0 and _is_row_of_numbers(item):
                raise TypeError(
                    f"labels is required: features is a {type(self.chunks).__name__} of rows of "
                    "numbers, not of (features, labels) chunk tuples; pass labels= with one "
                    "class index per row")
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(
                    f"chunk {index} of the source is a {type(item).__name__}; each chunk must be "
                    "a tuple (features, labels) or (features, labels, clean_labels)"
                )
            try:
                source = ArraySource(*item, chunk_size=self.chunk_size, allow_empty=True,
                                     row_offset=offset)
            except (TypeError, ValueError) as error:
                kind = TypeError if isinstance(error, TypeError) else ValueError
                raise kind(f"chunk {index}: {error}") from None
            has_clean_labels = source.clean_labels is not None  # (x, y, None) has none
            if index == 0:
                self.num_features = source.num_features
                carries_clean_labels = has_clean_labels
            elif source.num_features != self.num_features:
                raise ValueError(
                    f"chunk {index} has {source.num_features} features but earlier chunks have "
                    f"{self.num_features}; every chunk must have the same number of columns"
                )
            if has_clean_labels != carries_clean_labels:
                raise ValueError(
                    f"chunk {index} {'has' if has_clean_labels else 'lacks'} clean labels but "
                    f"chunk 0 {'has' if carries_clean_labels else 'lacks'} them; every chunk "
                    "must be (features, labels) or every chunk (features, labels, clean_labels)"
                )
            yield from source
            offset += source.num_rows


def _is_row_of_numbers(item):
    """Whether an item of a chunk source is a row of numbers (rows of features passed
    without labels: a sequence of numbers, or a 1-D array or tensor) rather than a chunk
    tuple."""
    if getattr(item, "ndim", None) == 1:
        return True
    return isinstance(item, (tuple, list)) and len(item) > 0 and \
        all(isinstance(value, numbers.Number) for value in item)


def check_chunk_size(chunk_size, num_features):
    """Validate a user chunk size, or choose one from the row width."""
    if chunk_size is None:
        return default_chunk_rows(num_features)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be a positive int or None; found {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; found {chunk_size}")
    return int(chunk_size)


def is_chunk_source(features, labels):
    """True when ``features`` is a re-iterable of chunks rather than an array."""
    if labels is not None:
        return False
    if isinstance(features, (str, os.PathLike, np.ndarray)) or is_torch_tensor(features):
        return False
    return hasattr(features, "__iter__")


def num_features_of(source):
    """Columns of a source's rows; a chunk source is peeked at (its first chunk read)."""
    if source.num_features is None:
        next(iter(source), None)
    if source.num_features is None:
        raise ValueError("the chunk source yielded no chunks; pass at least one row per class")
    return source.num_features


def carries_clean_labels(source):
    """True when a chunk source's chunks are ``(features, labels, clean_labels)``."""
    if not isinstance(source, IterableSource):
        return False
    first = next(iter(source), None)
    return first is not None and first.clean_labels is not None


def as_source(features, labels, clean_labels=None, *, chunk_size=None):
    """The chunk stream for ``collapse``'s inputs."""
    if is_chunk_source(features, labels):
        if clean_labels is not None:
            raise ValueError("with a chunk source, pass clean labels inside each chunk tuple")
        return IterableSource(features, chunk_size=chunk_size)
    if labels is None:
        raise TypeError("labels is required unless features is a re-iterable of chunks")
    return ArraySource(features, labels, clean_labels, chunk_size=chunk_size)
