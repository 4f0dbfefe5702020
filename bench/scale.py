"""Many peers per process: memory, start-up, round time and training throughput of the daemon.

Each case runs the real daemon (`p2pfl-peer --id A-B`) on a ring of N peers, hosted either all in
one process (co-hosted: one torch, one frozen foundation model, in-process messages) or one
process per peer, and samples every process's PSS from /proc/PID/smaps_rollup while it runs.
Reported per case: peak PSS in total and per peer (co-hosted: the increment per peer beyond the
first, measured against the 1-peer case of the same run), start-up time (launch to the first
round's start), seconds per round, and machine-wide training samples per second (local steps x
batch x peers x rounds over the time from the first round's start to the last record). Ratios:
co-hosted 8 vs 8 processes, and 256 vs 8 co-hosted. Cases ``loopW`` give the machine's ceiling
without the daemon: W trainers of the shared model, one per worker thread, each calling
``train_round`` back to back in one process; the co-hosted 8 is also reported as a fraction of
``loop2``. Case ``batches`` asks what batching co-hosted peers' forward passes through the
frozen model could gain: one thread trains at batch 32, 64, 128 and 256 (the same samples per
round), rounds interleaved, and it reports samples per second by batch and the best over 32.
Case ``rayN`` runs the N training peers on a local Ray instance in 2 actors of N/2 peers
(`scripts/launch.sh --ray --actors 2`, one CPU and one training thread each) against case ``N``,
the same peers in one process (two training threads): start-up (launch to the first round's start,
Ray's own start included) and seconds per round, and ``ray_over_one_process`` their ratios; PSS is
not sampled there (the actors are Ray's worker processes). Prints one JSON line.

usage: python bench/scale.py [--cases 1,8,64,256,procs8,notrain1024,loop1,loop2,batches,ray64] [--rounds 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, pss_kib, trainer_config

from p2pfl.core import topology as T
from p2pfl.host.files import dump_topology, read_jsonl
from p2pfl.net.ports import free_base_port

ROOT = Path(__file__).resolve().parent.parent
SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # every process the bench starts


def run_case(n: int, processes: int, rounds: int, train: bool, sets: list[str], timeout: float, threads: int = 0,
             ray_actors: int = 0) -> dict:
    """N peers of a ring in `processes` processes, or with `ray_actors` in that many actors of a
    local Ray instance (the launcher's --ray)."""
    tmp = Path(tempfile.mkdtemp(prefix="p2pfl-scale-"))
    path = tmp / "ring.yaml"
    dump_topology(T.generate("ring", n, base_port=free_base_port(n)), path)
    run = tmp / "run"
    peer = ["--round-timeout", "3600", "--peer-timeout", "600", "--startup-timeout", "600", "--log-level", "WARNING"]
    peer += ["--no-train"] if not train else [a for s in sets for a in ("--set", s)]
    blocks = [list(range(n))[i * n // processes : (i + 1) * n // processes] for i in range(processes)]
    if ray_actors:  # the launcher gives each actor as many training threads as CPUs (one)
        cmds = [[sys.executable, "-m", "p2pfl.ops.launch", str(path), "--ray", "--actors", str(ray_actors), "--run-dir", str(run),
                 "--rounds", str(rounds), "--no-report", "--", *peer]]
    else:
        common = ["--topology", str(path), "--run-dir", str(run), "--rounds", str(rounds), "--threads", str(threads), *peer]
        cmds = [[sys.executable, "-m", "p2pfl", *common, "--id", f"{b[0]}-{b[-1]}"] for b in blocks]
    t0 = time.time()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=SINGLE_THREAD_ENV, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / f"err-{k}.log", "wb")) for k, cmd in enumerate(cmds)]  # noqa: SIM115
    peak = 0
    while any(p.poll() is None for p in procs):
        if not ray_actors:
            peak = max(peak, sum(pss_kib(p.pid) for p in procs))
        if time.time() - t0 > timeout:
            for p in procs:
                p.kill()
            return {"peers": n, "processes": processes, "error": f"timed out after {timeout}s"}
        time.sleep(0.5)
    codes = [p.returncode for p in procs]
    recs = {p: read_jsonl(run / "metrics" / f"peer-{p}.jsonl") for p in range(n) if (run / "metrics" / f"peer-{p}.jsonl").exists()}
    out: dict = {"peers": n, "processes": processes, "train": train, "rounds": rounds, "exit_codes": sorted(set(codes))}
    if ray_actors:
        out.update(processes=None, ray_actors=ray_actors)
    else:
        out.update(peak_pss_mb=round(peak / 1024, 1), pss_per_peer_mb=round(peak / 1024 / n, 2))
    done = [r for rs in recs.values() for r in rs]
    if len(recs) < n or not done:
        return {**out, "error": f"only {len(recs)} of {n} peers wrote records"}
    starts = [rs[0]["time"] - rs[0]["round_s"] for rs in recs.values()]
    end = max(r["time"] for r in done)
    out["startup_s"] = round(max(starts) - t0, 1)
    out["seconds_per_round"] = round((end - min(starts)) / rounds, 2)
    if train:
        steps = sum(r.get("steps", 0) for r in done)
        out["samples_per_s"] = round(steps * trainer_config(sets).batch_size / (end - min(starts)), 1)
        out["train_s_per_peer_round"] = round(sum(r.get("train_s", 0) for r in done) / len(done), 3)
        out["final_accuracy_mean"] = round(sum(rs[-1].get("accuracy", 0) for rs in recs.values()) / n, 4)
    return out


