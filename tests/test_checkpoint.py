import pytest
import torch

from p2pfl.core import topology as T
from p2pfl.core.state import synthetic_state
from p2pfl.host import checkpoint as C
from p2pfl.node import snapshot as S
from p2pfl.sim.engines import EngineNetwork


def test_roundtrip_and_plain_split(tmp_path):
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    tensors: dict = {"w": torch.randn(3, 2)}
    meta = {"round": 7, "opt": S.split_plain(opt, "opt", tensors)}
    C.save(tmp_path, 7, tensors, meta)
    got = C.load_latest(tmp_path)
    assert got is not None and got.round == 7
    assert torch.equal(got.tensors["w"], tensors["w"])
    back = S.join_plain(got.meta["opt"], got.tensors)
    assert back["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(back["state"][0]["exp_avg"], opt["state"][0]["exp_avg"]) and 0 in back["state"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-checksum"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    C.save(tmp_path, 5, {"w": torch.zeros(100)}, {"round": 5})
    newest = C.save(tmp_path, 10, {"w": torch.ones(100)}, {"round": 10})
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:-37])
    elif damage == "flip":
        b = bytearray(newest.read_bytes())
        b[-5] ^= 0xFF
        newest.write_bytes(bytes(b))
    else:
        newest.with_suffix(".sha256").unlink()
    with pytest.raises(S.CheckpointError, match=r"checksum|no checksum"):
        C.read(newest)
    got = C.load_latest(tmp_path)
    assert got is not None and got.round == 5 and torch.equal(got.tensors["w"], torch.zeros(100))


def test_only_broken_checkpoints_gives_none(tmp_path):
    p = C.save(tmp_path, 1, {"w": torch.zeros(10)}, {})
    p.write_bytes(b"garbage")
    assert C.load_latest(tmp_path) is None


def test_keeps_the_last_two(tmp_path):
    for r in range(5):
        C.save(tmp_path, r, {"w": torch.zeros(1)}, {})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.safetensors")) == ["checkpoint-00000003.safetensors", "checkpoint-00000004.safetensors"]


def test_engine_state_roundtrip(tmp_path):
    topo = T.generate("ring", 4)
    net = EngineNetwork(topo, {p: synthetic_state(0, p, 2048) for p in topo.ids}, plan="topk:0.1")
    for _ in range(4):
        net.step()
    e = net.engines[1]
    tensors, meta = S.engine_state(e)
    C.save(tmp_path, e.round, tensors, meta)
    fresh = EngineNetwork(topo, {p: synthetic_state(9, p, 2048) for p in topo.ids}, plan="topk:0.1").engines[1]
    got = C.load_latest(tmp_path)
    S.restore_engine(fresh, got.tensors, got.meta)
    assert fresh.round == e.round and fresh.out_seq == e.out_seq
    for k in e.x:
        assert torch.equal(fresh.x[k], e.x[k]) and torch.equal(fresh.xhat[k], e.xhat[k])
    for j in e.replicas:
        assert fresh.replicas[j].next_seq == e.replicas[j].next_seq
        for k in e.x:
            assert torch.equal(fresh.replicas[j].xhat[k], e.replicas[j].xhat[k])
    bad = {k: (v[:1] if k.startswith("x/") else v) for k, v in got.tensors.items()}
    with pytest.raises(S.CheckpointError, match="layout"):
        S.restore_engine(fresh, bad, got.meta)
