"""Model weights inside Flower's records, in the two forms they travel in.

- **npy** (Flower's ``SType.NUMPY``: each array an ``np.save`` payload): what Flower's own code
  writes and reads, and what crosses a real federation's wire (``fl/deploy.py``). Written here
  with one copy per tensor (``npy_record``), read without any (``view``).
- **raw** (``RAW``, a ``RawArray``): the array's own memory, no header and no copy. Inside a
  simulation the weights travel this way: Ray moves a raw array's buffer through its object store
  out of band (``fl/backend.py``), so a client maps the round's global weights read-only where the
  driver put them once, and the driver reads a client's reply where the client's process wrote
  it. ``RawArray.numpy()`` is that view, so Flower's strategies aggregate from it unchanged.

A client replies in the form its global weights came in (``like``): raw to our backend, npy to
anything else (a real SuperLink, a test that builds messages by hand). The bytes of the two forms'
arrays are the same, so a run's metrics and weights do not depend on the form.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

RAW = "cxrfl.raw"


class RawArray(Array):
    """An ``Array`` whose ``data`` is the array's memory (a flat uint8 numpy buffer: the source
    array itself, or a read-only map of Ray's object store). A raw reply built from a model's
    tensors shares their memory until it is serialised (our backend does that when the actor
    returns, before the model trains again)."""

    def __init__(self, ndarray: np.ndarray) -> None:  # pylint: disable=super-init-not-called
        arr = _contiguous(ndarray)
        self.__dict__.update(dtype=str(arr.dtype), shape=tuple(int(s) for s in arr.shape), stype=RAW,
                             data=arr.reshape(-1).view(np.uint8))

    @classmethod
    def from_parts(cls, dtype: str, shape: tuple, data: np.ndarray) -> "RawArray":
        """A raw array over ``data`` as it is (what Ray hands back: a map of its object store)."""
        out = cls.__new__(cls)
        out.__dict__.update(dtype=dtype, shape=tuple(shape), stype=RAW, data=data)
        return out

    def numpy(self) -> np.ndarray:
        """The array, read-only, without a copy (Flower's ``Array.numpy`` is ``np.load``, a copy)."""
        out = np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)
        out.flags.writeable = False
        return out

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Array) and (self.dtype, tuple(self.shape)) == (other.dtype, tuple(other.shape))
                and np.array_equal(view(self), view(other)))

    __hash__ = None  # type: ignore[assignment]


def view(array: Array) -> np.ndarray:
    """The array in either form, read-only and without copying it."""
    if isinstance(array, RawArray):
        return array.numpy()
    if array.stype != SType.NUMPY:
        return array.numpy()
    data = array.data
    size = 10 + int.from_bytes(bytes(data[8:10]), "little") if bytes(data[6:8]) == b"\x01\x00" else 4096
    shape, fortran, dtype, offset = _npy_header(bytes(data[:size]))
    flat = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=8192)
def _npy_header(head: bytes) -> tuple:
    """(shape, fortran order, dtype, data offset) of an npy header: parsing one takes ~50 us
    (``ast.literal_eval``), and a model's headers are the same every round (320 for ResNet50)."""
    stream = io.BytesIO(head)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return shape, fortran, dtype, stream.tell()


def views(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: view(v) for k, v in record.items()}


