"""p2pfl-report on an open network's run (`network.yaml`, no topology): the overlay over time, from
the records alone. Hand-made records whose overlay is known, and the records of a simulated churn
run (the daemon's node on a virtual clock: joins, goodbyes and crashes mid-run) written as a run
directory, down to the page as headless Chromium shows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch

from p2pfl.core.consensus import flatten
from p2pfl.core.membership.size import relative_std
from p2pfl.host.checkpoint import save_state
from p2pfl.host.files import JsonlWriter, dump_topology
from p2pfl.ops import overlay, pages, report
from p2pfl.sim.simulation import OpenNet, Simulation

from .conftest import ROOT
from .test_open import cfg
from .test_report import (
    CHROMIUM,
    assert_png,
    distinct_colours,
    find_block,
    md_rows,
    numbers,
    rgb8,
    row,
    screenshot,
)

ROUNDS, N, LATE = 40, 32, range(24, 32)
LEAVES, CRASHES = (3, 9, 27, 30), (5, 14, 25, 29)


def write_open_run(run: Path, records: dict[int, list[dict[str, Any]]]) -> Path:
    for p, recs in records.items():
        w = JsonlWriter(run / "metrics" / f"peer-{p}.jsonl")
        for rec in recs:
            w.write(rec)
        w.close()
    shutil.copy(ROOT / "topologies" / "network.yaml", run / "network.yaml")
    return run


def rec(p: int, r: int, active: list[int], **kw: Any) -> dict[str, Any]:
    return {"peer": p, "round": r, "degree": len(active), "mixed_with": active, "active": active,
            "network_size_estimate": None, "consensus_distance": None, "consensus_absent": "open", **kw}


def test_the_overlay_of_hand_made_records():
    """Four peers, eight rounds of 2: a ring held at both ends (round 0); 3 holds 0 but 0 no longer
    holds 3, nor 2 holds 3, which leaves 3 alone (1); 4 joins (2); 1 says goodbye after round 3 (nobody holds it
    in round 5); 2 goes silent after round 3 (0 and 3 hold it until round 6); the size estimate of
    epoch 0 (rounds 0-1: peers 0-3) is reported in rounds 2-3."""
    ring = {0: [1, 3], 1: [0, 2], 2: [1, 3], 3: [0, 2]}
    recs: dict[int, list[dict[str, Any]]] = {p: [rec(p, 0, ring[p])] for p in ring}
    for p, view in {0: [1], 1: [0, 2], 2: [1], 3: [0, 2]}.items():
        recs[p].append(rec(p, 1, view))
    for r in (2, 3):
        for p, view in {0: [1, 2, 4], 1: [0, 2], 2: [0, 1, 3], 3: [2, 4], 4: [0, 3]}.items():
            recs.setdefault(p, []).append(rec(p, r, view, network_size_estimate=4.4))
    for r in (4, 5, 6, 7):
        views = {0: [2, 4] if r < 7 else [4], 3: [2, 4] if r < 7 else [4], 4: [0, 3]}
        if r == 4:
            views[0], views[4] = [1, 2, 4], [0, 1, 3]  # 1's goodbye reaches 0 and 4 a round late
        for p, view in views.items():
            recs[p].append(rec(p, r, view, network_size_estimate=3.0 if r >= 4 else None))
    o = overlay.overlay_summary(report.index_records(recs), size_k=64, size_epoch=2)
    ser = o["series"]
    assert ser["live"] == [4, 4, 5, 5, 3, 3, 3, 3]
    assert ser["joins"] == [4, 0, 1, 0, 0, 0, 0, 0] and o["joined"] == {0: 0, 1: 0, 2: 0, 3: 0, 4: 2}
    assert o["left"] == {1: {"after_round": 3, "how": "goodbye", "neighbours": 2, "dropped_at_once": 2},  # 0 and 4 (2 left too)
                         2: {"after_round": 3, "how": "silence", "neighbours": 2, "dropped_at_once": 0}}  # 0 and 3 kept it
    assert ser["leaves_goodbye"] == [0, 0, 0, 0, 1, 0, 0, 0] and ser["leaves_silence"] == [0, 0, 0, 0, 1, 0, 0, 0]
    assert ser["connected"] == [True, False, True, True, True, True, True, True] and o["rounds_not_connected"] == [1]
    assert ser["components"][1] == 2 and ser["isolated"][1] == 1 and ser["one_sided"][1] == 2  # 0-3 and 2-3
    assert ser["links"][:4] == [4, 2, 6, 6] and ser["one_sided"][2] == 0
    assert ser["degree_min"][1] == 1 and ser["degree_max"][2] == 3 and ser["degree_mean"][2] == pytest.approx(12 / 5)
    assert ser["size_target"] == [None, None, 4, 4, 5, 5, 3, 3]  # the peers of the epoch before
    assert o["size_error_max"] == pytest.approx(3 / 5 - 1)  # the largest: 4 and 1 gone, the estimate of rounds 2-3
    assert o["goodbyes"] == [1] and o["silences"] == [2]

    junk = report.index_records({0: [rec(0, 0, [1, 0, "1", True, None, 7.0, 99])], 1: [rec(1, 0, [0], degree="5")]})
    j = overlay.overlay_summary(junk, size_k=64, size_epoch=2)["series"]  # ids that are no int, itself, a peer never seen
    assert (j["links"], j["one_sided"], j["connected"], j["degree_max"]) == ([1], [0], [True], [7])


@pytest.fixture(scope="module")
def churn(tmp_path_factory) -> tuple[Simulation, Path]:
    """The churn run of tests/test_open.py: 24 peers join through peer 0, 8 more mid-run, 4 say
    goodbye and 4 crash; its records in a run directory with the shipped network.yaml."""
    starts = {p: 0.1 * p for p in range(24)} | {p: 12.0 + 0.5 * (p - 24) for p in LATE}
    sim = Simulation(OpenNet(ids=list(range(N)), leaves=dict.fromkeys(LEAVES, 20.0), crashes=dict.fromkeys(CRASHES, 22.0)),
                     cfg(rounds=ROUNDS), starts=starts)
    sim.run()
    run = write_open_run(tmp_path_factory.mktemp("open") / "run", sim.records)
    for p, model in sim.models().items():  # as the daemon saves them, a departed peer's of its last round
        save_state(run / f"peer-{p}" / "adapter.safetensors", model, {"round": str(sim.records[p][-1]["round"]), "peer": str(p)})
    return sim, run


def test_open_run_report_shows_what_the_simulation_did(churn):
    sim, run = churn
    assert pages.main([str(run)]) == 0  # p2pfl-report RUN_DIR
    out = run / "report"
    assert (out / "summary.html").exists() and (out / "summary.md").exists()
    assert_png(out / "overlay.png")
    assert_png(out / "bytes.png")
    assert not (out / "consensus.png").exists()  # no peer of an open network estimates it
    o = json.loads((out / "report.json").read_text())["overlay"]

    first = {p: sim.records[p][0]["round"] for p in range(N)}
    assert {int(p): r for p, r in o["joined"].items()} == first
    assert {p for p, r in first.items() if r > 5} == set(LATE)  # the mid-run joins, and only they
    assert sorted(o["goodbyes"]) == list(LEAVES) and sorted(o["silences"]) == list(CRASHES) and not o["unknown_leaves"]
    for p in (*LEAVES, *CRASHES):
        assert o["left"][str(p)]["after_round"] == sim.records[p][-1]["round"] < ROUNDS - 1
        assert o["left"][str(p)]["neighbours"] >= 1
    assert all(o["left"][str(p)]["dropped_at_once"] == o["left"][str(p)]["neighbours"] for p in LEAVES)
    ser = o["series"]
    assert ser["round"] == list(range(ROUNDS)) and sum(ser["joins"]) == N
    assert sum(ser["leaves_goodbye"]) == len(LEAVES) and sum(ser["leaves_silence"]) == len(CRASHES)
    assert ser["live"][-1] == N - len(LEAVES) - len(CRASHES) == o["live_final"]

    for r in range(ROUNDS):  # the overlay of links held at both ends, built here from the simulation's records
        live = {p: x for p in range(N) for x in sim.records[p] if x["round"] == r}
        g = nx.Graph([(p, q) for p, x in live.items() for q in x["active"] if q in live and p in live[q]["active"]])
        g.add_nodes_from(live)
        assert ser["live"][r] == len(live) and ser["links"][r] == g.number_of_edges()
        assert ser["connected"][r] == nx.is_connected(g), r
        assert ser["degree_max"][r] == max(x["degree"] for x in live.values())
    assert o["rounds_connected"] >= ROUNDS // 2  # between joins and goodbyes the views hold at both ends

    bound = 3 * relative_std(64)  # the estimator's stated error, K = 64
    est = [(m, t) for m, t in zip(ser["size_mean"], ser["size_target"], strict=True) if m is not None]
    assert len(est) == ROUNDS - 16 and all(t == N for _, t in est)  # every peer ran in epochs 0 and 1
    assert all(abs(m / t - 1) <= bound for m, t in est), est

    rows = md_rows((out / "summary.md").read_text())
    assert numbers(row(rows, "overlay: peers seen")) == [N, N - len(LEAVES) - len(CRASHES)]
    leaves = row(rows, "leaves")
    assert leaves.startswith("8; 4 goodbyes") and "4 silent" in leaves
    assert row(rows, "topology").startswith("demo: open network")
    assert not any(k.startswith("lambda") for k in rows)  # no fixed graph, no spectral bound
    assert "no consensus estimate: " + sim.records[0][-1]["consensus_absent"] in (out / "summary.md").read_text()
    x = torch.stack([flatten(m).double() for p, m in sim.models().items() if p not in (*LEAVES, *CRASHES)])
    exact = float((x - x.mean(0)).norm(dim=1).pow(2).mean().sqrt())  # the live peers' models only: the others are older
    assert float(row(rows, "final consensus distance, exact from the saved adapters of the 24 peers live")) == pytest.approx(exact, rel=1e-5)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable installed")
def test_open_run_page_shows_the_overlay_in_chromium(churn, tmp_path):
    _, run = churn
    page = pages.write_report(run, tmp_path / "report")
    shot = screenshot(page, tmp_path / "page.png")
    assert distinct_colours(shot) > 500
    figure = rgb8(page.parent / "overlay.png")
    at = find_block(shot, figure)
    assert at is not None, f"overlay.png not shown in full on the page (see {tmp_path / 'page.png'})"
    assert at[0] > 300  # below the summary table


def test_a_run_with_a_topology_is_reported_as_before_and_a_bad_network_file_is_a_note(tmp_path):
    from p2pfl.core import topology as T

    recs = {p: [rec(p, r, [(p + 1) % 3, (p + 2) % 3], consensus_distance=0.5**r) for r in range(4)] for p in range(3)}
    both = write_open_run(tmp_path / "both", recs)
    dump_topology(T.generate("ring", 3, base_port=40000), both / "topology.yaml")
    assert not report.is_open_run(both)
    topo, _, notes = report.load_run(both)
    assert topo is not None and topo.n == 3 and not notes

    bad = write_open_run(tmp_path / "bad", recs)
    (bad / "network.yaml").write_text("name: demo\nbootstrap: []\n")
    pages.write_report(bad)
    text = (bad / "report" / "summary.md").read_text()
    assert "unusable network file" in text and "authority" in text
    assert row(md_rows(text), "topology").startswith("bad: open network")  # the run directory's name
    assert (bad / "report" / "overlay.png").exists() and (bad / "report" / "consensus.png").exists()
