"""Gradient tracking with local steps (K-GT, `--algorithm gt`) against decentralized SGD.

The peers hold a strongly convex least-squares problem each, f_i(x) = 1/2 ||A_i x - b_i||^2 with
different minimisers (heterogeneous data), and run K full-gradient steps of a constant size per
round: the daemon's own rounds in the simulator. Both algorithms are linear iterations here, so
their limits are known in closed form: D-SGD's fixed point X = W (M X + c) (M_i = (I - eta H_i)^K),
which is not the optimum of sum_i f_i, and K-GT's, which is.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.core import topology as T
from p2pfl.host.files import dump_topology
from p2pfl.node.build import make_node
from p2pfl.node.node import NodeSpec
from p2pfl.node.tracking import TRACK
from p2pfl.sim.simulation import train_network

N, D, M, K = 8, 8, 16, 5


class LeastSquares:
    """One peer's K gradient steps on 1/2 ||A x - b||^2, plus K-GT's correction when it gets one."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, eta: float) -> None:
        self.a, self.b, self.eta = a, b, eta
        self.x = torch.zeros(a.shape[1])
        self.drift = torch.zeros(a.shape[1])

    def adapter_state(self):
        return {"w": self.x.clone()}

    def load_adapter_state(self, state) -> None:
        self.x = state["w"].clone()

    def set_correction(self, correction) -> None:
        self.drift = correction["w"] / K  # as `Trainer.set_correction`: the round's correction in equal steps

    def train_round(self):
        for _ in range(K):
            self.x = self.x - self.eta * (self.a.T @ (self.a @ self.x - self.b)) - self.drift
        return {}

    def evaluate(self, global_eval: bool = False):
        return {"accuracy": float("nan"), "global_accuracy": float("nan")}


