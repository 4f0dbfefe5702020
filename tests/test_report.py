"""p2pfl-report: on hand-written run directories (files, valid PNGs, numbers equal to the
records'), and on real runs of both kinds, pure averaging and training, launched as `make run`
launches them, down to the page as headless Chromium shows it."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, flatten
from p2pfl.host.checkpoint import load_state
from p2pfl.host.files import dump_topology, load_topology, read_jsonl
from p2pfl.ops import pages, report
from p2pfl.ops.launch import bytes_line

from .conftest import ROOT, make_topology

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PEERS = (0, 1, 3)  # ring-4: peer 2's metrics file is missing
ROUNDS = 10
PAYLOAD, RATIO, FANOUT = 4096, 4.0, 2  # each record: a delta 4x smaller than fp32, sent to 2 neighbours


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
                "payload_bytes": PAYLOAD, "compression_ratio": RATIO, "compression_error": 0.0,
                "live_neighbors": FANOUT, "rejected_messages": r // 4 if p == 1 else 0,
                "duplicates": 1 if p == 0 and r >= 5 else 0, "dropped_messages": 0,
                "wait_s": 0.1, "round_s": 0.2, "late_neighbors": [2] if r == 2 else [],
                "some_future_field": {"nested": [1, 2]},  # unknown fields are ignored
            }
            if training:
                rec["train_loss"] = 1.0 / (r + 1)
                rec["model_norm"] = 100.0 * (1 + 0.1 * p) + r
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
        dump_topology(T.generate("ring", 4, base_port=40000), run_dir / "topology.yaml")
    for p, recs in records.items():
        (run_dir / "metrics" / f"peer-{p}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def expected(records: dict[int, list[dict[str, Any]]], lam: float) -> dict[str, Any]:
    """The numbers the page must show, computed independently of p2pfl.ops.report."""
    all_recs = [r for recs in records.values() for r in recs]
    rounds = sorted({r["round"] for r in all_recs})
    means = {}
    for t in rounds:
        vals = [r["consensus_distance"] for r in all_recs if r["round"] == t and r["consensus_distance"] is not None]
        if vals:
            means[t] = sum(vals) / len(vals)
    ratios = [means[t + 1] / means[t] for t in sorted(means) if t + 1 in means]
    t0 = min(means)
    relative = {}
    for t in means:
        norms = [r["model_norm"] for r in all_recs if r["round"] == t and "model_norm" in r]
        if norms:
            relative[t] = means[t] / math.sqrt(sum(v * v for v in norms) / len(norms))
    e: dict[str, Any] = {
        "rounds": max(rounds) + 1,
        "consensus_initial": means[t0],
        "consensus_final": means[max(means)],
        "contraction": math.prod(ratios) ** (1 / len(ratios)),
        "bound": {t: means[t0] / lam ** (t0 + 1) * lam ** (t + 1) for t in rounds},
        "means": means,
        "bytes_sent": sum(r["bytes_sent"] for r in all_recs),
        "bytes_received": sum(r["bytes_received"] for r in all_recs),
        "bytes_saved": len(all_recs) * (RATIO * PAYLOAD - PAYLOAD) * FANOUT,
        "relative": relative,
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
    lam = load_topology(run / "topology.yaml").mixing_lambda()
    assert lam == pytest.approx(1 / 3)  # ring-4 with Metropolis-Hastings weights
    out = tmp_path / "elsewhere"
    assert pages.main([str(run), "--out", str(out)]) == 0
    assert "summary.html" in capsys.readouterr().out

    assert sorted(p.name for p in out.glob("*.png")) == ["bytes.png", "consensus.png"]
    for name in ("consensus.png", "bytes.png"):
        assert_png(out / name)
    e = expected(records, lam)
    text = (out / "summary.md").read_text()
    rows = md_rows(text)
    assert row(rows, "topology") == "ring-4"
    assert row(rows, "run kind").startswith("pure averaging")
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
    assert numbers(row(rows, "saved by compression"))[0] == e["bytes_saved"] > 0
    assert numbers(row(rows, "rejected messages")) == [e["rejected"]] and e["rejected"] == 2
    assert numbers(row(rows, "duplicates")) == [e["duplicates"]] and e["duplicates"] == 1
    assert not any(k.startswith(("final accuracy", "final clusters")) for k in rows)
    assert not any("adapter scale" in k or "exact from the saved adapters" in k for k in rows)
    assert "no metrics file for peer(s) [2]" in text and "no saved adapter for peer(s) [0, 1, 2, 3]" in text
    assert pages.AVERAGING_TEXT in text and "compressed (4.0x)" in text and "Kong" not in text
    assert text.index(pages.AVERAGING_TEXT) < text.index("](consensus.png)")
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
    assert data["kind"] == "averaging" and "consensus_relative" not in data["series"]


def test_report_with_accuracy_clusters_and_broken_lines(tmp_path):
    records = make_records(training=True, clusters=True)
    run = write_run(tmp_path / "run", records)
    with (run / "metrics" / "peer-0.jsonl").open("a") as f:
        f.write('{"peer": 0, "round": 10, "consensus_dist')  # a peer killed mid-write
    lines = (run / "metrics" / "peer-1.jsonl").read_text().splitlines(keepends=True)
    lines.insert(4, "not json\n")  # garbage mid-file: skipped and said so
    (run / "metrics" / "peer-1.jsonl").write_text("".join(lines))
    assert pages.main([str(run)]) == 0
    out = run / "report"
    for name in ("consensus.png", "accuracy.png", "bytes.png", "clusters.png"):
        assert_png(out / name)
    e = expected(records, 1 / 3)
    text = (out / "summary.md").read_text()
    rows = md_rows(text)
    assert row(rows, "run kind").startswith("training")
    assert not any(k.startswith(("measured contraction", "rounds above")) for k in rows)  # averaging only
    assert "bound" not in json.loads((out / "report.json").read_text())
    relative = rows[f"consensus distance / adapter scale, from the records (round {ROUNDS - 1})"]
    assert numbers(relative) == [pytest.approx(e["relative"][ROUNDS - 1], rel=1e-5)]
    assert pages.TRAINING_TEXT + pages.RELATIVE_TEXT in text and "Kong et al., 2021" in text
    assert text.index("Kong et al., 2021") < text.index("](accuracy.png)") < text.index("](consensus.png)")
    assert row(rows, "saved by compression").startswith("n/a")  # clustered: delta recipients unknown
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
    trained = report.summarize(make_records(training=True, clusters=False), 0.5)
    assert trained["kind"] == "training" and "bound" not in trained and "rounds_above_bound" not in trained
    assert trained["series"]["consensus_relative"][0] == pytest.approx(
        trained["series"]["consensus_mean"][0] / math.sqrt((100**2 + 110**2 + 130**2) / 3))


def test_training_run_without_a_model_scale_draws_no_relative_panel(tmp_path):
    records = make_records(training=True, clusters=False)
    for recs in records.values():
        for rec in recs:
            del rec["model_norm"]  # and no saved adapters either
    page = pages.write_report(write_run(tmp_path / "run", records))
    text = (page.parent / "summary.md").read_text()
    assert pages.TRAINING_TEXT in text and pages.RELATIVE_TEXT not in text
    assert not any("adapter scale" in k for k in md_rows(text))
    assert mpimg.imread(page.parent / "accuracy.png").shape[1] == mpimg.imread(page.parent / "consensus.png").shape[1]


def test_launcher_says_what_compression_saved():
    assert bytes_line(1_000_000, 4_000_000) == (
        "launch: bytes on the wire 1.00 MB, 4.00 MB with uncompressed deltas: compression saved 3.00 MB (75%)")
    assert bytes_line(2_000_000, 2_000_000).endswith("(--compress none), so compression saved nothing")
    assert bytes_line(5, None).endswith("(what uncompressed deltas would have cost is not in the records)")


def test_report_without_topology_still_reports(tmp_path):
    run = write_run(tmp_path / "run", make_records(training=False, clusters=False), topology=False)
    page = pages.write_report(run)
    assert page == run / "report" / "summary.html"
    rows = md_rows((run / "report" / "summary.md").read_text())
    assert row(rows, "lambda") == "n/a"
    assert numbers(row(rows, "peers")) == [3]
    assert_png(run / "report" / "consensus.png")


def test_a_scheduled_run_labels_lambda_as_the_schedules_contraction(tmp_path):
    run = write_run(tmp_path / "run", make_records(training=False, clusters=False), topology=False)
    topo = T.scheduled("one-peer-exponential", 6)  # not a power of 2: lambda > 0
    dump_topology(topo, run / "topology.yaml")
    pages.write_report(run)
    rows = md_rows((run / "report" / "summary.md").read_text())
    assert not any(k.startswith("lambda = ") for k in rows)  # no single W to take the norm of
    assert float(row(rows, "lambda: contraction per round of schedule one-peer-exponential")) == pytest.approx(topo.mixing_lambda())


@pytest.mark.parametrize("case", ["missing", "empty", "no-files", "empty-files"])
def test_bad_run_dir_is_a_clear_error(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case in ("no-files", "empty-files"):
        (run / "metrics").mkdir()
        dump_topology(T.generate("ring", 4, base_port=40000), run / "topology.yaml")
    if case == "empty-files":
        (run / "metrics" / "peer-0.jsonl").write_text("")
    assert pages.main([str(run)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("p2pfl-report: error:") and str(run) in err
    assert ("not a directory" if case == "missing" else "no metrics" if case != "empty-files" else "no records") in err
    assert "Traceback" not in err
    assert not (run / "report").exists()


# ---------------------------------------------------------------- real runs, as `make run` starts them

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DIM = 4096  # floats of an averaging peer's state (a multiple of 16 tensors x rank 8: exactly DIM)
TRAINER = ("local_steps=1", "eval_every=2", "samples_per_peer=64", "global_test_size=64", "batch_size=16")
LAUNCH = {  # launcher arguments of each kind: a few rounds on a ring of 4, one process; the averaging
    # run holds every round's estimate against the spectral bound, so it sketches every round (the
    # default budget, --monitor-share 0.25, estimates a run this short once)
    "averaging": ("--rounds", "8", "--", "--no-train", "--dim", str(DIM), "--compress", "int8", "--monitor-share", "0"),
    "training": ("--rounds", "4", "--", "--compress", "fp16", *(a for kv in TRAINER for a in ("--set", kv))),
}
FIRST_FIGURE = {"averaging": "consensus.png", "training": "accuracy.png"}  # the one the kind's paragraph explains


@dataclass
class RealRun:
    kind: str
    run: Path
    stdout: str
    records: dict[int, list[dict[str, Any]]]
    models: list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module", params=sorted(LAUNCH))
def real_run(request, tmp_path_factory) -> RealRun:
    """A real run through the launcher (peers, gossip, records, adapters, the report at the end)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    topo, path = make_topology(tmp, "ring", 4)
    run = tmp / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "p2pfl.ops.launch", str(path), "--run-dir", str(run), "--processes", "1",
                           *LAUNCH[kind]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {p: read_jsonl(run / "metrics" / f"peer-{p}.jsonl") for p in topo.ids}
    models = [load_state(run / f"peer-{p}" / "adapter.safetensors") for p in topo.ids]
    return RealRun(kind, run, done.stdout, records, models)


