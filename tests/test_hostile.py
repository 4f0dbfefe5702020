"""A neighbour with valid keys and hostile protocol fields, in process (sans-IO).

Messages here are valid on the wire, come from a real neighbour id, and carry arbitrary kinds,
sequence numbers, rounds, incarnations, tensors and sketch keys. They must produce only counted
refusals: no internal error, per-neighbour state within its bounds, at most one full state per
neighbour per round, and an honest neighbour's messages still applied exactly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.config import PeerConfig
from p2pfl.core import topology as T
from p2pfl.core.conduct import Conduct, Limits, check_claim
from p2pfl.core.gossip import FLAT, ChocoEngine, GossipError, Refused
from p2pfl.core.state import synthetic_state
from p2pfl.core.wire import BASE, CHANNELS, Kind, Message, TensorPayload, decode, encode
from p2pfl.node.build import make_node
from p2pfl.node.node import Node, NodeSpec
from p2pfl.node.piggyback import FINGERPRINT_TENSOR, SKETCH_TENSOR
from p2pfl.sim.simulation import Simulation

DIM, ROUNDS, WINDOW = 128, 8, 4
BIG = 2**62
LAYOUT = {k: tuple(v.shape) for k, v in synthetic_state(0, 0, DIM).items()}


def cfg(**kw) -> PeerConfig:
    base = {"topology": Path("mem"), "id": 0, "no_train": True, "dim": DIM, "rounds": ROUNDS, "sketch_dim": 16,
            "window": WINDOW, "min_wait": 0.5, "round_timeout": 3.0, "cooloff": 5.0}
    return PeerConfig(**{**base, **kw})


# ------------------------------------------------------------------ strategies

def _dense(shape: tuple[int, ...], value: float) -> TensorPayload:
    n = 1
    for d in shape:
        n *= d
    return TensorPayload(codec="none", shape=shape, parts={"data": torch.full((n,), value)})


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, TensorPayload]:
    """The engine's layout, the flat form, a wrong layout or none; values include NaN and huge ones."""
    value = draw(st.sampled_from([0.0, 1.0, -3.5, 1e30, float("nan"), float("inf")]))
    form = draw(st.sampled_from(["none", "layout", "flat", "wrong-shape", "wrong-name"]))
    if form == "layout":
        return {k: _dense(s, value) for k, s in LAYOUT.items()}
    if form == "flat":
        return {FLAT: _dense((sum(a * b for a, b in LAYOUT.values()),), value)}
    if form == "wrong-shape":
        return {k: _dense((s[0] + 1, s[1]), value) for k, s in LAYOUT.items()}
    if form == "wrong-name":
        return {"blocks.99.lora_B": _dense((2, 2), value)}
    return {}


@st.composite
def sketch_block(draw: st.DrawFn, tensor: str, key: str, k: int) -> tuple[dict[str, TensorPayload], dict[str, object]]:
    rows = draw(st.integers(0, 4))
    keys = [[draw(st.integers(-2, 6)), draw(st.one_of(st.integers(0, ROUNDS + 8), st.integers(0, BIG)))] for _ in range(rows)]
    width = draw(st.sampled_from([k, k + 1]))
    data = torch.full((rows, width), draw(st.sampled_from([0.5, float("nan")])), dtype=draw(st.sampled_from([torch.float64, torch.float32])))
    return {tensor: TensorPayload(codec="none", shape=tuple(data.shape), parts={"data": data})}, {key: keys}


@st.composite
def hostile(draw: st.DrawFn, sender: int) -> Message:
    kind = draw(st.sampled_from(list(Kind)))
    number = st.one_of(st.integers(0, 12), st.integers(0, BIG))
    msg = Message(kind, sender, round=draw(st.one_of(st.integers(0, ROUNDS + 4), st.integers(0, BIG))), seq=draw(number),
                  inc=draw(st.one_of(st.integers(0, 2000), st.integers(0, BIG))), tensors=draw(tensors()),
                  channel=draw(st.sampled_from([BASE, BASE, BASE, *CHANNELS])),
                  net=draw(st.sampled_from([0, 0, 0, 1, 2**63 - 1])))  # 0: this network's (see HostileSim)
    if draw(st.booleans()):
        extra, info = draw(sketch_block(SKETCH_TENSOR, "sketches", 16))
        msg.tensors.update(extra)
        msg.info.update(info)
    if draw(st.integers(0, 5)) == 0:
        extra, info = draw(sketch_block(FINGERPRINT_TENSOR, "fingerprints", 8))
        msg.tensors.update(extra)
        msg.info.update(info)
    return msg


