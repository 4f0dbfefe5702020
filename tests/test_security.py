"""Security over real TCP: CurveZMQ allow-list, key-to-id binding, replays, Byzantine peers.

Every multi-process test runs one OS process per peer (`--no-train`, small states) over loopback
TCP with a topology whose keys come from `p2pfl-topology keygen`; the test itself plays the
attacker with pyzmq sockets (and, for the raw replay, plain TCP sockets).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from p2pfl.config import PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, flatten, network_mean
from p2pfl.core.robust import NormGuard, RobustSpec
from p2pfl.core.state import State, synthetic_state
from p2pfl.core.wire import Kind, Message, TensorPayload, encode
from p2pfl.host.checkpoint import load_state
from p2pfl.host.files import load_topology
from p2pfl.node.build import make_node
from p2pfl.node.node import NodeSpec
from p2pfl.node.piggyback import ESTIMATE_TENSOR, SKETCH_TENSOR
from p2pfl.ops.cli import topology_main
from p2pfl.sim.engines import EngineNetwork

from .conftest import make_topology, records, wait_all, wait_until

DIM = 4096


# --------------------------------------------------------------------------- helpers

def keyed_topology(tmp: Path, kind: str, n: int) -> tuple[T.Topology, Path]:
    _, path = make_topology(tmp, kind, n)
    assert topology_main(["keygen", "--topology", str(path)]) == 0
    topo = load_topology(path)
    assert all(len(topo.peers[p].extra["public_key"]) == 40 for p in topo.ids)
    return topo, path


def peer_keys(path: Path, peer: int) -> tuple[bytes, bytes]:
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(path.parent / "keys" / f"peer-{peer}.key_secret"))
    assert secret is not None
    return public, secret


def wait_round(run_dir: Path, peer: int, rnd: int, procs: dict[int, subprocess.Popen], timeout: float = 120) -> None:
    wait_until(lambda: any(r["round"] >= rnd for r in records(run_dir, peer)), timeout, f"peer {peer}'s round {rnd}",
               procs.values())


def log_of(run_dir: Path, peer: int) -> str:
    return (run_dir / "logs" / f"peer-{peer}.log").read_text()


def handshake_events(sock, mon, timeout: float = 60) -> list[str]:
    """Names of the monitor events a client socket saw up to its handshake's outcome (the first
    HANDSHAKE_SUCCEEDED or HANDSHAKE_FAILED_*); `mon` is its monitor socket, attached before
    connecting, and is closed here."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    seen: list[str] = []
    end = time.monotonic() + timeout
    try:
        while not any(e.startswith("HANDSHAKE_") for e in seen):
            assert time.monotonic() < end, f"no handshake outcome within {timeout}s, only {seen}"
            if mon.poll(100):
                seen.append(zmq.Event(recv_monitor_message(mon)["event"]).name)
    finally:
        sock.disable_monitor()
        mon.close(0)
    return seen


def client(ctx, endpoint: str, keys: tuple[bytes, bytes] | None, server_key: bytes | None, identity: bytes | None = None):
    import zmq

    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey = keys
        s.curve_serverkey = server_key
    return s


def heartbeat(sender: int, inc: int = 1, net: int = 0) -> list:
    return encode(Message(Kind.HEARTBEAT, sender=sender, inc=inc, net=net))


def delta(sender: int, seq: int, rnd: int, inc: int, state: State | None = None, net: int = 0) -> list:
    tensors = {}
    for name, v in (state or {}).items():
        tensors[name] = TensorPayload(codec="none", shape=tuple(v.shape), parts={"data": v.contiguous()})
    return encode(Message(Kind.DELTA, sender=sender, round=rnd, seq=seq, inc=inc, tensors=tensors, net=net))


