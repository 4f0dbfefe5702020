"""`p2pfl-report RUN_DIR`: the plots and the summary page (Markdown and HTML) of one run.

Everything drawn or written here comes from `p2pfl.ops.report.summarize`, which is pure; this module
holds only the presentation: matplotlib figures without pyplot, the page's rows and texts, and
the files.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.ops.overlay import daemon_size_settings, is_open, overlay_rows, overlay_summary
from p2pfl.ops.report import (
    AVERAGING,
    COUNTERS,
    TRAINING,
    Record,
    ReportError,
    Table,
    dataset_table,
    exact_consensus,
    index_records,
    load_adapters,
    load_network_file,
    load_run,
    record_number,
    summarize,
)

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
OVERLAY_TEXT = (
    "Open network: no file lists the peers, so the overlay is rebuilt from the records. Top: live peers "
    "(those with a record that round), joins (a peer's first record) and leaves (its records stop before the "
    "run's last round): a goodbye takes a peer out of its neighbours' active views at once, a crash only after "
    "their liveness timeout. Middle: the degree band, and the rounds where the links held at both ends do not "
    "connect the live peers; peers write their records at different moments of a round, so a link being made "
    "or dropped shows at one end only (joins, switches, and peers that finish and say goodbye). Bottom: the "
    "size estimate against the live count and the peers of the epoch it measures."
)


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
        pts = [(r, v) for r, rec in by_round.items() if (v := record_number(rec, "consensus_distance")) is not None and v > 0]
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
        pts = [(r, v) for r, rec in by_round.items() if (v := record_number(rec, "accuracy")) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=colour, lw=0.8, alpha=0.6, label="each peer (local test)" if first_acc else None)
            first_acc = False
        gpts = [(r, v) for r, rec in by_round.items() if (v := record_number(rec, "global_accuracy")) is not None]
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


def plot_overlay(o: Mapping[str, Any], title: str, path: Path) -> Path:
    """An open network's overlay over time (`p2pfl.ops.overlay.overlay_summary`): membership,
    degrees and connectedness, and the size estimate against the live count."""
    fig = _figure(9.5, 7.0)  # within the page's width and, below its table, the height of a screen
    top, mid, low = fig.subplots(3, 1, sharex=True)
    ser = o["series"]
    rounds = ser["round"]
    top.step(rounds, ser["live"], where="mid", color="black", lw=2, label="live peers\n(a record this round)")
    top.bar(rounds, ser["joins"], color="tab:green", width=0.8, label="joins (first record)")
    below = np.zeros(len(rounds))
    for key, colour, label in (("leaves_goodbye", "tab:orange", "leaves: goodbye"), ("leaves_silence", "tab:red", "leaves: silent"),
                               ("leaves_unknown", "0.5", "leaves: no neighbour to tell")):
        if any(ser[key]):
            top.bar(rounds, [-v for v in ser[key]], bottom=below, color=colour, width=0.8, label=label)
            below -= np.array(ser[key])
    top.axhline(0, color="0.3", lw=0.8)
    top.set_ylabel("peers")
    top.set_title(f"Overlay — {title}\n{o['peers_seen']} peers seen, {len(o['left'])} left "
                  f"({len(o['goodbyes'])} goodbyes, {len(o['silences'])} silent)", fontsize=10)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)

    pts = [(r, lo, m, hi) for r, lo, m, hi in zip(rounds, ser["degree_min"], ser["degree_mean"], ser["degree_max"], strict=True) if m is not None]
    if pts:
        r_, lo, m, hi = zip(*pts, strict=True)
        mid.fill_between(r_, lo, hi, color="tab:blue", alpha=0.25, step="mid", label="degree min–max\nover live peers")
        mid.plot(r_, m, color="tab:blue", lw=2, drawstyle="steps-mid", label="mean degree")
    for k, r in enumerate(o["rounds_not_connected"]):
        mid.axvspan(r - 0.5, r + 0.5, color="tab:red", alpha=0.15, lw=0, label="not connected\n(links held at both ends)" if k == 0 else None)
    mid.set_ylim(bottom=0)
    mid.set_ylabel("degree")
    mid.set_title(f"connected in {o['rounds_connected']} of {len(rounds)} rounds (at most {max(ser['components'])} components, "
                  f"{max(ser['isolated'])} isolated peers in a round)", fontsize=10)
    mid.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)

    low.step(rounds, ser["live"], where="mid", color="black", lw=1.5, label="live peers")
    est = [(r, lo, m, hi) for r, lo, m, hi in zip(rounds, ser["size_min"], ser["size_mean"], ser["size_max"], strict=True) if m is not None]
    if est:
        r_, lo, m, hi = zip(*est, strict=True)
        low.fill_between(r_, lo, hi, color="tab:purple", alpha=0.25, step="mid")
        low.plot(r_, m, color="tab:purple", lw=2, marker=".", label="size estimate\n(mean, min–max over peers)")
    else:
        low.text(0.5, 0.5, f"no size estimate recorded (the first comes after an epoch of {o['size_epoch']} rounds)",
                 ha="center", va="center", transform=low.transAxes, fontsize=9, color="0.35")
    tgt = [(r, t) for r, t in zip(rounds, ser["size_target"], strict=True) if t]
    if tgt:
        r_, t = zip(*tgt, strict=True)
        sd = o["size_relative_std"]
        low.step(r_, t, where="mid", color="tab:green", ls="--", lw=1.5, label="peers of the epoch\nit measures")
        low.fill_between(r_, [v * (1 - sd) for v in t], [v * (1 + sd) for v in t], color="tab:green", alpha=0.12, step="mid",
                         label=f"± one standard deviation\n({sd:.1%}, K = {o['size_k']})")
    low.set_ylim(bottom=0)
    low.set_ylabel("peers")
    low.set_title(f"network size: extrema propagation, epochs of {o['size_epoch']} rounds", fontsize=10)
    low.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    for ax in (top, mid, low):
        ax.grid(True, alpha=0.3)
    _integer_rounds(low)
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


def summary_rows(s: Mapping[str, Any], topo_name: str, n_peers: int | None, schedule: str | None = None) -> list[tuple[str, str]]:
    """(quantity, value) rows shared by the Markdown and HTML pages. On a `schedule:` the graph
    changes every round, so lambda is the schedule's contraction per round (seed 0), not the norm
    of one fixed W."""
    peers = f"{s['peers_reporting']} with metrics" + (f" of {n_peers}" if n_peers is not None else "")
    rounds = f"{s['rounds']}"
    if s["rounds_per_peer_min"] != s["rounds_per_peer_max"]:
        rounds += f" (records per peer {s['rounds_per_peer_min']}–{s['rounds_per_peer_max']})"
    kind = ("training: local steps between gossip rounds" if s["kind"] == TRAINING
            else "pure averaging (no training): peers only gossip")
    rows = [("topology", topo_name), ("run kind", kind), ("peers", peers), ("rounds", rounds)]
    if "overlay" not in s:  # an open network's graph changes with its membership: no one W
        rows += [
            (f"lambda: contraction per round of schedule {schedule} (seed 0)" if schedule else "lambda = ‖W − 11ᵀ/n‖₂", _fmt(s["lambda"])),
            ("spectral gap 1 − lambda", _fmt(s["spectral_gap"])),
        ]
    if "overlay" not in s or s["consensus_initial"] is not None:  # an open network's peers may estimate none (a note says why)
        rows += [
            (f"initial mean consensus estimate (round {_fmt(s['consensus_initial_round'])})", _fmt(s["consensus_initial"])),
            (f"final mean consensus estimate (round {_fmt(s['consensus_final_round'])})", _fmt(s["consensus_final"])),
        ]
    if s["consensus_exact_final"] is not None:
        among = f" of the {s['overlay']['live_final']} peers live at the end" if "overlay" in s else ""
        rows.append((f"final consensus distance, exact from the saved adapters{among}", _fmt(s["consensus_exact_final"])))
    if s["consensus_partial_records"]:
        rows.append(("consensus estimates over part of the network only",
                     f"{s['consensus_partial_records']} records: no sketch from peer(s) {s['consensus_missing_peers']}"))
    if s["kind"] == AVERAGING:
        if "overlay" not in s or s["contraction_measured"] is not None:  # an open network's peers may estimate none
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
    first. An open network's run adds its overlay, and draws no consensus distance when its peers
    recorded none (they do not know the network)."""
    accuracy = "accuracy_final_mean" in s or "global_accuracy_final_mean" in s
    text = kind_text(s, relative_shown=accuracy and _has_relative(s))
    figures = [(plot_accuracy(idx, s, title, out / "accuracy.png").name, text)] if accuracy else []
    if "overlay" in s:
        figures.append((plot_overlay(s["overlay"], title, out / "overlay.png").name, OVERLAY_TEXT))
    if "overlay" not in s or s["consensus_initial"] is not None:
        figures.append((plot_consensus(idx, s, title, out / "consensus.png").name, "" if accuracy else text))
    figures.append((plot_bytes(s, title, out / "bytes.png").name, ""))
    if "clusters_final" in s:
        figures.append((plot_clusters(idx, s, title, out / "clusters.png").name, ""))
    return figures


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the PNGs, summary.md, summary.html and report.json; returns summary.html's path. A
    run of a topology file, or of an open network (`network.yaml`, peers that join and leave:
    the page adds the overlay over time, `p2pfl.ops.overlay`)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    topo, records, notes = load_run(run_dir)
    net = load_network_file(run_dir, notes)
    idx = index_records(records)
    o = overlay_summary(idx, *daemon_size_settings()) if idx and is_open(idx) else None
    lam = topo.mixing_lambda() if topo is not None else None
    ids = topo.ids if topo is not None else sorted(set(idx) - set(o["left"]) if o else records)  # open: those at the end
    vectors = load_adapters(run_dir, ids, notes)
    s = summarize(records, lam, exact_consensus(vectors) if vectors else None)
    title = topo.name if topo is not None else net.name if net is not None else run_dir.name
    topo_name = title
    if o is not None:
        s["overlay"] = o
        topo_name = f"{title}: open network, no peer list (peers join and leave; see the overlay rows)"
        absent = {rec["consensus_absent"] for by_round in idx.values() for rec in by_round.values() if isinstance(rec.get("consensus_absent"), str)}
        notes += [f"no consensus estimate: {why}" for why in sorted(absent)]
    out.mkdir(parents=True, exist_ok=True)

    figures = _figures(idx, s, title, out)
    rows = summary_rows(s, topo_name, topo.n if topo is not None else None, str(topo.schedule) if topo is not None and topo.schedule else None)
    rows += overlay_rows(o) if o is not None else []
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
