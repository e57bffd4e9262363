"""The wire codec: exact numpy round trips, refused dtypes, and clear errors on malformed bytes (never pickle)."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fm_policy.deploy.codec import CodecError, packb, unpackb


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "<f2", "u1", "i1", "<i8", "?", "<u2"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 20), (2, 3, 4, 1)])
def test_arrays_round_trip_exactly(dtype, shape):
    value = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    back = unpackb(packb({"x": value, "nested": [value, {"y": value}]}))
    for got in (back["x"], back["nested"][0], back["nested"][1]["y"]):
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int32, np.uint8]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
def test_round_trip_property(value):
    back = unpackb(packb(value))
    assert back.dtype == value.dtype and back.shape == value.shape
    assert np.array_equal(back, value, equal_nan=value.dtype.kind == "f")


def test_numpy_scalars_and_plain_values_round_trip():
    message = {"a": np.float32(1.5), "b": np.int64(-3), "c": "text", "d": [1, 2.5, None, True], "e": b"\x00\x01"}
    back = unpackb(packb(message))
    assert back["a"] == np.float32(1.5) and back["a"].dtype == np.float32
    assert back["b"] == -3 and back["b"].dtype == np.int64
    assert back["c"] == "text" and back["d"] == [1, 2.5, None, True] and back["e"] == b"\x00\x01"


def test_non_contiguous_arrays_are_sent_in_c_order():
    value = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert np.array_equal(unpackb(packb(value)), value)


@pytest.mark.parametrize("value", [np.array([1 + 2j]), np.array([object()], dtype=object),
                                   np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), np.complex64(1j), {1, 2}])
def test_refused_values_do_not_encode(value):
    with pytest.raises(CodecError):
        packb({"x": value})


def _tagged(**fields) -> bytes:
    header = {"__ndarray__": True, "data": b"\x00" * 8, "dtype": "<f4", "shape": [2], **fields}
    return msgpack.packb({"x": header}, use_bin_type=True)


@pytest.mark.parametrize("fields, match", [
    ({"dtype": "|O"}, "object"),
    ({"dtype": "<c8"}, "complex"),
    ({"dtype": "|V8"}, "void"),
    ({"dtype": "not-a-dtype"}, "unknown dtype"),
    ({"shape": [3]}, "needs 12 bytes, got 8"),
    ({"shape": [-2]}, "non-negative"),
    ({"shape": "2"}, "list"),
    ({"shape": [1] * 40}, "at most"),
    ({"data": "text"}, "bytes"),
])
def test_lying_array_headers_are_clear_errors(fields, match):
    with pytest.raises(CodecError, match=match):
        unpackb(_tagged(**fields))


@pytest.mark.parametrize("data", [
    b"\xc1\xc1\xc1",  # reserved msgpack byte
    b"\xff\x00garbage" * 10,
    packb({"x": np.zeros(100, np.float32)})[:-7],  # truncated
    packb({"a": 1}) + b"\x01",  # trailing bytes
    msgpack.packb({1: "int key"}),  # strict map keys
    b"",
])
def test_garbage_bytes_are_clear_errors(data):
    with pytest.raises(CodecError):
        unpackb(data)


def test_text_frames_are_refused():
    with pytest.raises(CodecError, match="binary frame"):
        unpackb("not bytes")  # type: ignore[arg-type]


_EXECUTED: list[str] = []


class _Exploit:
    def __reduce__(self):
        return (_EXECUTED.append, ("pwned",))


def test_pickle_payloads_are_never_executed():
    payload = pickle.dumps(_Exploit())
    with pytest.raises(CodecError):
        unpackb(payload)
    assert _EXECUTED == []


def test_openpi_bytes_key_encoding_is_read_and_written():
    """openpi's msgpack_numpy tags arrays with bytes keys and scalars with plain numbers; both directions work."""
    openpi = pytest.importorskip("openpi_client.msgpack_numpy")
    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(-3), "c": np.float64(0.5), "s": "x"}
    back = unpackb(openpi.packb(value))
    assert back["a"].dtype == np.float32 and np.array_equal(back["a"], value["a"])
    assert back["b"] == -3 and back["b"].dtype == np.int64 and back["c"] == 0.5 and back["s"] == "x"
    theirs = openpi.unpackb(packb(value, openpi=True))
    assert np.array_equal(theirs["a"], value["a"]) and theirs["b"] == -3 and theirs["c"] == 0.5
    assert np.array_equal(unpackb(packb(value, openpi=True))["a"], value["a"])  # ours reads both spellings


def test_openpi_style_headers_are_checked_too():
    header = {b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<f4", b"shape": [2]}
    with pytest.raises(CodecError, match="needs 8 bytes"):
        unpackb(msgpack.packb({"x": header}, use_bin_type=True))
    with pytest.raises(CodecError, match="object"):
        unpackb(msgpack.packb({"x": {**header, b"dtype": "|O"}}, use_bin_type=True))


@pytest.mark.parametrize("frame", [
    b"\xdd" + (4_000_000).to_bytes(4, "big") + b"\x90" * 4_000_000,  # one list of 4 M empty lists
    b"\xdd" + (1000).to_bytes(4, "big") + (b"\xdc" + (4000).to_bytes(2, "big") + b"\x90" * 4000) * 1000,
])
def test_frames_of_millions_of_containers_are_refused_fast(frame):
    import time

    start = time.perf_counter()
    with pytest.raises(CodecError, match="max_array_len|maps and lists"):
        unpackb(frame)
    assert time.perf_counter() - start < 0.2


def test_errors_quote_received_values_briefly():
    with pytest.raises(CodecError) as info:
        unpackb(_tagged(shape=[1] * 4000))
    assert len(str(info.value)) < 300
    with pytest.raises(CodecError) as info:
        unpackb(_tagged(dtype="<" + "f" * 100_000))
    assert len(str(info.value)) < 300