def loop(workers: int, rounds: int, sets: list[str]) -> dict:
    """Training samples per second of ``workers`` trainers training back to back, one thread each
    (after one warm-up round), in this process."""
    import threading

    import torch

    from p2pfl.learn.trainer import Trainer

    torch.set_num_threads(1)
    cfg = trainer_config(sets)
    trainers = [Trainer(cfg, i, 8, replica=i) for i in range(workers)]
    for t in trainers:
        t.train_round()
    samples = [0] * workers

    def run(k: int) -> None:
        for _ in range(rounds):
            samples[k] += int(trainers[k].train_round()["steps"]) * cfg.batch_size

    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"workers": workers, "rounds": rounds, "samples_per_s": round(sum(samples) / (time.perf_counter() - t0), 1)}


BATCHES = (32, 64, 128, 256)


def batches(rounds: int, sets: list[str]) -> dict:
    """Training samples per second of one thread at each of `BATCHES` (512 samples a round), the
    rounds interleaved so that the machine's load hits every batch size alike."""
    from dataclasses import replace

    import torch

    from p2pfl.learn.trainer import Trainer

    torch.set_num_threads(1)
    base = trainer_config(sets)
    base = replace(base, samples_per_peer=max(base.samples_per_peer, 1024))  # 768 training samples: room for a batch of 256
    trainers = {b: Trainer(replace(base, batch_size=b, local_steps=512 // b), 0, 8, replica=k) for k, b in enumerate(BATCHES)}
    for t in trainers.values():
        t.train_round()
    took = dict.fromkeys(BATCHES, 0.0)
    done = dict.fromkeys(BATCHES, 0)
    for _ in range(rounds):
        for b, t in trainers.items():
            t0 = time.perf_counter()
            done[b] += int(t.train_round()["steps"]) * b
            took[b] += time.perf_counter() - t0
    rate = {str(b): round(done[b] / took[b], 1) for b in BATCHES}
    return {"rounds": rounds, "samples_per_s_by_batch": rate, "best_over_32": round(max(rate.values()) / rate["32"], 3)}


def loop_case(workers: int, rounds: int, sets: list[str]) -> dict:
    """`loop` (workers > 0) or `batches` (0) in a process of its own, so that its torch and
    trainers do not stay in this one."""
    cmd = [sys.executable, __file__, "--loop", str(workers or -1), "--rounds", str(rounds)] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, cwd=ROOT, env=SINGLE_THREAD_ENV, capture_output=True, text=True)
    if done.returncode:
        return {"workers": workers, "error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1,8,64,256,procs8,notrain1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option of every training case")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of co-hosting processes (0: every core)")
    ap.add_argument("--loop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop:
        emit(loop(args.loop, args.rounds, args.set) if args.loop > 0 else batches(args.rounds, args.set))
        return
    results: dict[str, dict] = {}
    for case in args.cases.split(","):
        if case == "procs8":
            results[case] = run_case(8, 8, args.rounds, True, args.set, args.timeout)
        elif case.startswith("loop"):
            results[case] = loop_case(int(case.removeprefix("loop")), args.rounds, args.set)
        elif case == "batches":
            results[case] = loop_case(0, args.rounds, args.set)
        elif case.startswith("ray"):
            results[case] = run_case(int(case.removeprefix("ray")), 1, args.rounds, True, args.set, args.timeout, ray_actors=2)
        elif case.startswith("notrain"):
            results[case] = run_case(int(case.removeprefix("notrain")), 1, args.rounds, False, args.set, args.timeout)
        else:
            results[case] = run_case(int(case), 1, args.rounds, True, args.set, args.timeout, args.threads)
        print(json.dumps({case: results[case]}), file=sys.stderr, flush=True)
    out: dict = {"bench": "scale", "rounds": args.rounds, "set": args.set, "threads": args.threads, "cases": results}
    one = results.get("1", {}).get("peak_pss_mb")
    for case, r in results.items():
        if one and case.isdigit() and int(case) > 1 and "peak_pss_mb" in r:
            r["pss_per_extra_peer_mb"] = round((r["peak_pss_mb"] - one) / (int(case) - 1), 2)
    for key, num, den in (("throughput_cohosted8_over_processes8", "8", "procs8"), ("cohosted8_over_loop2", "8", "loop2"),
                          ("throughput_256_over_8", "256", "8")):
        a, b = results.get(num, {}).get("samples_per_s"), results.get(den, {}).get("samples_per_s")
        if a is not None and b:
            out[key] = round(a / b, 3)
    for case, r in results.items():
        one = results.get(case.removeprefix("ray"), {})
        if case.startswith("ray") and "seconds_per_round" in r and "seconds_per_round" in one:
            r["ray_over_one_process"] = {k: round(r[k] / one[k], 3) for k in ("startup_s", "seconds_per_round")}
    emit(out)


if __name__ == "__main__":
    main()
