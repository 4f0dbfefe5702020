"""docs/wire.md, held against the code: golden bytes of every message kind, an encoder written
from the spec alone (it imports nothing from `p2pfl.core.wire` or the codecs), the network id,
and the consensus sketch.

`tests/golden/wire-v<N>.json` holds the frames of each vector, as hex. Both the package and the
spec's encoder must produce them; the package must decode them to the inputs. The vectors are
frozen per protocol version (`FROZEN`): a change to the bytes needs a new version.
`python tests/test_wire_spec.py` writes the file for the current version from the spec's encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import msgpack
import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden"
VERSION = 5
PINNED = {3: "009dbf77cf5eac270282585f63abed192405e6091bc8a6ecbba06790c4de9c28",
          4: "65fbaf7524a6147f2c67dd49defb44feb240c5c57305cfa50ffd4e3826952c4b",
          5: "160264bc8071314657076d7798b6289d9b9f3569eb4daea71475a131b6dc4742"}  # sha256 of each version's golden vectors (`digest`): its bytes never change

NET = 0x0123_4567_89AB_CDEF  # any 63-bit value
INC = 1_733_600_000_000_000  # a start time in microseconds

# ------------------------------------------------------------------------------ the spec's encoder


def f32(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


def int8_blocks(x: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """`int8:B`: per block of B values (the last zero-padded) scale = max|x| / 127 in float32, and
    q = x / scale rounded half to even, clamped to +-127 (a zero scale divides by 1)."""
    n = x.size
    nb = -(-n // block)
    pad = np.zeros(nb * block, np.float32)
    pad[:n] = x
    blocks = pad.reshape(nb, block)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))[:, None]
    q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(-1)[:n]
    return {"data": q, "scales": scales}


def sign_blocks(x: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """`sign:B`: one bit per value (1 where x >= 0), packed most significant bit first; per block
    scale = mean |x| over the block's real values, in float32."""
    n = x.size
    nb = -(-n // block)
    scales = np.array([np.abs(x[b * block:(b + 1) * block]).astype(np.float32).mean(dtype=np.float32) for b in range(nb)], np.float32)
    return {"data": np.packbits(x >= 0), "scales": scales}


def topk(x: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """`topk:F`: k = max(1, ceil(F n)) values of largest |x|, their int32 indices in ascending order."""
    k = max(1, math.ceil(fraction * x.size))
    return np.sort(np.argsort(-np.abs(x), kind="stable")[:k]).astype(np.int32), k


DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16",
          np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}


def tensor(name: str, codec: str, shape: list[int], parts: dict[str, np.ndarray], meta: dict | None = None,
           source: np.ndarray | None = None) -> dict:
    """A descriptor and its parts; `source`, not on the wire, is what a codec encoded into them."""
    return {"name": name, "codec": codec, "shape": shape, "parts": parts, "meta": meta or {}, "source": source}


def spec_frames(v: dict) -> list[bytes]:
    """A message's frames as docs/wire.md describes them."""
    descs, data = [], []
    for t in v.get("tensors", []):
        parts = []
        for key, arr in t["parts"].items():
            parts.append([key, DTYPES[arr.dtype], list(arr.shape)])
            data.append(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
        descs.append({"name": t["name"], "codec": t["codec"], "shape": t["shape"], "parts": parts, "meta": t["meta"]})
    header = {"v": VERSION, "kind": v["kind"], "sender": v["sender"], "inc": INC, "net": NET, "round": v["round"],
              "seq": v["seq"], "tensors": descs, "info": v.get("info", {})}
    if v.get("channel", "base") != "base":
        header["channel"] = v["channel"]
    return [msgpack.packb(header, use_bin_type=True), *data]


VIEW_BODY = msgpack.packb({"k": "neighbor", "c": b"10.0.0.5:29500", "h": True}, use_bin_type=True)
VIEW = {"kind": "view", "sender": 3, "round": 0, "seq": 0,
        "tensors": [tensor("view", "msgpack", [len(VIEW_BODY)], {"data": np.frombuffer(VIEW_BODY, np.uint8)})]}


REVOKE_BODY = msgpack.packb({"k": "revoke", "r": [bytes(range(16))]}, use_bin_type=True)  # a revocation is opaque here


def vectors() -> list[dict]:
    """One input per message kind and per kind of payload."""
    x = f32(0.5, -1.25, 2.0, 0.0, -0.75, 3.5)  # two tensors of 3 values, flattened in name order
    a, b = f32(1.0, -2.0, 0.25, 4.0, -0.5, 0.125), f32(-3.0, 0.75, 1.5, -0.25, 2.5, -1.0)
    idx_a, k_a = topk(a, 0.5)
    q_a = int8_blocks(a[idx_a], 4)
    idx_b, k_b = topk(b, 0.5)
    q_b = int8_blocks(b[idx_b], 4)
    control = {"sender": 3, "round": 7, "seq": 8}
    return [
        {"name": "hello", "kind": "hello", "sender": 3, "round": 0, "seq": 0},
        {"name": "heartbeat", "kind": "heartbeat", **control},
        {"name": "resync", "kind": "resync", **control},
        {"name": "bye", "kind": "bye", **control},
        {"name": "delta-none-flat", "kind": "delta", **control, "tensors": [tensor("_flat", "none", [6], {"data": x})]},
        {"name": "delta-int8-flat", "kind": "delta", **control, "tensors": [tensor("_flat", "int8:4", [6], int8_blocks(x, 4), source=x)]},
        {"name": "delta-sign-flat", "kind": "delta", **control, "tensors": [tensor("_flat", "sign:4", [6], sign_blocks(x, 4), source=x)]},
        {"name": "delta-fp16-flat", "kind": "delta", **control,
         "tensors": [tensor("_flat", "fp16", [6], {"data": x.astype(np.float16)}, source=x)]},
        {"name": "delta-topk-int8-per-tensor", "kind": "delta", **control, "tensors": [
            tensor("blocks.00.lora_B", "topk:0.5+int8:4", [2, 3], {"values": q_a["data"], "scales": q_a["scales"], "indices": idx_a},
                   {"k": k_a}, source=a),
            tensor("blocks.01.lora_B", "topk:0.5+int8:4", [2, 3], {"values": q_b["data"], "scales": q_b["scales"], "indices": idx_b},
                   {"k": k_b}, source=b)]},
        {"name": "delta-drain", "kind": "delta", "sender": 3, "round": 20, "seq": 21},
        {"name": "state", "kind": "state", **control, "tensors": [
            tensor("blocks.00.lora_B", "none", [2, 3], {"data": a}), tensor("blocks.01.lora_B", "none", [2, 3], {"data": b})]},
        {"name": "delta-sketches", "kind": "delta", **control, "tensors": [
            tensor("_flat", "none", [6], {"data": x}),
            tensor("_sketches", "none", [2, 4], {"data": np.arange(8, dtype=np.float64).reshape(2, 4) / 8})],
         "info": {"sketches": [[1, 6], [3, 7]]}},
        {"name": "delta-estimate", "kind": "delta", **control, "tensors": [
            tensor("_flat", "none", [6], {"data": x}),
            tensor("_estimate", "none", [1, 5], {"data": np.array([[0.5, -0.5, 0.25, 1.0, 0.0625]])})],
         "info": {"estimate": [[4, 3]]}},
        {"name": "delta-cluster-channel", "kind": "delta", **control, "channel": "cluster",
         "tensors": [tensor("_flat", "none", [6], {"data": x})]},
        {"name": "state-push-sum", "kind": "state", **control, "tensors": [tensor("_flat", "none", [6], {"data": x})],
         "info": {"weight": 0.375}},
        {"name": "view-neighbor", **VIEW},
        {"name": "view-revoke", **VIEW, "tensors": [tensor("view", "msgpack", [len(REVOKE_BODY)], {"data": np.frombuffer(REVOKE_BODY, np.uint8)})]},
        {"name": "resync-gap", "kind": "resync", **control, "info": {"gap": [5, 8]}},
        {"name": "delta-open", "kind": "delta", **control, "tensors": [
            tensor("_flat", "none", [6], {"data": x}), tensor("_size", "none", [4], {"data": f32(0.5, 1.25, 0.0625, 2.0)})],
         "info": {"deg": 5, "size": 2}},
    ]


def golden_file(version: int = VERSION) -> Path:
    return GOLDEN / f"wire-v{version}.json"


def load_golden(version: int = VERSION) -> dict[str, list[bytes]]:
    doc = json.loads(golden_file(version).read_text())
    assert doc["version"] == version
    return {v["name"]: [bytes.fromhex(f) for f in v["frames"]] for v in doc["vectors"]}


def digest(golden: dict[str, list[bytes]]) -> str:
    h = hashlib.sha256()
    for name in sorted(golden):
        h.update(name.encode())
        for f in golden[name]:
            h.update(len(f).to_bytes(8, "little") + f)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- the tests


def test_the_spec_encoder_writes_the_golden_bytes():
    golden = load_golden()
    for v in vectors():
        assert spec_frames(v) == golden[v["name"]], v["name"]


def test_the_package_writes_the_golden_bytes():
    import torch

    from p2pfl.core.compress import get_codec
    from p2pfl.core.wire import Kind, Message, TensorPayload, encode

    golden = load_golden()
    for v in vectors():
        tensors = {}
        for t in v.get("tensors", []):
            if t["source"] is None:  # exact: the parts are the values themselves
                tensors[t["name"]] = TensorPayload(t["codec"], tuple(t["shape"]), {k: torch.from_numpy(a.copy()) for k, a in t["parts"].items()})
            else:  # the package's codec, on the values the spec's encoder compressed
                enc = get_codec(t["codec"]).encode(torch.from_numpy(t["source"].copy()).reshape(t["shape"]), seed=0)
                tensors[t["name"]] = TensorPayload(t["codec"], tuple(t["shape"]), dict(enc.parts), dict(enc.meta))
        msg = Message(Kind(v["kind"]), v["sender"], round=v["round"], seq=v["seq"], inc=INC, tensors=tensors, info=v.get("info", {}),
                      channel=v.get("channel", "base"), net=NET)
        assert [bytes(f) for f in encode(msg)] == golden[v["name"]], v["name"]


def test_the_package_decodes_the_golden_bytes_to_the_inputs():
    from p2pfl.core.codec import Encoded
    from p2pfl.core.compress import get_codec
    from p2pfl.core.wire import decode

    golden = load_golden()
    for v in vectors():
        msg = decode(golden[v["name"]])
        assert (msg.kind.value, msg.sender, msg.round, msg.seq, msg.inc, msg.net, msg.channel) == (
            v["kind"], v["sender"], v["round"], v["seq"], INC, NET, v.get("channel", "base")), v["name"]
        assert msg.info == v.get("info", {})
        for t in v.get("tensors", []):
            tp = msg.tensors[t["name"]]
            assert (tp.codec, list(tp.shape), tp.meta) == (t["codec"], t["shape"], t["meta"])
            for key, arr in t["parts"].items():
                assert np.array_equal(tp.parts[key].numpy(), arr), (v["name"], key)
        if v["name"] == "delta-int8-flat":  # and the codec decodes it as the spec says: q * scale
            out = get_codec("int8:4").decode(Encoded(msg.tensors["_flat"].parts, {}), (6,)).numpy()
            q, s = (v["tensors"][0]["parts"][k] for k in ("data", "scales"))
            assert np.array_equal(out, (np.concatenate([q, np.zeros(2, np.int8)]).astype(np.float32).reshape(2, 4) * s[:, None]).reshape(-1)[:6])


def test_the_view_kind_is_the_spec_layout():
    """`view` (docs/wire.md section 5): the package's own view message is the spec's (and the
    golden vector's) layout, and decodes to the same HyParView message."""
    from p2pfl.core.membership.messages import ViewConfig, ViewKind, ViewMsg
    from p2pfl.core.wire import decode, encode
    from p2pfl.node.membership import read_view, view_message

    sent = ViewMsg(ViewKind.NEIGHBOR, contact=b"10.0.0.5:29500", high=True)
    msg = view_message(3, INC, sent)
    msg.net = NET
    frames = [bytes(f) for f in encode(msg)]
    assert frames == spec_frames(VIEW) == load_golden()["view-neighbor"]
    assert read_view(decode(frames), ViewConfig()) == sent


def test_golden_vectors_are_frozen_for_their_version():
    """The bytes of a protocol version never change; new bytes are a new version (and file). Earlier
    versions' files stay, for implementations of those versions."""
    from p2pfl.core.wire import PROTOCOL_VERSION

    assert PROTOCOL_VERSION == VERSION, "the wire changed version: write tests/golden/wire-v<N>.json and freeze its digest"
    assert VERSION in PINNED
    for version, pinned in PINNED.items():
        assert digest(load_golden(version)) == pinned, version


def test_the_network_id_is_the_spec_digest():
    from p2pfl.core import topology as T

    for topo in (T.generate("ring", 4, base_port=29500), T.scheduled("one-peer-exponential", 8, base_port=40000)):
        d = topo.to_dict()
        core = {"peers": [[q["id"], q["host"], q["port"]] for q in d["peers"]], **{k: d[k] for k in ("edges", "schedule") if k in d}}
        spec = int.from_bytes(hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=8).digest(), "big") >> 1
        assert topo.network_id() == spec
    assert T.generate("ring", 4, base_port=29500).network_id() == 0x45002B5F2B4C32BF  # the worked example in docs/wire.md


def splitmix64(seed: int, count: int) -> list[int]:
    """Textbook scalar SplitMix64 (Steele, Lea & Flood 2014) with explicit 64-bit masking, as docs/wire.md states it."""
    mask, out = (1 << 64) - 1, []
    for _ in range(count):
        seed = (seed + 0x9E3779B97F4A7C15) & mask
        z = ((seed ^ (seed >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def spec_sketch(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The consensus sketch of docs/wire.md, by its definition (a dense Hadamard matrix)."""
    m = 1 << max(0, (x.size - 1).bit_length())
    k = min(k, m)
    z = splitmix64((0x5EED ^ seed) & ((1 << 64) - 1), 2 * m)
    signs = np.array([-1.0 if v >> 63 else 1.0 for v in z[:m]])
    rows = sorted(range(m), key=lambda i: (z[m + i], i))[:k]
    pad = np.zeros(m)
    pad[: x.size] = x
    h = np.array([[(-1.0) ** bin(i & j).count("1") for j in range(m)] for i in range(m)]) / math.sqrt(m)
    return (h @ (signs * pad))[rows] * math.sqrt(m / k)


def test_the_sketch_is_the_spec_transform():
    import torch

    from p2pfl.core.consensus import Sketcher

    x = np.linspace(-1, 1, 37)
    for k, seed in ((8, 0), (64, 5), (16, 2**40 + 3)):
        got = Sketcher(37, k, seed)(torch.from_numpy(x)).numpy()
        assert got.shape == (min(k, 64),) and np.allclose(got, spec_sketch(x, k, seed), atol=1e-12)


def test_the_no_train_state_is_sixteen_lora_b_tensors_rounded_up_to_whole_rows():
    from p2pfl.core.state import synthetic_state

    for dim, rows in ((100, 1), (128, 1), (129, 2), (131072, 1024)):
        s = synthetic_state(0, 3, dim)
        assert sorted(s) == [f"blocks.{i:02d}.lora_B" for i in range(16)]
        assert all(v.shape == (rows, 8) and v.dtype.is_floating_point for v in s.values())


if __name__ == "__main__":  # write the golden file of this version from the spec's encoder
    out = golden_file()
    if out.exists() and "--force" not in sys.argv:
        sys.exit(f"{out} exists: a version's bytes never change (bump the version instead, or --force while drafting it)")
    out.parent.mkdir(exist_ok=True)
    doc = {"version": VERSION, "vectors": [{"name": v["name"], "frames": [f.hex() for f in spec_frames(v)]} for v in vectors()]}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}; its digest {digest(load_golden())}")
