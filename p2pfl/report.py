"""`p2pfl-report RUN_DIR`: plots and a summary page for one run, read from its JSONL metrics.

Peers never send their metrics anywhere, so the run directory is the only place a whole run can
be seen at once; this turns it into a page a person can read. A run is one of two kinds, told
apart by its records (`run_kind`): in a pure-averaging run (`--no-train`) the measured consensus
contraction is set against the spectral-gap bound of exact gossip, so the run is judged by theory;
in a training run that bound does not hold, and the consensus distance is shown relative to the
adapters' own scale beside the accuracy it buys.

The numbers are computed by `summarize` (pure: records in, dict out) and only then drawn and
written, so tests can check every figure on the page against the records by hand.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from p2pfl import topology as topo_mod
from p2pfl.errors import P2pflError
from p2pfl.metrics import fairness_figures, read_jsonl

Record = Mapping[str, Any]
COUNTERS = ("rejected_messages", "duplicates", "dropped_messages")  # cumulative per peer
LAMBDA_ZERO = 1e-12  # below this W is 11^T/n to rounding: exact gossip agrees after one round
TRAINING, AVERAGING = "training", "averaging"
KONG = 'Kong et al., 2021, "Consensus control for decentralized deep learning"'
AVERAGING_TEXT = (
    "Pure averaging run (no training): the peers only gossip, and exact gossip multiplies the "
    "consensus distance by at most lambda each round, Xi_t <= lambda^t Xi_0. The dashed line is that bound, "
    "started from the first measured round; a few percent above it near the end is the sketch "
    "estimate's own error."
)
COMPRESSED_TEXT = (
    " The deltas were compressed ({ratio:.1f}x): CHOCO-Gossip with a lossy codec contracts more "
    "slowly than exact gossip, so rounds above this bound are expected."
)
TRAINING_TEXT = (
    "Training run: between gossip rounds every peer takes local steps on its own data, which keeps "
    "injecting new local progress that gossip has not averaged yet. The consensus distance therefore "
    "does not decay to zero as in pure averaging (the spectral bound of averaging does not apply and "
    "is not drawn): the peers start from the same adapter, drift apart, and the distance settles at a "
    f"level set by the learning rate and the mixing of the graph ({KONG})."
)
RELATIVE_TEXT = (
    " Its size is judged against the models' own scale: right, the distance relative to the adapter "
    "norm, Xi / sqrt(mean_i ||x_i||^2), which is 0 when all peers hold the same adapter and 1 when "
    "the peers' adapters cancel out on average."
)


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


def load_run(run_dir: Path) -> tuple[topo_mod.Topology | None, dict[int, list[dict[str, Any]]], list[str]]:
    """Topology (None when unusable: the plots lose the bound, not the data), records, notes."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    notes: list[str] = []
    topo: topo_mod.Topology | None = None
    try:
        topo = topo_mod.load(run_dir / "topology.yaml")
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


def _num(rec: Record, key: str) -> float | None:
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
        v = _num(rec, key)
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
            payload, ratio, fanout = (_num(rec, k) for k in ("payload_bytes", "compression_ratio", "live_neighbors"))
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
        return [v for p in idx if r in idx[p] and (v := _num(idx[p][r], key)) is not None]

    def per_round_mean(key: str) -> list[float | None]:
        return [_mean(values(key, r)) for r in rounds]

    def per_round_sum(key: str) -> list[int]:
        return [int(sum(_num(idx[p][r], key) or 0 for p in idx if r in idx[p])) for r in rounds]

    consensus = per_round_mean("consensus_distance")
    present = [(r, v) for r, v in zip(rounds, consensus, strict=True) if v is not None]
    sent, received = per_round_sum("bytes_sent"), per_round_sum("bytes_received")
    cumulative, acc_total = [], 0
    for b in sent:
        acc_total += b
        cumulative.append(acc_total)
    extra = uncompressed_extra_bytes(idx)
    ratios = [v for by_round in idx.values() for rec in by_round.values()
              if (v := _num(rec, "compression_ratio"))]  # 0: an empty delta, nothing compressed

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
        s[key] = int(sum(max((_num(rec, key) or 0 for rec in by_round.values()), default=0) for by_round in idx.values()))

    s.update(consensus_initial=None, consensus_initial_round=None, consensus_final=None, consensus_final_round=None)
    if present:
        (r0, m0), (rf, mf) = present[0], present[-1]
        s.update(consensus_initial=m0, consensus_initial_round=r0, consensus_final=mf, consensus_final_round=rf)
    s["consensus_exact_final"] = exact.xi if exact else None
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
    """A run of heterogeneous sites (several data kinds or datasets; `p2pfl.tasks`): the peers
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
        g["accuracy_mean_series"] = [_mean([v for p in ids if r in idx[p] and (v := _num(idx[p][r], "accuracy")) is not None])
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
    """Each DP peer's latest spent epsilon (`p2pfl.privacy`), the largest delta it is stated at,
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


