"""p2pfl-report on hand-written run directories: files, valid PNGs, numbers equal to the records'."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest

from p2pfl import report
from p2pfl import topology as T

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PEERS = (0, 1, 3)  # ring-4: peer 2's metrics file is missing
ROUNDS = 10


def make_records(training: bool, clusters: bool) -> dict[int, list[dict[str, Any]]]:
    """Hand-made records with the awkward cases: nulls, a peer one round short, sparse evaluation."""
    out: dict[int, list[dict[str, Any]]] = {}
    for p in PEERS:
        recs = []
        for r in range(ROUNDS - 1 if p == 3 else ROUNDS):
            rec: dict[str, Any] = {
                "peer": p, "round": r, "time": 1000.0 + r,
                "consensus_distance": None if (p, r) == (1, 3) else 50.0 * 0.3**r * (1 + 0.02 * p),
                "consensus_peers": 3, "neighbor_distance": 1.0,
                "bytes_sent": 10_000 + 37 * p + r, "bytes_received": 9_000 + r,
                "payload_bytes": 4096, "compression_ratio": 1.0, "compression_error": 0.0,
                "live_neighbors": 2, "rejected_messages": r // 4 if p == 1 else 0,
                "duplicates": 1 if p == 0 and r >= 5 else 0, "dropped_messages": 0,
                "wait_s": 0.1, "round_s": 0.2, "late_neighbors": [2] if r == 2 else [],
                "some_future_field": {"nested": [1, 2]},  # unknown fields are ignored
            }
            if training:
                rec["train_loss"] = 1.0 / (r + 1)
                if r % 3 == 0 or r == ROUNDS - 1:
                    rec["accuracy"] = 0.4 + 0.05 * r + 0.01 * p
                if r in (0, ROUNDS - 1):
                    rec["global_accuracy"] = 0.3 + 0.04 * r + 0.02 * p
            if clusters:
                rec["cluster"] = {0: 0, 1: 0 if r < 5 else 1, 3: 1}[p]
                rec["cluster_size"] = 2
                rec["fairness_gap"] = 0.1 * (p + 1) / (r + 1)
            recs.append(rec)
        out[p] = recs
    return out


def write_run(run_dir: Path, records: dict[int, list[dict[str, Any]]], topology: bool = True) -> Path:
    (run_dir / "metrics").mkdir(parents=True)
    if topology:
        T.generate("ring", 4, base_port=40000).dump(run_dir / "topology.yaml")
    for p, recs in records.items():
        (run_dir / "metrics" / f"peer-{p}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def expected(records: dict[int, list[dict[str, Any]]], lam: float) -> dict[str, Any]:
    """The numbers the page must show, computed independently of p2pfl.report."""
    all_recs = [r for recs in records.values() for r in recs]
    rounds = sorted({r["round"] for r in all_recs})
    means = {}
    for t in rounds:
        vals = [r["consensus_distance"] for r in all_recs if r["round"] == t and r["consensus_distance"] is not None]
        if vals:
            means[t] = sum(vals) / len(vals)
    ratios = [means[t + 1] / means[t] for t in sorted(means) if t + 1 in means]
    t0 = min(means)
    e: dict[str, Any] = {
        "rounds": max(rounds) + 1,
        "consensus_initial": means[t0],
        "consensus_final": means[max(means)],
        "contraction": math.prod(ratios) ** (1 / len(ratios)),
        "bound": {t: means[t0] / lam ** (t0 + 1) * lam ** (t + 1) for t in rounds},
        "means": means,
        "bytes_sent": sum(r["bytes_sent"] for r in all_recs),
        "bytes_received": sum(r["bytes_received"] for r in all_recs),
        "rejected": sum(recs[-1]["rejected_messages"] for recs in records.values()),
        "duplicates": sum(recs[-1]["duplicates"] for recs in records.values()),
    }
    last_acc = [[r["accuracy"] for r in recs if "accuracy" in r][-1] for recs in records.values() if any("accuracy" in r for r in recs)]
    if last_acc:
        e["acc"] = (sum(last_acc) / len(last_acc), min(last_acc), max(last_acc))
        glob = [[r["global_accuracy"] for r in recs if "global_accuracy" in r][-1] for recs in records.values()]
        e["global_acc"] = sum(glob) / len(glob)
    return e


def md_rows(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (.+?) \| (.+?) \|$", text, re.M)}


def row(rows: dict[str, str], prefix: str) -> str:
    hits = [v for k, v in rows.items() if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, rows)
    return hits[0]


def numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", text)]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.shape[2] in (3, 4), img.shape
    assert float(img[..., :3].std()) > 0.01  # something was drawn, not a blank canvas


def test_report_without_training(tmp_path, capsys):
    records = make_records(training=False, clusters=False)
    run = write_run(tmp_path / "run", records)
    lam = T.load(run / "topology.yaml").mixing_lambda()
    assert lam == pytest.approx(1 / 3)  # ring-4 with Metropolis-Hastings weights
    out = tmp_path / "elsewhere"
    assert report.main([str(run), "--out", str(out)]) == 0
    assert "summary.html" in capsys.readouterr().out

    assert sorted(p.name for p in out.glob("*.png")) == ["bytes.png", "consensus.png"]
    for name in ("consensus.png", "bytes.png"):
        assert_png(out / name)
    e = expected(records, lam)
    text = (out / "summary.md").read_text()
    rows = md_rows(text)
    assert row(rows, "topology") == "ring-4"
    assert numbers(row(rows, "peers")) == [3, 4]
    assert numbers(rows["rounds"]) == [e["rounds"], ROUNDS - 1, ROUNDS]
    assert numbers(row(rows, "lambda"))[-1] == pytest.approx(lam, rel=1e-5)
    assert numbers(row(rows, "spectral gap"))[-1] == pytest.approx(1 - lam, rel=1e-5)
    initial = numbers(rows["initial mean consensus estimate (round 0)"])
    assert initial == [pytest.approx(e["consensus_initial"], rel=1e-5)]
    assert numbers(rows["final mean consensus estimate (round 9)"]) == [pytest.approx(e["consensus_final"], rel=1e-5)]
    contraction, lam_shown, n_ratios = numbers(row(rows, "measured contraction"))
    assert contraction == pytest.approx(e["contraction"], rel=1e-5)
    assert contraction == pytest.approx(0.3, rel=0.05)  # the records contract by 0.3 per round
    assert lam_shown == pytest.approx(lam, rel=1e-5) and n_ratios == ROUNDS - 1
    assert numbers(row(rows, "total bytes sent"))[0] == e["bytes_sent"]
    assert numbers(row(rows, "total bytes received"))[0] == e["bytes_received"]
    assert numbers(row(rows, "rejected messages")) == [e["rejected"]] and e["rejected"] == 2
    assert numbers(row(rows, "duplicates")) == [e["duplicates"]] and e["duplicates"] == 1
    assert not any(k.startswith(("final accuracy", "final clusters")) for k in rows)
    assert "no metrics file for peer(s) [2]" in text
    assert "](consensus.png)" in text and "](bytes.png)" in text and "accuracy.png" not in text

    html = (out / "summary.html").read_text()
    assert '<img src="consensus.png"' in html and '<img src="bytes.png"' in html
    assert f"<td>{row(rows, 'measured contraction')}</td>" in html

    data = json.loads((out / "report.json").read_text())  # the same numbers, unrounded
    assert data["consensus_initial"] == pytest.approx(e["consensus_initial"], rel=1e-12)
    assert data["contraction_measured"] == pytest.approx(e["contraction"], rel=1e-12)
    assert data["total_bytes_sent"] == e["bytes_sent"]
    series = dict(zip(data["series"]["round"], data["series"]["consensus_mean"], strict=True))
    assert series == pytest.approx(e["means"], rel=1e-12)
    bound = dict(zip(data["series"]["round"], data["bound"], strict=True))
    assert bound == pytest.approx(e["bound"], rel=1e-12)
    above = sum(1 for t, m in e["means"].items() if m > e["bound"][t])
    assert numbers(row(rows, "rounds above the spectral bound")) == [above, len(e["means"])]


def test_report_with_accuracy_clusters_and_broken_lines(tmp_path):
    records = make_records(training=True, clusters=True)
    run = write_run(tmp_path / "run", records)
    with (run / "metrics" / "peer-0.jsonl").open("a") as f:
        f.write('{"peer": 0, "round": 10, "consensus_dist')  # a peer killed mid-write
    lines = (run / "metrics" / "peer-1.jsonl").read_text().splitlines(keepends=True)
    lines.insert(4, "not json\n")  # garbage mid-file: skipped and said so
    (run / "metrics" / "peer-1.jsonl").write_text("".join(lines))
    assert report.main([str(run)]) == 0
    out = run / "report"
    for name in ("consensus.png", "accuracy.png", "bytes.png", "clusters.png"):
        assert_png(out / name)
    e = expected(records, 1 / 3)
    text = (out / "summary.md").read_text()
    rows = md_rows(text)
    mean, lo, hi = numbers(row(rows, "final accuracy mean / min / max"))
    assert (mean, lo, hi) == pytest.approx(e["acc"], rel=1e-5)
    # peer 3 stopped at round 8, so its latest accuracy is from round 6, not round 9
    assert lo == pytest.approx(0.4 + 0.05 * 6 + 0.03, rel=1e-5)
    assert numbers(row(rows, "final global accuracy")) == [pytest.approx(e["global_acc"], rel=1e-5)]
    assert row(rows, "final clusters") == "2 (0: 1, 1: 2)"  # peer 1 moved from cluster 0 to 1 at round 5
    assert numbers(row(rows, "cluster changes")) == [1]
    fair = [[r["fairness_gap"] for r in recs][-1] for recs in records.values()]
    assert numbers(row(rows, "fairness_gap")) == [pytest.approx(sum(fair) / len(fair), rel=1e-5)]
    assert "peer-1.jsonl: skipped 1 line(s) that are not JSON" in text
    for name in ("consensus.png", "accuracy.png", "bytes.png", "clusters.png"):
        assert f"]({name})" in text


def test_summarize_is_pure_and_keeps_a_rounds_last_record():
    records = make_records(training=False, clusters=False)
    rerun = dict(records[0][4], bytes_sent=1, consensus_distance=7.0)
    records[0] = [*records[0], rerun]  # round 4 logged again by a restarted peer: the later one counts
    s = report.summarize(records, 0.5)
    assert s["series"]["bytes_sent"][4] == 1 + sum(recs[4]["bytes_sent"] for p, recs in records.items() if p != 0)
    vals = [7.0, *(records[p][4]["consensus_distance"] for p in (1, 3))]
    assert s["series"]["consensus_mean"][4] == pytest.approx(sum(vals) / 3)
    assert s["lambda"] == 0.5 and s["spectral_gap"] == 0.5
    assert s["bound"][0] == pytest.approx(s["consensus_initial"])
    assert s["bound"][3] == pytest.approx(s["consensus_initial"] * 0.5**3)
    assert report.summarize(records, None)["bound"] is None


def test_report_without_topology_still_reports(tmp_path):
    run = write_run(tmp_path / "run", make_records(training=False, clusters=False), topology=False)
    page = report.write_report(run)
    assert page == run / "report" / "summary.html"
    rows = md_rows((run / "report" / "summary.md").read_text())
    assert row(rows, "lambda") == "n/a"
    assert numbers(row(rows, "peers")) == [3]
    assert_png(run / "report" / "consensus.png")


@pytest.mark.parametrize("case", ["missing", "empty", "no-files", "empty-files"])
def test_bad_run_dir_is_a_clear_error(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case in ("no-files", "empty-files"):
        (run / "metrics").mkdir()
        T.generate("ring", 4, base_port=40000).dump(run / "topology.yaml")
    if case == "empty-files":
        (run / "metrics" / "peer-0.jsonl").write_text("")
    assert report.main([str(run)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("p2pfl-report: error:") and str(run) in err
    assert ("not a directory" if case == "missing" else "no metrics" if case != "empty-files" else "no records") in err
    assert "Traceback" not in err
    assert not (run / "report").exists()
