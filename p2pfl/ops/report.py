"""The numbers of a run report, read from a run directory's JSONL metrics and adapters.

Peers never send their metrics anywhere, so the run directory is the only place a whole run can
be seen at once. A run is one of two kinds, told apart by its records (`run_kind`): in a
pure-averaging run (`--no-train`) the measured consensus contraction is set against the
spectral-gap bound of exact gossip, so the run is judged by theory; in a training run that bound
does not hold, and the consensus distance is shown relative to the adapters' own scale beside the
accuracy it buys.

`summarize` is pure (records in, dict out); `p2pfl.ops.pages` only draws and writes what it returns,
so tests can check every figure on the page against the records by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from p2pfl.core import netfile
from p2pfl.core import topology as topo_mod
from p2pfl.errors import P2pflError
from p2pfl.host.files import load_network, load_topology, read_jsonl

Record = Mapping[str, Any]
COUNTERS = ("rejected_messages", "duplicates", "dropped_messages")  # cumulative per peer
LAMBDA_ZERO = 1e-12  # below this W is 11^T/n to rounding: exact gossip agrees after one round
TRAINING, AVERAGING = "training", "averaging"
NETWORK_FILE = "network.yaml"  # an open network's run directory holds this instead of topology.yaml


class ReportError(P2pflError):
    """A run directory that cannot be reported on; the message says what is missing."""


# ---------------------------------------------------------------- reading


def _peer_id(path: Path) -> int | None:
    m = re.fullmatch(r"peer-(\d+)\.jsonl", path.name)
    return int(m.group(1)) if m else None


def _read_lenient(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """All records of one file; a line cut short by a peer killed mid-write is skipped, not fatal."""
    try:
        return read_jsonl(path)
    except json.JSONDecodeError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{path.name}: unreadable ({e})")
        return []
    out, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    notes.append(f"{path.name}: skipped {bad} line(s) that are not JSON")
    return out


def is_open_run(run_dir: Path) -> bool:
    """An open network's run directory: `network.yaml` and no topology file."""
    return (run_dir / NETWORK_FILE).exists() and not (run_dir / "topology.yaml").exists()


def load_run(run_dir: Path) -> tuple[topo_mod.Topology | None, dict[int, list[dict[str, Any]]], list[str]]:
    """Topology (None when unusable: the plots lose the bound, not the data; None in an open
    network's run, whose directory holds `network.yaml` instead), records, notes."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    notes: list[str] = []
    topo: topo_mod.Topology | None = None
    if not is_open_run(run_dir):
        try:
            topo = load_topology(run_dir / "topology.yaml")
        except topo_mod.TopologyError as e:
            notes.append(f"no usable topology, so no spectral bound: {e}")
    metrics = run_dir / "metrics"
    files = sorted((pid, f) for f in metrics.glob("peer-*.jsonl") if (pid := _peer_id(f)) is not None)
    if not files:
        raise ReportError(f"{run_dir}: no metrics (expected {metrics}/peer-<id>.jsonl); is this a run directory?")
    records = {pid: _read_lenient(f, notes) for pid, f in files}
    if topo is not None:
        missing = sorted(set(topo.ids) - set(records))
        if missing:
            notes.append(f"no metrics file for peer(s) {missing}")
    if not any(records.values()):
        raise ReportError(f"{metrics}: metrics files hold no records")
    return topo, records, notes


def load_network_file(run_dir: Path, notes: list[str]) -> netfile.Network | None:
    """An open network's file, when the run has one and no topology; a bad one is a note."""
    if not is_open_run(run_dir):
        return None
    try:
        return load_network(run_dir / NETWORK_FILE)
    except topo_mod.TopologyError as e:
        notes.append(f"unusable network file: {e}")
        return None


def load_adapters(run_dir: Path, ids: Sequence[int], notes: list[str]) -> list[np.ndarray] | None:
    """Every peer's model as saved at the end of the run, flattened in name order; None, with a
    note, when one is missing, unreadable or of another round than the others: an exact consensus
    distance is a property of the whole set of models at one moment."""
    from safetensors import SafetensorError, safe_open

    vectors, rounds, missing = [], set(), []
    for p in ids:
        path = run_dir / f"peer-{p}" / "adapter.safetensors"
        if not path.exists():
            missing.append(p)
            continue
        try:
            with safe_open(str(path), framework="numpy") as f:
                rounds.add((f.metadata() or {}).get("round"))
                vectors.append(np.concatenate([f.get_tensor(k).reshape(-1) for k in sorted(f.keys())]))
        except (OSError, SafetensorError, TypeError, ValueError) as e:
            notes.append(f"{path}: unreadable, so no exact consensus distance ({e})")
            return None
    if missing:
        notes.append(f"no saved adapter for peer(s) {missing}, so no exact consensus distance")
        return None
    if len(rounds) > 1 or len({v.size for v in vectors}) > 1:
        notes.append("the saved adapters are of different rounds or sizes, so no exact consensus distance")
        return None
    return vectors


