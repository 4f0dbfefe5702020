"""Memory and speed of many co-hosted trainers in one OS process (shared foundation and data).

Builds trainers for peers 0, 1, ... of one run (default model and data sizes) in stages of 1, 8,
64 (and ``--peers 256``: 256) peers; every new peer runs one ``train_round()`` and one
``evaluate(True)``, then the process's PSS (``/proc/self/smaps_rollup``) is read. Prints one JSON
line: PSS per stage, PSS per extra peer and training samples per second (local_steps * batch_size
* new peers / seconds of their train rounds). ``--private`` builds every trainer with its own
foundation and data (``share=False``) for comparison.

PSS counts heap that glibc keeps after ``free`` as well as live data, so the line also gives what
one peer's own tensors take (its data share, adapter and optimizer state) and, at the very end,
the PSS after ``malloc_trim(0)`` (heap that was free, handed back): the live share of the total.
``--trim`` calls ``malloc_trim(0)`` after every peer's round, as a host process could.

    .venv/bin/python bench/shared_memory.py [--peers 256] [--private] [--trim] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import time

import torch
from common import emit, pss_kib, trainer_config

from p2pfl.learn.trainer import Trainer


def pss_mib(field: str = "Pss") -> float:
    return pss_kib("self", field) / 1024


def own_tensor_mib(tr: Trainer) -> float:
    """Bytes of the tensors only this trainer holds: data share, travelling tensors, optimizer state."""
    tensors = [tr.data.train.images, tr.data.train.labels, tr.data.test.images, tr.data.test.labels]
    tensors += list(tr.model.trainable()) + [p.grad for p in tr.model.trainable() if p.grad is not None]
    tensors += [v for st in tr.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(t.untyped_storage().nbytes() for t in tensors) / 2**20


def trimmed_pss_mib() -> float | None:
    """PSS after glibc hands free heap back to the kernel; None without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return pss_mib()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=64, help="largest stage (stages: 1, 8, 64, 256 up to it)")
    ap.add_argument("--private", action="store_true", help="no sharing: every trainer loads its own copies")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer option")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every peer's round and evaluation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = trainer_config(args.set)
    stages = sorted({s for s in (1, 8, 64, 256) if s < args.peers} | {args.peers})
    base = pss_mib()
    trainers: list[Trainer] = []
    rows = []
    for n in stages:
        train_s = other_s = 0.0
        new = range(len(trainers), n)
        for p in new:
            t0 = time.perf_counter()
            tr = Trainer(cfg, p, args.peers, share=not args.private)
            t1 = time.perf_counter()
            tr.train_round()
            t2 = time.perf_counter()
            tr.evaluate(True)
            if args.trim:
                trimmed_pss_mib()
            other_s += (t1 - t0) + time.perf_counter() - t2
            train_s += t2 - t1
            trainers.append(tr)
        gc.collect()
        rows.append({"peers": n, "pss_mib": round(pss_mib(), 1), "pss_anon_mib": round(pss_mib("Pss_Anon"), 1), "train_seconds": round(train_s, 2),
                     "build_and_eval_seconds": round(other_s, 2),
                     "samples_per_second": round(cfg.local_steps * cfg.batch_size * len(new) / train_s, 1)})
    first, last = rows[0], rows[-1]
    extra = max(1, last["peers"] - first["peers"])
    own = own_tensor_mib(trainers[-1])
    trimmed = trimmed_pss_mib()
    emit({
        "bench": "shared_memory", "shared": not args.private, "trim_each_peer": args.trim, "model": cfg.model, "threads": args.threads,
        "samples_per_peer": cfg.samples_per_peer, "global_test_size": cfg.global_test_size,
        "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "pss_before_mib": round(base, 1),
        "stages": rows,
        **{f"{k}_per_extra_peer_mib": round((last[f"{k}_mib"] - first[f"{k}_mib"]) / extra, 2) for k in ("pss", "pss_anon")},
        **{f"{k}_per_extra_peer_by_stage_mib": [
            round((b[f"{k}_mib"] - a[f"{k}_mib"]) / (b["peers"] - a["peers"]), 2) for a, b in itertools.pairwise(rows)
        ] for k in ("pss", "pss_anon")},
        "samples_per_second": round(cfg.local_steps * cfg.batch_size * last["peers"] / sum(r["train_seconds"] for r in rows), 1),
        "own_tensors_per_peer_mib": round(own, 2),
        "pss_after_malloc_trim_mib": None if trimmed is None else round(trimmed, 1),
    })


if __name__ == "__main__":
    main()
