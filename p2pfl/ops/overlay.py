"""The overlay of an open network over time, rebuilt from its peers' records alone: who is live,
who joined and left, their degrees, whether the links form one component, and the network-size
estimate against the live count. The report's "Overlay" section (`p2pfl.ops.pages`).

An open network has no peer list, so the records are the only account of its membership. A
peer's records start at the round it joined and stop at the round it left. A goodbye (SIGTERM)
removes a peer from its neighbours' active views at once; a crash only once their liveness
timeout passes, so a peer still named in others' `active` two rounds or more after its last
record went silent. That tells the two apart only while `--peer-timeout` is over a round period.

Pure: records in, a dict out (`overlay_summary`), and the page's rows (`overlay_rows`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx

from p2pfl.core.membership.size import relative_std
from p2pfl.ops.report import Record, record_number

GOODBYE, SILENCE, UNKNOWN = "goodbye", "silence", "unknown"


def daemon_size_settings() -> tuple[int, int]:
    """The size estimator's K and epoch (rounds) an open network's peer runs with (`make_open_node`)."""
    from p2pfl.node.build import make_open_node

    return inspect.signature(make_open_node).parameters["size"].default


def is_open(idx: Mapping[int, Mapping[int, Record]]) -> bool:
    """Records of an open network's peers: they name their active view each round."""
    return any(isinstance(rec.get("active"), list) for by_round in idx.values() for rec in by_round.values())


def _ids(value: Any, me: int) -> set[int]:
    """The peer ids of an `active` field; anything else in it (and the peer itself) is ignored."""
    return {q for q in value if isinstance(q, int) and not isinstance(q, bool) and q != me} if isinstance(value, list) else set()


