"""Placeholder hosts filled from a job's machines (p2pfl/ops/placement.py), and the SLURM batch
script run to the end on this machine with stand-ins for `scontrol` and `srun`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from p2pfl.core import topology as T
from p2pfl.core.topology import TopologyError
from p2pfl.host.files import dump_topology, load_topology, read_jsonl
from p2pfl.ops.placement import assign_hosts, fill, fill_hosts
from p2pfl.ops.placement import main as placement_main

from .conftest import ROOT, free_base_port

NODES = ["gpu-a01", "gpu-a02", "gpu-b07"]


def test_at_peers_go_to_the_machines_in_contiguous_blocks_and_at_k_to_machine_k():
    hosts = {p: "@" for p in range(7)} | {7: "@2", 8: "10.0.0.9"}
    got = assign_hosts(hosts, NODES)
    assert [got[p] for p in range(7)] == ["gpu-a01"] * 2 + ["gpu-a02"] * 2 + ["gpu-b07"] * 3
    assert got[7] == "gpu-b07" and got[8] == "10.0.0.9"


def test_fewer_at_peers_than_machines_leave_the_last_machines_empty():
    assert assign_hosts({0: "@", 1: "@"}, NODES) == {0: "gpu-a01", 1: "gpu-a02"}


@pytest.mark.parametrize(("host", "machines", "says"), [
    ("@3", NODES, "the job has 3 machines"),
    ("@x", NODES, "is not a placeholder"),
    ("@", [], "machine list is empty"),
])
def test_bad_placeholders_are_refused_naming_the_peer(host, machines, says):
    with pytest.raises(TopologyError, match=says):
        assign_hosts({0: "127.0.0.1", 5: host}, machines)


def test_a_filled_file_keeps_everything_but_the_addresses(tmp_path):
    topo = T.generate("ring", 6, base_port=29500, host="@")
    doc = topo.to_dict()
    doc["settings"] = {"rounds": 7}
    doc["peers"][0]["trainer"] = {"lr": 0.01}
    text = yaml.safe_dump(doc, sort_keys=False)
    filled = T.parse(fill_hosts(text, NODES[:2], "ring.yaml"), "filled")
    assert [filled.peers[p].host for p in range(6)] == ["gpu-a01"] * 3 + ["gpu-a02"] * 3
    assert [filled.peers[p].port for p in range(6)] == list(range(29500, 29506))
    assert filled.graph.edges == topo.graph.edges and filled.settings == {"rounds": 7}
    assert filled.peers[0].extra == {"trainer": {"lr": 0.01}}


def test_filling_two_peers_onto_one_address_is_refused():
    doc = T.generate("ring", 3, base_port=29500).to_dict()
    with pytest.raises(TopologyError, match=r"both use 10\.1\.1\.1:4000"):
        fill(doc, {0: ("10.1.1.1", 4000), 1: ("10.1.1.1", 4000)})


def test_the_command_line_fills_a_file_and_refuses_a_missing_hosts_file(tmp_path, capsys):
    path = tmp_path / "ring.yaml"
    dump_topology(T.generate("ring", 4, base_port=29500, host="@"), path)
    (tmp_path / "hosts").write_text("n1\nn2\n\n")
    assert placement_main([str(path), "--hosts-file", str(tmp_path / "hosts"), "-o", str(tmp_path / "out.yaml")]) == 0
    assert [s.host for s in load_topology(tmp_path / "out.yaml").peers.values()] == ["n1", "n1", "n2", "n2"]
    assert placement_main([str(path), "--hosts-file", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_the_slurm_script_fills_the_hosts_and_runs_every_peer(tmp_path):
    """Two "nodes", 127.0.0.1 and 127.0.0.2 (both this machine), from a stand-in `scontrol`; the
    stand-in `srun` runs its command once, so one process hosts every peer with `--id local`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames fake[1-2]" ] && printf "127.0.0.1\\n127.0.0.2\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    path = tmp_path / "ring.yaml"
    dump_topology(T.generate("ring", 4, base_port=free_base_port(4), host="@"), path)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "fake[1-2]",
           "SLURM_CPUS_ON_NODE": "1", "RUN_DIR": str(run), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "p2pfl.sbatch"), str(path), "--rounds", "4", "--no-train",
                           "--dim", "1024"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ran = load_topology(run / "topology.yaml")
    assert [ran.peers[p].host for p in range(4)] == ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"]
    for p in range(4):
        assert [r["round"] for r in read_jsonl(run / "metrics" / f"peer-{p}.jsonl")] == [0, 1, 2, 3]
    assert (run / "report" / "summary.html").exists()


def test_the_slurm_script_refuses_to_run_outside_a_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "p2pfl.sbatch"), "topologies/ring.yaml"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not inside a SLURM job" in done.stderr
    assert not Path(tmp_path / "run" / "topology.yaml").exists()