def wire(msg: Message) -> Message:
    """What a receiver sees: the frames decoded again (values checked later, by the codecs)."""
    return decode([bytes(f) for f in encode(msg)], check_finite=False)


# ------------------------------------------------------------------ the engine

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(hostile(1), max_size=12), min_size=ROUNDS, max_size=ROUNDS))
def test_engine_refuses_hostile_fields_within_bounds_and_keeps_applying_the_honest_neighbour(batches):
    a = ChocoEngine(0, {1: 1 / 3, 2: 1 / 3}, synthetic_state(0, 0, DIM), inc=10, window=WINDOW)
    b = ChocoEngine(2, {0: 1 / 2}, synthetic_state(0, 2, DIM), inc=20, window=WINDOW)
    for e, other in ((a, b), (b, a)):
        other.receive(wire(e.hello()))
    for rnd, batch in enumerate(batches):
        states_to_1 = 0
        for m in batch:
            try:
                replies = a.receive(wire(m))
            except Refused as e:
                replies = e.replies
            except GossipError:
                replies = []
            states_to_1 += sum(1 for dest, r in replies if dest == 1 and r.kind == Kind.STATE)
            assert all(len(rep.pending) <= WINDOW for rep in a.replicas.values())
        delta_a, delta_b = a.make_delta(rnd), b.make_delta(rnd)
        states_to_1 += sum(1 for dest, r in a.take_owed() if dest == 1 and r.kind == Kind.STATE)
        assert states_to_1 <= 2, "at most one full state per round, plus one that the previous round owed"
        assert b.receive(wire(delta_a)) == [] and a.receive(wire(delta_b)) == []
        a.mix([1, 2])
        b.mix([0])
        assert all(bool(torch.isfinite(v).all()) for v in a.x.values())
        mine = a.replicas[2]
        assert mine.synced and mine.round == rnd
        for k in LAYOUT:  # the honest neighbour's replica is bit-identical with its public copy
            assert torch.equal(mine.xhat[k], b.xhat[k])
            assert torch.equal(b.replicas[0].xhat[k], a.xhat[k])


def test_far_future_sequence_numbers_are_refused_with_one_resync_and_hold_nothing():
    a = ChocoEngine(0, {1: 1.0}, synthetic_state(0, 0, DIM), inc=10, window=WINDOW)
    a.receive(wire(Message(Kind.HELLO, 1, inc=5)))
    asked = refused = 0
    for seq in range(WINDOW, WINDOW + 50):
        try:
            replies = a.receive(wire(Message(Kind.DELTA, 1, round=0, seq=seq * 1000, inc=5,
                                             tensors={k: _dense(s, 1.0) for k, s in LAYOUT.items()})))
        except Refused as e:
            assert e.reason == "seq-window"
            replies, refused = e.replies, refused + 1
        asked += sum(1 for _, r in replies if r.kind == Kind.RESYNC)
        assert len(a.replicas[1].pending) <= WINDOW
    assert refused == 1 + (50 - 1 - WINDOW)  # the first (far ahead of a synced replica), then every one past the window
    assert asked == 1


def test_full_state_requests_get_one_answer_per_round_and_one_deferred():
    a = ChocoEngine(0, {1: 1.0}, synthetic_state(0, 0, DIM), inc=10, window=WINDOW)
    a.make_delta(0)
    got, refused = [], 0
    for _ in range(100):
        try:
            got += a.receive(wire(Message(Kind.RESYNC, 1, inc=5)))
        except Refused as e:
            assert e.reason == "state-rate"
            refused += 1
    assert [r.kind for _, r in got] == [Kind.STATE] and refused == 99  # first contact got the state; its resync is owed
    assert a.take_owed() == []  # still round 0
    a.make_delta(1)
    owed = a.take_owed()
    assert [(d, r.kind) for d, r in owed] == [(1, Kind.STATE)] and a.take_owed() == []


# ------------------------------------------------------------------ claims and conduct