def torch_views(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record as CPU tensors over its memory (``to_torch_state_dict`` without its copies);
    read-only: copy one (``load_state_dict`` does) before changing it."""
    with warnings.catch_warnings():  # torch warns that the views are read-only; they are only read
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) for k, v in views(record).items()}


def _contiguous(arr: np.ndarray) -> np.ndarray:
    """C order, copied only if needed (``np.ascontiguousarray`` would turn a 0-d array into 1-d)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _cpu_numpy(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    return tensor if isinstance(tensor, np.ndarray) else tensor.detach().cpu().numpy()


def wire_size(array: Array) -> int:
    """Bytes of the array in Flower's npy form, whichever form it is in here (what a real
    federation's wire carries, so simulated traffic does not depend on the simulation's transport)."""
    if not isinstance(array, RawArray):
        return len(array.data)
    return _npy_header_size(array.dtype, tuple(array.shape)) + len(array.data)


@functools.lru_cache(maxsize=8192)
def _npy_header_size(dtype: str, shape: tuple) -> int:
    """Bytes of the npy header of a C-order array (counted for every array of every message)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                   "fortran_order": False, "shape": shape})
    return len(header.getvalue())


def npy_array(tensor: torch.Tensor | np.ndarray) -> Array:
    """``Array(tensor)`` byte for byte, with one copy: Flower's ``np.save`` into a BytesIO copies
    each tensor three times (60 ms of a ResNet50 message)."""
    arr = _contiguous(_cpu_numpy(tensor))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    data = b"".join([header.getvalue(), arr.reshape(-1).view(np.uint8).data])
    return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype=SType.NUMPY, data=data)


def record_of(arrays: dict[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these very ``Array`` objects: ``ArrayRecord(dict)`` rebuilds
    each as a plain ``Array``, which would turn a raw array into one nobody can read."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def npy_record(tensors: dict) -> ArrayRecord:
    """``ArrayRecord(tensors)`` byte for byte (Flower's form), one copy per tensor."""
    return record_of({k: npy_array(v) for k, v in tensors.items()})


def raw_record(tensors: dict) -> ArrayRecord:
    """The tensors as raw arrays over their own memory (a GPU tensor is copied to the CPU once)."""
    return record_of({k: RawArray(_cpu_numpy(v)) for k, v in tensors.items()})


def is_raw(record: ArrayRecord) -> bool:
    return any(isinstance(v, RawArray) for v in record.values())


def record_like(tensors: dict, like: ArrayRecord) -> ArrayRecord:
    """The tensors in the form ``like`` came in (a client's reply to its global weights)."""
    return raw_record(tensors) if is_raw(like) else npy_record(tensors)


ALIGN = 64  # each array's offset in a packed buffer: aligned for any dtype and for vector loads

Index = list[tuple[str, str, tuple, int]]  # (name, dtype, shape, byte offset) of each array in a buffer


def layout(arrays: Iterable[tuple[str, str, tuple]]) -> tuple[Index, int]:
    """Where ``pack`` puts arrays of these (name, dtype, shape): their index and the buffer's size."""
    index, offset = [], 0
    for key, dtype, shape in arrays:
        index.append((key, str(dtype), tuple(shape), offset))
        offset += -(-nbytes(dtype, shape) // ALIGN) * ALIGN
    return index, offset


def nbytes(dtype: str, shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def pack(record: ArrayRecord) -> tuple[Index, np.ndarray]:
    """The record's arrays in one buffer, with (name, dtype, shape, offset) of each: the buffer they
    already lie in (``packed``: a reply over a model's flat weights, an average), else a copy.

    Ray moves one large buffer at memory speed, but handles every out-of-band buffer of an object
    on its own: a ResNet50 record as 320 buffers took 45-120 ms to put where the same bytes as one
    buffer took 8-14 ms (2 cores). One copy here buys that back."""
    already = packed(record)
    if already is not None:
        return already
    arrays = [(key, view(value)) for key, value in record.items()]
    index, size = layout((key, arr.dtype, arr.shape) for key, arr in arrays)
    buffer = np.empty(size, dtype=np.uint8)
    ends = [start for _, _, _, start in index[1:]] + [size]
    for (_, _, _, start), (_, arr), end in zip(index, arrays, ends):
        buffer[start:start + arr.nbytes] = _contiguous(arr).reshape(-1).view(np.uint8)
        buffer[start + arr.nbytes:end] = 0  # the padding too: the bytes stored are the same every run
    return index, buffer


_PACKED = "_cxrfl_packed"  # an unpacked record remembers its buffer (as long as it holds the same arrays)


def unpack(index: Index, buffer: np.ndarray) -> ArrayRecord:
    """The record of raw arrays over one buffer (``pack``'s layout), each a view of its part."""
    out = {key: RawArray.from_parts(dtype, shape, buffer[start:start + nbytes(dtype, shape)])
           for key, dtype, shape, start in index}
    record = record_of(out)
    record.__dict__[_PACKED] = (index, buffer, list(out.values()))
    return record


def packed(record: ArrayRecord) -> tuple[Index, np.ndarray] | None:
    """(index, buffer) of a record built over one buffer by ``unpack`` and still holding exactly
    those arrays, else None."""
    hint = record.__dict__.get(_PACKED)
    if hint is None:
        return None
    index, buffer, arrays = hint
    if len(record) != len(index) or any(record.get(key) is not array
                                         for (key, *_), array in zip(index, arrays)):
        return None
    return index, buffer


def as_raw(record: ArrayRecord) -> ArrayRecord:
    """The same arrays as raw arrays over the record's own bytes (no copy)."""
    if all(isinstance(v, RawArray) for v in record.values()):
        return record
    return record_of({k: v if isinstance(v, RawArray) else RawArray(view(v)) for k, v in record.items()})
