"""Wire format: one msgpack header frame, then one raw frame per tensor part.

Header (msgpack map): ``v`` protocol version, ``kind``, ``sender``, ``inc`` (sender incarnation),
``round``, ``seq``, ``tensors`` (list of descriptors: name, codec, shape, parts [[key, dtype, shape]],
meta), ``info`` (small msgpack-able extras) and, only when it is not ``base``, ``channel``: the
gossip level a message belongs to (``base`` graph, PPFM ``cluster`` or ``global`` level), so each
level's CHOCO engine gets its own sequence numbers. Tensor data never goes through msgpack and nothing
is unpickled: frames are viewed in place with ``torch.frombuffer`` after every size, dtype and value
check below has passed. Anything off raises ``WireError`` with the offending field named.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
import torch

from p2pfl.config import PeerConfig
from p2pfl.errors import P2pflError

# 2: every header carries the sender's network id (`net`). 3: the consensus sketch is drawn from
# SplitMix64 (any implementation can rebuild it), top-k indices go in ascending order, and a STATE
# of seq 0 holds no round. 4: the kind `view` (open networks' peer sampling), and an open network's
# deltas carry the sender's degree (info `deg`) and size-estimate minima (`_size`, info `size`).
# docs/wire.md is the whole protocol; tests/golden/ pins its bytes.
PROTOCOL_VERSION = 5
MAX_HEADER = 4 * 1024 * 1024
MAX_TENSORS = 4096
BASE, CLUSTER, GLOBAL = "base", "cluster", "global"
CHANNELS = (BASE, CLUSTER, GLOBAL)


class WireError(P2pflError, ValueError):
    """A frame sequence that is not a valid message; the message says which field and why."""


class Kind(StrEnum):
    HELLO = "hello"  # announce incarnation, round and next sequence number
    HEARTBEAT = "heartbeat"
    DELTA = "delta"  # compressed CHOCO update q, applied in sequence order
    STATE = "state"  # full replica (resync), exact fp32
    RESYNC = "resync"  # request a STATE from the receiver
    BYE = "bye"  # clean shutdown: mark me down now, not after a timeout
    VIEW = "view"  # open membership: a HyParView message (p2pfl.core.membership.messages) as one uint8 part


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}
FLOAT_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


@dataclass
class TensorPayload:
    """One named tensor as the codec left it: the parts travel as frames, meta in the header."""

    codec: str
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


@dataclass
class Message:
    kind: Kind
    sender: int
    round: int = 0
    seq: int = 0
    inc: int = 0
    tensors: dict[str, TensorPayload] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    channel: str = BASE
    net: int = 0  # the sender's `Topology.network_id`, stamped by its node


def _as_frame(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for zmq ``send_multipart(copy=False)``: the header, then each part's raw bytes."""
    descs = []
    frames: list[bytes | memoryview] = []
    for name, tp in msg.tensors.items():
        parts = []
        for key, part in tp.parts.items():
            if part.dtype not in DTYPE_NAMES:
                raise WireError(f"tensor {name!r} part {key!r}: dtype {part.dtype} cannot travel")
            parts.append([key, DTYPE_NAMES[part.dtype], list(part.shape)])
            frames.append(_as_frame(part))
        descs.append({"name": name, "codec": tp.codec, "shape": list(tp.shape), "parts": parts, "meta": tp.meta})
    header = {
        "v": PROTOCOL_VERSION,
        "kind": str(msg.kind),
        "sender": msg.sender,
        "inc": msg.inc,
        "net": msg.net,
        "round": msg.round,
        "seq": msg.seq,
        "tensors": descs,
        "info": msg.info,
    }
    if msg.channel != BASE:  # absent means base: base-channel bytes are unchanged
        header["channel"] = msg.channel
    return [msgpack.packb(header, use_bin_type=True), *frames]


_KINDS = {k.value: k for k in Kind}
_SCALARS = (int, float, str, bool)

# decode runs once per received message on the peer's event loop: the checks below use exact type
# tests (msgpack yields exact ints, lists and dicts; ``type(v) is int`` also rejects bools) and
# format their error text only when they raise.