# ---------------------------------------------------------------- plots


def _figure(width: float = 7.5, height: float = 4.2) -> Any:
    """A Figure without pyplot: no global backend state, safe inside the launcher and tests."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def plot_consensus(idx: Mapping[int, Mapping[int, Record]], s: Mapping[str, Any], title: str, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    rounds, mean = s["series"]["round"], s["series"]["consensus_mean"]
    lowest = math.inf
    for k, by_round in enumerate(idx.values()):
        pts = [(r, v) for r, rec in by_round.items() if (v := _num(rec, "consensus_distance")) is not None and v > 0]
        if pts:
            lowest = min(lowest, *(v for _, v in pts))
            ax.plot(*zip(*pts, strict=True), color="tab:blue", lw=0.7, alpha=0.35, label="each peer's estimate" if k == 0 else None)
    pts = [(r, v) for r, v in zip(rounds, mean, strict=True) if v is not None and v > 0]
    if pts:
        ax.plot(*zip(*pts, strict=True), color="black", lw=2, marker="o", ms=3, label="mean over peers")
    bound = s.get("bound")
    if bound:
        bpts = [(r, b) for r, b in zip(rounds, bound, strict=True) if b is not None and b > 0]
        lam = s["lambda"]
        ax.plot(*zip(*bpts, strict=True), color="tab:red", ls="--", lw=1.5,
                label=f"spectral bound of averaging $\\Xi_0\\lambda^{{t+1}}$, $\\lambda$={lam:.4f}\n"
                f"($\\Xi_0$ estimated as round-{s['consensus_initial_round']} mean / $\\lambda^{{{s['consensus_initial_round'] + 1}}}$)")
        if min(b for _, b in bpts) < lowest / 10:  # keep a fast-falling bound from squashing the data
            ax.set_ylim(bottom=lowest / 10)
    if pts:
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no consensus estimates recorded", ha="center", va="center", transform=ax.transAxes)
    measured = s.get("contraction_measured")
    if s["kind"] == TRAINING:
        sub = "training run: no spectral bound (it holds for pure averaging only)"
    else:
        sub = f"measured contraction {measured:.4f}/round" if measured is not None else ""
        if measured is not None and s.get("lambda") is not None:
            sub += f" vs $\\lambda$ = {s['lambda']:.4f}"
    ax.set_title(f"Consensus distance — {title}\n{sub}", fontsize=10)
    _integer_rounds(ax)
    ax.set_ylabel(r"consensus distance $\Xi$ (estimate)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _draw_accuracy(ax: Any, idx: Mapping[int, Mapping[int, Record]], s: Mapping[str, Any], title: str) -> None:
    from matplotlib import colormaps

    cmap, by_kind = colormaps["viridis"], colormaps["tab10"]
    n = max(1, len(idx) - 1)
    first_acc = first_glob = True
    kinds, kind_of = list(s.get("kinds", {})), s.get("peer_kind", {})  # heterogeneous sites: a colour per data kind
    for k, (p, by_round) in enumerate(idx.items()):
        colour = by_kind(kinds.index(kind_of[p]) % 10) if p in kind_of and kinds else cmap(k / n)
        pts = [(r, v) for r, rec in by_round.items() if (v := _num(rec, "accuracy")) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=colour, lw=0.8, alpha=0.6, label="each peer (local test)" if first_acc else None)
            first_acc = False
        gpts = [(r, v) for r, rec in by_round.items() if (v := _num(rec, "global_accuracy")) is not None]
        if gpts:
            ax.scatter(*zip(*gpts, strict=True), color=colour, marker="x", s=18, alpha=0.7,
                       label="each peer (global test)" if first_glob else None)
            first_glob = False
    ser = s["series"]
    for j, (kind, g) in enumerate(s.get("kinds", {}).items()):
        kpts = [(r, v) for r, v in zip(ser["round"], g["accuracy_mean_series"], strict=True) if v is not None]
        if kpts:
            ax.plot(*zip(*kpts, strict=True), color=by_kind(j % 10), lw=2, ls="--", label=f"mean of the {kind} peers (local test)")
    pts = [(r, v) for r, v in zip(ser["round"], ser["accuracy_mean"], strict=True) if v is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), color="black", lw=2, label="mean over peers (local test)")
    gpts = [(r, v) for r, v in zip(ser["round"], ser["global_accuracy_mean"], strict=True) if v is not None]
    if gpts:
        ax.scatter(*zip(*gpts, strict=True), color="tab:red", marker="D", s=40, zorder=3, label="mean over peers (global test)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Accuracy — {title}", fontsize=10)
    _integer_rounds(ax)
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _draw_relative(ax: Any, s: Mapping[str, Any]) -> None:
    """Consensus distance over the model scale: per round where records carry `model_norm`, and
    exactly at the end of the run from the saved adapters."""
    rounds = s["series"]["round"]
    pts = [(r, v) for r, v in zip(rounds, s["series"]["consensus_relative"], strict=True) if v is not None]
    top = 0.0
    if pts:
        ax.plot(*zip(*pts, strict=True), color="black", lw=2, marker="o", ms=3, label="per round: mean estimate / recorded model_norm")
        top = max(v for _, v in pts)
    else:
        ax.text(0.5, 0.5, "records carry no model_norm:\nonly the end of the run is known", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="0.35")
    exact = s.get("consensus_relative_exact_final")
    if exact is not None:
        ax.scatter([rounds[-1]], [exact], color="tab:red", marker="D", s=40, zorder=3,
                   label=f"exact, from the saved adapters: {exact:.3g}")
        top = max(top, exact)
    ax.set_ylim(0, 1.25 * top if top > 0 else 1)
    ax.set_title("Consensus distance relative to the adapter scale\n"
                 r"$\Xi\,/\,\sqrt{\mathrm{mean}_i\,\|x_i\|^2}$ (0: one model; 1: models cancel out)", fontsize=10)
    _integer_rounds(ax)
    ax.set_ylabel("relative consensus distance")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def _has_relative(s: Mapping[str, Any]) -> bool:
    """A training run whose model scale is known, per round or at the end: what `_draw_relative`
    needs to draw anything."""
    return s["kind"] == TRAINING and (
        any(v is not None for v in s["series"]["consensus_relative"]) or s["consensus_relative_exact_final"] is not None)


def plot_accuracy(idx: Mapping[int, Mapping[int, Record]], s: Mapping[str, Any], title: str, path: Path) -> Path:
    """Accuracy; in a training run with a known model scale, beside the relative consensus distance
    that goes with it."""
    relative = _has_relative(s)
    fig = _figure(10.0 if relative else 7.5, 4.2)  # two panels: the page's width at 110 dpi
    axes = fig.subplots(1, 2 if relative else 1, squeeze=False, sharex=True)[0]
    _draw_accuracy(axes[0], idx, s, title)
    if relative:
        _draw_relative(axes[1], s)
    return _save(fig, path)


def plot_bytes(s: Mapping[str, Any], title: str, path: Path) -> Path:
    fig = _figure(9.5, 3.8)
    left, right = fig.subplots(1, 2)
    ser = s["series"]
    mb = 1e6
    left.bar(ser["round"], [b / mb for b in ser["bytes_sent"]], color="tab:blue", width=0.8, label="sent")
    left.plot(ser["round"], [b / mb for b in ser["bytes_received"]], color="tab:orange", lw=1.2, marker=".", label="received")
    left.set_title("per round, summed over peers", fontsize=10)
    left.set_ylabel("MB")
    left.set_ylim(0, 1.25 * max(1, *ser["bytes_sent"], *ser["bytes_received"]) / mb)
    left.legend(loc="upper right", ncols=2, fontsize=8)
    right.plot(ser["round"], [b / mb for b in ser["bytes_sent_cumulative"]], color="tab:blue", lw=2)
    right.set_title(f"cumulative sent: {s['total_bytes_sent'] / mb:,.1f} MB", fontsize=10)
    right.set_ylabel("MB")
    for ax in (left, right):
        _integer_rounds(ax)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Bytes on the wire — {title}", fontsize=11)
    return _save(fig, path)


def plot_clusters(idx: Mapping[int, Mapping[int, Record]], s: Mapping[str, Any], title: str, path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    rounds, peers = s["series"]["round"], sorted(idx)
    ids = sorted({c for by_round in idx.values() for rec in by_round.values()
                  if isinstance(c := rec.get("cluster"), int) and not isinstance(c, bool)})
    slot = {c: k for k, c in enumerate(ids)}
    col = {r: k for k, r in enumerate(rounds)}
    grid = np.full((len(peers), len(rounds)), np.nan)
    for i, p in enumerate(peers):
        for r, rec in idx[p].items():
            c = rec.get("cluster")
            if isinstance(c, int) and not isinstance(c, bool):
                grid[i, col[r]] = slot[c]
    base = colormaps["tab20" if len(ids) > 10 else "tab10"]
    cmap = ListedColormap([base(k % base.N) for k in range(len(ids))]).with_extremes(bad="white")
    fig = _figure(7.5, max(2.5, 0.28 * len(peers) + 1.5))
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=cmap,
              norm=BoundaryNorm(np.arange(len(ids) + 1) - 0.5, len(ids)),
              extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(peers) - 0.5, -0.5))
    ax.set_yticks(range(len(peers)), [str(p) for p in peers], fontsize=7 if len(peers) > 24 else 9)
    _integer_rounds(ax)
    ax.set_ylabel("peer")
    ax.set_title(f"Cluster assignment — {title} ({s.get('cluster_changes', 0)} changes; white: no record)", fontsize=10)
    ax.legend(handles=[Patch(color=cmap(k), label=f"cluster {c}") for k, c in enumerate(ids)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return _save(fig, path)


# ---------------------------------------------------------------- summary page


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.6g}"


def _bytes(v: int) -> str:
    return f"{v:,} ({v / 1e6:,.1f} MB)"


def _saved(s: Mapping[str, Any]) -> str:
    """What the codec saved against uncompressed deltas, or why that is unknown."""
    dense, sent = s["total_bytes_uncompressed"], s["total_bytes_sent"]
    if dense is None:
        return "n/a (records do not say what each delta cost uncompressed)"
    saved = dense - sent
    if saved == 0:
        return "0 (deltas went uncompressed: --compress none)"
    share = f", {saved / dense:.0%} of {dense / 1e6:,.1f} MB" if dense > 0 else ""
    return f"{saved:,} ({saved / 1e6:,.1f} MB{share})"


def summary_rows(s: Mapping[str, Any], topo_name: str, n_peers: int | None) -> list[tuple[str, str]]:
    """(quantity, value) rows shared by the Markdown and HTML pages."""
    peers = f"{s['peers_reporting']} with metrics" + (f" of {n_peers}" if n_peers is not None else "")
    rounds = f"{s['rounds']}"
    if s["rounds_per_peer_min"] != s["rounds_per_peer_max"]:
        rounds += f" (records per peer {s['rounds_per_peer_min']}–{s['rounds_per_peer_max']})"
    kind = ("training: local steps between gossip rounds" if s["kind"] == TRAINING
            else "pure averaging (no training): peers only gossip")
    rows = [
        ("topology", topo_name),
        ("run kind", kind),
        ("peers", peers),
        ("rounds", rounds),
        ("lambda = ‖W − 11ᵀ/n‖₂", _fmt(s["lambda"])),
        ("spectral gap 1 − lambda", _fmt(s["spectral_gap"])),
        (f"initial mean consensus estimate (round {_fmt(s['consensus_initial_round'])})", _fmt(s["consensus_initial"])),
        (f"final mean consensus estimate (round {_fmt(s['consensus_final_round'])})", _fmt(s["consensus_final"])),
    ]
    if s["consensus_exact_final"] is not None:
        rows.append(("final consensus distance, exact from the saved adapters", _fmt(s["consensus_exact_final"])))
    if s["kind"] == AVERAGING:
        rows.append(("measured contraction per round (geometric mean of ratios)",
                     f"{_fmt(s['contraction_measured'])} vs lambda {_fmt(s['lambda'])} ({s['contraction_ratios']} ratios)"))
        if s["rounds_above_bound"] is not None:
            n_est = sum(1 for b, v in zip(s["bound"], s["series"]["consensus_mean"], strict=True) if b is not None and v is not None)
            rows.append(("rounds above the spectral bound of exact gossip", f"{s['rounds_above_bound']} of {n_est}"))
    else:
        if s["consensus_relative_final"] is not None:
            rows.append((f"consensus distance / adapter scale, from the records (round {s['consensus_relative_final_round']})",
                         _fmt(s["consensus_relative_final"])))
        if s["consensus_relative_exact_final"] is not None:
            rows.append(("consensus distance / adapter scale, exact from the saved adapters",
                         f"{_fmt(s['consensus_relative_exact_final'])} (scale sqrt(mean ‖x_i‖²) = {_fmt(s['model_scale_exact_final'])})"))
    rows += [
        ("total bytes sent (deltas, sketches, control)", _bytes(s["total_bytes_sent"])),
        ("total bytes received", _bytes(s["total_bytes_received"])),
        ("saved by compression, against uncompressed (none) deltas", _saved(s)),
    ]
    if "accuracy_final_mean" in s:
        rows.append(("final accuracy mean / min / max",
                     f"{_fmt(s['accuracy_final_mean'])} / {_fmt(s['accuracy_final_min'])} / {_fmt(s['accuracy_final_max'])}"))
    if "global_accuracy_final_mean" in s:
        rows.append(("final global accuracy (mean)", _fmt(s["global_accuracy_final_mean"])))
    if "accuracy_fairness" in s:
        f = s["accuracy_fairness"]
        rows.append((f"fairness: final {f['basis'].replace('_', ' ')} std across peers / worst 10% / worst-peer gap",
                     f"{_fmt(f['std'])} / {_fmt(f['worst10'])} / {_fmt(f['worst_gap'])}"))
        if "unseen_mean" in f:
            rows.append(("fairness: accuracy on classes unseen at the peer (mean over peers)",
                         f"{_fmt(f['unseen_mean'])} ({f['unseen_peers']} peers)"))
    rows += [(f"{k.replace('_', ' ')} (sum over peers)", _fmt(s[k])) for k in COUNTERS]
    if "clusters_final" in s:
        sizes = ", ".join(f"{c}: {m}" for c, m in s["clusters_final"].items())
        rows.append(("final clusters (cluster: peers)", f"{len(s['clusters_final'])} ({sizes})"))
        rows.append(("cluster changes", _fmt(s["cluster_changes"])))
    rows += [(f"{k} (final, mean over peers)", _fmt(v)) for k, v in s.get("fairness_final_mean", {}).items()]
    for k, g in s.get("kinds", {}).items():
        figures = [f"{key.replace('_', ' ')} {_fmt(g[f'{key}_final_mean'])}" for key in
                   ("accuracy", "global_accuracy", "pseudo_label_accuracy", "composition_accuracy") if f"{key}_final_mean" in g]
        rows.append((f"{k} peers {g['peers']} ({', '.join(g['datasets'])}): final means", ", ".join(figures)))
    if "dp_epsilon_spent" in s:
        eps = s["dp_epsilon_spent"]
        rows.append((f"differential privacy: epsilon spent min / max over {len(eps)} peers (delta <= {_fmt(s['dp_delta_max'])}; "
                     "peers at their budget)", f"{_fmt(min(eps.values()))} / {_fmt(max(eps.values()))} ({s['dp_budget_reached_peers']})"))
        rows.append(("differential privacy: epsilon spent per peer", ", ".join(f"{p}: {_fmt(v)}" for p, v in sorted(eps.items()))))
    return rows


Figure = tuple[str, str]  # (PNG file name, the paragraph that explains it, or "")


def kind_text(s: Mapping[str, Any], relative_shown: bool) -> str:
    """What the consensus distance of this kind of run means, for the first figure of the page."""
    if s["kind"] == TRAINING:
        return TRAINING_TEXT + (RELATIVE_TEXT if relative_shown else "")
    ratio = s["compression_ratio_mean"]
    return AVERAGING_TEXT + (COMPRESSED_TEXT.format(ratio=ratio) if ratio is not None and ratio > 1 else "")


def _markdown(title: str, rows: list[tuple[str, str]], figures: list[Figure], notes: list[str], tables: Sequence[Table] = ()) -> str:
    def cell(t: str) -> str:
        return t.replace("|", "\\|")

    lines = [f"# p2pfl run report: {title}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    for name, header, body in tables:
        lines += ["", f"{name}:", "", "| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(cell, r)) + " |" for r in body]
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    lines.append("")
    for name, text in figures:
        lines += [text, ""] if text else []
        lines.append(f"![{Path(name).stem}]({name})\n")
    return "\n".join(lines)


def _html(title: str, rows: list[tuple[str, str]], figures: list[Figure], notes: list[str], tables: Sequence[Table] = ()) -> str:
    """A page that needs nothing but its directory: images by relative path, so it opens from
    file:// where it was written, or wherever the directory is copied."""
    e = html.escape
    body = [f"<h1>p2pfl run report: {e(title)}</h1>", "<table>", "<tr><th>quantity</th><th>value</th></tr>"]
    body += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows]
    body.append("</table>")
    for name, header, table in tables:
        body += [f"<p>{e(name)}</p>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table]
        body.append("</table>")
    if notes:
        body += ["<p>Notes:</p><ul>", *(f"<li>{e(n)}</li>" for n in notes), "</ul>"]
    for name, text in figures:
        body += [f'<p class="text">{e(text)}</p>'] if text else []
        body.append(f'<p><a href="{e(name)}"><img src="{e(name)}" alt="{e(Path(name).stem)}"></a></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}img{max-width:100%}.text{max-width:80ch}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _figures(idx: Mapping[int, Mapping[int, Record]], s: Mapping[str, Any], title: str, out: Path) -> list[Figure]:
    """The plots, each with its paragraph. A training run (the only kind with accuracy) leads with
    accuracy and the relative consensus distance beside it, an averaging run with the consensus
    distance against its bound; the paragraph on what the consensus distance means goes with the
    first."""
    accuracy = "accuracy_final_mean" in s or "global_accuracy_final_mean" in s
    paths = [plot_accuracy(idx, s, title, out / "accuracy.png")] if accuracy else []
    paths += [plot_consensus(idx, s, title, out / "consensus.png"), plot_bytes(s, title, out / "bytes.png")]
    if "clusters_final" in s:
        paths.append(plot_clusters(idx, s, title, out / "clusters.png"))
    text = kind_text(s, relative_shown=accuracy and _has_relative(s))
    return [(p.name, text if k == 0 else "") for k, p in enumerate(paths)]


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the PNGs, summary.md, summary.html and report.json; returns summary.html's path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    topo, records, notes = load_run(run_dir)
    lam = topo.mixing_lambda() if topo is not None else None
    ids = topo.ids if topo is not None else sorted(records)
    vectors = load_adapters(run_dir, ids, notes)
    s = summarize(records, lam, exact_consensus(vectors) if vectors else None)
    idx = index_records(records)
    title = topo.name if topo is not None else run_dir.name
    out.mkdir(parents=True, exist_ok=True)

    figures = _figures(idx, s, title, out)
    rows = summary_rows(s, title, topo.n if topo is not None else None)
    tables = dataset_table(s)
    (out / "summary.md").write_text(_markdown(title, rows, figures, notes, tables))
    (out / "report.json").write_text(json.dumps({"topology": title, **s, "notes": notes}, indent=1))
    page = out / "summary.html"
    page.write_text(_html(title, rows, figures, notes, tables))
    return page


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="p2pfl-report", description="Plots and a summary page for a p2pfl run directory.")
    ap.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run directory written by scripts/launch.sh or peers")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/report)")
    args = ap.parse_args(argv)
    try:
        page = write_report(args.run_dir, args.out)
    except ReportError as e:
        print(f"p2pfl-report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"p2pfl-report: error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(f"p2pfl-report: wrote {page} (and {page.with_suffix('.md').name}, PNGs) in {page.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