def problem(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, float]:
    """Per-peer (A_i, b_i) around minimisers far apart, the optimum of the sum, and a step 1/(2L)."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(M, D, generator=g) / math.sqrt(M) for _ in range(N)]
    b = [ai @ (3 * torch.randn(D, generator=g)) + 0.1 * torch.randn(M, generator=g) for ai in a]
    h = sum(ai.T.double() @ ai.double() for ai in a)
    optimum = torch.linalg.solve(h, sum(ai.T.double() @ bi.double() for ai, bi in zip(a, b, strict=True)))
    lip = max(float(torch.linalg.eigvalsh(ai.T @ ai).max()) for ai in a)
    return a, b, optimum, 0.5 / lip


def dsgd_fixed_point(w: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], eta: float) -> torch.Tensor:
    """X with X = W (M X + c): K local steps x -> M_i x + c_i, then mixing with W."""
    eye = torch.eye(D, dtype=torch.float64)
    ms, cs = [], []
    for ai, bi in zip(a, b, strict=True):
        step = eye - eta * ai.T.double() @ ai.double()
        ms.append(torch.linalg.matrix_power(step, K))
        cs.append(sum(torch.linalg.matrix_power(step, k) for k in range(K)) @ (eta * ai.T.double() @ bi.double()))
    mix = torch.kron(w, eye)
    x = torch.linalg.solve(torch.eye(N * D, dtype=torch.float64) - mix @ torch.block_diag(*ms), mix @ torch.cat(cs))
    return x.reshape(N, D)


def run(topo: T.Topology, algorithm: str, rounds: int, compress: str = "none") -> torch.Tensor:
    a, b, _, eta = problem()
    sim = train_network(topo, {p: LeastSquares(a[p], b[p], eta) for p in topo.ids}, rounds, algorithm=algorithm, sketch_dim=0,
                        compress=compress)
    return torch.stack([sim.models()[p]["w"].double() for p in topo.ids])


def test_gradient_tracking_reaches_the_optimum_where_dsgd_with_the_same_constant_step_stalls():
    topo = T.generate("ring", N)
    a, b, optimum, eta = problem()
    stall = dsgd_fixed_point(torch.from_numpy(topo.mixing_matrix()), a, b, eta)
    scale = float(optimum.norm())
    assert float((stall - optimum).norm(dim=1).max()) > 0.3 * scale  # heterogeneity: D-SGD's limit is off the optimum
    dsgd, gt = run(topo, "dsgd", 800), run(topo, "gt", 800)
    assert float((dsgd - stall).norm(dim=1).max()) < 1e-5 * scale  # D-SGD lands on its predicted fixed point
    assert float((gt - optimum).norm(dim=1).max()) < 1e-5 * scale  # K-GT on the optimum, with the same step


@pytest.mark.parametrize("spec,compress", [("one-peer-exponential", "int8"), ("random-regular:3", "none"), ("epidemic:2", "none")])
def test_gradient_tracking_reaches_the_optimum_on_every_schedule(spec, compress):
    """Per-edge CHOCO replicas (with a codec), whole models, and push-sum (whose corrections move
    in numerator form) all keep the corrections summing to zero."""
    _, _, optimum, _ = problem()
    gt = run(T.scheduled(spec, N), "gt", 500, compress)
    assert float((gt - optimum).norm(dim=1).max()) < 1e-5 * float(optimum.norm())


def test_the_tracking_variable_travels_in_the_same_messages_and_counts_in_their_bytes():
    topo = T.generate("ring", 4)
    a, b, _, eta = problem()
    runs = {alg: train_network(topo, {p: LeastSquares(a[p], b[p], eta) for p in topo.ids}, 3, algorithm=alg, sketch_dim=0)
            for alg in ("dsgd", "gt")}
    dsgd, gt = ([r["payload_bytes"] for r in runs[alg].records[0]] for alg in ("dsgd", "gt"))
    assert gt == [2 * p for p in dsgd] and runs["gt"].messages == runs["dsgd"].messages
    assert sum(runs["gt"].bytes_sent.values()) > 1.9 * sum(runs["dsgd"].bytes_sent.values()) - 4 * 3 * 2 * 1024
    assert set(runs["gt"].models()[0]) == {"w"}  # evaluation and checkpoints see the model alone
    assert set(runs["gt"].nodes[0].mixer.engine.x) == {"w", TRACK + "w"}


def test_the_correction_survives_a_checkpoint():
    topo = T.generate("ring", 4)
    cfg = PeerConfig(topology=Path("mem"), id=0, algorithm="gt", sketch_dim=0)
    node = make_node(cfg, topo, NodeSpec(x0={"w": torch.zeros(D)}, inc=1, train=True))
    node.algo.correction["w"] += torch.arange(D, dtype=torch.float32)
    tensors, meta = node.checkpoint_state()
    back = make_node(cfg, topo, NodeSpec(x0={"w": torch.zeros(D)}, inc=2, train=True))
    back.resume(tensors, meta, -1)
    assert torch.equal(back.algo.correction["w"], torch.arange(D, dtype=torch.float32))


def test_the_trainer_moves_its_adapter_by_the_correction_over_a_round():
    from p2pfl.config import TrainerConfig
    from p2pfl.learn.trainer import Trainer

    cfg = TrainerConfig.from_dict({"optimizer": "sgd", "lr": 0.0, "local_steps": 4, "samples_per_peer": 64, "global_test_size": 50})
    t = Trainer(cfg, 0, 2)
    before = t.adapter_state()
    c = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in before.items()}
    t.set_correction(c)
    t.train_round()  # lr 0: only the correction moves it, a quarter per step
    after = t.adapter_state()
    assert all(torch.allclose(after[k], before[k] - c[k], atol=1e-6) for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_the_flag_and_a_topology_setting_choose_the_algorithm(tmp_path):
    from p2pfl.ops.cli import build_peer_config

    path = tmp_path / "t.yaml"
    dump_topology(T.scheduled("epidemic:2", 6), path)
    path.write_text(path.read_text() + "settings: {algorithm: gt}\n")
    assert build_peer_config(["--topology", str(path), "--id", "0"])[0].algorithm == "gt"
    assert build_peer_config(["--topology", str(path), "--id", "0", "--algorithm", "dsgd"])[0].algorithm == "dsgd"
    with pytest.raises(SystemExit):
        build_peer_config(["--topology", str(path), "--id", "0", "--algorithm", "adam"])


@pytest.mark.parametrize("kw,needle", [({"robust": "median"}, "gt with --robust"), ({"clusters": "2"}, "gt with --clusters")])
def test_gradient_tracking_refuses_rules_that_break_the_zero_sum_of_corrections(kw, needle):
    cfg = PeerConfig(topology=Path("mem"), id=0, algorithm="gt", sketch_dim=0, **kw)
    with pytest.raises(ConfigError, match=needle):
        make_node(cfg, T.generate("ring", 4), NodeSpec(x0={"w": torch.zeros(D)}, inc=1, train=True))