# ---------------------------------------------------------------- pure computations


def record_number(rec: Record, key: str) -> float | None:
    """A finite number or None: fields may be missing, null (NaN on the wire) or of another type."""
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def index_records(records_by_peer: Mapping[int, Sequence[Record]]) -> dict[int, dict[int, Record]]:
    """peer -> round -> record, in round order; a round logged twice (a restarted peer) keeps the last."""
    out: dict[int, dict[int, Record]] = {}
    for p in sorted(records_by_peer):
        rounds: dict[int, Record] = {}
        for rec in records_by_peer[p]:
            r = rec.get("round") if isinstance(rec, Mapping) else None
            if isinstance(r, int) and not isinstance(r, bool) and r >= 0:
                rounds[r] = rec
        if rounds:
            out[p] = dict(sorted(rounds.items()))
    return out


def _latest(by_round: Mapping[int, Record], key: str) -> float | None:
    for rec in reversed(list(by_round.values())):
        v = record_number(rec, key)
        if v is not None:
            return v
    return None


def run_kind(idx: Mapping[int, Mapping[int, Record]]) -> str:
    """TRAINING when any record carries trainer metrics, else AVERAGING (a `--no-train` run).

    A training peer merges its trainer's `train_loss` into every round's record (null when a round
    had no batch); a peer that only averages never has one. Accuracy is no marker: evaluation
    skips rounds.
    """
    return TRAINING if any("train_loss" in rec for by_round in idx.values() for rec in by_round.values()) else AVERAGING


def model_scale(norms: Sequence[float]) -> float | None:
    """The scale a consensus distance is judged against: sqrt(1/n sum_i ||x_i||^2).

    The root mean square of the peers' model norms rather than the norm of the mean model, because
    Xi^2 = 1/n sum_i ||x_i||^2 - ||xbar||^2: Xi over this scale lies in [0, 1] (0: every peer holds
    the same model, 1: the models cancel out on average), while ||xbar|| can sit near zero
    (adapters start at zero, and peers pulling different ways keep their mean small) and make the
    ratio unbounded. It is also the one a peer can record alone: its own norm, `model_norm`.
    """
    return math.sqrt(math.fsum(v * v for v in norms) / len(norms)) if norms else None


class ExactConsensus(NamedTuple):
    xi: float  # sqrt(1/n sum_i ||x_i - xbar||^2)
    scale: float  # model_scale of the same models


def exact_consensus(vectors: Sequence[np.ndarray]) -> ExactConsensus:
    """The exact consensus distance of the peers' models (not empty) and their `model_scale`, in
    float64 whatever the models' dtype, so the sketch estimate can be checked against it."""
    x = np.stack([v.astype(np.float64) for v in vectors])
    xi = float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return ExactConsensus(xi, model_scale([float(np.linalg.norm(v)) for v in x]) or 0.0)


def uncompressed_extra_bytes(idx: Mapping[int, Mapping[int, Record]]) -> int | None:
    """How many more bytes the run's frames would have taken had every delta travelled
    uncompressed (`none`, fp32); negative when the codec's payload outgrew the dense one.

    A record gives its round's delta payload (`payload_bytes`, one copy) and `compression_ratio`
    (dense fp32 size over payload), and the delta goes to every live neighbour. Headers, sketches,
    heartbeats and resyncs cost the same under any codec, so they stay as `bytes_sent` measured
    them. None when a record lacks one of these fields, and for clustered (PPFM) runs, whose deltas
    go to overlay neighbours that records do not count.
    """
    extra = 0
    for by_round in idx.values():
        for rec in by_round.values():
            payload, ratio, fanout = (record_number(rec, k) for k in ("payload_bytes", "compression_ratio", "live_neighbors"))
            if payload is None or ratio is None or fanout is None or "cluster" in rec:
                return None
            extra += (round(ratio * max(1.0, payload)) - int(payload)) * int(fanout)
    return extra


