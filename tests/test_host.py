"""The asyncio host of several co-hosted peers: a failing peer is reported, the others go on."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from p2pfl.config import PeerConfig
from p2pfl.host.daemon import Host
from p2pfl.host.files import read_jsonl
from p2pfl.node.build import make_parts
from p2pfl.node.node import Node

from .conftest import ROOT, make_topology


class StubTrainer:
    """Local steps that add a constant; peer `bad` raises in its second round."""

    def __init__(self, p: int, bad: int) -> None:
        self.p, self.bad, self.rounds, self.x = p, bad, 0, {"w": torch.full((64,), float(p))}

    def adapter_state(self):
        return {k: v.clone() for k, v in self.x.items()}

    def load_adapter_state(self, state) -> None:
        self.x = {k: v.clone() for k, v in state.items()}

    def train_round(self):
        self.rounds += 1
        if self.p == self.bad and self.rounds == 2:
            raise RuntimeError("injected trainer failure")
        self.x = {k: v + 1.0 for k, v in self.x.items()}
        return {"train_loss": 1.0 / self.rounds}

    def evaluate(self, global_eval: bool = False):
        out = {"accuracy": 0.5, "test_loss": 1.0}
        if global_eval:
            out["global_accuracy"] = 0.5
        return out

    def optimizer_state(self):
        return {"tensors": {}, "meta": {}}


def test_a_trainer_that_raises_is_reported_by_id_and_the_others_finish(tmp_path, caplog):
    _, path = make_topology(tmp_path, "ring", 3)
    cfg = PeerConfig(topology=path, id=0, run_dir=tmp_path / "run", no_train=True, rounds=4, min_wait=0.2, sketch_dim=64)
    host = Host(cfg, [0, 1, 2], trainers=lambda c, topo, worker: StubTrainer(c.id, bad=1))
    with caplog.at_level(logging.ERROR):
        code = asyncio.run(host.run())
    assert code == 1
    assert any("peer 1: train failed: injected trainer failure" in r.getMessage() for r in caplog.records)
    assert any("peers [1] failed" in r.getMessage() for r in caplog.records)
    for p in (0, 2):
        recs = read_jsonl(tmp_path / "run" / "metrics" / f"peer-{p}.jsonl")
        assert [r["round"] for r in recs] == [0, 1, 2, 3] and recs[0]["train_loss"] == 1.0 and "train_s" in recs[0]
    assert [r["round"] for r in read_jsonl(tmp_path / "run" / "metrics" / "peer-1.jsonl")] == [0]


def test_a_fault_in_a_peers_round_fails_that_peer_instead_of_stopping_its_clock(tmp_path, caplog):
    """An exception inside a node's tick used to end that peer's timer silently: the peer hung and
    the process never exited. Now it is logged, the peer finishes with code 1, the others go on.
    Paced rounds (`round_period`) and heartbeats wake every peer on its clock, so a tick comes
    during round 2 or later however loaded the machine is."""
    _, path = make_topology(tmp_path, "ring", 3)
    cfg = PeerConfig(topology=path, id=0, run_dir=tmp_path / "run", no_train=True, rounds=8, min_wait=0.2, sketch_dim=64,
                     round_period=0.5, heartbeat=0.25)
    calls = {"n": 0}

    class Faulty(Node):
        def tick(self, now: float):
            calls["n"] += 1
            if self.rnd >= 2:
                raise ValueError("injected fault in a round")
            return super().tick(now)

    def nodes(c: PeerConfig, topo, spec, log):
        return (Faulty if c.id == 1 else Node)(c, spec, make_parts(c, topo, spec, log), log)

    host = Host(cfg, [0, 1, 2], nodes=nodes)
    with caplog.at_level(logging.ERROR):
        code = asyncio.run(asyncio.wait_for(host.run(), 120))
    assert code == 1 and calls["n"] > 0
    assert any(re.fullmatch(r"peer 1: internal error in round \d+: injected fault in a round", r.getMessage()) for r in caplog.records)
    assert any("peers [1] failed" in r.getMessage() for r in caplog.records)
    for p in (0, 2):
        assert [r["round"] for r in read_jsonl(tmp_path / "run" / "metrics" / f"peer-{p}.jsonl")] == list(range(8))


def _folder(root, peer: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(peer)
    for c in ("red", "blue"):
        d = root / f"peer-{peer}" / c
        d.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.slow
def test_a_missing_data_folder_fails_one_cohosted_peer_and_the_process_exits_nonzero(tmp_path):
    _, path = make_topology(tmp_path, "ring", 3)
    for p in (0, 2):  # peer 1's folder is missing
        _folder(tmp_path / "data", p)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "p2pfl", "--topology", str(path), "--id", "0-2", "--run-dir", str(run),
                           "--rounds", "2", "--startup-timeout", "3", "--min-wait", "0.5", "--set", f'dataset="folder:{tmp_path / "data"}"',
                           "--set", "local_steps=1", "--set", "batch_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "peer 1: cannot start" in proc.stderr and "is not a directory" in proc.stderr
    for p in (0, 2):
        assert [r["round"] for r in read_jsonl(run / "metrics" / f"peer-{p}.jsonl")] == [0, 1]


def test_a_fault_in_the_transition_after_training_fails_that_peer_and_the_others_finish(tmp_path, caplog):
    """The training answer comes back in a future's callback; an exception in the node's next
    transition there used to vanish into the event loop, leaving the peer stuck in training and
    the process running forever."""

    class Faulty(Node):
        def trained(self, metrics, state, now):
            if self.me == 1 and self.rnd == 1:
                raise ValueError("injected fault after training")
            return super().trained(metrics, state, now)

    def nodes(c: PeerConfig, topo, spec, log):
        return Faulty(c, spec, make_parts(c, topo, spec, log), log)

    _, path = make_topology(tmp_path, "ring", 3)
    cfg = PeerConfig(topology=path, id=0, run_dir=tmp_path / "run", no_train=True, rounds=4, min_wait=0.2, sketch_dim=64)
    host = Host(cfg, [0, 1, 2], trainers=lambda c, topo, worker: StubTrainer(c.id, bad=-1), nodes=nodes)
    with caplog.at_level(logging.ERROR):
        code = asyncio.run(asyncio.wait_for(host.run(), 120))
    assert code == 1
    assert any("peer 1: internal error in round 1: injected fault after training" in r.getMessage() for r in caplog.records)
    for p in (0, 2):
        assert [r["round"] for r in read_jsonl(tmp_path / "run" / "metrics" / f"peer-{p}.jsonl")] == [0, 1, 2, 3]


def test_checkpoints_of_cohosted_peers_hold_no_process_wide_rng(tmp_path):
    """Co-hosted peers share one process-wide torch RNG, so a per-peer copy of it could never be
    restored for one of them. Nothing a peer computes reads it (every draw takes a generator
    seeded from the run seed, the peer and the step; `test_training_reads_no_process_wide_rng`),
    so checkpoints hold none and a co-hosted peer resumes as reproducibly as a lone one."""
    from p2pfl.host import checkpoint as ckpt

    _, path = make_topology(tmp_path, "ring", 3)
    cfg = PeerConfig(topology=path, id=0, run_dir=tmp_path / "run", no_train=True, rounds=2, min_wait=0.2, sketch_dim=64)
    assert asyncio.run(asyncio.wait_for(Host(cfg, [0, 1, 2], trainers=lambda c, topo, w: StubTrainer(c.id, bad=-1)).run(), 120)) == 0
    for p in (0, 1, 2):
        found = ckpt.load_latest(tmp_path / "run" / f"peer-{p}")
        assert found is not None and "optimizer" in found.meta and "torch_rng" not in found.meta
        assert not any(k.startswith("rng/") for k in found.tensors)


def test_training_reads_no_process_wide_rng():
    from p2pfl.config import TrainerConfig
    from p2pfl.learn.trainer import Trainer

    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        t = Trainer(TrainerConfig(local_steps=2, samples_per_peer=64, global_test_size=32, augment="zero-shot"), 0, 4)
        t.train_round()
        states.append(t.adapter_state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
