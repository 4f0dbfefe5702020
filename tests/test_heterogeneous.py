"""Heterogeneous sites: per-peer trainer settings and their precedence, the keys every peer must
share, caption peers' contrastive loss, unlabelled peers' pseudo-labels, the report's grouping by
data kind, and a mixed shapes/digits ring of real processes."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.config import (
    MUST_AGREE,
    ConfigError,
    PeerConfig,
    TrainerConfig,
    peer_trainers,
    resolve,
    run_datasets,
)
from p2pfl.host.files import dump_topology, load_topology, read_jsonl
from p2pfl.learn import shapes, tasks
from p2pfl.learn.data import DataError, composition_test, folder_captions
from p2pfl.learn.trainer import Trainer, TrainerError
from p2pfl.ops.report import dataset_table, summarize

from .conftest import ROOT, make_topology, wait_all

HETEROGENEOUS = ROOT / "topologies" / "heterogeneous.yaml"


def _resolved(settings: dict, sets: list[str]) -> PeerConfig:
    return resolve(Path("t.yaml"), 0, settings, {}, sets, "t.yaml")[0]


def test_per_peer_trainer_sits_between_the_files_settings_and_set():
    cfg = _resolved({"trainer": {"local_steps": 5, "lr": 0.01, "domain": "noise"}}, ["lr=0.02"])
    entries = {0: {}, 1: {"trainer": {"local_steps": 7, "lr": 0.5, "dataset": "digits"}}, 2: {"public_key": "k"}}
    got = peer_trainers(cfg, entries, "t.yaml")
    assert got[0] == {"local_steps": 5, "lr": 0.02, "domain": "noise"}  # settings.trainer < --set
    assert got[1] == {"local_steps": 7, "lr": 0.02, "domain": "noise", "dataset": "digits"}  # entry over settings, --set over entry
    assert got[2] == got[0]
    assert TrainerConfig.from_dict(got[1]).batch_size == TrainerConfig().batch_size  # the defaults under all three
    assert run_datasets(got) == (("digits", "", "noise"), ("shapes", "shape", "noise"))


@pytest.mark.parametrize("key", sorted(MUST_AGREE))
def test_keys_every_peer_must_share_are_refused_in_a_peer_entry(key):
    value = {"lora_targets": "c_fc", "pretrained": "w.pt", "model": "m", "train_a": True, "text_lora": True}.get(key, 1)
    with pytest.raises(ConfigError, match=re.escape(f"t.yaml: peer 3: trainer: {key} cannot differ between peers: {MUST_AGREE[key]}")):
        peer_trainers(PeerConfig(Path("t.yaml"), 0), {0: {}, 3: {"trainer": {key: value}}}, "t.yaml")


def test_peer_entries_are_checked_like_settings_naming_the_peer_and_key():
    cfg = PeerConfig(Path("t.yaml"), 0)
    for trainer, why in [({"lcoal_steps": 3}, r"peer 2: trainer: unknown trainer key 'lcoal_steps'; did you mean 'local_steps'"),
                         ({"lr": "fast"}, r"peer 2: trainer: lr: expected a finite number, got 'fast'"),
                         ({"data_kind": "caption"}, r"peer 2: trainer: unknown data_kind 'caption'; did you mean 'captions'"),
                         ("shapes", r"peer 2: trainer: expected a mapping")]:
        with pytest.raises(ConfigError, match=why):
            peer_trainers(cfg, {2: {"trainer": trainer}}, "t.yaml")


def test_a_caption_peer_turns_the_text_tower_on_for_every_peer():
    got = peer_trainers(PeerConfig(Path("t.yaml"), 0), {0: {}, 1: {"trainer": {"data_kind": "captions"}}}, "t.yaml")
    assert got[0]["text_lora"] is got[1]["text_lora"] is True
    off = _resolved({"trainer": {"text_lora": False}}, [])
    with pytest.raises(ConfigError, match=r"text_lora is off, but peers \[1\] have data_kind captions"):
        peer_trainers(off, {0: {}, 1: {"trainer": {"data_kind": "captions"}}}, "t.yaml")


def test_the_shipped_heterogeneous_file_mixes_three_kinds_and_prints_per_peer(capsys):
    from p2pfl.ops.cli import peer_main

    topo = load_topology(HETEROGENEOUS)
    cfg = resolve(HETEROGENEOUS, 0, topo.settings, {}, [], str(HETEROGENEOUS))[0]
    got = peer_trainers(cfg, {p: s.extra for p, s in topo.peers.items()}, str(HETEROGENEOUS))
    assert {t["data_kind"] for t in got.values()} == {"labelled", "captions", "unlabelled"}
    assert peer_main(["--topology", str(HETEROGENEOUS), "--id", "1,2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "data_kind: captions  # peer 1's entry in" in out and "text_lora: true  # on for every peer" in out
    assert "# peer 2's trainer differs: {data_kind: unlabelled, domain: contrast+noise}" in out


def test_trainer_refuses_what_a_data_kind_cannot_do():
    with pytest.raises(TrainerError, match="captions trains the text tower"):
        Trainer(TrainerConfig(data_kind="captions"), 0, 8)
    with pytest.raises(TrainerError, match="augment and logit_adjust need labels"):
        Trainer(TrainerConfig(data_kind="unlabelled", logit_adjust=1.0), 0, 8)


def test_pseudo_labels_keep_the_confident_with_a_cap_per_class():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6], [0.55, 0.45], [0.3, 0.7]])
    idx, labels = tasks.select_pseudo_labels(probs, threshold=0.6, fraction=2 / 3)  # cap: 2 a class
    assert idx.tolist() == [0, 1, 3, 5] and labels.tolist() == [0, 0, 1, 1]  # 2 (third of class 0) and 4 (0.55) left out


def test_folder_captions_by_relative_path_or_file_name(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / c / "1.png")
    (tmp_path / "captions.tsv").write_text("# name\tcaption\ncat/1.png\ta sleeping cat\n1.png\ta dog\n")
    assert folder_captions(tmp_path) == ("a sleeping cat", "a dog")
    (tmp_path / "captions.tsv").write_text("cat/1.png\ta cat\n")
    with pytest.raises(DataError, match=re.escape("no caption for 'dog/1.png'")):
        folder_captions(tmp_path)


def test_composition_sets_hold_only_the_held_out_or_only_the_seen_pairs():
    held = {s * len(shapes.COLOURS) + c for s, c in shapes.HELD_OUT_PAIRS}
    unseen, seen = (composition_test("contrast", 0, 256, pairs) for pairs in ("unseen", "seen"))
    assert set(unseen.labels.tolist()) == held and len(unseen.class_names) == 64
    assert not set(seen.labels.tolist()) & held and len(set(seen.labels.tolist())) > 40
    assert not torch.equal(seen.images[:8], unseen.images[:8])
    with pytest.raises(DataError, match="pairs 'all' is not seen or unseen"):
        composition_test("contrast", 0, 16, "all")


def _fixed_caption_loss(t: Trainer) -> float:
    with torch.no_grad(), t.model.bound():
        return float(tasks.caption_loss(t.foundation, t.data.train.images[:64], t.data.captions[:64])[0])


def test_the_contrastive_loss_falls_on_a_caption_peer():
    t = Trainer(TrainerConfig(data_kind="captions", text_lora=True, local_steps=4, domain="noise"), 1, 8)
    assert len(t.data.captions) == len(t.data.train) and all(isinstance(c, str) and c for c in t.data.captions)
    before = _fixed_caption_loss(t)
    rounds = [t.train_round() for _ in range(3)]
    assert _fixed_caption_loss(t) < 0.9 * before
    assert rounds[0]["data_kind"] == "captions" and rounds[-1]["train_loss"] < rounds[0]["train_loss"]


def test_pseudo_label_accuracy_rises_over_rounds_on_a_shifted_domain():
    t = Trainer(TrainerConfig(data_kind="unlabelled", local_steps=3), 2, 8)  # the default shift: contrast+clutter
    acc = [t.train_round()["pseudo_label_accuracy"] for _ in range(5)]
    assert acc[-1] > acc[0] + 0.03, acc


def test_the_report_groups_peers_by_kind_with_a_table_by_dataset():
    def rec(p: int, kind: str, ds: str, acc: float) -> dict:
        return {"peer": p, "round": 0, "train_loss": 1.0, "accuracy": acc, "data_kind": kind, "dataset": ds,
                "dataset_accuracy": {"digits@clean": acc / 2, "shapes/shape@noise": acc}}

    s = summarize({0: [rec(0, "labelled", "shapes/shape@noise", 0.8)], 1: [rec(1, "unlabelled", "shapes/shape@noise", 0.4)],
                   2: [rec(2, "labelled", "digits@clean", 0.6)]}, None)
    assert s["kinds"]["labelled"]["peers"] == [0, 2] and s["kinds"]["labelled"]["accuracy_final_mean"] == pytest.approx(0.7)
    [(_, header, rows)] = dataset_table(s)
    assert header == ["peer", "data kind", "digits@clean", "shapes/shape@noise"]
    assert rows[0] == ["0", "labelled", "0.400", "0.800 *"] and rows[2] == ["2", "labelled", "0.300 *", "0.600"]
    assert rows[3] == ["mean (2)", "labelled", "0.350", "0.700"]
    assert summarize({0: [rec(0, "labelled", "d", 0.5)]}, None).get("kinds") is None  # one kind of one dataset: nothing to group


@pytest.mark.slow
def test_a_mixed_shapes_digits_ring_of_processes_beats_its_peers_trained_alone(tmp_path, spawn, cluster_dir):
    topo, path = make_topology(tmp_path, "ring", 4)
    topo.settings = {"rounds": 8, "trainer": {"partition": "dirichlet:0.5", "local_steps": 3, "eval_every": 8}}
    for p in topo.ids:
        topo.peers[p].extra["trainer"] = {"dataset": "shapes" if p % 2 == 0 else "digits"}
    dump_topology(topo, path)
    procs = {k: spawn(path, ids, cluster_dir, "--min-wait", "0.5", "--startup-timeout", "60") for k, ids in enumerate(("0,2", "1,3"))}
    assert wait_all(procs, 600) == {0: 0, 1: 0}
    mixed = {p: read_jsonl(cluster_dir / "metrics" / f"peer-{p}.jsonl")[-1] for p in topo.ids}
    assert {mixed[p]["dataset"] for p in topo.ids} == {"shapes/shape@contrast+clutter", "digits@clean"}
    assert set(mixed[0]["dataset_accuracy"]) == {"shapes/shape@contrast+clutter", "digits@clean"}
    cfg = resolve(path, 0, topo.settings, {}, [], str(path))[0]
    options = peer_trainers(cfg, {p: s.extra for p, s in topo.peers.items()}, str(path))
    for group in ((0, 2), (1, 3)):
        alone = []
        for p in group:
            t = Trainer(TrainerConfig.from_dict(options[p]), p, topo.n, datasets=run_datasets(options))
            for _ in range(8):
                t.train_round()
            alone.append(t.evaluate(global_eval=True)["global_accuracy"])
        assert np.mean([mixed[p]["global_accuracy"] for p in group]) > np.mean(alone), (group, mixed, alone)
