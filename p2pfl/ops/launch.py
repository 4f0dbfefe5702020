"""Local cluster launcher: the peers of a topology spread over P processes, progress, clean
shutdown, summary. One process hosts a contiguous block of ids (co-hosted peers share one model
and talk in process; blocks talk over loopback TCP). The default, one process per core, keeps
every core busy without importing torch once per peer. With `--ray`, `p2pfl.ops.ray_launch` places
the blocks on a Ray cluster's nodes instead and reuses the progress line and the summary here."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2pfl.core import topology as topo_mod
from p2pfl.host.files import load_topology, read_jsonl
from p2pfl.ops.pages import write_report
from p2pfl.ops.report import ReportError, index_records, uncompressed_extra_bytes


def last_records(run_dir: Path, ids: list[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for p in ids:
        path = run_dir / "metrics" / f"peer-{p}.jsonl"
        if path.exists() and (recs := read_jsonl(path, last=1)):
            out[p] = recs[0]
    return out


def _mean(values: list[Any]) -> float:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(run_dir: Path, ids: list[int]) -> dict[str, Any]:
    per_peer = {p: read_jsonl(run_dir / "metrics" / f"peer-{p}.jsonl") for p in ids if (run_dir / "metrics" / f"peer-{p}.jsonl").exists()}
    last = {p: recs[-1] for p, recs in per_peer.items() if recs}
    first = {p: recs[0] for p, recs in per_peer.items() if recs}
    sent = sum(sum(x.get("bytes_sent", 0) for x in recs) for recs in per_peer.values())
    extra = uncompressed_extra_bytes(index_records(per_peer))
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "peers": len(ids),
        "rounds_done": {p: r["round"] + 1 for p, r in last.items()},
        "final_consensus_distance": _mean([r.get("consensus_distance") for r in last.values()]),
        "bytes_sent_total": sent,
        "bytes_uncompressed_total": None if extra is None else sent + extra,
        "rejected_messages": sum(r.get("rejected_messages", 0) for r in last.values()),
    }
    accs = [r.get("accuracy") for r in first.values() if r.get("accuracy") is not None]
    if accs:
        summary["accuracy_before_training"] = _mean([r.get("accuracy_before") for r in first.values()])
        summary["global_accuracy_before_training"] = _mean([r.get("global_accuracy_before") for r in first.values()])
        summary["accuracy_first_round"] = _mean(accs)
        summary["accuracy_final"] = _mean([r.get("accuracy") for r in last.values()])
        summary["global_accuracy_final"] = _mean([r.get("global_accuracy") for r in last.values() if "global_accuracy" in r])
    return summary


def bytes_line(sent: int, uncompressed: int | None) -> str:
    """The launcher's last word on bytes: what went on the wire (deltas, consensus sketches,
    control), and what the codec saved against sending every delta uncompressed (`none`)."""
    line = f"launch: bytes on the wire {sent / 1e6:,.2f} MB"
    if uncompressed is None:
        return line + " (what uncompressed deltas would have cost is not in the records)"
    saved = uncompressed - sent
    if saved == 0:
        return line + "; deltas went uncompressed (--compress none), so compression saved nothing"
    share = f" ({saved / uncompressed:.0%})" if uncompressed > 0 else ""
    return line + f", {uncompressed / 1e6:,.2f} MB with uncompressed deltas: compression saved {saved / 1e6:,.2f} MB{share}"


def progress_line(recs: dict[int, dict[str, Any]], ids: list[int], alive: int) -> str:
    """The launcher's live line from each peer's latest record: rounds, live peers, consensus, accuracy."""
    rounds = [recs[p]["round"] + 1 if p in recs else 0 for p in ids]
    cd = _mean([r.get("consensus_distance") for r in recs.values()])
    acc = _mean([r.get("accuracy") for r in recs.values() if r.get("accuracy") is not None])
    line = f"launch: rounds {min(rounds)}..{max(rounds)} | alive {alive}/{len(ids)} | consensus {cd:.3e}"
    return line + (f" | accuracy {acc:.3f}" if math.isfinite(acc) else "")


def finish(run_dir: Path, ids: list[int], codes: dict[int, int | None], report: bool) -> int:
    """The end of a run: summary.json and its line, the bytes line, the report; 1 if a peer failed."""
    failed = {p: c for p, c in codes.items() if c != 0}
    summary = summarize(run_dir, ids)
    summary["exit_codes"] = codes
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("launch: summary " + json.dumps(summary))
    print(bytes_line(summary["bytes_sent_total"], summary["bytes_uncompressed_total"]))
    if report:
        try:
            page = write_report(run_dir).resolve()
            print(f"launch: report at {page} (open {page.as_uri()} in a browser)")
        except ReportError as e:
            print(f"launch: no report: {e}", file=sys.stderr)
    if failed:
        print(f"launch: peers failed: {failed} (see {run_dir / 'logs'})", file=sys.stderr)
        return 1
    return 0


def follow(run_dir: Path, procs: dict[int, subprocess.Popen[bytes]], blocks: dict[int, list[int]]) -> None:
    """Until every process exits: the progress line, and SIGINT or SIGTERM forwarded to the peers
    (SIGTERM, then SIGKILL the second time). `procs` and `blocks` by a block's first id."""
    stopping = {"n": 0}

    def forward(sig: int, _frame: Any) -> None:
        stopping["n"] += 1
        target = signal.SIGTERM if stopping["n"] == 1 else signal.SIGKILL
        print(f"\nlaunch: forwarding {signal.Signals(target).name} to all peers", flush=True)
        for pr in procs.values():
            if pr.poll() is None:
                pr.send_signal(target)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    ids = sorted(p for b in blocks.values() for p in b)
    last_line = ""
    while any(pr.poll() is None for pr in procs.values()):
        time.sleep(1.0)
        alive = sum(len(blocks[k]) for k, pr in procs.items() if pr.poll() is None)
        line = progress_line(last_records(run_dir, ids), ids, alive)
        if line != last_line:
            print(line, flush=True)
            last_line = line


