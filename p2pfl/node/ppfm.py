"""PPFM as a neighbourhood and a mixer (`p2pfl.ppfm.levels` holds the levels themselves).

With clustering on, the base graph's engine only paces rounds and floods sketches and
fingerprints (empty deltas); the model travels on the cluster and global channels, among overlay
peers that need not be graph neighbours:
- `Overlay`: the static graph plus those overlay peers, which are up until silent for
  `--peer-timeout` or gone (`liveness.OverlayLiveness`), beat on their level's channel, and are let
  go when a re-clustering no longer needs them;
- `LevelsMixer`: before each round, cluster the fingerprints of round r - lag once all are in;
  send the cluster delta (and on global rounds the representative's global delta) to the live
  overlay peers; mix both levels.
"""

from __future__ import annotations

import logging
from typing import Any

from p2pfl.config import PeerConfig
from p2pfl.core.gossip import Action, ChocoEngine
from p2pfl.core.state import State
from p2pfl.core.topology import Topology
from p2pfl.core.wire import BASE, CLUSTER, GLOBAL, Kind, Message
from p2pfl.node import actions as A
from p2pfl.node import snapshot
from p2pfl.node.liveness import OverlayLiveness
from p2pfl.node.mixer import Mixer
from p2pfl.node.neighbourhood import Neighbourhood, StaticGraph
from p2pfl.node.records import Monitor
from p2pfl.ppfm.levels import Levels


class Overlay(StaticGraph):
    def __init__(self, me: int, topo: Topology, cfg: PeerConfig, levels: Levels, log: logging.Logger) -> None:
        super().__init__(me, topo, cfg, log)
        self.levels = levels
        self.overlay = OverlayLiveness(me, cfg.peer_timeout, log)

    def extra(self) -> list[int]:
        """Overlay peers that are not graph neighbours (no base heartbeats from them)."""
        return sorted(self.levels.overlay_peers() - self._known)

    def overlay_live(self, rnd: int) -> set[int]:
        """Overlay peers to wait for and mix with: live graph neighbours, and the others unless down."""
        return self.participants(rnd) | {j for j in self.extra() if j not in self.overlay.down}

    def refuse(self, msg: Message) -> tuple[str, str] | None:
        return None if msg.channel != BASE else super().refuse(msg)

    def accepted(self, msg: Message, now: float) -> list[A.Action]:
        if msg.channel == BASE:
            return super().accepted(msg, now)
        self.overlay.heard(msg.sender, now, alive=msg.kind != Kind.BYE)
        return []

    def contacted(self, peer: int, now: float) -> None:
        if peer not in self._known:
            self.overlay.contact(peer, now)

    def _control(self, peer: int, kind: str) -> Message:
        return self.levels.control(CLUSTER if peer in self.levels.cluster_neighbors else GLOBAL, kind)

    def beat(self, now: float, heartbeat: Message) -> list[A.Action]:
        out = super().beat(now, heartbeat)
        for j in self.extra():
            out.append(A.Send(j, self._control(j, "heartbeat"), offer=j in self.overlay.down))
            if self.overlay.expired(j, now):
                out.append(A.Flush(j))
        return out

    def farewells(self) -> list[A.Action]:
        return [A.Send(j, self._control(j, "bye")) for j in self.extra()]

    def regroup(self, before: list[int], now: float) -> list[int]:
        """The clusters changed: overlay peers no longer needed (their links close), and the new
        ones' silence counted from now."""
        after = self.extra()
        gone = [j for j in before if j not in after]
        for j in gone:
            self.overlay.forget(j)
        for j in after:
            self.overlay.contact(j, now)
        return gone