@pytest.mark.slow  # real_run starts the launcher and its peer process
def test_real_run_report_of_its_kind(real_run):
    r = real_run
    out = r.run / "report"
    text = (out / "summary.md").read_text()
    rows = md_rows(text)
    data = json.loads((out / "report.json").read_text())
    xi = exact_distance(r.models)
    scale = math.sqrt(sum(float(flatten(m).double().norm()) ** 2 for m in r.models) / len(r.models))
    assert numbers(row(rows, "final consensus distance, exact")) == [pytest.approx(xi, rel=1e-5)]
    if r.kind == "averaging":
        assert row(rows, "run kind").startswith("pure averaging")
        assert numbers(row(rows, "rounds above the spectral bound"))[-1] == 8
        assert numbers(row(rows, "measured contraction"))[1] == pytest.approx(1 / 3, rel=1e-5)  # lambda of ring-4
        assert pages.AVERAGING_TEXT in text and "compressed (" in text and "Kong" not in text
        assert not any("adapter scale" in k for k in rows) and data["kind"] == "averaging" and len(data["bound"]) == 8
    else:
        assert row(rows, "run kind").startswith("training")
        assert not any(k.startswith(("measured contraction", "rounds above")) for k in rows)
        assert "bound" not in data and "Xi_0 lambda" not in text
        relative = numbers(row(rows, "consensus distance / adapter scale, exact"))
        assert relative == [pytest.approx(xi / scale, rel=1e-5), pytest.approx(scale, rel=1e-5)]
        assert pages.TRAINING_TEXT + pages.RELATIVE_TEXT in text
        assert "Kong et al., 2021" in (out / "summary.html").read_text()
        # accuracy with the relative consensus distance beside it: twice as wide as one panel
        assert mpimg.imread(out / "accuracy.png").shape[1] > 1.2 * mpimg.imread(out / "consensus.png").shape[1]

    # bytes saved: every delta's fp32 size is known from the model itself
    dense = 4 * flatten(r.models[0]).numel()
    assert r.kind != "averaging" or dense == 4 * DIM
    recs = [rec for peer in r.records.values() for rec in peer]
    assert all(round(rec["compression_ratio"] * rec["payload_bytes"]) == dense for rec in recs)
    sent = sum(rec["bytes_sent"] for rec in recs)
    uncompressed = sent + sum((dense - rec["payload_bytes"]) * rec["live_neighbors"] for rec in recs)
    assert numbers(row(rows, "saved by compression"))[0] == uncompressed - sent > 0
    assert json.loads((r.run / "summary.json").read_text())["bytes_uncompressed_total"] == uncompressed
    page = (out / "summary.html").resolve()
    assert f"launch: report at {page} (open {page.as_uri()} in a browser)" in r.stdout
    assert (f"launch: bytes on the wire {sent / 1e6:,.2f} MB, {uncompressed / 1e6:,.2f} MB with uncompressed deltas: "
            f"compression saved {(uncompressed - sent) / 1e6:,.2f} MB") in r.stdout