def id_spec(block: list[int]) -> str:
    """A block of ids as `--id` takes it: a range where it is one, else a list."""
    return f"{block[0]}-{block[-1]}" if block == list(range(block[0], block[-1] + 1)) else ",".join(map(str, block))


def spread(ids: list[int], processes: int) -> list[list[int]]:
    """Contiguous blocks of ids, as even as possible, one per process (never an empty one)."""
    k = max(1, min(processes, len(ids)))
    return [ids[i * len(ids) // k : (i + 1) * len(ids) // k] for i in range(k)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--open", "--join"):  # an open network: no topology file (`p2pfl.ops.open_launch`)
        from p2pfl.ops import open_launch

        return open_launch.main(argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1 :]
    ap = argparse.ArgumentParser(prog="scripts/launch.sh", description="Run every peer of a topology locally.")
    ap.add_argument("topology", type=Path)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--no-report", action="store_true", help="skip p2pfl-report at the end")
    ap.add_argument("--processes", type=int, help="processes to spread the peers over (default: one per core, at most one per peer)")
    from p2pfl.ops import ray_launch  # its options; Ray itself is imported only by a --ray run

    ray_launch.add_options(ap)
    args = ap.parse_args(argv)
    if args.processes is not None and args.processes < 1:
        print(f"launch: --processes must be >= 1, got {args.processes}", file=sys.stderr)
        return 2
    try:
        topo = load_topology(args.topology)
    except topo_mod.TopologyError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    if args.ray is not None:
        return ray_launch.run(args, topo, run_dir, extra)
    shutil.copy(args.topology, run_dir / "topology.yaml")
    common = ["--topology", str(args.topology), "--run-dir", str(run_dir)]
    if args.rounds is not None:
        common += ["--rounds", str(args.rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    blocks = spread(topo.ids, args.processes or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // len(blocks))  # training workers: the cores, shared out among the processes
    procs: dict[int, subprocess.Popen[bytes]] = {}  # first id of a block -> its process
    print(f"launch: {topo.n} peers of {args.topology} in {len(blocks)} processes -> {run_dir} (logs in {run_dir / 'logs'})", flush=True)
    for block in blocks:
        with open(run_dir / "logs" / f"process-{block[0]}.stdout", "wb") as out:  # the child keeps its own handle
            procs[block[0]] = subprocess.Popen(
                [sys.executable, "-m", "p2pfl", *common, "--id", id_spec(block), "--threads", str(threads), *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    follow(run_dir, procs, {b[0]: b for b in blocks})
    return finish(run_dir, topo.ids, {p: procs[b[0]].returncode for b in blocks for p in b}, not args.no_report)


if __name__ == "__main__":
    sys.exit(main())