def _band(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    return (min(values), sum(values) / len(values), max(values)) if values else (None, None, None)


def how_it_left(p: int, last: int, active: Mapping[int, Mapping[int, set[int]]]) -> dict[str, Any]:
    """How `p` left after round `last`, from the peers that named it in their active view then or
    later and stayed two rounds past it: GOODBYE when every one dropped it within a round, SILENCE when one kept it two rounds
    or more (until its liveness timeout), UNKNOWN when none named it (no neighbour to tell). With
    how many neighbours named it, and how many of them dropped it at once: a silent peer some
    dropped at once either crashed where they saw it fail sooner, or said a goodbye that only
    those heard."""
    kept = {q: max(held) - last for q, by_round in active.items() if q != p and max(by_round, default=-1) >= last + 2
            if (held := [r for r, view in by_round.items() if r >= last and p in view])}  # q stayed long enough to tell
    how = UNKNOWN if not kept else SILENCE if max(kept.values()) >= 2 else GOODBYE
    return {"after_round": last, "how": how, "neighbours": len(kept), "dropped_at_once": sum(1 for k in kept.values() if k <= 1)}


def overlay_summary(idx: Mapping[int, Mapping[int, Record]], size_k: int, size_epoch: int) -> dict[str, Any]:
    """Per round: live peers (those with a record), joins (first records) and leaves (a last record
    before the run's last round, counted at the first round without it), the min/mean/max of
    `degree`, the overlay of links held at both ends (connected or not, its components, links
    held at one end only), and the mean `network_size_estimate` against its target: the peers
    with a record in the epoch it measures (a peer reports its last complete epoch's estimate)."""
    rounds = sorted({r for by_round in idx.values() for r in by_round})
    end = rounds[-1]
    active = {p: {r: _ids(rec.get("active"), p) for r, rec in by_round.items()} for p, by_round in idx.items()}
    first = {p: min(by_round) for p, by_round in idx.items()}
    last = {p: max(by_round) for p, by_round in idx.items()}
    members: dict[int, set[int]] = {}  # epoch -> peers with a record in it
    for p, by_round in idx.items():
        for r in by_round:
            members.setdefault(r // size_epoch, set()).add(p)
    left = {p: how_it_left(p, last[p], active) for p in sorted(idx) if last[p] < end}

    series: dict[str, list[Any]] = {k: [] for k in (
        "round", "live", "joins", "leaves_goodbye", "leaves_silence", "leaves_unknown", "degree_min", "degree_mean",
        "degree_max", "links", "one_sided", "components", "isolated", "connected", "size_mean", "size_min", "size_max",
        "size_target")}
    for r in rounds:
        live = sorted(p for p in idx if r in idx[p])
        g = nx.Graph()
        g.add_nodes_from(live)
        one_sided = 0
        for p in live:
            for q in active[p][r]:
                if q in active and r in active[q] and p in active[q][r]:
                    g.add_edge(p, q)
                elif q in idx and r in idx[q]:
                    one_sided += 1  # a link the other live end does not hold (yet, or any more)
        degrees = [v for p in live if (v := record_number(idx[p][r], "degree")) is not None]
        sizes = [v for p in live if (v := record_number(idx[p][r], "network_size_estimate")) is not None]
        epoch = r // size_epoch - 1  # the epoch whose estimate a peer reports at round r
        gone = [p for p, info in left.items() if info["after_round"] == r - 1]
        values = {
            "round": r, "live": len(live), "joins": sum(1 for p in live if first[p] == r),
            **{f"leaves_{how}": sum(1 for p in gone if left[p]["how"] == how) for how in (GOODBYE, SILENCE, UNKNOWN)},
            **dict(zip(("degree_min", "degree_mean", "degree_max"), _band(degrees), strict=True)),
            "links": g.number_of_edges(), "one_sided": one_sided, "components": nx.number_connected_components(g),
            "isolated": sum(1 for _, d in g.degree if d == 0), "connected": len(live) > 0 and nx.is_connected(g),
            **dict(zip(("size_min", "size_mean", "size_max"), _band(sizes), strict=True)),
            "size_target": None if epoch < 0 else len(members.get(epoch, ())),
        }
        for k, v in values.items():
            series[k].append(v)

    errors = [m / t - 1 for m, t in zip(series["size_mean"], series["size_target"], strict=True) if m is not None and t]
    all_degrees = [v for by_round in idx.values() for rec in by_round.values() if (v := record_number(rec, "degree")) is not None]
    return {
        "peers_seen": len(idx),
        "live_final": series["live"][-1],
        "joined": {p: first[p] for p in sorted(idx)},
        "left": left,
        "goodbyes": sorted(p for p, info in left.items() if info["how"] == GOODBYE),
        "silences": sorted(p for p, info in left.items() if info["how"] == SILENCE),
        "unknown_leaves": sorted(p for p, info in left.items() if info["how"] == UNKNOWN),
        "rounds_connected": sum(series["connected"]),
        "rounds_not_connected": [r for r, c in zip(rounds, series["connected"], strict=True) if not c],
        "degree_overall": dict(zip(("min", "mean", "max"), _band(all_degrees), strict=True)),
        "size_k": size_k,
        "size_epoch": size_epoch,
        "size_relative_std": relative_std(size_k),
        "size_error_max": max(errors, key=abs) if errors else None,
        "series": series,
    }


def _rounds_text(rs: Sequence[int], most: int = 12) -> str:
    shown = ", ".join(map(str, rs[:most]))
    return shown + (f" and {len(rs) - most} more" if len(rs) > most else "")


def overlay_rows(o: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The section's (quantity, value) rows, for the Markdown and HTML pages."""
    ser = o["series"]
    rounds = ser["round"]
    per_round = [f"{r}: {j}" for r, j in zip(rounds, ser["joins"], strict=True) if j]
    left = o["left"]

    def who(ps: Sequence[int]) -> str:
        return ", ".join(f"{p} after round {left[p]['after_round']}" + (
            f" ({left[p]['dropped_at_once']} of {left[p]['neighbours']} neighbours dropped it at once)"
            if left[p]["how"] == SILENCE and left[p]["dropped_at_once"] else "") for p in ps)

    leaves = f"{len(left)}"
    for name, ps in (("goodbyes (dropped by its neighbours at once)", o["goodbyes"]),
                     ("silent (kept until the liveness timeout)", o["silences"]),
                     ("with no neighbour to tell how", o["unknown_leaves"])):
        if ps:
            leaves += f"; {len(ps)} {name}: {who(ps)}"
    d = o["degree_overall"]
    rows = [
        ("overlay: peers seen / live in the last round", f"{o['peers_seen']} / {o['live_final']}"),
        ("joins (a peer's first record), round: peers", ", ".join(per_round)),
        (f"leaves (records stop before round {rounds[-1]})", leaves),
        ("degree (links a delta went to) min / mean / max, all records", " / ".join("n/a" if v is None else f"{v:.3g}" for v in d.values())),
        ("overlay connected (links held at both ends)", f"{o['rounds_connected']} of {len(rounds)} rounds"
         + (f"; not in rounds {_rounds_text(o['rounds_not_connected'])} (at most {max(ser['components'])} components, "
            f"{max(ser['isolated'])} isolated peers in a round)" if o["rounds_not_connected"] else "")),
    ]
    last = [(r, m, t) for r, m, t in zip(rounds, ser["size_mean"], ser["size_target"], strict=True) if m is not None and t]
    if last:
        r, m, t = last[-1]
        rows.append((f"network size estimate, round {r} (mean over peers) against the peers of the epoch it measures",
                     f"{m:.1f} against {t} ({m / t - 1:+.1%}; largest error over rounds {o['size_error_max']:+.1%}; "
                     f"one standard deviation {o['size_relative_std']:.1%} at K = {o['size_k']}); live now: {ser['live'][-1]}"))
    return rows