def _int(header: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = header.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise WireError(f"header.{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _shape(v: Any) -> tuple[int, ...] | None:
    """``v`` as a shape if it is a list of at most 8 non-negative ints, else None."""
    if type(v) is not list or len(v) > 8:
        return None
    for s in v:
        if type(s) is not int or s < 0:
            return None
    return tuple(v)


def _bad_shape(where: str, v: Any) -> WireError:
    return WireError(f"{where}: expected a list of at most 8 non-negative ints, got {v!r}")


def _meta(v: Any, index: int) -> dict[str, Any]:
    """Descriptor ``index``'s meta: a small mapping of string keys to finite scalars."""
    if type(v) is dict and not v:
        return v
    where = f"tensors[{index}].meta"
    if type(v) is not dict or len(v) > 64:
        raise WireError(f"{where}: expected a small mapping, got {type(v).__name__}")
    for k, x in v.items():
        if type(k) is not str or not isinstance(x, _SCALARS):
            raise WireError(f"{where}[{k!r}]: expected a scalar, got {type(x).__name__}")
        if type(x) is float and not math.isfinite(x):
            raise WireError(f"{where}[{k!r}]: non-finite value {x}")
    return v


def decode(frames: Sequence[Any], max_frame: int = PeerConfig.max_frame, check_finite: bool = True) -> Message:
    """Validate and view a frame sequence as a Message. Raises WireError and nothing else."""
    if not frames:
        raise WireError("empty message: no header frame")
    raw = [f if type(f) is memoryview else memoryview(f) for f in frames]  # bytes, views, zmq.Frame alike
    for k, f in enumerate(raw):
        if f.nbytes > max_frame:
            raise WireError(f"frame {k}: {f.nbytes} bytes exceeds the maximum of {max_frame}")
    if raw[0].nbytes > MAX_HEADER:
        raise WireError(f"header: {raw[0].nbytes} bytes exceeds {MAX_HEADER}")
    try:
        header = msgpack.unpackb(raw[0], raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"header: not valid msgpack ({type(e).__name__}: {e})") from None
    if type(header) is not dict:
        raise WireError(f"header: expected a map, got {type(header).__name__}")
    if header.get("v") != PROTOCOL_VERSION:
        raise WireError(f"header.v: unsupported protocol version {header.get('v')!r} (speak {PROTOCOL_VERSION})")
    kind_name = header.get("kind")
    kind = _KINDS.get(kind_name) if type(kind_name) is str else None
    if kind is None:
        raise WireError(f"header.kind: unknown message kind {kind_name!r}")
    channel = header.get("channel", BASE)
    if channel not in CHANNELS:
        raise WireError(f"header.channel: unknown channel {channel!r} (known: {', '.join(CHANNELS)})")
    info = header.get("info", {})
    if type(info) is not dict:
        raise WireError("header.info: expected a map")
    descs = header.get("tensors", [])
    if type(descs) is not list or len(descs) > MAX_TENSORS:
        raise WireError(f"header.tensors: expected a list of at most {MAX_TENSORS} descriptors")
    msg = Message(
        kind=kind,
        sender=_int(header, "sender", 0, 2**31),
        inc=_int(header, "inc"),
        net=_int(header, "net"),
        round=_int(header, "round"),
        seq=_int(header, "seq"),
        info=info,
        channel=channel,
    )
    expected = 0
    for d in descs:
        if type(d) is dict and type(d.get("parts")) is list:
            expected += len(d["parts"])
    if expected != len(raw) - 1:
        raise WireError(f"frames: descriptors name {expected} parts but {len(raw) - 1} data frames arrived")
    cursor = 1
    for k, d in enumerate(descs):
        if type(d) is not dict:
            raise WireError(f"tensors[{k}]: expected a descriptor map")
        name, codec = d.get("name"), d.get("codec")
        if type(name) is not str or not name or len(name) > 512:
            raise WireError(f"tensors[{k}].name: expected a non-empty string, got {name!r}")
        if name in msg.tensors:
            raise WireError(f"tensors[{k}].name: duplicate tensor {name!r}")
        if type(codec) is not str or len(codec) > 128:
            raise WireError(f"tensors[{k}].codec: expected a codec spec string, got {codec!r}")
        shape = _shape(d.get("shape"))
        if shape is None:
            raise _bad_shape(f"tensors[{k}].shape", d.get("shape"))
        meta = _meta(d.get("meta", {}), k)
        plist = d.get("parts")
        if type(plist) is not list:
            raise WireError(f"tensors[{k}].parts: expected a list of [key, dtype, shape]")
        parts: dict[str, torch.Tensor] = {}
        for pk, p in enumerate(plist):
            if not (type(p) is list and len(p) == 3 and type(p[0]) is str and type(p[1]) is str):
                raise WireError(f"tensors[{k}]({name}).parts[{pk}]: expected [key, dtype, shape]")
            key, dname, pshape = p[0], p[1], _shape(p[2])
            if pshape is None:
                raise _bad_shape(f"tensors[{k}]({name}).parts[{pk}].shape", p[2])
            if key in parts:
                raise WireError(f"tensors[{k}]({name}).parts[{pk}]: duplicate part key {key!r}")
            dtype = DTYPES.get(dname)
            if dtype is None:
                raise WireError(f"tensors[{k}]({name}).parts[{pk}].dtype: {dname!r} is not an allowed dtype")
            numel = math.prod(pshape)
            buf = raw[cursor]
            cursor += 1
            if buf.nbytes != numel * ITEMSIZE[dtype]:
                raise WireError(
                    f"tensors[{k}]({name}).parts[{pk}]: frame has {buf.nbytes} bytes, {dname}{list(pshape)} needs {numel * ITEMSIZE[dtype]}"
                )
            parts[key] = _view(buf, dtype, pshape)
            if check_finite and dtype in FLOAT_DTYPES and numel and not all_finite(parts[key]):
                raise WireError(f"tensors[{k}]({name}).parts[{pk}]: contains NaN or Inf")
        msg.tensors[name] = TensorPayload(codec=codec, shape=shape, parts=parts, meta=meta)
    return msg


def all_finite(t: torch.Tensor) -> bool:
    """NaN and Inf propagate through a sum, so a finite sum proves every value finite; only an
    overflowing sum (or a real NaN/Inf) pays for the element-wise check. That is far cheaper than
    ``isfinite().all()``, and a float check of ``.item()`` saves two tensor ops per call over
    ``isfinite(sum)`` (timings: docs/experiments.md)."""
    return math.isfinite(t.sum(dtype=torch.float32).item()) or bool(torch.isfinite(t).all())


# Views of read-only buffers (bytes) are never written through. A filter set once, not a
# `catch_warnings` block per frame: that block resets the warning registry and costs ~10 us a frame.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


def _view(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if buf.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    flat = torch.frombuffer(buf, dtype=dtype)
    return flat if len(shape) == 1 else flat.reshape(shape)  # flat deltas: no reshape per frame


def frames_nbytes(frames: Sequence[Any]) -> int:
    """Bytes of a frame list without building a view per frame (it is counted for every message)."""
    return sum(f.nbytes if type(f) is memoryview else len(f) for f in frames)
