"""Round trips through the wire codec, its refusals, and decoding over a real ZeroMQ socket."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from blueengine.codec import OUT_OF_BAND_MIN_BYTES, decode, encode
from blueengine.errors import CodecError

FAST = settings(max_examples=100, deadline=None)

DTYPES = st.one_of(
    hnp.scalar_dtypes(),
    st.sampled_from([np.dtype(np.longdouble), np.dtype(np.clongdouble)]).map(
        lambda dtype: dtype.newbyteorder(">")
    ),
    st.sampled_from([np.dtype(np.longdouble), np.dtype(np.clongdouble)]),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
    hnp.array_dtypes(allow_subarrays=True),
    hnp.nested_dtypes(),
)

SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)

HASHABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=6,
)

PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**100), max_value=2**100)
    | st.floats()
    | st.text()
    | st.binary()
    | st.binary().map(bytearray),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(HASHABLE, inner, max_size=4)
    ),
    max_leaves=20,
)


def assert_same_array(got: object, want: np.ndarray[Any, Any]) -> None:
    """Check type, dtype, shape, and every bit (NaN payloads, -0.0, struct padding)."""
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    if want.dtype.fields is None:
        np.testing.assert_array_equal(got, want, strict=True)


def assert_same(got: object, want: object) -> None:
    """Check equality and the exact type at every level: a tuple stays a tuple, 1 stays 1."""
    assert type(got) is type(want)
    if isinstance(want, np.ndarray):
        assert_same_array(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict)
        for (got_key, got_value), (key, value) in zip(got.items(), want.items(), strict=True):
            assert_same(got_key, key)
            assert_same(got_value, value)
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple)
        for got_item, item in zip(got, want, strict=True):
            assert_same(got_item, item)
    else:
        # repr tells 0.0 from -0.0 and NaN from NaN, which == cannot.
        assert repr(got) == repr(want)


@FAST
@given(hnp.arrays(DTYPES, SHAPES))
def test_arrays_of_every_dtype_and_shape_round_trip(array: np.ndarray[Any, Any]) -> None:
    frames = encode(array)

    assert len(frames) == 2
    assert_same_array(decode(frames), array)


@FAST
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=6)))
def test_non_contiguous_arrays_round_trip(array: np.ndarray[Any, Any]) -> None:
    view = array[::2, ::-1]

    assert_same_array(decode(encode(view)), view)


@FAST
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=6)))
def test_fortran_arrays_keep_their_values_and_order(array: np.ndarray[Any, Any]) -> None:
    fortran = np.asfortranarray(array)

    got = decode(encode(fortran))

    assert_same_array(got, fortran)
    assert isinstance(got, np.ndarray) and got.flags.f_contiguous


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
@pytest.mark.parametrize("dtype", ["f8", ">i2", "S3", "<U2", "M8[ms]", "f4,i1"])
def test_zero_size_arrays_round_trip(shape: tuple[int, ...], dtype: str) -> None:
    array = np.zeros(shape, dtype)

    assert_same_array(decode(encode(array)), array)


def test_zero_dimensional_array_stays_an_array() -> None:
    array = np.array(2.5, dtype=np.float32)

    got = decode(encode(array))

    assert_same_array(got, array)
    assert isinstance(got, np.ndarray) and got.ndim == 0


def test_array_data_is_neither_copied_by_encode_nor_by_decode() -> None:
    array = np.arange(1000, dtype=np.int64).reshape(10, 100)

    frames = encode(array)
    got = decode(frames)

    assert np.shares_memory(np.asarray(frames[1]), array)
    assert isinstance(got, np.ndarray) and np.shares_memory(got, array)


@FAST
@given(hnp.arrays(DTYPES, ()))
def test_numpy_scalars_keep_their_type(zero_d: np.ndarray[Any, Any]) -> None:
    scalar = zero_d[()]

    got = decode(encode(scalar))

    assert type(got) is type(scalar)
    assert isinstance(got, np.generic) and got.dtype == scalar.dtype
    # Not tobytes(): the six padding bytes of a longdouble scalar hold garbage.
    assert repr(got) == repr(scalar)


@pytest.mark.parametrize(
    "scalar",
    [
        np.float32(1.5),
        np.float16(-0.0),
        np.longdouble("1.1"),
        np.uint64(2**64 - 1),
        np.int8(-3),
        np.bool_(True),
        np.complex64(1 + 2j),
        np.datetime64("2024-01-01T12:00", "m"),
        np.timedelta64(5, "ms"),
        np.str_("héllo"),
        np.bytes_(b"ab"),
    ],
)
def test_common_numpy_scalars_round_trip(scalar: np.generic) -> None:
    got = decode(encode(scalar))

    assert type(got) is type(scalar)
    assert got == scalar


@FAST
@given(PLAIN)
def test_plain_values_round_trip_with_their_types(value: object) -> None:
    assert_same(decode(encode(value)), value)


def test_nested_containers_of_arrays_bytes_and_tuples_round_trip() -> None:
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    value = {
        "image": image,
        ("box", 1): [(np.float32(0.5), image[::2]), {"raw": b"\x00\x01", "n": None}],
        "nested": ((1, (2, (3,))), [np.zeros(0), {"k": (b"x", bytearray(b"y"))}]),
    }

    frames = encode(value)

    assert len(frames) == 4  # the document and three arrays
    assert_same(decode(frames), value)


@pytest.mark.parametrize("value", [{1, 2, (3, 4)}, frozenset({"a", b"b"}), set()])
def test_sets_round_trip(value: set[object] | frozenset[object]) -> None:
    got = decode(encode(value))

    assert type(got) is type(value)
    assert got == value


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 7**200, -(7**200)])
def test_ints_of_any_size_round_trip(value: int) -> None:
    assert_same(decode(encode(value)), value)


def test_large_bytes_travel_as_their_own_frames_without_copy() -> None:
    image = bytes(range(256)) * (OUT_OF_BAND_MIN_BYTES // 256)
    buffer = bytearray(OUT_OF_BAND_MIN_BYTES)
    value = {"image": image, "buffer": buffer, "view": memoryview(image), "small": b"x" * 99}

    frames = encode(value)

    got = decode(frames)

    assert len(frames) == 4
    assert frames[1] is image
    assert got == {"image": image, "buffer": buffer, "view": image, "small": b"x" * 99}
    assert isinstance(got, dict) and type(got["buffer"]) is bytearray


def test_bytes_below_the_threshold_stay_in_the_document() -> None:
    value = [b"x" * (OUT_OF_BAND_MIN_BYTES - 1), memoryview(b"y" * 10)]

    frames = encode(value)

    assert len(frames) == 1
    assert decode(frames) == [value[0], b"y" * 10]


def test_non_contiguous_memoryview_arrives_as_its_bytes() -> None:
    view = np.arange(OUT_OF_BAND_MIN_BYTES, dtype=np.uint8).data[::2]

    assert decode(encode(view)) == view.tobytes()


class Pair(NamedTuple):
    """A tuple subclass, which would arrive as a plain tuple if it were not refused."""

    a: int
    b: int


class Point:
    """A user type that only pickle can carry."""

    def __init__(self, x: int, data: np.ndarray[Any, Any]) -> None:
        self.x = x
        self.data = data


UNPICKLED: list[str] = []


def _record_unpickle(name: str) -> str:
    UNPICKLED.append(name)
    return name


class Tripwire:
    """Records on unpickling, so a test can see whether decode ran pickle at all."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _record_unpickle, ("tripwire",)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Point(1, np.zeros(1)), "'Point'"),
        (np.array([1, "a"], dtype=object), "dtype=object"),
        (collections.OrderedDict(a=1), "'OrderedDict'"),
        (Pair(1, 2), "'Pair'"),
        ({"ok": [1, (2, {3j})]}, "'complex'"),
    ],
)
def test_values_that_need_pickle_are_refused_by_default(value: object, type_name: str) -> None:
    with pytest.raises(CodecError, match=f"{type_name}.*allow_pickle=True"):
        encode(value)


