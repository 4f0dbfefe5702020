"""Operations: clean shutdown on SIGTERM, Prometheus metrics, resume past a damaged checkpoint."""

import signal
import urllib.request

import pytest
import torch

from p2pfl.config import PeerConfig
from p2pfl.host import checkpoint as ckpt
from p2pfl.host.daemon import Host
from p2pfl.host.files import read_jsonl

from .conftest import free_base_port, make_topology, records, wait_all, wait_until


@pytest.mark.slow
def test_sigterm_checkpoints_says_goodbye_and_exits_zero_and_metrics_are_scrapable(tmp_path, cluster_dir, spawn):
    topo, path = make_topology(tmp_path, "ring", 3)
    port = free_base_port(1)
    common = ["--rounds", "300", "--no-train", "--dim", "4096", "--round-period", "0.1", "--peer-timeout", "30"]
    procs = {p: spawn(path, p, cluster_dir, *common, *(["--metrics-port", str(port)] if p == 0 else [])) for p in topo.ids}
    wait_until(lambda: len(records(cluster_dir, 1)) >= 8, 120, "peer 1's first eight rounds", procs.values())
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'p2pfl_round{peer="0"}' in body and 'p2pfl_consensus_distance{peer="0"}' in body
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=60) == 0
    log1 = (cluster_dir / "logs" / "peer-1.log").read_text()
    assert "stopping after round" in log1
    stopped = ckpt.load_latest(cluster_dir / "peer-1")
    assert stopped is not None and stopped.round >= 7
    wait_until(lambda: len(records(cluster_dir, 0)) >= stopped.round + 5, 120, "peer 0's rounds after peer 1 stopped")
    log0 = (cluster_dir / "logs" / "peer-0.log").read_text()
    assert "neighbour 1 said goodbye" in log0  # marked down at once, not after the 30 s timeout
    for p in (0, 2):
        procs[p].send_signal(signal.SIGINT)
    codes = wait_all({p: procs[p] for p in (0, 2)}, timeout=60)
    assert codes == {0: 0, 2: 0}
    rounds = [r["round"] for r in read_jsonl(cluster_dir / "metrics" / "peer-0.jsonl")]
    assert rounds == sorted(rounds) and rounds[-1] < 299


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path):
    _, path = make_topology(tmp_path, "ring", 3)
    run = tmp_path / "run"
    cfg = PeerConfig(topology=path, id=0, run_dir=run, no_train=True, dim=1024)
    host = Host(cfg, [0])
    h = host.peers[0]
    peer = h.node
    peer.mixer.engine.round = 4
    peer.mixer.engine.x = {k: v + 1 for k, v in peer.mixer.engine.x.items()}
    peer.round = 4
    host._checkpoint(h, 4)
    good = {k: v.clone() for k, v in peer.mixer.engine.x.items()}
    peer.mixer.engine.round = peer.round = 9
    peer.mixer.engine.x = {k: v * 0 + 123 for k, v in peer.mixer.engine.x.items()}
    host._checkpoint(h, 9)
    newest = sorted((run / "peer-0").glob("checkpoint-*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    resumed = Host(PeerConfig(topology=path, id=0, run_dir=run, no_train=True, dim=1024, resume=True), [0]).peers[0].node
    assert resumed.start_round == 5
    for k, v in good.items():
        assert torch.equal(resumed.mixer.engine.x[k], v)
