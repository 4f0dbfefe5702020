"""Heterogeneous sites on one ring: peers with different datasets, data kinds and domains.

Three scenarios on a ring of 8 (per-peer trainer settings merged by `p2pfl.config.peer_trainers`,
as a topology file's peer entries are):
- a: shapes peers (shape task, contrast+clutter) and digits peers, alternating on the ring, with
  the main job's Dirichlet 0.5 label skew (so that a dataset's peers need each other);
- b: labelled, caption and unlabelled shapes peers on three shifted domains;
- c: every peer unlabelled but one labelled peer, on one shifted domain;
- b1: b's peers all on the labelled peers' domain, the control that tells what the data kinds do
  from what the domain shifts between them do.
Three arms of the same peers (same data shares, rounds and local steps): ``mixed`` (every peer
gossips on the ring: the daemon's rounds in `p2pfl.sim.simulation`), ``by_kind`` (each kind gossips only
with its own kind, on a ring of its own; a kind of one peer trains alone) and ``alone``; with
``--arms`` also ``mixed_ppfm``: every peer on the ring with PPFM's levels on (``--clusters auto``),
so each peer ends on its cluster's model while the global level still mixes across clusters
(``--clusters K`` fixes the number of clusters instead); ``oracle``: the mixed ring with every
unlabelled peer training on its hidden labels, the supervised ceiling of the unlabelled targets at
the same budget (domain adaptation's usual upper bound); ``without_captions``: the mixed ring
without the caption peers, the counterfactual of "caption peers' gossip raises ...". For each
kind: zero-shot and final global accuracy on its own task and on every dataset of the run;
unlabelled peers' pseudo-label accuracy; labelled peers' accuracy on held-out compositions.
Prints one JSON line. usage: python bench/heterogeneous.py [--rounds 20] [--local-steps 5]
[--scenarios a,b,c] [--arms mixed,by_kind,alone[,mixed_ppfm,oracle,without_captions]] [--clusters auto|K] [--seed 0]
[--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from common import emit

from p2pfl.config import PeerConfig, dataset_key, dataset_name, parse_sets, peer_trainers, run_datasets
from p2pfl.core.topology import PeerSpec, Topology, generate_graph
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.simulation import train_network

N = 8
LABELLED, CAPTIONS, UNLABELLED = "labelled", "captions", "unlabelled"


def scenario(name: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[int, str]]:
    """(settings.trainer, each peer's own trainer: entry, each peer's kind in the tables)."""
    if name == "a":
        entries = {p: {"dataset": "shapes"} if p % 2 == 0 else {"dataset": "digits"} for p in range(N)}
        return {"partition": "dirichlet:0.5"}, entries, {p: e["dataset"] for p, e in entries.items()}
    if name in ("b", "b1"):
        kinds = [LABELLED, CAPTIONS, UNLABELLED, LABELLED, CAPTIONS, UNLABELLED, LABELLED, CAPTIONS]
        domain = {LABELLED: "contrast+clutter", CAPTIONS: "noise+clutter", UNLABELLED: "contrast+noise"}
        if name == "b1":
            domain = dict.fromkeys(domain, domain[LABELLED])
        return {}, {p: {"data_kind": k, "domain": domain[k]} for p, k in enumerate(kinds)}, dict(enumerate(kinds))
    if name == "c":
        kinds = [LABELLED] + [UNLABELLED] * (N - 1)
        return {}, {p: {"data_kind": k} for p, k in enumerate(kinds)}, dict(enumerate(kinds))
    raise SystemExit(f"--scenarios: unknown scenario {name!r} (a, b, c, b1)")


def ring(ids: list[int]) -> Topology:
    """A ring over `ids` (their own ids kept: each trainer keeps its share of the data)."""
    graph = nx.Graph()
    graph.add_nodes_from(ids)
    graph.add_edges_from((ids[a], ids[b]) for a, b in generate_graph("ring", len(ids)).edges)
    return Topology({p: PeerSpec(p, "127.0.0.1", 30000 + p) for p in ids}, graph, name=f"ring-{len(ids)}")


def make_trainers(configs: Mapping[int, TrainerConfig], datasets: tuple) -> dict[int, Trainer]:
    return {p: Trainer(c, p, N, datasets=datasets) for p, c in configs.items()}


def gossip(trainers: dict[int, Trainer], rounds: int, clusters: str = "off") -> dict[int, dict[str, Any]]:
    """The last record of each peer, with the first's zero-shot figures (``*_before``) and its
    round-0 training metrics (``first_*``)."""
    sim = train_network(ring(sorted(trainers)), trainers, rounds, sketch_dim=0, clusters=clusters)
    out = {}
    for p in trainers:
        first, last = sim.records[p][0], sim.records[p][-1]
        out[p] = {**{f"first_{k}": v for k, v in first.items()}, **first, **last}  # with PPFM, last has cluster_labels
    return out


def alone(trainers: dict[int, Trainer], rounds: int) -> dict[int, dict[str, Any]]:
    out = {}
    for p, t in trainers.items():
        before = {f"{k}_before": v for k, v in t.evaluate(global_eval=True).items()}
        metrics = [t.train_round() for _ in range(rounds)]
        out[p] = {**before, **{f"first_{k}": v for k, v in metrics[0].items()}, **metrics[-1], **t.evaluate(global_eval=True)}
    return out


def arm(name: str, configs: Mapping[int, TrainerConfig], kinds: Mapping[int, str], datasets: tuple, rounds: int,
        clusters: str = "auto") -> dict[int, dict[str, Any]]:
    if name == "alone":
        return alone(make_trainers(configs, datasets), rounds)
    if name in ("mixed", "mixed_ppfm"):
        return gossip(make_trainers(configs, datasets), rounds, clusters if name == "mixed_ppfm" else "off")
    if name == "oracle":
        labelled = {p: dataclasses.replace(c, data_kind=LABELLED) if kinds[p] == UNLABELLED else c for p, c in configs.items()}
        return gossip(make_trainers(labelled, datasets), rounds)
    if name == "without_captions":
        return gossip(make_trainers({p: c for p, c in configs.items() if kinds[p] != CAPTIONS}, datasets), rounds)
    out: dict[int, dict[str, Any]] = {}
    for kind in sorted(set(kinds.values())):
        ids = [p for p in configs if kinds[p] == kind]
        group = make_trainers({p: configs[p] for p in ids}, datasets)
        out.update(gossip(group, rounds) if len(ids) > 1 else alone(group, rounds))
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return round(float(np.mean(vals)), 4) if vals else None


def by_kind(records: Mapping[int, Mapping[str, Any]], kinds: Mapping[int, str], own: Mapping[int, str]) -> dict[str, Any]:
    """Per kind: own-task global accuracy (zero-shot and final), accuracy on each dataset, and the
    kind-specific figures, averaged over the kind's peers."""
    out: dict[str, Any] = {}
    for kind in sorted({kinds[p] for p in records}):
        ids = [p for p in records if kinds[p] == kind]
        recs = [records[p] for p in ids]
        names = sorted({n for r in recs for n in r.get("dataset_accuracy", {})})
        row: dict[str, Any] = {
            "peers": ids, "dataset": own[ids[0]],
            "zero_shot": _mean([r["global_accuracy_before"] for r in recs]),
            "own_task": _mean([r["global_accuracy"] for r in recs]),
            "on_dataset": {n: _mean([r["dataset_accuracy"][n] for r in recs]) for n in names},
            "on_dataset_zero_shot": {n: _mean([r["dataset_accuracy_before"][n] for r in recs]) for n in names},
        }
        if "composition_accuracy" in recs[0]:
            row["composition"] = _mean([r["composition_accuracy"] for r in recs])
            row["composition_zero_shot"] = _mean([r["composition_accuracy_before"] for r in recs])
            row["composition_seen_pairs"] = _mean([r["composition_seen_accuracy"] for r in recs])
            row["composition_seen_pairs_zero_shot"] = _mean([r["composition_seen_accuracy_before"] for r in recs])
        if "pseudo_label_accuracy" in recs[0]:
            row["pseudo_label_accuracy_first_round"] = _mean([r["first_pseudo_label_accuracy"] for r in recs])
            row["pseudo_label_accuracy_last_round"] = _mean([r["pseudo_label_accuracy"] for r in recs])
            row["pseudo_label_coverage_last_round"] = _mean([r["pseudo_label_coverage"] for r in recs])
        out[kind] = row
    return out


