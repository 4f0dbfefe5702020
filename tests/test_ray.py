"""The launcher on a Ray cluster: Ray's own multi-node test cluster (two raylets on this machine,
one CPU each, so the two actors land one per node), peers talking ZeroMQ over TCP between the
actors, the run gathered into one local run directory.

The same run under the local launcher (one process) and on Ray (two actors) decides the same:
with exact gossip and deadlines that never fire the final adapters are bit-identical, and training
gives the same losses. A killed actor is restarted by Ray and its peers resume from their
checkpoints; the gathered run directory resumes as a local one does.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from p2pfl.errors import P2pflError
from p2pfl.host.checkpoint import load_state
from p2pfl.host.files import load_topology, read_jsonl
from p2pfl.ops.ray_launch import add_options, layout, wants_gpu

from .conftest import ROOT, make_topology

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def cluster():
    """A head node and a worker node of one CPU each, for every test of a pytest(-xdist worker)
    session: pytest-xdist 3.8's xdist_group does not keep a module's tests together under pytest 9,
    so a module scope could start one per test."""
    pytest.importorskip("ray", reason="Ray is the optional extra .[ray] (the Makefile's setup installs it)")
    from ray.cluster_utils import Cluster

    # Ray's workers take ports the kernel picks (min_worker_port 0), not from 10002-19999, where the
    # peers of tests beside this one draw theirs.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "min_worker_port": 0})
    try:
        c.add_node(num_cpus=1, min_worker_port=0)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def launch(path: Path, run_dir: Path, *args: str, timeout: float = 400) -> str:
    """`scripts/launch.sh` to the end; its output, which must end in exit 0."""
    done = subprocess.run([str(ROOT / "scripts" / "launch.sh"), str(path), "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def actors_of(out: str) -> list[tuple[str, str, str, int]]:
    """(peers, address, node, pid) of each actor, from the launcher's lines."""
    return [(m[1], m[2], m[3], int(m[4])) for m in re.finditer(r"launch: actor \d+: peers (\S+) on (\S+) node (\w+) \(pid (\d+)\)", out)]