def test_pickled_values_round_trip_when_allowed() -> None:
    point = Point(3, np.arange(OUT_OF_BAND_MIN_BYTES, dtype=np.float64))
    objects = np.array([1, "a", None], dtype=object)

    frames = encode({"point": point, "objects": objects}, allow_pickle=True)
    got = decode(frames, allow_pickle=True)

    assert len(frames) == 2  # the point's array travels out of band
    assert isinstance(got, dict)
    assert got["point"].x == 3
    assert_same_array(got["point"].data, point.data)
    assert got["objects"].tolist() == [1, "a", None]


def test_pickled_data_is_not_unpickled_unless_allowed() -> None:
    UNPICKLED.clear()
    frames = encode([Tripwire()], allow_pickle=True)

    with pytest.raises(CodecError, match=r"'Tripwire'.*allow_pickle=True"):
        decode(frames)
    assert UNPICKLED == []

    assert decode(frames, allow_pickle=True) == ["tripwire"]
    assert UNPICKLED == ["tripwire"]


def test_unpicklable_values_raise_codec_error() -> None:
    with pytest.raises(CodecError, match="'function'"):
        encode(lambda: None, allow_pickle=True)


def test_cyclic_values_raise_codec_error() -> None:
    cycle: list[object] = []
    cycle.append(cycle)

    with pytest.raises(CodecError, match="'list'"):
        encode(cycle)


@FAST
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_frames_decode_or_raise_codec_error(frames: list[bytes]) -> None:
    with contextlib.suppress(CodecError):
        decode(frames)


