"""One topology, several process layouts over real loopback TCP: the same rounds, the same numbers.

Co-hosted peers exchange frames in process and remote ones over TCP; the node decides the same
either way, so with exact gossip and deadlines that never fire the final adapters are bit-identical,
and training gives the same losses and accuracies.
"""

from __future__ import annotations

import pytest
import torch

from p2pfl.host.checkpoint import load_state
from p2pfl.host.files import read_jsonl

from .conftest import make_topology, run_layout


@pytest.mark.slow
def test_ring8_no_train_eight_processes_and_one_give_bit_identical_adapters(tmp_path, spawn):
    topo, path = make_topology(tmp_path, "ring", 8)
    args = ["--rounds", "12", "--no-train", "--dim", "16384", "--min-wait", "20", "--sketch-dim", "256"]
    run_layout(spawn, path, tmp_path / "eight", [str(p) for p in topo.ids], *args)
    run_layout(spawn, path, tmp_path / "one", ["0-7"], *args)
    for p in topo.ids:
        a = load_state(tmp_path / "eight" / f"peer-{p}" / "adapter.safetensors")
        b = load_state(tmp_path / "one" / f"peer-{p}" / "adapter.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), p
        ra, rb = (read_jsonl(tmp_path / d / "metrics" / f"peer-{p}.jsonl") for d in ("eight", "one"))
        assert [r["round"] for r in ra] == [r["round"] for r in rb] == list(range(12))
        assert [r["consensus_distance"] for r in ra] == pytest.approx([r["consensus_distance"] for r in rb], rel=1e-12)
        assert sum(r["bytes_sent"] for r in rb) > 0 and all(r["late_neighbors"] == [] for r in ra + rb)


@pytest.mark.slow
def test_ring4_training_over_tcp_half_in_process_and_in_one_process_gives_the_same_losses_and_accuracies(tmp_path, spawn):
    """Every ring edge over TCP (peers 0, 2 in one process, 1, 3 in the other), two edges in process
    and two over TCP (0-1 and 2-3), all in one process. Each training process loads the learning
    stack, so the layouts take two processes at most."""
    topo, path = make_topology(tmp_path, "ring", 4)
    sets = ["local_steps=2", "samples_per_peer=64", "global_test_size=100", "partition=\"dirichlet:0.5\""]
    args = ["--rounds", "3", "--min-wait", "60", "--sketch-dim", "256", *[a for s in sets for a in ("--set", s)]]
    layouts = {"tcp": ["0,2", "1,3"], "half": ["0-1", "2-3"], "one": ["0-3"]}
    for name, blocks in layouts.items():
        run_layout(spawn, path, tmp_path / name, blocks, *args)
    keys = ("train_loss", "accuracy", "test_loss")
    for p in topo.ids:
        runs = {name: read_jsonl(tmp_path / name / "metrics" / f"peer-{p}.jsonl") for name in layouts}
        ref = runs["tcp"]
        assert [r["round"] for r in ref] == [0, 1, 2] and all(r["train_s"] > 0 for r in ref)
        for name, recs in runs.items():
            for k in keys:
                assert [r[k] for r in recs] == pytest.approx([r[k] for r in ref], rel=1e-5, abs=1e-6), (name, p, k)
            assert recs[-1]["global_accuracy"] == pytest.approx(ref[-1]["global_accuracy"], abs=1e-9)