class LevelsMixer(Mixer):
    def __init__(self, engine: ChocoEngine, levels: Levels, monitor: Monitor, train: bool, log: logging.Logger) -> None:
        super().__init__(engine)
        self.levels, self.monitor, self.train, self.log = levels, monitor, train, log
        self.me = engine.me

    def model(self) -> State:
        """This peer's copy of its cluster model: the personalised model."""
        return self.levels.model()

    def teachers(self, live: set[int]) -> list[State]:
        return []  # the base replicas hold no model here

    def prepared(self, rnd: int) -> bool:
        """Flooding needs at most `diameter` rounds and the lag is one more, so a clustering's
        fingerprints are normally all in."""
        src = self.levels.fingerprint_round(rnd)
        return src is None or self.monitor.fbook.complete(src)

    def prepare(self, rnd: int, now: float, nbh: Neighbourhood) -> list[int]:
        """Cluster the fingerprints of round rnd - lag if a clustering is due. A set that is still
        incomplete (lost messages) is skipped with a warning rather than clustered on a partial set
        that other peers would not share."""
        src = self.levels.fingerprint_round(rnd)
        if src is None:
            return []
        assert isinstance(nbh, Overlay)
        fbook = self.monitor.fbook
        if not fbook.complete(src):
            have = sorted(p for p in self.levels.topo.ids if (p, src) in fbook.entries)
            self.log.warning("peer %d: round %d: fingerprints of round %d only from %s; clustering skipped", self.me, rnd, src, have)
            return []
        before = nbh.extra()
        try:
            changed = self.levels.recluster(rnd, {p: fbook.entries[(p, src)] for p in self.levels.topo.ids})
        except ValueError as e:
            self.log.error("peer %d: round %d: clustering failed: %s", self.me, rnd, e)
            return []
        if not changed:
            return []
        lv = self.levels
        self.log.info("peer %d: round %d: clusters %s; mine %d (size %d, representative %d), overlay neighbours %s",
                      self.me, rnd, lv.labels, lv.labels[self.me], len(lv.members), lv.rep, sorted(lv.overlay_peers()))
        return nbh.regroup(before, now)

    def outgoing(self, rnd: int, training: bool, nbh: Neighbourhood) -> list[Action]:
        """The task step is done: the cluster delta to the cluster overlay, the fingerprint into the
        flood, on global rounds the representative's global delta to the other representatives;
        and the base channel's empty delta, which paces rounds and carries the flooded blocks."""
        assert isinstance(nbh, Overlay)
        out: list[Action] = []
        if training:
            lv = self.levels
            cmsg, fingerprint = lv.task_done(rnd, self._phi if self.train else lv.model())
            self.monitor.fbook.add(self.me, rnd, fingerprint)
            live = nbh.overlay_live(rnd)
            out += [(j, cmsg) for j in lv.cluster_neighbors if j in live]
            gmsg = lv.global_delta(rnd)
            out += [(j, gmsg) for j in lv.global_neighbors if j in live] if gmsg is not None else []
        delta = self.engine.make_delta(rnd, empty=True)
        return out + [(j, delta) for j in sorted(nbh.live)]

    def receive(self, msg: Message) -> list[Action]:
        return self.engine.receive(msg) if msg.channel == BASE else self.levels.receive(msg)

    def waiting_for(self, rnd: int, training: bool, nbh: Neighbourhood, banned: set[int]) -> list[int]:
        assert isinstance(nbh, Overlay)
        late = self.engine.waiting_for(rnd, nbh.participants(rnd))
        if training:
            late += self.levels.waiting_for(rnd, nbh.overlay_live(rnd))
        return sorted(set(late))

    def mix(self, rnd: int, nbh: Neighbourhood, banned: set[int]) -> dict[str, Any]:
        assert isinstance(nbh, Overlay)
        lv = self.levels
        lv.mix(rnd, nbh.overlay_live(rnd))
        self.monitor.labels_at[rnd + 1] = dict(lv.labels)
        return {"cluster": lv.labels[self.me], "cluster_size": len(lv.members), "representative": lv.rep,
                "overlay_neighbors": sorted(lv.overlay_peers()), "clusters": len(set(lv.labels.values())),
                "cluster_labels": [lv.labels[p] for p in lv.topo.ids], "cluster_evaluated_round": lv.state.evaluated_round,
                **{f"cluster_{k}": v for k, v in lv.state.scores.items()}}

    def owed(self) -> list[Action]:
        out = super().owed()
        for eng, channel in ((self.levels.cluster, CLUSTER), (self.levels.glob, GLOBAL)):
            for dest, msg in eng.take_owed() + eng.overdue():
                msg.channel = channel
                out.append((dest, msg))
        return out

    def global_model(self, rnd: int) -> State | None:
        """A representative's global meta model, on global rounds."""
        return self.levels.glob.x if self.levels.global_step(rnd) else None

    def stats(self, rnd: int, nbh: Neighbourhood) -> dict[str, Any]:
        assert isinstance(nbh, Overlay)
        lv = self.levels
        return self._stats(lv.cluster, nbh.overlay_live(rnd), len(nbh.live),
                           self.engine.duplicates + lv.cluster.duplicates + lv.glob.duplicates)

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors, meta = super().snapshot()
        ltensors, meta["ppfm"] = snapshot.levels_state(self.levels)
        tensors.update(ltensors)
        return tensors, meta

    def restore(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        super().restore(tensors, meta)
        if "ppfm" in meta:
            snapshot.restore_levels(self.levels, tensors, meta["ppfm"])