class RecordingProxy:
    """TCP man-in-the-middle on loopback that keeps every byte the client sends."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        up = socket.create_connection(("127.0.0.1", self.upstream))
        t = threading.Thread(target=self._pump, args=(conn, up, True), daemon=True)
        t.start()
        self._pump(up, conn, False)
        t.join(5)
        conn.close()
        up.close()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.recorded.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def zmtp_chunks(stream: bytes) -> list[bytes]:
    """Split a client's ZMTP 3 byte stream: the 64-byte greeting, then one chunk per frame."""
    chunks, pos = [stream[:64]], 64
    while pos < len(stream):
        flags = stream[pos]
        if flags & 0x02:
            size, head = int.from_bytes(stream[pos + 1 : pos + 9], "big"), 9
        else:
            size, head = stream[pos + 1], 2
        chunks.append(stream[pos : pos + head + size])
        pos += head + size
    return chunks


def replay_raw(port: int, stream: bytes) -> int:
    """Play recorded client bytes on a fresh TCP connection, frame by frame; bytes the server sent back."""
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(0.5)
        for chunk in zmtp_chunks(stream):
            try:
                s.sendall(chunk)
            except OSError:
                break
            try:
                while data := s.recv(65536):
                    got += len(data)
            except TimeoutError:
                continue
            except OSError:
                break
            break  # the server closed the connection
    return got


# ------------------------------------------------------------------ the NO ENCRYPTION warning

def _make_peer(path: Path, run_dir: Path, secret: Path | None = None):
    from p2pfl.host.daemon import Host

    return Host(PeerConfig(topology=path, id=0, no_train=True, dim=256, run_dir=run_dir, secret_key=secret), [0])


def _close_peer(host) -> None:
    assert not host.failed, host.failed
    for h in host.peers.values():
        h.writer.close()
    for w in host.work:
        w.shutdown()


def test_plaintext_topology_warns_loudly_and_keys_silence_it(tmp_path, caplog):
    (tmp_path / "plain").mkdir()
    _, plain = make_topology(tmp_path / "plain", "ring", 3)
    with caplog.at_level(logging.WARNING):
        p = _make_peer(plain, tmp_path / "run-plain")
    _close_peer(p)
    assert p.curve[0] is None
    warning = [r.getMessage() for r in caplog.records if "NO ENCRYPTION" in r.getMessage()]
    assert len(warning) == 1 and "keygen" in warning[0] and str(p.topo.peers[0].port) in warning[0]

    caplog.clear()
    (tmp_path / "keyed").mkdir()
    _, keyed = keyed_topology(tmp_path / "keyed", "ring", 3)
    with caplog.at_level(logging.WARNING):
        p = _make_peer(keyed, tmp_path / "run-keyed")
    _close_peer(p)
    assert p.curve[0] is not None and set(p.curve[0].peers) == {0, 1, 2}
    assert p.curve[0].public == peer_keys(keyed, 0)[0]
    assert not [r for r in caplog.records if "NO ENCRYPTION" in r.getMessage()]
    # Another peer's secret key does not match peer 0's listed public key: refused at start.
    with pytest.raises(T.TopologyError, match="does not match peer 0"):
        _make_peer(keyed, tmp_path / "run-wrong", keyed.parent / "keys" / "peer-1.key_secret")


# ------------------------------------------------------- strangers: unknown key, plaintext, replay