def screenshot(page: Path, png: Path) -> np.ndarray:
    """The page as headless Chromium shows it from file:// in a 1280x2000 window, as 8-bit RGB."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--force-device-scale-factor=1", "--window-size=1280,2000",
                        f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)
    assert png.read_bytes()[:8] == PNG_MAGIC
    return rgb8(png)


def rgb8(png: Path) -> np.ndarray:
    return (mpimg.imread(png)[..., :3] * 255).round().astype(np.uint8)


def find_block(shot: np.ndarray, block: np.ndarray) -> tuple[int, int] | None:
    """Where `block` appears pixel for pixel in `shot` (top, left), or None: an image shown at its
    own size is copied exactly into the screenshot."""
    h, w, _ = block.shape
    k = int(np.argmax((block.min(axis=-1) < 200).sum(axis=1)))  # the block's busiest row
    target = block[k].tobytes()
    for y in range(k, shot.shape[0] - h + k + 1):
        line = shot[y].tobytes()
        pos = line.find(target)
        while pos >= 0:
            top, left = y - k, pos // 3
            if pos % 3 == 0 and np.array_equal(shot[top:top + h, left:left + w], block):
                return top, left
            pos = line.find(target, pos + 1)
    return None


def distinct_colours(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1])))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable installed")
def test_real_run_page_shows_its_plots_in_chromium(real_run, tmp_path):
    page = real_run.run / "report" / "summary.html"
    shot = screenshot(page, tmp_path / "page.png")
    assert shot.shape == (2000, 1280, 3)
    assert distinct_colours(shot) > 500  # text, table and antialiased plots, not a blank page
    first = rgb8(page.parent / FIRST_FIGURE[real_run.kind])
    assert first.shape[1] <= 1100  # the page's width: shown at its own size
    at = find_block(shot, first)
    assert at is not None, f"{FIRST_FIGURE[real_run.kind]} not shown in full on the page (see {tmp_path / 'page.png'})"
    assert at[0] > 300  # below the summary table
    assert (shot[at[0]:at[0] + first.shape[0], at[1]:at[1] + first.shape[1]].min(axis=-1) < 250).mean() > 0.02

    control = tmp_path / "control"  # the same page without its images: the check above must fail there
    control.mkdir()
    shutil.copy(page, control / page.name)
    assert find_block(screenshot(control / page.name, tmp_path / "control.png"), first) is None