def run_scenario(name: str, rounds: int, local_steps: int, seed: int, arms: list[str], clusters: str = "auto",
                 sets: tuple[str, ...] = ()) -> dict[str, Any]:
    settings, entries, kinds = scenario(name)
    overrides = parse_sets(sets)  # over the settings and every peer's entry, as --set is for a topology file
    cfg = PeerConfig(topology=Path(f"heterogeneous-{name}"), id=0, seed=seed,
                     trainer={"local_steps": local_steps, "eval_every": rounds, **settings, **overrides}, trainer_sets=overrides)
    options = peer_trainers(cfg, {p: {"trainer": e} for p, e in entries.items()}, f"scenario {name}")
    configs = {p: TrainerConfig.from_dict({"seed": seed, **o}) for p, o in options.items()}
    datasets = run_datasets(options)
    own = {p: dataset_name(dataset_key(c.dataset, c.task, c.domain)) for p, c in configs.items()}
    out: dict[str, Any] = {"kinds": {str(p): k for p, k in kinds.items()}, "entries": {str(p): e for p, e in entries.items()},
                           "datasets": [dataset_name(k) for k in datasets], "text_lora": configs[0].text_lora}
    for a in arms:
        t0 = time.time()
        records = arm(a, configs, kinds, datasets, rounds, clusters)
        out[a] = by_kind(records, kinds, own)
        if a == "mixed_ppfm":
            out[a].update({k: records[0][k] for k in ("cluster_labels", "cluster_evaluated_round", "cluster_best_split_silhouette",
                                                      "cluster_split_bar", "cluster_held_quality")})
        out[a]["seconds"] = round(time.time() - t0, 1)
    out["targets"] = targets(name, out)
    return out


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100 * (a - b), 2)