def summarize(records_by_peer: Mapping[int, Sequence[Record]], lambda_: float | None,
              exact: ExactConsensus | None = None) -> dict[str, Any]:
    """Every number the report shows, from the records alone (plus lambda of the topology and the
    `exact_consensus` of the saved models, when known).

    Per-round series are over the union of rounds; a mean is over the peers that logged a finite
    value that round. "Final" accuracy is each peer's latest evaluated value (evaluation may skip
    rounds). Counters are cumulative per peer, so a peer contributes its largest value. The
    spectral bound and the measured contraction belong to averaging runs only, the consensus
    distance relative to the model scale to training runs only (see `run_kind`).
    """
    idx = index_records(records_by_peer)
    if not idx:
        raise ReportError("no records with a valid 'round' field")
    rounds = sorted({r for by_round in idx.values() for r in by_round})
    kind = run_kind(idx)

    def values(key: str, r: int) -> list[float]:
        return [v for p in idx if r in idx[p] and (v := record_number(idx[p][r], key)) is not None]

    def per_round_mean(key: str) -> list[float | None]:
        return [_mean(values(key, r)) for r in rounds]

    def per_round_sum(key: str) -> list[int]:
        return [int(sum(record_number(idx[p][r], key) or 0 for p in idx if r in idx[p])) for r in rounds]

    consensus = per_round_mean("consensus_distance")
    present = [(r, v) for r, v in zip(rounds, consensus, strict=True) if v is not None]
    sent, received = per_round_sum("bytes_sent"), per_round_sum("bytes_received")
    cumulative, acc_total = [], 0
    for b in sent:
        acc_total += b
        cumulative.append(acc_total)
    extra = uncompressed_extra_bytes(idx)
    ratios = [v for by_round in idx.values() for rec in by_round.values()
              if (v := record_number(rec, "compression_ratio"))]  # 0: an empty delta, nothing compressed

    s: dict[str, Any] = {
        "kind": kind,
        "peers_reporting": len(idx),
        "peer_ids": sorted(idx),
        "rounds": rounds[-1] + 1,
        "rounds_per_peer_min": min(len(v) for v in idx.values()),
        "rounds_per_peer_max": max(len(v) for v in idx.values()),
        "lambda": lambda_,
        "spectral_gap": None if lambda_ is None else 1.0 - lambda_,
        "total_bytes_sent": sum(sent),
        "total_bytes_received": sum(received),
        "total_bytes_uncompressed": None if extra is None else sum(sent) + extra,
        "compression_ratio_mean": _mean(ratios),
        "series": {
            "round": rounds,
            "consensus_mean": consensus,
            "bytes_sent": sent,
            "bytes_received": received,
            "bytes_sent_cumulative": cumulative,
            "accuracy_mean": per_round_mean("accuracy"),
            "global_accuracy_mean": per_round_mean("global_accuracy"),
        },
    }
    for key in COUNTERS:
        s[key] = int(sum(max((record_number(rec, key) or 0 for rec in by_round.values()), default=0) for by_round in idx.values()))

    s.update(consensus_initial=None, consensus_initial_round=None, consensus_final=None, consensus_final_round=None)
    if present:
        (r0, m0), (rf, mf) = present[0], present[-1]
        s.update(consensus_initial=m0, consensus_initial_round=r0, consensus_final=mf, consensus_final_round=rf)
    s["consensus_exact_final"] = exact.xi if exact else None
    partial = [rec["consensus_missing"] for by_round in idx.values() for rec in by_round.values()
               if isinstance(rec.get("consensus_missing"), list) and rec["consensus_missing"]]
    s["consensus_partial_records"] = len(partial)  # estimates that rest on part of the network (a peer's sketches never came)
    s["consensus_missing_peers"] = sorted({q for miss in partial for q in miss if isinstance(q, int)})
    if kind == AVERAGING:
        s.update(_against_the_bound(rounds, consensus, present, lambda_))
    else:
        relative = [v / m if v is not None and m else None
                    for v, m in zip(consensus, (model_scale(values("model_norm", r)) for r in rounds), strict=True)]
        s["series"]["consensus_relative"] = relative
        last = [(r, v) for r, v in zip(rounds, relative, strict=True) if v is not None]
        s["consensus_relative_final_round"], s["consensus_relative_final"] = last[-1] if last else (None, None)
        s["model_scale_exact_final"] = exact.scale if exact else None
        s["consensus_relative_exact_final"] = exact.xi / exact.scale if exact and exact.scale > 0 else None

    _accuracy_and_clusters(idx, s)
    s.update(privacy_spent(idx))
    s.update(sites(idx, rounds))
    return s