RICH = {
    "array": np.arange(12, dtype=">i4").reshape(3, 4),
    "record": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
    "tuple": (1, "x", frozenset({2, 3})),
    "bytes": bytearray(b"xy"),
    "scalar": np.float16(2),
    "big": 2**80,
}


@FAST
@given(st.data())
def test_corrupted_messages_decode_or_raise_codec_error(data: st.DataObject) -> None:
    frames = [bytes(frame) for frame in encode(RICH, allow_pickle=True)]
    document = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        document[data.draw(st.integers(0, len(document) - 1))] = data.draw(st.integers(0, 255))
    kept = data.draw(st.integers(0, len(frames) - 1))

    with contextlib.suppress(CodecError):
        decode([bytes(document), *frames[1 : 1 + kept]])


_INT_ARRAY = encode(np.arange(4, dtype="<i8"))
_DOCUMENT = bytes(_INT_ARRAY[0])


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([], id="no frames"),
        pytest.param([msgpack.packb(msgpack.ExtType(99, b""))], id="unknown ext type"),
        pytest.param([_DOCUMENT], id="missing frame"),
        pytest.param([_DOCUMENT, _INT_ARRAY[1], b"extra"], id="extra frame"),
        pytest.param([_DOCUMENT, b"abc"], id="short frame"),
        # An object dtype would make numpy read pointers from received bytes.
        pytest.param([_DOCUMENT.replace(b"<i8", b"|O8"), _INT_ARRAY[1]], id="object dtype"),
        pytest.param([_DOCUMENT.replace(b"<i8", b"<i9"), _INT_ARRAY[1]], id="bad dtype"),
    ],
)
def test_malformed_messages_raise_codec_error(frames: list[bytes | memoryview]) -> None:
    with pytest.raises(CodecError, match=r"malformed|refusing"):
        decode(frames)


ConnectPair = Callable[[str], tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]


@pytest.fixture
def connect_pair() -> Iterator[ConnectPair]:
    """Bind a sender to an address (tcp on port 0 picks a free port) and connect a receiver."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []

    def connect(address: str) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        sender = context.socket(zmq.PAIR)
        receiver = context.socket(zmq.PAIR)
        sockets.extend((sender, receiver))
        receiver.rcvtimeo = 5000
        sender.bind(address)
        receiver.connect(sender.getsockopt_string(zmq.LAST_ENDPOINT))
        return sender, receiver

    yield connect
    for socket in sockets:
        socket.close(linger=0)
    context.term()


def test_decode_reads_arrays_from_zmq_frames_without_copy(
    connect_pair: ConnectPair,
) -> None:
    sender, receiver = connect_pair("inproc://test-codec")
    value = {"image": np.arange(3000, dtype=np.uint16).reshape(50, 60), "raw": bytes(100_000)}

    sender.send_multipart(encode(value), copy=False)
    frames = receiver.recv_multipart(copy=False)
    got = decode(frames)

    assert isinstance(got, dict)
    assert all(isinstance(frame, zmq.Frame) for frame in frames)
    assert_same(got, value)
    # Large bytes are hoisted while walking the value, before arrays get their frames.
    assert np.shares_memory(got["image"], np.asarray(frames[2].buffer))


def test_arrays_from_zmq_frames_are_writable_and_over_inproc_alias_the_sender(
    connect_pair: ConnectPair,
) -> None:
    sender, receiver = connect_pair("inproc://test-codec")
    # pyzmq copies frames below zmq.COPY_THRESHOLD even with copy=False.
    array = np.zeros(zmq.COPY_THRESHOLD, dtype=np.uint8)

    sender.send_multipart(encode(array), copy=False)
    got = decode(receiver.recv_multipart(copy=False))

    assert isinstance(got, np.ndarray) and got.flags.writeable
    got[0] = 7
    assert array[0] == 7  # the module docstring warns of this


def test_arrays_from_bytes_frames_are_read_only(connect_pair: ConnectPair) -> None:
    sender, receiver = connect_pair("inproc://test-codec")

    sender.send_multipart(encode(np.zeros(1000)), copy=False)
    got = decode(receiver.recv_multipart(copy=True))

    assert isinstance(got, np.ndarray) and not got.flags.writeable
    assert got.copy().flags.writeable


def test_arrays_received_over_tcp_are_aligned(connect_pair: ConnectPair) -> None:
    sender, receiver = connect_pair("tcp://127.0.0.1:*")

    for size in range(1, 40):
        # Documents of odd lengths shift the array's frame within ZeroMQ's receive buffer.
        value = {"pad": "x" * size, "array": np.arange(size, dtype=np.float64)}
        sender.send_multipart(encode(value), copy=False)
        got = decode(receiver.recv_multipart(copy=False))

        assert isinstance(got, dict) and got["array"].flags.aligned
        assert_same(got, value)