def same_adapters(a: Path, b: Path, p: int) -> bool:
    x, y = (load_state(d / f"peer-{p}" / "adapter.safetensors") for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_ray_is_imported_only_by_the_ray_launcher_and_only_when_it_runs():
    """The core install works without the extra: no module imports Ray at its top level, and
    only p2pfl/ops/ray_launch.py imports it at all."""
    users = {}
    for path in sorted((ROOT / "p2pfl").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for n in ast.walk(tree):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            if any(x == "ray" or x.startswith("ray.") for x in names):
                users.setdefault(path.relative_to(ROOT).as_posix(), []).append("top" if id(n) in top else "lazy")
    assert set(users) == {"p2pfl/ops/ray_launch.py"} and set(users["p2pfl/ops/ray_launch.py"]) == {"lazy"}, users


def options(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_options(ap)
    return ap.parse_args(["--ray", *argv])


NODES = [{"Resources": {"CPU": 16.0, "GPU": 2.0}}, {"Resources": {"CPU": 8.0, "GPU": 2.0}}]


@pytest.mark.parametrize(("argv", "gpu", "want"), [
    ((), False, (2, 8.0, 0.0)),  # one actor per node, the smallest node's CPUs
    ((), True, (4, 4.0, 1.0)),  # device auto/cuda: one actor and one GPU per GPU
    (("--peers-per-actor", "10"), False, (7, 2.0, 0.0)),  # 64 peers: 7 actors, 4 on a node
    (("--actors", "3", "--actor-cpus", "5", "--actor-gpus", "0.5"), True, (3, 5.0, 0.5)),
    (("--actors", "100"), False, (64, 1.0, 0.0)),  # never more actors than peers, at least one CPU each
])
def test_actors_follow_the_nodes_the_gpus_or_the_options(argv, gpu, want):
    assert layout(options(*argv), 64, NODES, 4.0, gpu) == want


def test_the_peers_device_decides_whether_actors_ask_for_gpus(tmp_path):
    topo, path = make_topology(tmp_path, "ring", 4)
    assert not wants_gpu(path, topo, [])
    assert wants_gpu(path, topo, ["--set", "device=auto"])
    assert not wants_gpu(path, topo, ["--set", "device=auto", "--no-train"])
    with pytest.raises(P2pflError, match="device"):
        wants_gpu(path, topo, ["--set", "device=tpu"])


@pytest.mark.slow
def test_ring16_no_train_over_two_nodes_gives_the_local_launchers_adapters(tmp_path, cluster):
    topo, path = make_topology(tmp_path, "ring", 16)
    peer = ["--no-train", "--dim", "16384", "--min-wait", "20", "--sketch-dim", "256"]
    launch(path, tmp_path / "local", "--rounds", "10", "--processes", "1", "--no-report", "--", *peer)
    out = launch(path, tmp_path / "ray", "--rounds", "10", "--ray", cluster.address, "--", *peer)
    actors = actors_of(out)
    assert [a[0] for a in actors] == ["0-7", "8-15"] and len({a[2] for a in actors}) == 2, out  # one actor per node
    assert "alive 16/16" in out and (tmp_path / "ray" / "report" / "summary.html").exists()
    ran = load_topology(tmp_path / "ray" / "topology.yaml")  # the addresses the actors filled in
    assert ran.graph.edges == topo.graph.edges and {ran.peers[p].host for p in topo.ids} == {a[1] for a in actors}
    for p in topo.ids:
        assert same_adapters(tmp_path / "local", tmp_path / "ray", p), p
        ra, rb = (read_jsonl(tmp_path / d / "metrics" / f"peer-{p}.jsonl") for d in ("local", "ray"))
        assert [r["round"] for r in ra] == [r["round"] for r in rb] == list(range(10))
        # Estimates come every few rounds within the monitoring budget: the same rounds carry one, with the same value.
        ca, cb = ([r["consensus_distance"] for r in recs] for recs in (ra, rb))
        assert [c is None for c in ca] == [c is None for c in cb] and any(c is not None for c in ca)
        assert [c for c in ca if c is not None] == pytest.approx([c for c in cb if c is not None], rel=1e-12)
        assert (tmp_path / "ray" / "logs" / f"peer-{p}.log").stat().st_size > 0
        assert sum(r["bytes_sent"] for r in rb) > 0 and all(r["late_neighbors"] == [] for r in ra + rb)


@pytest.mark.slow
def test_ring8_training_on_ray_gives_the_local_launchers_losses(tmp_path, cluster):
    _, path = make_topology(tmp_path, "ring", 8)
    sets = ["local_steps=2", "samples_per_peer=64", "global_test_size=100", "partition=\"dirichlet:0.5\""]
    peer = ["--min-wait", "60", "--sketch-dim", "256", *[a for s in sets for a in ("--set", s)]]
    launch(path, tmp_path / "local", "--rounds", "3", "--processes", "1", "--no-report", "--", *peer)
    launch(path, tmp_path / "ray", "--rounds", "3", "--ray", cluster.address, "--no-report", "--", *peer)
    for p in range(8):
        ra, rb = (read_jsonl(tmp_path / d / "metrics" / f"peer-{p}.jsonl") for d in ("local", "ray"))
        assert [r["round"] for r in rb] == [0, 1, 2] and all(r["train_s"] > 0 for r in rb)
        for k in ("train_loss", "accuracy", "test_loss"):
            assert [r[k] for r in rb] == pytest.approx([r[k] for r in ra], rel=1e-5, abs=1e-6), (p, k)


def launch_until(path: Path, run_dir: Path, args: list[str], reached: int, act) -> str:
    """`scripts/launch.sh` in a session of its own; once every peer has passed round `reached`,
    `act(pid of the launcher, output so far)`; then its output, which must end in exit 0."""
    pr = subprocess.Popen([str(ROOT / "scripts" / "launch.sh"), str(path), "--run-dir", str(run_dir), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(pr.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 240
        while not any((m := re.search(r"rounds (\d+)\.\.", ln)) and int(m[1]) > reached for ln in lines):
            assert pr.poll() is None and time.monotonic() < end, "".join(lines)[-3000:]
            time.sleep(0.2)
        act(pr.pid, "".join(lines))
        assert pr.wait(timeout=240) == 0, "".join(lines)[-3000:]
    finally:
        if pr.poll() is None:
            os.killpg(pr.pid, signal.SIGKILL)
        pr.wait()
    reader.join(5)
    return "".join(lines)


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_its_peers_resume_and_the_run_resumes_until_ctrl_c(tmp_path, cluster):
    rounds = 24
    _, path = make_topology(tmp_path, "ring", 4)
    peer = ["--no-train", "--dim", "1024", "--round-period", "1.0", "--checkpoint-every", "2", "--peer-timeout", "3"]
    out = launch_until(path, tmp_path / "run", ["--rounds", str(rounds), "--ray", cluster.address, "--no-report", "--", *peer],
                       5, lambda _pid, out: os.kill(actors_of(out)[1][3], signal.SIGKILL))
    assert "actor 1 (peers 2-3) died; Ray restarts it" in out, out[-3000:]
    for p in range(4):
        recs = read_jsonl(tmp_path / "run" / "metrics" / f"peer-{p}.jsonl")
        assert recs[-1]["round"] == rounds - 1, (p, recs[-1])  # every peer finished
    for p in (2, 3):
        log = (tmp_path / "run" / "logs" / f"peer-{p}.log").read_text()
        assert "resumed from checkpoint-" in log, log[-2000:]
    # The gathered run goes on from its exit checkpoints (taken after the drain rounds) as a local one
    # would, each peer's files sent back to its actor first, until Ctrl-C (SIGINT to the terminal's
    # process group) stops every peer at the end of a round.
    out = launch_until(tmp_path / "run" / "topology.yaml", tmp_path / "run", ["--rounds", str(rounds + 100), "--ray", cluster.address,
                       "--no-report", "--", *peer, "--resume"], rounds + 2, lambda pid, _out: os.killpg(pid, signal.SIGINT))
    assert "stopping every actor" in out and '"exit_codes": {"0": 0, "1": 0, "2": 0, "3": 0}' in out, out[-3000:]
    for p in range(4):
        more = [r["round"] for r in read_jsonl(tmp_path / "run" / "metrics" / f"peer-{p}.jsonl") if r["round"] >= rounds]
        assert len(more) >= 2 and more == list(range(more[0], more[-1] + 1)) and more[-1] < rounds + 50, (p, more)
        log = (tmp_path / "run" / "logs" / f"peer-{p}.log").read_text()
        assert f"next round {more[0]}" in log.rsplit("resumed from checkpoint-", 1)[-1], log[-2000:]
