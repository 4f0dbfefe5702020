import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.core.wire import Kind, Message, TensorPayload, WireError, decode, encode


def sample(dtype=torch.float32):
    parts = {"values": torch.arange(12, dtype=torch.float32).reshape(3, 4).to(dtype), "idx": torch.arange(5, dtype=torch.int32)}
    return Message(Kind.DELTA, sender=3, round=7, seq=9, inc=42, tensors={"a.lora_B": TensorPayload("topk:0.1", (3, 4), parts, {"k": 5, "scale": 0.5})}, info={"x": 1})


def only_wire_errors(frames) -> None:
    """Decoding garbage may fail, but only with WireError (anything else would kill a peer's receive loop)."""
    try:
        decode(frames)
    except Exception as e:
        assert isinstance(e, WireError), f"{type(e).__name__}: {e}"


def as_bytes(frames):
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
def test_roundtrip(dtype):
    m = sample(dtype)
    back = decode(as_bytes(encode(m)))
    assert (back.kind, back.sender, back.round, back.seq, back.inc, back.info) == (Kind.DELTA, 3, 7, 9, 42, {"x": 1})
    tp = back.tensors["a.lora_B"]
    assert tp.codec == "topk:0.1" and tp.shape == (3, 4) and tp.meta == {"k": 5, "scale": 0.5}
    assert torch.equal(tp.parts["values"], m.tensors["a.lora_B"].parts["values"])
    assert tp.parts["values"].dtype == dtype
    assert torch.equal(tp.parts["idx"], torch.arange(5, dtype=torch.int32))


def header_of(frames):
    return msgpack.unpackb(frames[0])


def with_header(frames, **changes):
    h = header_of(frames)
    h.update(changes)
    return [msgpack.packb(h), *frames[1:]]


def test_rejections_name_the_field():
    f = as_bytes(encode(sample()))
    cases = [
        (with_header(f, v=99), "header.v"),
        (with_header(f, kind="teleport"), "header.kind"),
        (with_header(f, sender=-1), "header.sender"),
        (with_header(f, round="x"), "header.round"),
        (f[:-1], "descriptors name 2 parts but 1"),
        ([*f, b"extra"], "descriptors name 2 parts but 3"),
        ([f[0], f[1][:-4], f[2]], "needs 48"),
        ([b"\xc1garbage"], "not valid msgpack"),
        ([], "empty message"),
        (with_header(f, kind=["delta"]), "header.kind"),  # unhashable: still a named rejection
        (with_header(f, seq=True), "header.seq"),  # a bool is not an integer here
        (with_header(f, tensors=[{"name": "a", "codec": "none", "shape": [1], "parts": 5}])[:1], "tensors[0].parts"),
        (with_header(f, tensors=[{"name": "a", "codec": "none", "shape": [1], "parts": [], "meta": None}])[:1], "tensors[0].meta"),
        (with_header(f, tensors=[{"name": "a", "codec": "none", "shape": [1, -2], "parts": []}])[:1], "tensors[0].shape"),
    ]
    for frames, needle in cases:
        with pytest.raises(WireError) as e:
            decode(frames)
        assert needle in str(e.value), (needle, str(e.value))


def test_nan_inf_and_dtype_and_size_limits():
    m = sample()
    m.tensors["a.lora_B"].parts["values"][1, 1] = float("nan")
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(as_bytes(encode(m)))
    m.tensors["a.lora_B"].parts["values"][1, 1] = float("inf")
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(as_bytes(encode(m)))
    f = as_bytes(encode(sample()))
    h = header_of(f)
    h["tensors"][0]["parts"][0][1] = "complex128"
    with pytest.raises(WireError, match="not an allowed dtype"):
        decode([msgpack.packb(h), *f[1:]])
    with pytest.raises(WireError, match="exceeds the maximum"):
        decode(f, max_frame=16)
    h = header_of(f)
    h["tensors"][0]["meta"]["scale"] = float("nan")
    with pytest.raises(WireError, match="non-finite"):
        decode([msgpack.packb(h), *f[1:]])


def test_zero_copy_view_of_frames():
    f = encode(sample())
    buf = bytearray(bytes(f[1]))
    back = decode([bytes(f[0]), buf, bytes(f[2])])
    buf[0:4] = torch.tensor([99.0]).numpy().tobytes()
    assert back.tensors["a.lora_B"].parts["values"][0, 0] == 99.0  # a view of the buffer, not a copy


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=5))
def test_fuzz_random_frames_only_raise_wire_error(frames):
    only_wire_errors(frames)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_messages(data):
    frames = as_bytes(encode(sample()))
    k = data.draw(st.integers(0, len(frames) - 1))
    raw = bytearray(frames[k])
    for _ in range(data.draw(st.integers(1, 8))):
        if not raw:
            break
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    frames[k] = bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw)
    only_wire_errors(frames)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=20))
def test_fuzz_structured_headers(obj):
    only_wire_errors([msgpack.packb(obj)])