def test_round_claims_are_checked_against_the_run_and_the_other_neighbours():
    lim = Limits(claim_ahead=16, last_round=60, strikes=3, cooloff=10.0)
    assert check_claim(1, BIG, -1, {}, lim) is not None  # past the run's last round
    assert check_claim(1, 50, -1, {}, lim) is None  # a lone neighbour ahead of a restarted peer is believed
    assert check_claim(1, 50, 3, {1: 2, 2: 4}, lim) is not None  # far ahead of us and the other neighbour
    assert check_claim(1, 50, 3, {2: 48}, lim) is None  # the other neighbour is there too: we are the straggler
    c = Conduct(lim)
    assert [c.strike(1, 0.0) for _ in range(3)] == [False, False, True] and c.banned(1)
    assert c.expired(9.9) == [] and c.expired(10.0) == [1] and not c.banned(1)
    for _ in range(10):  # strikes halve each round: a neighbour with a refusal a round is never marked
        assert not c.strike(2, 0.0)
        c.new_round()


# ------------------------------------------------------------------ nodes on a virtual clock

class HostileSim(Simulation):
    """Peer `bad` runs its real node, and every message it sends is preceded by a hostile batch."""

    def __init__(self, *a, bad: int, batches: list[list[Message]], **kw) -> None:
        self.bad, self.batches = bad, list(batches)
        self.states_from: dict[int, int] = {}
        self.public: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (peer, seq) -> its xhat once that delta is out
        super().__init__(*a, **kw)

    def _send(self, src, a):
        if a.msg.kind == Kind.DELTA and a.msg.channel == BASE and src != self.bad:
            self.public.setdefault((src, a.msg.seq), {k: v.clone() for k, v in self.nodes[src].mixer.engine.xhat.items()})
        if a.dest == self.bad and a.msg.kind == Kind.STATE:
            self.states_from[src] = self.states_from.get(src, 0) + 1
        if src == self.bad and self.batches:
            for m in self.batches.pop(0):
                m.net = m.net or self.nodes[src].intake.net  # an insider: its messages carry this network's id unless drawn otherwise
                frames = [bytes(f) for f in encode(m)]
                dst = self.nodes[a.dest]
                self._at(self.now, a.dest, lambda dst=dst, frames=frames: [] if dst.finished else dst.receive(frames, src, self.now))
        super()._send(src, a)


def _bounded(nd: Node) -> None:
    assert all(len(rep.pending) <= WINDOW for rep in nd.mixer.engine.replicas.values())
    lim = nd.intake.conduct.limits
    assert all(r <= lim.last_round for r in nd.nbh.rounds.values())
    horizon = lim.last_round + nd.monitor.diameter + 8
    assert len(nd.monitor.book.entries) <= len(nd.monitor.ids) * horizon
    assert all(r <= nd.round + nd.monitor.diameter + 2 + lim.claim_ahead for _, r in nd.monitor.book.entries)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(hostile(3), max_size=8), min_size=1, max_size=40))
def test_nodes_finish_with_counted_refusals_when_a_neighbour_sends_hostile_fields(batches):
    topo = T.generate("ring", 4)
    sim = HostileSim(topo, cfg(), bad=3, batches=batches)
    sim.run()
    assert all(sim.codes[p] == 0 for p in (0, 1, 2))
    for p in (0, 1, 2):
        nd = sim.nodes[p]
        assert nd.intake.internal_errors == 0
        _bounded(nd)
        assert [r["round"] for r in sim.records[p]] == list(range(ROUNDS))
        assert sum(nd.intake.by_reason.values()) == nd.intake.rejected
    rounds = ROUNDS + sim.nodes[0].drain
    for p, n in sim.states_from.items():  # no amplification: a state per round, one deferred, and the start
        assert n <= rounds + 2, (p, n)
    for a, b in ((0, 1), (1, 2)):  # honest edges: a replica is bit-identical with the public copy it has reached
        for x, y in ((a, b), (b, a)):
            rep = sim.nodes[x].mixer.engine.replicas[y]
            assert rep.synced and rep.next_seq >= 1
            assert all(torch.equal(rep.xhat[k], sim.public[(y, rep.next_seq - 1)][k]) for k in LAYOUT)


def test_a_resync_flood_marks_the_neighbour_misbehaving_and_it_is_heard_again_after_the_cooloff():
    topo = T.generate("ring", 4)
    flood = [[Message(Kind.RESYNC, 3, round=0, seq=0, inc=1003) for _ in range(40)]] * 3
    sim = HostileSim(topo, cfg(rounds=30, cooloff=5.0, round_period=0.5), bad=3, batches=flood)
    sim.run()
    n0 = sim.nodes[0]
    assert n0.intake.by_reason.get("state-rate", 0) >= 20 and n0.intake.conduct.bans >= 1
    assert n0.intake.by_reason.get("misbehaving", 0) > 0  # dropped while in its cool-off
    assert sim.states_from[0] <= ROUNDS + 2
    # Left out while in its cool-off; then a fresh state from it, and it is mixed with again.
    live = [r["live_neighbors"] for r in sim.records[0]]
    assert live[0] == 1 and live[-1] == 2 and live == sorted(live)
    assert n0.mixer.engine.replicas[3].synced and n0.mixer.engine.replicas[3].next_seq > 0
    assert sim.records[0][-1]["misbehaving_marks"] == n0.intake.conduct.bans
    assert all(sim.codes[p] == 0 for p in topo.ids)