def targets(name: str, r: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, measured on the arms that ran: gains in points and whether each is met."""
    t: dict[str, Any] = {}
    mixed, kind, solo = r.get("mixed"), r.get("by_kind"), r.get("alone")
    if name == "a" and kind is not None:
        for label, arm_ in (("", mixed), ("ppfm_", r.get("mixed_ppfm"))):
            for k in ("shapes", "digits") if arm_ is not None else ():
                cost = _points(kind[k]["own_task"], arm_[k]["own_task"])
                t[f"{label}{k}_mixing_cost_points"] = cost
                t[f"{label}{k}_mixing_cost_at_most_2"] = cost is not None and cost <= 2
                if solo is not None:
                    t[f"{label}{k}_gain_over_alone_points"] = _points(arm_[k]["own_task"], solo[k]["own_task"])
    if mixed is not None and UNLABELLED in mixed and solo is not None:
        u = mixed[UNLABELLED]
        gain0, gain_alone = _points(u["own_task"], u["zero_shot"]), _points(u["own_task"], solo[UNLABELLED]["own_task"])
        t.update(unlabelled_gain_over_zero_shot_points=gain0, unlabelled_gain_over_zero_shot_at_least_10=gain0 is not None and gain0 >= 10,
                 unlabelled_gain_over_self_training_alone_points=gain_alone,
                 unlabelled_gain_over_self_training_alone_at_least_5=gain_alone is not None and gain_alone >= 5)
    if r.get("oracle") is not None and UNLABELLED in r["kinds"].values():  # the same peers with their hidden labels
        u = r["oracle"][UNLABELLED]
        t["unlabelled_with_hidden_labels_gain_over_zero_shot_points"] = _points(u["own_task"], u["zero_shot"])
    if mixed is not None and CAPTIONS in mixed and kind is not None:
        lab_mixed, lab_kind = mixed[LABELLED].get("composition"), kind[LABELLED].get("composition")
        t["labelled_composition_mixed_minus_labelled_only_points"] = _points(lab_mixed, lab_kind)
        t["labelled_composition_mixed_minus_zero_shot_points"] = _points(lab_mixed, mixed[LABELLED].get("composition_zero_shot"))
        t["caption_gossip_raises_labelled_composition"] = (lab_mixed or 0) > (lab_kind or 0)
    if mixed is not None and r.get("without_captions") is not None and CAPTIONS in mixed:
        t["labelled_composition_mixed_minus_without_captions_points"] = _points(
            mixed[LABELLED].get("composition"), r["without_captions"][LABELLED].get("composition"))
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--arms", default="mixed,by_kind,alone", help="of mixed, by_kind, alone, mixed_ppfm, oracle, without_captions (the targets need the first three)")
    ap.add_argument("--clusters", default="auto", help="PPFM's clusters in the mixed_ppfm arm: auto or a number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option of every peer, over its entry")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    out: dict[str, Any] = {"bench": "heterogeneous", "peers": N, "topology": "ring", "rounds": args.rounds,
                           "local_steps": args.local_steps, "seed": args.seed, "sets": args.set}
    for name in args.scenarios.split(","):
        out[name] = run_scenario(name, args.rounds, args.local_steps, args.seed, args.arms.split(","), args.clusters, tuple(args.set))
    out["seconds"] = round(time.time() - t0, 1)
    emit(out)


if __name__ == "__main__":
    main()
