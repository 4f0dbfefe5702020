"""Peer settings: --id lists and ranges, the launcher's blocks, worker counts; topology settings,
typed --set options and --print-config, all checked before torch is imported; the error base."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from p2pfl.config import (
    ConfigError,
    PeerConfig,
    TrainerConfig,
    parse_ids,
    parse_sets,
    peer_trainers,
    resolve,
    worker_threads,
)
from p2pfl.core.specs import check_peer
from p2pfl.core.topology import PeerSpec, generate
from p2pfl.errors import P2pflError
from p2pfl.host.daemon import local_ids
from p2pfl.host.files import dump_topology, load_topology
from p2pfl.learn.options import check_trainers
from p2pfl.ops.launch import spread

from .conftest import ROOT


def test_ids_ranges_lists_and_local():
    ids = list(range(16))
    assert parse_ids("3", ids) == [3]
    assert parse_ids("0-3", ids) == [0, 1, 2, 3]
    assert parse_ids("9,1,5-6", ids) == [1, 5, 6, 9]
    assert parse_ids("local", ids, {4, 2}) == [2, 4]
    for bad, why in [("5-2", "empty range"), ("1,x", "not an id"), ("14-17", r"\[16, 17\] are not in the topology"),
                     ("1,1", "names a peer twice"), ("local", "no peer of the topology")]:
        with pytest.raises(ConfigError, match=why):
            parse_ids(bad, ids, set())


def test_local_ids_are_the_peers_on_this_machine():
    topo = generate("ring", 3)
    topo.peers[2] = PeerSpec(2, "192.0.2.7", 29502)  # TEST-NET-1: never this machine
    assert local_ids(topo) == {0, 1}


def test_spread_gives_contiguous_even_blocks_and_never_an_empty_one():
    assert spread(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert spread(list(range(10)), 4) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert spread([0, 1], 8) == [[0], [1]]
    blocks = spread(list(range(256)), 3)
    assert [p for b in blocks for p in b] == list(range(256)) and {len(b) for b in blocks} <= {85, 86}


def test_worker_threads():
    assert worker_threads(0, 1, 2) == 1  # one peer: one worker
    assert worker_threads(0, 64, 2) == 2  # one per core
    assert worker_threads(3, 2, 16) == 2  # never more than peers
    with pytest.raises(ConfigError, match="--threads"):
        worker_threads(-1, 4, 2)


# ---------------------------------------------------------------- settings, --set and --print-config

def _peer_main(*argv: str) -> subprocess.CompletedProcess:
    """`p2pfl-peer ARGV` in a fresh interpreter that also reports whether torch got imported."""
    code = ("import sys\nfrom p2pfl.ops.cli import peer_main\nrc = peer_main(sys.argv[1:])\n"
            "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _topology(tmp_path, settings: dict) -> Path:
    topo = generate("ring", 3)
    topo.settings = settings
    path = tmp_path / "ring.yaml"
    dump_topology(topo, path)
    return path


def test_a_misspelt_set_key_is_refused_before_torch_is_imported(tmp_path):
    run = _peer_main("--topology", str(ROOT / "topologies" / "ring.yaml"), "--id", "0", "--set", "local_step=3",
                     "--run-dir", str(tmp_path))
    assert run.returncode == 2, run.stderr
    first, rest = run.stderr.split("\n", 1)
    assert first == "p2pfl-peer: --set: unknown trainer key 'local_step'; did you mean 'local_steps'?"
    assert "torch imported: False" in rest


@pytest.mark.parametrize(("settings", "message"), [
    ({"trainer": {"lora_rnak": 4}}, "settings.trainer: unknown trainer key 'lora_rnak'; did you mean 'lora_rank'?"),
    ({"roudns": 4}, "settings: unknown setting 'roudns'; did you mean 'rounds'?"),
    ({"checkpoint_every": "often"}, "settings.checkpoint_every: expected an integer, got 'often'"),
    ({"trainer": {"lr": [1]}}, "settings.trainer: lr: expected a finite number, got [1]"),
    ({"trainer": "fast"}, "settings.trainer: expected a mapping of trainer options, got 'fast'"),
    ({"dim": 0}, "dim: expected an integer >= 1, got 0 (from the"),
])
def test_bad_topology_settings_are_one_line_errors_before_torch(tmp_path, settings, message):
    path = _topology(tmp_path, settings)
    run = _peer_main("--topology", str(path), "--id", "0", "--run-dir", str(tmp_path / "run"))
    assert run.returncode == 2, run.stderr
    first, rest = run.stderr.split("\n", 1)
    assert first.startswith("p2pfl-peer: ") and message in first, first
    assert "torch imported: False" in rest


def _write(tmp_path, doc: dict) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _peers(n: int) -> list[dict]:
    return [{"id": i, "host": "127.0.0.1", "port": 29500 + i} for i in range(n)]


SCHEDULE = {"name": "s", "peers": _peers(4), "schedule": "epidemic:2"}
WIDE = {"name": "wide", "peers": _peers(65), "edges": [[i, (i + 1) % 65] for i in range(65)]}
ENTRY = {"name": "e", "peers": [*_peers(2), {"id": 2, "host": "127.0.0.1", "port": 29502, "trainer": {"optimizer": "adamx"}}],
         "edges": [[0, 1], [1, 2], [2, 0]]}


@pytest.mark.parametrize(("topology", "argv", "message"), [
    (None, ["--set", "optimizer=adamx"], "trainer config: optimizer 'adamx' is not adamw or sgd"),
    (None, ["--compress", "sgn"], "--compress 'sgn': unknown codec 'sgn' in 'sgn'; known: none,"),
    (None, ["--compress", "fp16,*A*=topk:0.1+topk:0.2"], "'topk:0.2' cannot compress the kept values"),
    (None, ["--robust", "trimmed:0"], "robust: trimmed needs B >= 1, got '0'"),
    (None, ["--byzantine", "scale:x"], "--byzantine: scale:F needs a finite factor F, got 'scale:x'"),
    (None, ["--clusters", "many"], "--clusters: expected off, auto or a positive integer, got 'many'"),
    (None, ["--monitor-share", "-1"], "--monitor-share: expected a number >= 0, got -1.0"),
    (None, ["--clusters", "2", "--cluster-beta", "1.5"], "--cluster-beta: expected a number in [0, 1] with --clusters, got 1.5"),
    (WIDE, ["--clusters", "auto"], "--clusters: PPFM floods every peer's fingerprint, so at most 64 peers; this topology has 65"),
    (None, ["--algorithm", "gt", "--robust", "median"], "--algorithm gt with --robust: not supported"),
    (SCHEDULE, ["--compress", "sign"], "--compress sign: epidemic:2 draws fresh edges, so no replica corrects a lossy codec"),
    (SCHEDULE, ["--robust", "median"], "a schedule with --robust: not supported"),
    (None, ["--set", "lr_schedule=cosine:0"], "trainer config: lr_schedule 'cosine:0' is not 'constant' or 'cosine:ROUNDS'"),
    (None, ["--set", "partition=dirichlet:-1"], "partition: parameter in 'dirichlet:-1' must be > 0"),
    (None, ["--set", "partition=groups:task=shape,hue"], "task: 'hue' is not one of ('shape', 'colour'"),
    (None, ["--set", "dataset=mnist"], "dataset: 'mnist' is not shapes, digits or folder:PATH"),
    (None, ["--set", "task=hue"], "task: 'hue' is not one of"),
    (None, ["--set", "domain=sepia"], "domain: unknown shift 'sepia'"),
    (None, ["--set", "dataset=digits", "--set", "domain=rotation"], "domain: 'rotation'; digits support only pixel shifts"),
    (None, ["--set", "data_kind=unlabelled", "--set", "augment=zero-shot"], "data_kind unlabelled: augment and logit_adjust need labels"),
    (None, ["--set", "augment=zero-shot", "--set", "augment_confidence=1.5"], "augment_confidence: 1.5 not in (0, 1]"),
    (None, ["--set", "device=tpu"], "trainer config: device 'tpu' is not cpu, cuda, cuda:N or auto"),
    (None, ["--set", "dp_epsilon=0"], "trainer config: dp_epsilon 0.0 must be > 0"),
    (None, ["--set", "dp_noise=1", "--set", "augment=zero-shot"], "augment 'zero-shot' with DP"),
    (None, ["--set", "lora_targets=qkv"], "lora targets: ['qkv'] not a non-empty subset of"),
    (ENTRY, [], ": peer 2: trainer config: optimizer 'adamx' is not adamw or sgd"),
])
def test_a_bad_value_is_refused_naming_it_before_torch_is_imported(tmp_path, topology, argv, message):
    path = _write(tmp_path, topology) if topology else ROOT / "topologies" / "ring.yaml"
    run = _peer_main("--topology", str(path), "--id", "0", "--run-dir", str(tmp_path / "run"), *argv)
    assert run.returncode == 2, run.stderr
    first, rest = run.stderr.split("\n", 1)
    assert first.startswith("p2pfl-peer: ") and message in first, first
    assert "torch imported: False" in rest
    assert not (tmp_path / "run").exists()


def test_good_values_pass_the_early_checks_without_torch(tmp_path):
    """What the early checks accept, the peer would run: the values of the refusals above, right."""
    sets = ["partition=groups:task=shape,colour", "lr_schedule=cosine:5", "device=cuda:1", "augment=zero-shot",
            "augment_confidence=1", "dp_clip=2", "lora_targets=in_proj,c_fc", "domain=noise+blur"]
    run = _peer_main("--topology", str(ROOT / "topologies" / "ring.yaml"), "--print-config", "--compress", "topk:0.1+int8",
                     "--robust", "trimmed:1", "--byzantine", "alie", "--clusters", "2", *(f for s in sets for f in ("--set", s)))
    assert run.returncode == 0 and "torch imported: False" in run.stderr, run.stderr
    run = _peer_main("--topology", str(ROOT / "topologies" / "one_peer_exponential.yaml"), "--print-config", "--compress", "sign")
    assert run.returncode == 0, run.stderr  # its edges recur: CHOCO's replicas correct a lossy codec


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "topologies").glob("*.yaml") if p.name != "network.yaml"),
                         ids=lambda p: p.name)  # network.yaml: an open network's file (tests/test_admission.py)
def test_every_shipped_topology_passes_the_early_checks(path):
    topo = load_topology(path)
    cfg, _ = resolve(path, topo.ids[0], topo.settings, {}, [], str(path))
    entries = {p: s.extra for p, s in topo.peers.items()}
    check_peer(cfg, topo)
    check_trainers(peer_trainers(cfg, entries, str(path)), cfg.seed, entries, str(path))


def test_set_values_are_typed_by_the_trainer_config_fields():
    got = parse_sets(["local_steps=5", "lr=1e-3", 'partition="dirichlet:0.1"', "domain=", "train_a=yes",
                      "logit_adjust=none", "pretrained=null", "lora_targets=in_proj, c_fc", "augment_steps=7",
                      "local_steps=6"])
    assert got == {"local_steps": 6, "lr": 0.001, "partition": "dirichlet:0.1", "domain": "", "train_a": True,
                   "logit_adjust": None, "pretrained": None, "lora_targets": ("in_proj", "c_fc"), "augment_steps": 7}
    assert TrainerConfig.from_dict(got).lora_targets == ("in_proj", "c_fc")
    for item, message in [("local_steps=2.5", "--set local_steps: expected an integer, got '2.5'"),
                          ("lr=fast", "--set lr: expected a finite number, got 'fast'"),
                          ("lr=inf", "--set lr: expected a finite number, got 'inf'"),
                          ("train_a=maybe", "--set train_a: expected true or false, got 'maybe'"),
                          ("augment_steps=many", "--set augment_steps: expected an integer or none, got 'many'"),
                          ("local_steps", "--set: expected KEY=VALUE, got 'local_steps'"),
                          ("batchsize=8", "did you mean 'batch_size'?")]:
        with pytest.raises(ConfigError) as e:
            parse_sets([item])
        assert message in str(e.value)


def test_trainer_options_in_yaml_are_type_checked_and_yaml_strings_parsed():
    assert TrainerConfig.from_dict({"lr": "3e-3", "lora_alpha": 16, "lora_targets": ["c_fc"]}) == TrainerConfig(
        lr=0.003, lora_alpha=16.0, lora_targets=("c_fc",))
    for bad in ({"local_steps": True}, {"task": None}, {"lora_targets": []}, {"seed": 1.5}):
        with pytest.raises(ConfigError, match=f"trainer config: {next(iter(bad))}: expected"):
            TrainerConfig.from_dict(bad)


def test_precedence_defaults_then_topology_then_flags(tmp_path):
    settings = {"rounds": 7, "seed": 3, "compress": "fp16", "clusters": 2, "run_dir": "runs/x",
                "trainer": {"local_steps": 4, "lr": 0.5}}
    cfg, origin = resolve(tmp_path / "t.yaml", 1, settings, {"rounds": 9}, ["lr=0.25"], "t.yaml")
    assert (cfg.rounds, cfg.seed, cfg.compress, cfg.clusters, cfg.run_dir) == (9, 3, "fp16", "2", Path("runs/x"))
    assert cfg.sketch_dim == PeerConfig.sketch_dim and "sketch_dim" not in origin
    assert cfg.trainer == {"local_steps": 4, "lr": 0.25}
    assert origin == {"rounds": "command line", "seed": "t.yaml", "compress": "t.yaml", "clusters": "t.yaml",
                      "run_dir": "t.yaml", "trainer.local_steps": "t.yaml", "trainer.lr": "--set"}


def test_print_config_shows_the_effective_settings_and_exits_without_torch(tmp_path):
    path = _topology(tmp_path, {"rounds": 7, "compress": "sign:2048", "trainer": {"local_steps": 4}})
    run_dir = tmp_path / "run"
    run = _peer_main("--topology", str(path), "--print-config", "--rounds", "9", "--set", "lr=0.25", "--run-dir", str(run_dir))
    assert run.returncode == 0, run.stderr
    assert "torch imported: False" in run.stderr
    assert not run_dir.exists()  # printed, not run
    lines = run.stdout.splitlines()
    assert "rounds: 9  # command line" in lines and f"compress: 'sign:2048'  # {path}" in lines
    assert "  local_steps: 4  # " + str(path) in lines and "  lr: 0.25  # --set" in lines
    assert f"sketch_dim: {PeerConfig.sketch_dim}" in lines  # a default, unmarked
    shown = yaml.safe_load(run.stdout)
    assert shown["trainer"] == TrainerConfig.from_dict({"local_steps": 4, "lr": 0.25}).to_dict()
    # What it prints is a valid `settings:` block that gives the same config back.
    again, _ = resolve(path, 0, shown, {}, [], "shown")
    first, _ = resolve(path, 0, {"rounds": 9, "compress": "sign:2048", "trainer": {"local_steps": 4, "lr": 0.25}}, {}, [], "t")
    assert again.rounds == first.rounds and again.compress == first.compress
    assert TrainerConfig.from_dict(again.trainer) == TrainerConfig.from_dict(first.trainer)


def test_missing_file_bad_yaml_and_missing_id_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("peers: [\n")
    for argv, message in [(["--topology", str(tmp_path / "nope.yaml"), "--id", "0"], "cannot read topology file"),
                          (["--topology", str(bad), "--id", "0"], "invalid YAML at line"),
                          (["--topology", str(ROOT / "topologies" / "ring.yaml")], "--id: required")]:
        run = _peer_main(*argv)
        assert run.returncode == 2 and run.stderr.count("\n") == 2 and message in run.stderr, run.stderr


def test_every_error_derives_from_p2pfl_error():
    import p2pfl

    found = {}
    for info in pkgutil.walk_packages(p2pfl.__path__, "p2pfl."):
        if info.name == "p2pfl.__main__":
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    assert {"p2pfl.core.topology.TopologyError", "p2pfl.core.wire.WireError", "p2pfl.config.ConfigError"} <= set(found)
    assert [n for n, c in found.items() if not issubclass(c, P2pflError)] == []
    value_errors = [n for n, c in found.items() if c is not P2pflError and not issubclass(c, ValueError)]
    assert sorted(value_errors) == ["p2pfl.ops.report.ReportError", "p2pfl.sim.simulation.SimulationError"]  # bad values everywhere else


def test_each_ppfm_default_is_the_peer_configs():
    from p2pfl.ppfm.cluster import ClusterState
    from p2pfl.ppfm.levels import PpfmConfig

    p, s = PpfmConfig(), ClusterState()
    assert (p.recluster_every, p.global_every, p.lam, p.beta, p.margin, p.fingerprint_dim) == (
        PeerConfig.recluster_every, PeerConfig.global_every, PeerConfig.global_lambda, PeerConfig.cluster_beta,
        PeerConfig.cluster_margin, PeerConfig.fingerprint_dim)
    assert (s.every, s.margin) == (PeerConfig.recluster_every, PeerConfig.cluster_margin)