@pytest.mark.slow
def test_unknown_keys_plaintext_clients_and_raw_replays_deliver_nothing(tmp_path, cluster_dir, spawn):
    import zmq

    topo, path = keyed_topology(tmp_path, "ring", 3)
    rounds = 60
    args = ["--rounds", str(rounds), "--round-period", "0.3", "--no-train", "--dim", str(DIM), "--min-wait", "20"]
    procs = {p: spawn(path, p, cluster_dir, *args) for p in topo.ids}
    server = {p: topo.peers[p].extra["public_key"].encode() for p in topo.ids}
    ctx = zmq.Context()
    try:
        wait_round(cluster_dir, 0, 1, procs)
        # 1) A CURVE client whose key is not in the topology, even claiming peer 1's routing id.
        stranger = client(ctx, topo.peers[0].endpoint, zmq.curve_keypair(), server[0], identity=b"1")
        stranger_mon = stranger.get_monitor_socket()
        stranger.connect(topo.peers[0].endpoint)
        for k in range(10):
            stranger.send_multipart([b"\x93junk", b"x" * k])
            stranger.send_multipart(heartbeat(1))
        unknown_events = handshake_events(stranger, stranger_mon)
        stranger.close(0)
        # 2) A plaintext client (no CURVE at all) to the same CURVE server.
        plain = client(ctx, topo.peers[0].endpoint, None, None, identity=b"2")
        plain_mon = plain.get_monitor_socket()
        plain.connect(topo.peers[0].endpoint)
        for k in range(10):
            plain.send_multipart([b"\x93junk", b"x" * k])
            plain.send_multipart(heartbeat(2))
        plain_events = handshake_events(plain, plain_mon)
        plain.close(0)
        # 3) Record a real CURVE session (peer 1's key, wrong routing id: 3 delivered and rejected
        #    by peer 2), then replay its raw bytes on new connections: they deliver nothing.
        proxy = RecordingProxy(topo.peers[2].port)
        insider = client(ctx, "", peer_keys(path, 1), server[2])
        insider.setsockopt(zmq.LINGER, 2000)
        insider.connect(f"tcp://127.0.0.1:{proxy.port}")
        for _ in range(3):
            insider.send_multipart(heartbeat(1))
        wait_until(lambda: "[total 3]" in log_of(cluster_dir, 2), 60, "the recorded session at peer 2")
        insider.close()
        proxy.thread.join(10)
        proxy.close()
        recorded = bytes(proxy.recorded)
        replies = [replay_raw(topo.peers[2].port, recorded) for _ in range(3)]
        last_attack_round = records(cluster_dir, 2)[-1]["round"]
        wait_round(cluster_dir, 2, last_attack_round + 2, procs)  # peer 2 went on with whatever the replays left
        assert records(cluster_dir, 0)[-1]["round"] < rounds - 3, "the run ended before the attacks did; raise --rounds"
        codes = wait_all(procs, timeout=300)
    finally:
        ctx.destroy(linger=0)  # closes every socket (monitors included) first: term() would wait for them
    assert codes == {0: 0, 1: 0, 2: 0}
    print(f"unknown key: {unknown_events}; plaintext: {plain_events}; recorded {len(recorded)} bytes, "
          f"replays got {replies} bytes back")
    assert "HANDSHAKE_FAILED_AUTH" in unknown_events and "HANDSHAKE_SUCCEEDED" not in unknown_events
    assert any(e.startswith("HANDSHAKE_FAILED") for e in plain_events) and "HANDSHAKE_SUCCEEDED" not in plain_events
    assert len(zmtp_chunks(recorded)) >= 6  # greeting, HELLO, INITIATE and the three messages
    assert all(r >= 64 for r in replies)  # the server did answer the replayed greeting and HELLO
    final = {p: records(cluster_dir, p)[-1] for p in topo.ids}
    assert [r["round"] for r in records(cluster_dir, 0)] == list(range(rounds))
    assert final[0]["rejected_messages"] == 0  # nothing of the 40 stranger messages got in
    assert final[1]["rejected_messages"] == 0
    assert final[2]["rejected_messages"] == 3  # the recorded session, and not one more from 3 replays
    assert all(final[p]["live_neighbors"] == 2 for p in topo.ids)  # "routing id 1" did not evict peer 1
    log0 = log_of(cluster_dir, 0)
    assert "refused a CURVE handshake from an unknown key" in log0
    assert "rejected message" not in log0
    # The recorded messages claim peer 1 from another routing id with a made-up incarnation:
    # rejected as "identity" (routing id) or, were routing ids not checked, "stale incarnation".
    assert log_of(cluster_dir, 2).count("rejected message (") == 3
    assert not any("NO ENCRYPTION" in log_of(cluster_dir, p) for p in topo.ids)


# ------------------------------------------------------ a compromised insider: forgery and replays