def _latest_of(by_round: Mapping[int, Record], key: str, kind: type) -> Any:
    """The latest value of `key` that is a `kind` (str, dict), or None."""
    for rec in reversed(list(by_round.values())):
        if isinstance(v := rec.get(key), kind):
            return v
    return None


def sites(idx: Mapping[int, Mapping[int, Record]], rounds: Sequence[int]) -> dict[str, Any]:
    """A run of heterogeneous sites (several data kinds or datasets; `p2pfl.learn.tasks`): the peers
    grouped by data kind with each group's final and per-round mean accuracy, and each peer's
    latest accuracy on every dataset of the run (its ``dataset_accuracy`` records). Empty for a
    run whose peers all hold one kind of one dataset."""
    kind = {p: k for p, by_round in idx.items() if (k := _latest_of(by_round, "data_kind", str)) is not None}
    dataset = {p: d for p, by_round in idx.items() if (d := _latest_of(by_round, "dataset", str)) is not None}
    if len(set(kind.values())) < 2 and len(set(dataset.values())) < 2:
        return {}
    groups: dict[str, Any] = {}
    for k in sorted(set(kind.values())):
        ids = sorted(p for p in kind if kind[p] == k)
        g = {"peers": ids, "datasets": sorted({dataset[p] for p in ids if p in dataset})}
        for key in ("accuracy", "global_accuracy", "pseudo_label_accuracy", "composition_accuracy"):
            finals = [v for p in ids if (v := _latest(idx[p], key)) is not None]
            if finals:
                g[f"{key}_final_mean"] = _mean(finals)
        g["accuracy_mean_series"] = [_mean([v for p in ids if r in idx[p] and (v := record_number(idx[p][r], "accuracy")) is not None])
                                     for r in rounds]
        groups[k] = g
    table = {p: {n: float(v) for n, v in acc.items() if isinstance(v, int | float) and math.isfinite(v)}
             for p, by_round in idx.items() if (acc := _latest_of(by_round, "dataset_accuracy", dict)) is not None}
    return {"kinds": groups, "peer_kind": kind, "peer_dataset": dataset, "dataset_accuracy": table,
            "datasets": sorted({n for acc in table.values() for n in acc})}


Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)


def dataset_table(s: Mapping[str, Any]) -> list[Table]:
    """Peers by dataset: each peer's latest accuracy on every dataset of the run, then the mean of
    each data kind's peers (a peer's own dataset is marked *)."""
    if not s.get("dataset_accuracy"):
        return []
    names, acc, kind, own = s["datasets"], s["dataset_accuracy"], s["peer_kind"], s["peer_dataset"]

    def cell(v: float | None, mine: bool = False) -> str:
        return "n/a" if v is None else f"{v:.3f}" + (" *" if mine else "")

    rows = [[str(p), kind.get(p, "?"), *(cell(acc[p].get(n), own.get(p) == n) for n in names)] for p in sorted(acc)]
    for k, g in s["kinds"].items():
        members = [p for p in g["peers"] if p in acc]
        rows.append([f"mean ({len(members)})", k, *(cell(_mean([acc[p][n] for p in members if n in acc[p]])) for n in names)])
    return [("Accuracy by dataset (global test sets; * the peer's own)", ["peer", "data kind", *names], rows)]


def privacy_spent(idx: Mapping[int, Mapping[int, Record]]) -> dict[str, Any]:
    """Each DP peer's latest spent epsilon (`p2pfl.learn.privacy`), the largest delta it is stated at,
    and how many peers stopped training at their budget; empty when no peer ran DP."""
    spent = {p: v for p, by_round in idx.items() if (v := _latest(by_round, "dp_epsilon_spent")) is not None}
    if not spent:
        return {}
    deltas = [v for by_round in idx.values() if (v := _latest(by_round, "dp_delta")) is not None]
    reached = sum(1 for by_round in idx.values() if _latest(by_round, "dp_budget_reached") == 1.0)
    return {"dp_epsilon_spent": spent, "dp_delta_max": max(deltas, default=None), "dp_budget_reached_peers": reached}


