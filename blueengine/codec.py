"""The wire codec between steps: a Python value becomes a list of ZeroMQ frames, and back.

Frame 0 is a msgpack document. Every other frame is a raw buffer that the document refers to
by index: the data of each numpy array, and each bytes-like value of `OUT_OF_BAND_MIN_BYTES` or
more (below that, copying into the document is cheaper than tracking another frame).

    >>> frames = encode({"image": np.zeros((480, 640, 3), np.uint8), "job": ("a", 1)})
    >>> len(frames)
    2
    >>> decode(frames)["job"]
    ('a', 1)

Values travel as exactly what they are. None, bool, int (any size), float, str, bytes,
bytearray, list, tuple, dict (keys of any encodable type), set, frozenset, numpy arrays of every
dtype but object (any shape and memory layout) and numpy scalars round-trip with their type. A
memoryview arrives as bytes. Anything else, subclasses of the types above included (an
OrderedDict, a namedtuple, an IntEnum), is refused with `CodecError`, or pickled when
``allow_pickle=True``. `decode` never unpickles unless its own ``allow_pickle`` is true, as
unpickling runs code chosen by the sender.

Memory ownership, which matters because neither side copies:

- `encode` returns views of the value's memory (arrays, large bytes), and ZeroMQ sending with
  ``copy=False`` reads them later from its I/O thread. Do not modify a value until it is sent.
- `decode` builds arrays with `np.frombuffer` over the frames. An array is writable exactly
  when its frame is: frames given as bytes (``recv_multipart(copy=True)``) give read-only
  arrays; call ``.copy()`` to modify one. The exceptions are copied, and so writable: arrays
  whose frame is not aligned for their dtype (small frames received over tcp with
  ``copy=False`` start at any offset of ZeroMQ's receive buffer), and large bytes and
  bytearrays, as those types own their memory.
- In pyzmq 27.3, ``zmq.Frame.buffer`` is always a writable memoryview, even over memory that
  is not: ``zmq.Frame(large_bytes).buffer[0] = 1`` changes the immutable bytes object. So
  arrays decoded from frames received with ``copy=False`` are writable. Over tcp and ipc the
  frame holds the receiver's own copy and writing is safe. Over inproc, frames of
  ``zmq.COPY_THRESHOLD`` (64 KiB) or more are the sender's memory itself: the decoded array is
  a writable view of the sender's array, even of a read-only one, and each side sees the
  other's writes.

Both functions keep no state between calls and are safe to call from any thread.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

import msgpack
import numpy as np
import numpy.typing as npt
import zmq
from numpy.lib.format import descr_to_dtype

from blueengine.errors import CodecError

Frame: TypeAlias = bytes | memoryview
"""One frame of an encoded message; ZeroMQ sends each as one message part."""

OUT_OF_BAND_MIN_BYTES: Final = 64 * 1024
"""Bytes-like values at least this large travel as their own frame instead of inline."""

# Ext type codes in the document. A code keeps its meaning forever: steps built from
# different versions of the SDK may share an engine.
_EXT_TUPLE: Final = 1
_EXT_SET: Final = 2
_EXT_FROZENSET: Final = 3
_EXT_BIG_INT: Final = 4
_EXT_BYTEARRAY: Final = 5
_EXT_BYTES_FRAME: Final = 6
_EXT_BYTEARRAY_FRAME: Final = 7
_EXT_ARRAY: Final = 8
_EXT_SCALAR: Final = 9
_EXT_PICKLE: Final = 10

# msgpack's default buffer is 256 KiB, and a nested pack (a tuple) holds two at once: the
# allocator then maps fresh pages on every call, which costs ~10 us. The buffer grows as needed.
_PACKER_BUF_BYTES: Final = 1024

# The containers and buffers that `_Encoder.hoist` may replace; msgpack packs these natively,
# so its `default` hook never sees them.
_HOISTED_TYPES: Final = frozenset({dict, list, bytes, bytearray, memoryview})

# Numpy dtype kinds whose values are plain bytes, safe to rebuild from a received buffer.
_RAW_KINDS: Final = "biufcmMSUV"

# Only the form `dtype.str` produces, so that numpy never parses arbitrary strings from the wire.
_DTYPE_STR: Final = re.compile(r"[<>|=][biufcmMSUV][0-9]+(\[[0-9a-zA-Z]+\])?")

# What msgpack, numpy and the decoders raise on input that was not produced by `encode`.
_MALFORMED: Final = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
    msgpack.UnpackException,
)

_PICKLE_ADVICE: Final = "pass allow_pickle=True to BlueEngine or send plain data"


def encode(obj: object, *, allow_pickle: bool = False) -> list[Frame]:
    """Encode a value as frames for ``send_multipart(frames, copy=False)``.

    Arrays and bytes-like values of `OUT_OF_BAND_MIN_BYTES` or more are not copied: their
    frames are views of the value's memory.

        >>> frames = encode({"boxes": np.zeros((4, 4), np.float32), "n": 4})
        >>> len(frames)  # the document, then the array's data
        2

    Raises `CodecError` when the value holds a type the codec cannot carry: object arrays and
    other Python objects need ``allow_pickle=True``.
    """
    encoder = _Encoder(allow_pickle)
    try:
        encoder.frames[0] = encoder.pack(obj)
    except (ValueError, TypeError, OverflowError, RecursionError, BufferError) as exc:
        # Cycles, nesting deeper than msgpack's 512 levels or Python's recursion limit, buffers
        # beyond msgpack's 4 GiB, and released memoryviews all end here.
        raise CodecError(f"cannot encode a value of type {_type_name(obj)!r}: {exc}") from exc
    return encoder.frames


def decode(
    frames: Sequence[bytes | memoryview | zmq.Frame], *, allow_pickle: bool = False
) -> object:
    """Decode the frames of one message made by `encode`.

    Arrays are views over the frames, not copies (see the module docstring for when they are
    writable).

        >>> decode(encode({"scores": (0.5, 0.25)}))
        {'scores': (0.5, 0.25)}

    Raises `CodecError` when the frames are not a message made by `encode`, or when it holds a
    pickled value and ``allow_pickle`` is false.
    """
    if not frames:
        raise CodecError("cannot decode a malformed message: it has no frames")
    decoder = _Decoder(frames, allow_pickle)
    first = frames[0]
    try:
        obj = decoder.unpack(first.buffer if isinstance(first, zmq.Frame) else first)
    except _MALFORMED as exc:
        raise CodecError(f"cannot decode a malformed message: {exc!r}") from exc
    decoder.check_frames_used()
    return obj


class _Encoder:
    """The state of one `encode` call: the frames its document refers to."""

    __slots__ = ("allow_pickle", "frames")

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        # Frame 0 is replaced by the document once everything it refers to is in place.
        self.frames: list[Frame] = [b""]

    def pack(self, obj: object) -> bytes:
        """Pack a value as msgpack; nested packs share this call's frames."""
        # A Packer costs ~0.1 us to build; one per call keeps encode free of shared state.
        packer = msgpack.Packer(  # type: ignore[call-arg]  # msgpack-types lacks buf_size
            default=self.ext,
            use_bin_type=True,
            strict_types=True,
            buf_size=_PACKER_BUF_BYTES,
        )
        return packer.pack(self.hoist(obj))

    def hoist(self, obj: object) -> object:
        """Replace large buffers, bytearrays and memoryviews by ext types; copy what changes."""
        if type(obj) is dict:
            return self._hoist_dict(obj)
        if type(obj) is list:
            return self._hoist_list(obj)
        if type(obj) is bytes or type(obj) is bytearray:
            return self._hoist_bytes(obj)
        if type(obj) is memoryview:
            return self._hoist_memoryview(obj)
        return obj

    def _hoist_dict(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        # Keys are left alone: a key cannot be a bytearray, and a huge bytes key is not worth
        # a check on every key of every message.
        hoisted = obj
        for key, value in obj.items():
            if type(value) in _HOISTED_TYPES:
                new = self.hoist(value)
                if new is not value:
                    if hoisted is obj:
                        hoisted = dict(obj)
                    hoisted[key] = new
        return hoisted

    def _hoist_list(self, obj: list[Any]) -> list[Any]:
        hoisted = obj
        for index, value in enumerate(obj):
            if type(value) in _HOISTED_TYPES:
                new = self.hoist(value)
                if new is not value:
                    if hoisted is obj:
                        hoisted = list(obj)
                    hoisted[index] = new
        return hoisted

    def _hoist_bytes(self, obj: bytes | bytearray) -> object:
        if len(obj) < OUT_OF_BAND_MIN_BYTES:
            return obj if type(obj) is bytes else msgpack.ExtType(_EXT_BYTEARRAY, bytes(obj))
        if type(obj) is bytes:
            return msgpack.ExtType(_EXT_BYTES_FRAME, self.add_frame(obj))
        return msgpack.ExtType(_EXT_BYTEARRAY_FRAME, self.add_frame(memoryview(obj)))

    def _hoist_memoryview(self, view: memoryview) -> object:
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return view.tobytes()
        frame = view.cast("B") if view.c_contiguous else view.tobytes()
        return msgpack.ExtType(_EXT_BYTES_FRAME, self.add_frame(frame))

    def add_frame(self, frame: Frame) -> bytes:
        """Append a frame; return its index, as the data of an ext type."""
        self.frames.append(frame)
        return (len(self.frames) - 1).to_bytes(4, "little")

    def ext(self, obj: object) -> msgpack.ExtType:
        """Encode what msgpack cannot pack itself (its `default` hook)."""
        if type(obj) is tuple:
            return msgpack.ExtType(_EXT_TUPLE, self.pack(list(obj)))
        if type(obj) is set:
            return msgpack.ExtType(_EXT_SET, self.pack(list(obj)))
        if type(obj) is frozenset:
            return msgpack.ExtType(_EXT_FROZENSET, self.pack(list(obj)))
        if type(obj) is int:
            # msgpack calls `default` for ints beyond the int64 and uint64 ranges.
            data = obj.to_bytes(obj.bit_length() // 8 + 1, "little", signed=True)
            return msgpack.ExtType(_EXT_BIG_INT, data)
        if type(obj) is np.ndarray and _is_raw_dtype(obj.dtype):
            return self._array(obj)
        if isinstance(obj, np.generic) and _is_raw_dtype(obj.dtype):
            return self._scalar(obj)
        return self._pickle(obj)

    def _array(self, array: npt.NDArray[Any]) -> msgpack.ExtType:
        # A Fortran-ordered array travels as its transpose, which is C-ordered: no copy.
        fortran = not array.flags.c_contiguous and array.flags.f_contiguous
        data = array.T if fortran else np.ascontiguousarray(array)
        index = self.add_frame(_raw_view(data))
        header = [_dtype_to_wire(array.dtype), list(array.shape), index, fortran]
        return msgpack.ExtType(_EXT_ARRAY, self.pack(header))

    def _scalar(self, scalar: np.generic) -> msgpack.ExtType:
        # An empty np.bytes_ has dtype 'S0' yet one byte of data; its 0-d array agrees on 'S1'.
        array = np.asarray(scalar)
        header = [_dtype_to_wire(array.dtype), array.tobytes()]
        return msgpack.ExtType(_EXT_SCALAR, self.pack(header))

    def _pickle(self, obj: object) -> msgpack.ExtType:
        name = _type_name(obj)
        if not self.allow_pickle:
            raise CodecError(
                f"cannot encode a value of type {name!r} without pickle; {_PICKLE_ADVICE}"
            )
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
            indices = [self.add_frame(buffer.raw()) for buffer in buffers]
        except Exception as exc:
            # Pickling runs the value's own __reduce__, which may raise anything.
            raise CodecError(f"cannot pickle a value of type {name!r}: {exc!r}") from exc
        return msgpack.ExtType(_EXT_PICKLE, self.pack([name, data, indices]))


class _Decoder:
    """The state of one `decode` call: its frames and how many the document used."""

    __slots__ = ("allow_pickle", "frames", "frames_used")

    def __init__(
        self, frames: Sequence[bytes | memoryview | zmq.Frame], allow_pickle: bool
    ) -> None:
        self.frames = frames
        self.allow_pickle = allow_pickle
        self.frames_used = 0

    def unpack(self, data: bytes | memoryview) -> Any:
        """Unpack a msgpack document whose ext types refer to this call's frames."""
        return msgpack.unpackb(data, ext_hook=self.ext, raw=False, strict_map_key=False)

    def ext(self, code: int, data: bytes) -> object:
        """Decode one ext type (msgpack's `ext_hook`)."""
        decoder = _EXT_DECODERS.get(code)
        if decoder is None:
            raise CodecError(f"cannot decode a malformed message: unknown ext type {code}")
        return decoder(self, data)

    def frame(self, ref: object) -> memoryview:
        """Return the frame that a reference made by `_Encoder.add_frame` names."""
        index = int.from_bytes(ref, "little") if type(ref) is bytes and len(ref) == 4 else -1
        if not 0 < index < len(self.frames):
            raise CodecError(
                f"cannot decode a malformed message: no frame {ref!r:.20} of {len(self.frames)}"
            )
        self.frames_used += 1
        frame = self.frames[index]
        return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)

    def check_frames_used(self) -> None:
        """Refuse frames the document does not refer to: a sign of a framing mistake."""
        if self.frames_used != len(self.frames) - 1:
            raise CodecError(
                f"cannot decode a malformed message: it has {len(self.frames)} frames but its "
                f"document refers to {self.frames_used} besides itself"
            )

    def items(self, data: bytes, length: int | None = None) -> list[Any]:
        """Unpack the list an ext type holds, checking its length when one is given."""
        items = self.unpack(data)
        if type(items) is not list or (length is not None and len(items) != length):
            raise CodecError(f"cannot decode a malformed message: bad ext data {data[:32]!r}")
        return items

    def _tuple(self, data: bytes) -> tuple[Any, ...]:
        return tuple(self.items(data))

    def _set(self, data: bytes) -> set[Any]:
        return set(self.items(data))

    def _frozenset(self, data: bytes) -> frozenset[Any]:
        return frozenset(self.items(data))

    def _big_int(self, data: bytes) -> int:
        return int.from_bytes(data, "little", signed=True)

    def _bytearray(self, data: bytes) -> bytearray:
        return bytearray(data)

    def _bytes_frame(self, data: bytes) -> bytes:
        return bytes(self.frame(data))

    def _bytearray_frame(self, data: bytes) -> bytearray:
        return bytearray(self.frame(data))

    def _array(self, data: bytes) -> npt.NDArray[Any]:
        descr, shape, index, fortran = self.items(data, 4)
        return _array_from_buffer(self.frame(index), _dtype_from_wire(descr), shape, fortran)

    def _scalar(self, data: bytes) -> object:
        descr, raw = self.items(data, 2)
        return _array_from_buffer(raw, _dtype_from_wire(descr), [], False)[()]

    def _pickle(self, data: bytes) -> object:
        name, pickled, indices = self.items(data, 3)
        if not self.allow_pickle:
            raise CodecError(
                f"refusing to unpickle a value of type {name!r}: unpickling runs code chosen by "
                "the sender; pass allow_pickle=True only when every sender is trusted"
            )
        buffers = [self.frame(index) for index in indices]
        try:
            return pickle.loads(pickled, buffers=buffers)
        except Exception as exc:
            # Unpickling runs the reduce functions named in the data, which may raise anything.
            raise CodecError(f"cannot unpickle a value of type {name!r}: {exc!r}") from exc


_EXT_DECODERS: Final[dict[int, Callable[[_Decoder, bytes], object]]] = {
    _EXT_TUPLE: _Decoder._tuple,
    _EXT_SET: _Decoder._set,
    _EXT_FROZENSET: _Decoder._frozenset,
    _EXT_BIG_INT: _Decoder._big_int,
    _EXT_BYTEARRAY: _Decoder._bytearray,
    _EXT_BYTES_FRAME: _Decoder._bytes_frame,
    _EXT_BYTEARRAY_FRAME: _Decoder._bytearray_frame,
    _EXT_ARRAY: _Decoder._array,
    _EXT_SCALAR: _Decoder._scalar,
    _EXT_PICKLE: _Decoder._pickle,
}


def _type_name(obj: object) -> str:
    """Name a value's type for a message; arrays and numpy scalars also name their dtype."""
    name = type(obj).__qualname__
    if isinstance(obj, np.ndarray | np.generic):
        return f"{name}[dtype={obj.dtype}]"
    return name


def _is_raw_dtype(dtype: np.dtype[Any]) -> bool:
    """Whether values of this dtype are plain bytes: no object pointers, no custom dtypes."""
    if dtype.fields is not None:
        return all(_is_raw_dtype(field[0]) for field in dtype.fields.values())
    if dtype.subdtype is not None:
        return _is_raw_dtype(dtype.subdtype[0])
    # isbuiltin is 2 for dtypes registered by other libraries, whose layout numpy cannot vouch for.
    return dtype.kind in _RAW_KINDS and dtype.isbuiltin != 2


def _dtype_to_wire(dtype: np.dtype[Any]) -> str | list[Any]:
    """Describe a dtype: its `str` (like '<f8' or '<M8[ns]'), or its fields' `descr`."""
    return dtype.descr if dtype.fields is not None else dtype.str


def _dtype_from_wire(descr: object) -> np.dtype[Any]:
    """Rebuild a dtype from `_dtype_to_wire`, refusing any that is not plain bytes."""
    _check_descr(descr)
    # numpy's stub for descr_to_dtype leaves out the str and nested forms that it accepts.
    dtype = descr_to_dtype(descr)  # type: ignore[arg-type]
    if not _is_raw_dtype(dtype):
        raise CodecError(f"refusing to build an array of dtype {dtype} from a received buffer")
    return dtype


def _check_descr(descr: object) -> None:
    """Check a wire dtype's shape before numpy parses it."""
    if isinstance(descr, str):
        if _DTYPE_STR.fullmatch(descr) is None:
            raise CodecError(f"cannot decode a malformed message: bad dtype {descr[:40]!r}")
        return
    if not isinstance(descr, list) or not descr:
        raise CodecError(f"cannot decode a malformed message: bad dtype {descr!r:.40}")
    for field in descr:
        if not isinstance(field, tuple) or len(field) not in (2, 3):
            raise CodecError(f"cannot decode a malformed message: bad dtype field {field!r:.40}")
        _check_descr(field[1])


def _raw_view(array: npt.NDArray[Any]) -> memoryview:
    """The bytes of a C-contiguous array, as a view of its memory."""
    if array.nbytes == 0:
        return memoryview(b"")
    # A uint8 view works for every dtype; memoryview(array) refuses datetimes, for one.
    return array.reshape(-1).view(np.uint8).data


def _array_from_buffer(
    buffer: bytes | memoryview, dtype: np.dtype[Any], shape: object, fortran: object
) -> npt.NDArray[Any]:
    """Build an array over a buffer, without copying unless misaligned; check sizes agree."""
    if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError(f"cannot decode a malformed message: bad array shape {shape!r:.40}")
    count = math.prod(shape)
    size = memoryview(buffer).nbytes
    if size != count * dtype.itemsize:
        raise CodecError(
            f"cannot decode a malformed message: {size} bytes for {shape} items of {dtype}"
        )
    if size == 0:
        return np.empty(shape, dtype)
    flat = np.frombuffer(buffer, dtype=dtype, count=count)
    if not flat.flags.aligned:
        # Small frames received over tcp sit at any offset of ZeroMQ's receive buffer, and many
        # C extensions mishandle unaligned arrays; copying a frame that small is cheap.
        flat = flat.copy()
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