@pytest.mark.slow
def test_insider_key_cannot_forge_ids_and_replays_are_rejected_or_counted(tmp_path, cluster_dir, spawn):
    """The test holds peer 1's secret key (a compromised insider).

    Forgery: while the real peer 1 runs, messages signed with key 1 but claiming sender 2 are
    rejected ("identity": CURVE key of peer 1 ... claiming to be peer 2) and counted.
    Another network: the same key and id with another network id is refused as "network".
    Replay: after peer 1 has left (so its routing id is free), messages of an incarnation older
    than the one peer 0 saw from the real peer 1 (a recorded or zombie peer 1) are rejected as
    "stale incarnation"; a newer incarnation's delta sent twice is applied once and the copy
    counted in `duplicates`.
    """
    import zmq

    topo, path = keyed_topology(tmp_path, "ring", 3)
    rounds = 70
    common = ["--round-period", "0.3", "--no-train", "--dim", str(DIM), "--min-wait", "20"]
    old_inc = time.time_ns() // 1000  # before peer 1 starts: older than its incarnation
    procs = {p: spawn(path, p, cluster_dir, "--rounds", str(8 if p == 1 else rounds), *common) for p in topo.ids}
    server0 = topo.peers[0].extra["public_key"].encode()
    key1 = peer_keys(path, 1)
    state2 = synthetic_state(0, 2, DIM)
    n_forged, n_stale, n_foreign = 10, 6, 1
    ctx = zmq.Context()
    try:
        wait_round(cluster_dir, 0, 1, procs)
        forger = client(ctx, "", key1, server0)  # a routing id of zmq's choosing: with CURVE the key is the identity
        forger.connect(topo.peers[0].endpoint)
        for k in range(n_forged // 2):
            forger.send_multipart(heartbeat(2, inc=time.time_ns() // 1000))
            forger.send_multipart(delta(2, seq=k, rnd=k, inc=time.time_ns() // 1000, state=state2))
        assert procs[1].wait(timeout=120) == 0
        wait_until(lambda: "neighbour 1 said goodbye" in log_of(cluster_dir, 0), 60, "peer 1's goodbye at peer 0")
        forger.close(0)

        replayer = client(ctx, "", key1, server0, identity=b"1")
        replayer.connect(topo.peers[0].endpoint)
        net = topo.network_id()
        for k in range(n_stale // 3):
            replayer.send_multipart(heartbeat(1, inc=old_inc, net=net))
            replayer.send_multipart(delta(1, seq=k, rnd=k, inc=old_inc, state=synthetic_state(0, 1, DIM), net=net))
            replayer.send_multipart(encode(Message(Kind.HELLO, sender=1, inc=old_inc - k, net=net)))
        new_inc = time.time_ns() // 1000
        # The same key and id as a peer of another network (a stale run on this port): refused first.
        replayer.send_multipart(delta(1, seq=0, rnd=0, inc=new_inc, state=synthetic_state(0, 1, DIM), net=net ^ 1))
        dup = delta(1, seq=0, rnd=0, inc=new_inc, net=net)  # an empty delta: counts, moves no model
        replayer.send_multipart(dup)
        replayer.send_multipart(dup)
        replayer.send_multipart(encode(Message(Kind.BYE, sender=1, inc=new_inc, net=net)))
        wait_until(lambda: f"[total {n_forged + n_stale + n_foreign}]" in log_of(cluster_dir, 0), 60,
                   "the replayed messages at peer 0")
        replayer.close(0)
        at = records(cluster_dir, 0)[-1]["round"]
        wait_round(cluster_dir, 0, at + 2, {p: procs[p] for p in (0, 2)})  # peer 0 went on after the replays
        assert records(cluster_dir, 0)[-1]["round"] < rounds - 3, "the run ended before the attacks did"
        codes = wait_all(procs, timeout=300)
    finally:
        ctx.destroy(linger=0)
    assert codes == {0: 0, 1: 0, 2: 0}
    final0 = records(cluster_dir, 0)[-1]
    assert final0["round"] == rounds - 1
    assert final0["rejected_messages"] == n_forged + n_stale + n_foreign
    assert final0["rejected_by_reason"]["network"] == n_foreign
    assert final0["duplicates"] == 1
    assert records(cluster_dir, 2)[-1]["rejected_messages"] == 0
    assert records(cluster_dir, 2)[-1]["duplicates"] == 0
    log0 = log_of(cluster_dir, 0)
    assert log0.count("rejected message (identity): CURVE key of peer 1 sent a message claiming to be peer 2") == n_forged
    assert len(re.findall(r"rejected message \(protocol\): peer 1: stale incarnation \d+ < \d+", log0)) == n_stale
    assert torch.isfinite(flatten(load_state(cluster_dir / "peer-0" / "adapter.safetensors"))).all()


@pytest.mark.slow
def test_insider_cannot_evict_a_neighbour_by_claiming_its_routing_id(tmp_path, cluster_dir, spawn):
    import zmq

    topo, path = keyed_topology(tmp_path, "ring", 3)
    rounds = 40
    args = ["--rounds", str(rounds), "--round-period", "0.3", "--no-train", "--dim", str(DIM),
            "--min-wait", "1", "--round-timeout", "3", "--peer-timeout", "2", "--heartbeat", "0.3"]
    procs = {p: spawn(path, p, cluster_dir, *args) for p in topo.ids}
    ctx = zmq.Context()
    try:
        wait_round(cluster_dir, 0, 2, procs)
        attacker = client(ctx, "", peer_keys(path, 1), topo.peers[0].extra["public_key"].encode(), identity=b"2")
        attacker.connect(topo.peers[0].endpoint)
        for _ in range(3):
            attacker.send_multipart(heartbeat(2))
        at = records(cluster_dir, 0)[-1]["round"]
        # the heartbeats arrived (and were refused)
        wait_until(lambda: records(cluster_dir, 0)[-1]["rejected_messages"] >= 3, 60, "the attacker's heartbeats at peer 0")
        # Stay connected for longer than --peer-timeout (7 paced rounds of 0.3 s > 2 s): had the
        # attacker taken peer 2's place, peer 0 would have marked peer 2 down by then.
        wait_round(cluster_dir, 0, at + 7, procs)
        attacker.close(0)
        wait_round(cluster_dir, 0, min(rounds - 1, at + 12), procs, timeout=200)
        recent = records(cluster_dir, 0)[-1]
        evicted = "neighbour 2 is down" in log_of(cluster_dir, 0)
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)
        ctx.destroy(linger=0)
    wait_all(procs, timeout=120)
    assert not evicted, "peer 0 lost peer 2 after a client with peer 1's key claimed routing id 2"
    assert recent["live_neighbors"] == 2
    assert recent["rejected_messages"] == 3


# ------------------------------------------------------------------------- Byzantine peers

BYZ_KIND, BYZ_N, BYZ_BAD, BYZ_ROUNDS, BYZ_SCALE, BYZ_SEED = "exponential", 8, 3, 20, 3.0, 5
# Honest peers' deviation from their own initial mean, in units of their initial consensus distance.
# Plain gossip without an attacker leaves 0.143 (the mean moves by the 8th peer's share).
ROBUST_MAX = 0.5  # trimmed:1 measured 0.238 (sans-IO and live alike), clip 0.222 (sans-IO)
DAMAGED_MIN = 10.0  # plain gossip under scale:3 measured 63.7 after 20 rounds


def honest_deviation(x0: dict[int, State], xt: dict[int, State], honest: list[int]) -> tuple[float, float]:
    """(RMS distance of honest final models from the honest initial mean, honest final spread),
    both relative to the honest peers' initial consensus distance."""
    d0 = exact_distance([x0[p] for p in honest])
    m0 = network_mean([x0[p] for p in honest])
    dev = math.sqrt(sum(float(((flatten(xt[p]).double() - m0) ** 2).sum()) for p in honest) / len(honest))
    return dev / d0, exact_distance([xt[p] for p in honest]) / d0


def simulate_byzantine(robust: str, attack: bool = True) -> tuple[float, float]:
    topo = T.generate(BYZ_KIND, BYZ_N)
    x0 = {p: synthetic_state(BYZ_SEED, p, DIM) for p in topo.ids}
    net = EngineNetwork(topo, x0, seed=BYZ_SEED)
    for e in net.engines.values():
        e.robust, e.guard = RobustSpec.parse(robust), NormGuard(0)  # as --robust R --norm-factor 0
    bad = net.engines[BYZ_BAD]
    for _ in range(BYZ_ROUNDS):
        if attack:  # what --byzantine scale:F does before every delta
            bad.x = {k: v * BYZ_SCALE for k, v in bad.x.items()}
        net.step()
    honest = [p for p in topo.ids if p != BYZ_BAD]
    return honest_deviation(x0, net.states(), honest)


def test_byzantine_sans_io_robust_mixing_bounds_the_damage():
    clean_dev, clean_spread = simulate_byzantine("off", attack=False)
    plain_dev, _ = simulate_byzantine("off")
    robust_dev, robust_spread = simulate_byzantine("trimmed:1")
    clip_dev, _ = simulate_byzantine("clip")
    print(f"sans-IO {BYZ_KIND}-{BYZ_N}, peer {BYZ_BAD} scale:{BYZ_SCALE:g}, {BYZ_ROUNDS} rounds: no attack {clean_dev:.3f}, "
          f"plain {plain_dev:.4g}, trimmed:1 {robust_dev:.3f} (spread {robust_spread:.2e}), clip {clip_dev:.3f}")
    assert clean_dev < 0.2 and clean_spread < 1e-4
    assert plain_dev > DAMAGED_MIN
    assert robust_dev < ROBUST_MAX and robust_spread < 1e-3
    assert clip_dev < ROBUST_MAX


@pytest.mark.slow
def test_byzantine_scaler_is_contained_by_trimmed_mean_and_not_without(tmp_path, spawn):
    """Mechanism exercised: robust aggregation only (`--norm-factor 0` turns the norm guard off).

    Exponential graph of 8 (degree 5), peer 3 runs `--byzantine scale:3` (multiplies its model
    by 3 before every delta). Rounds are lock-step (`--min-wait 60`), so the live runs follow
    the sans-IO simulation; both are checked.
    """
    _, path = make_topology(tmp_path, BYZ_KIND, BYZ_N)
    topo = load_topology(path)
    honest = [p for p in topo.ids if p != BYZ_BAD]
    x0 = {p: synthetic_state(BYZ_SEED, p, DIM) for p in topo.ids}
    measured: dict[str, tuple[float, float]] = {}
    for robust in ("trimmed:1", "off"):
        run = tmp_path / f"run-{robust.replace(':', '-')}"
        run.mkdir()
        args = ["--rounds", str(BYZ_ROUNDS), "--no-train", "--dim", str(DIM), "--seed", str(BYZ_SEED), "--sketch-dim", "0",
                "--robust", robust, "--norm-factor", "0", "--min-wait", "60", "--peer-timeout", "60"]
        # The Byzantine peer in a process of its own (--byzantine applies to every peer of a process),
        # the honest peers co-hosted in another.
        blocks = [f"0-{BYZ_BAD - 1},{BYZ_BAD + 1}-{BYZ_N - 1}", str(BYZ_BAD)]
        procs = {b: spawn(path, b, run, *args, *(["--byzantine", f"scale:{BYZ_SCALE:g}"] if b == str(BYZ_BAD) else []))
                 for b in blocks}
        codes = wait_all(procs, timeout=400)
        assert codes == {b: 0 for b in blocks}, (robust, codes)
        xt = {p: load_state(run / f"peer-{p}" / "adapter.safetensors") for p in topo.ids}
        assert all(bool(torch.isfinite(flatten(xt[p])).all()) for p in honest)
        measured[robust] = honest_deviation(x0, xt, honest)
        for p in topo.ids:
            recs = records(run, p)
            assert [r["round"] for r in recs] == list(range(BYZ_ROUNDS))
            assert recs[-1]["rejected_messages"] == 0  # the norm guard is off: nothing was refused
        for b in blocks:  # plaintext topology: the loud warning, once per process, in its lowest peer's log
            assert "NO ENCRYPTION" in log_of(run, int(b.split("-")[0])), b
    (robust_dev, robust_spread), (plain_dev, _) = measured["trimmed:1"], measured["off"]
    print(f"live {BYZ_KIND}-{BYZ_N}: trimmed:1 deviation {robust_dev:.4f} (spread {robust_spread:.2e}), "
          f"plain {plain_dev:.4g}; sans-IO {simulate_byzantine('trimmed:1')[0]:.4f} / {simulate_byzantine('off')[0]:.4g}")
    assert robust_dev < ROBUST_MAX and robust_spread < 1e-3  # contained: honest peers agree near their mean
    assert plain_dev > DAMAGED_MIN  # visibly damaged without robust mixing
    assert robust_dev == pytest.approx(simulate_byzantine("trimmed:1")[0], rel=1e-3)
    assert plain_dev == pytest.approx(simulate_byzantine("off")[0], rel=1e-2)


def test_a_message_with_two_bad_blocks_counts_both(tmp_path):
    """An estimator payload this peer cannot use is dropped and counted, and a malformed sketch
    block beside it is refused on its own: both leave the message, neither blames the other."""
    topo, path = make_topology(tmp_path, "ring", 4)
    cfg = PeerConfig(topology=path, id=0, no_train=True, dim=1024, run_dir=tmp_path / "run", sketch_dim=64)
    peer = make_node(cfg, topo, NodeSpec(x0=synthetic_state(0, 0, 1024), inc=1, train=False))
    rows = torch.zeros(2, 64, dtype=torch.float64)  # two rows, one key: malformed
    msg = Message(Kind.DELTA, 1, info={"sketches": [[1, 0]], "estimate": [[0, 0]]},
                  tensors={SKETCH_TENSOR: TensorPayload("none", (2, 64), {"data": rows}),
                           ESTIMATE_TENSOR: TensorPayload("none", (1, 64), {"data": torch.zeros(1, 64, dtype=torch.float64)})})
    dropped, refused = peer.monitor.take(msg, peer.round)
    assert [r for r, _ in dropped] == ["estimate"] and len(refused) == 1 and "malformed block" in refused[0]
    assert msg.tensors == {}


def test_non_finite_sketch_block_is_refused_by_the_peer(tmp_path):
    """Frames are decoded without a wire-level value scan, so the sketch block checks its own."""
    topo, path = make_topology(tmp_path, "ring", 4)
    cfg = PeerConfig(topology=path, id=0, no_train=True, dim=1024, run_dir=tmp_path / "run", sketch_dim=64)
    peer = make_node(cfg, topo, NodeSpec(x0=synthetic_state(0, 0, 1024), inc=1, train=False))
    rows = torch.zeros(1, 64, dtype=torch.float64)
    rows[0, 5] = math.inf
    msg = Message(Kind.DELTA, 1, info={"sketches": [[1, 0]]}, tensors={SKETCH_TENSOR: TensorPayload("none", (1, 64), {"data": rows})})
    _, refused = peer.monitor.take(msg, peer.round)
    assert len(refused) == 1 and "NaN or Inf" in refused[0]
    assert (1, 0) not in peer.monitor.book.entries
    rows[0, 5] = 0.0
    msg.tensors[SKETCH_TENSOR] = TensorPayload("none", (1, 64), {"data": rows})
    assert peer.monitor.take(msg, peer.round) == ([], [])  # the same block, finite, is taken
    assert torch.equal(peer.monitor.book.entries[(1, 0)], rows[0])