def test_an_absurd_round_claim_moves_neither_catch_up_nor_the_lag_rule():
    topo = T.generate("ring", 4)
    lies = [[Message(Kind.HEARTBEAT, 3, round=BIG, inc=1003), Message(Kind.HELLO, 3, round=10**6, inc=1003)]] * 5
    sim = HostileSim(topo, cfg(), bad=3, batches=lies)
    sim.run()
    assert sum(sim.nodes[p].intake.by_reason.get("round-claim", 0) for p in (0, 2)) == 10  # every lie, and only the lies
    for p in (0, 2):
        nd = sim.nodes[p]
        assert nd.nbh.rounds[3] <= ROUNDS + nd.drain and nd.start_round == 0
        assert [r["round"] for r in sim.records[p]] == list(range(ROUNDS))


def test_a_forged_sketch_of_this_peer_is_not_stored():
    topo = T.generate("ring", 4)
    fake = torch.full((1, 16), 1e3, dtype=torch.float64)
    forged = Message(Kind.HEARTBEAT, 3, round=0, inc=1003, tensors={SKETCH_TENSOR: TensorPayload("none", (1, 16), {"data": fake})},
                     info={"sketches": [[0, 1]]})
    sim = HostileSim(topo, cfg(), bad=3, batches=[[forged]])
    sim.run()
    own = sim.nodes[0].monitor.book
    assert not any(torch.equal(v, fake[0]) for v in own.entries.values())


def test_an_unexpected_error_while_handling_a_message_is_counted_and_the_peers_finish(monkeypatch, caplog):
    topo = T.generate("ring", 4)
    calls = {"n": 0}
    real = Node._receive

    def flaky(self, msg, now):
        if self.me == 1 and msg.kind == Kind.HEARTBEAT:
            calls["n"] += 1
            if calls["n"] % 2:
                raise KeyError("injected")
        return real(self, msg, now)

    monkeypatch.setattr(Node, "_receive", flaky)
    sim = Simulation(topo, cfg(), internal_errors_ok=True)
    sim.run()
    n1 = sim.nodes[1]
    assert n1.intake.internal_errors == (calls["n"] + 1) // 2 > 0
    assert sim.records[1][-1]["internal_errors"] > 0
    assert all(sim.codes[p] == 0 for p in topo.ids)
    assert sum("internal error" in r.getMessage() for r in caplog.records) == 1  # traceback logged once


def test_insider_settings_reach_the_engines():
    topo = T.generate("ring", 4)
    nd = make_node(replace(cfg(), window=3, clusters="2"), topo, NodeSpec(x0=synthetic_state(0, 0, DIM), inc=1, train=False))
    assert nd.mixer.engine.window == 3 and nd.mixer.levels is not None and nd.mixer.levels.cluster.window == 3
    assert nd.mixer.levels.glob.round_window == 3 * nd.cfg.global_every  # the global level sends every K rounds


def test_byzantine_abuse_floods_are_refused_and_cost_the_honest_peers_no_state_beyond_the_window():
    topo = T.generate("ring", 4)
    rounds = 20
    sim = HostileSim(topo, cfg(rounds=rounds, round_period=0.25, cooloff=2.0), bad=3, batches=[],
                     per_peer={3: {"byzantine": "abuse:400"}})
    sim.run()
    assert all(sim.codes[p] == 0 for p in topo.ids)
    for p in (0, 2):
        nd = sim.nodes[p]
        assert nd.intake.internal_errors == 0
        _bounded(nd)
        assert [r["round"] for r in sim.records[p]] == list(range(rounds))
        got = nd.intake.by_reason
        assert got.get("round-claim", 0) > 0 and got.get("misbehaving", 0) > 0 and nd.intake.conduct.bans >= 2  # marked, readmitted, marked
        assert sim.states_from.get(p, 0) <= rounds + nd.drain + 2
    assert sim.nodes[1].intake.rejected == 0  # not a neighbour of the abuser, and nothing of its flood reached it