def _against_the_bound(rounds: Sequence[int], consensus: Sequence[float | None],
                       present: Sequence[tuple[int, float]], lambda_: float | None) -> dict[str, Any]:
    """Measured contraction and the spectral bound of exact gossip, for an averaging run.

    Exact gossip has Xi_t <= lambda^t Xi_0 and a record is written after its round, so round t's
    value is compared with Xi_0 lambda^(t+1), Xi_0 estimated backwards from the first estimate.
    """
    out: dict[str, Any] = {"contraction_measured": None, "contraction_ratios": 0, "xi0_estimate": None,
                           "bound": None, "rounds_above_bound": None}
    logs = [math.log(b / a) for (ra, a), (rb, b) in itertools.pairwise(present) if rb == ra + 1 and a > 0 and b > 0]
    if logs:
        out["contraction_measured"] = math.exp(math.fsum(logs) / len(logs))
        out["contraction_ratios"] = len(logs)
    if present and lambda_ is not None and lambda_ > LAMBDA_ZERO and present[0][1] > 0:
        r0, m0 = present[0]
        xi0 = m0 / lambda_ ** (r0 + 1)
        bound = [xi0 * lambda_ ** (r + 1) if r >= r0 else None for r in rounds]
        out["xi0_estimate"], out["bound"] = xi0, bound
        out["rounds_above_bound"] = sum(
            1 for v, b in zip(consensus, bound, strict=True) if v is not None and b is not None and v > b
        )
    return out


def _accuracy_and_clusters(idx: Mapping[int, Mapping[int, Record]], s: dict[str, Any]) -> None:
    """Final accuracy, fairness and cluster figures, added to `s` where the records have them."""
    finals = [v for by_round in idx.values() if (v := _latest(by_round, "accuracy")) is not None]
    if finals:
        s.update(accuracy_final_mean=_mean(finals), accuracy_final_min=min(finals), accuracy_final_max=max(finals))
        s["accuracy_peers"] = len(finals)
    globals_ = [v for by_round in idx.values() if (v := _latest(by_round, "global_accuracy")) is not None]
    if globals_:
        s["global_accuracy_final_mean"] = _mean(globals_)
    # Fairness across peers (Hao et al., CVPR 2021): spread of the final per-peer accuracy on the
    # shared global test set where evaluated (comparable across peers), else on local test sets.
    basis, per_peer = ("global_accuracy", globals_) if globals_ else ("accuracy", finals)
    if per_peer:
        unseen = [v for by_round in idx.values() if (v := _latest(by_round, "unseen_accuracy")) is not None]
        s["accuracy_fairness"] = {"basis": basis, **fairness_figures(per_peer, unseen)}

    clusters = {p: [(r, c) for r, rec in by_round.items() if isinstance(c := rec.get("cluster"), int) and not isinstance(c, bool)] for p, by_round in idx.items()}
    clusters = {p: seq for p, seq in clusters.items() if seq}
    if clusters:
        final = {p: seq[-1][1] for p, seq in clusters.items()}
        s["clusters_final"] = dict(sorted(Counter(final.values()).items()))  # cluster -> members
        s["cluster_changes"] = sum(1 for seq in clusters.values() for a, b in itertools.pairwise(seq) if a[1] != b[1])

    fair_keys = sorted({k for by_round in idx.values() for rec in by_round.values() for k in rec if "fair" in k})
    fairness = {}
    for k in fair_keys:
        vals = [v for by_round in idx.values() if (v := _latest(by_round, k)) is not None]
        if vals:
            fairness[k] = _mean(vals)
    if fairness:
        s["fairness_final_mean"] = fairness


def fairness_figures(accuracies: Sequence[float | None], unseen: Sequence[float | None] = ()) -> dict[str, float | int]:
    """Spread of per-peer accuracy: how unequally a run serves its peers (Hao et al., CVPR 2021).

    ``std`` is the population standard deviation across peers; ``worst10`` the mean accuracy of the
    worst 10% of peers (at least one peer); ``worst_gap`` = mean - worst peer. ``unseen_mean``
    averages each peer's accuracy on classes it never saw locally, over peers that have such
    classes. Missing or non-finite values are skipped.
    """
    acc = sorted(v for v in accuracies if v is not None and math.isfinite(v))
    out: dict[str, float | int] = {"peers": len(acc)}
    if acc:
        mean = math.fsum(acc) / len(acc)
        k = max(1, math.ceil(0.1 * len(acc)))
        out.update(
            mean=mean,
            std=math.sqrt(math.fsum((v - mean) ** 2 for v in acc) / len(acc)),
            worst=acc[0],
            worst10=math.fsum(acc[:k]) / k,
            worst_gap=mean - acc[0],
        )
    seen_not = [v for v in unseen if v is not None and math.isfinite(v)]
    if seen_not:
        out.update(unseen_mean=math.fsum(seen_not) / len(seen_not), unseen_peers=len(seen_not))
    return out
