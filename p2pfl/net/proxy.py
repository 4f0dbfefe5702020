"""A fault-injecting TCP proxy between the peers of a test network (this kernel has no netem).

Every directed link i -> j (i's DEALER dials j's ROUTER) gets a port of its own on the proxy;
`route` writes it into j's topology entry as `via: {i: "host:port"}`, which i's transport dials
instead of j's address (`p2pfl.net.transport.dial_endpoint`). ZeroMQ's handshake travels on the
same connection, in both directions, so a link's faults apply to both of its byte streams:

- latency: each chunk leaves `delay` (+ uniform jitter in [0, `jitter`]) seconds after it came,
  never before an earlier chunk (a TCP stream keeps its order);
- a bandwidth cap: a chunk of n bytes holds the stream for n / `rate` seconds;
- a partition (`down`): nothing passes; open connections hold their bytes until the heal (as TCP
  retransmits across a short outage), or are reset (`cut(reset=True)`), and new ones are
  refused while it lasts;
- resets: `reset` aborts a link's open connections with an RST; what was in flight is lost.

Faults change over time by calling `set`, `cut`, `heal` and `reset` from the event loop the proxy
runs on (a test's scenario, or `Profile` events in `p2pfl.ops.wan`). Pure asyncio; bytes in
flight are bounded per stream (`BUFFER`): a slow link pushes back on its sender as TCP does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from p2pfl.core.topology import PeerSpec, Topology
from p2pfl.errors import P2pflError

CHUNK = 16 * 1024  # bytes read at a time: the grain of the bandwidth cap
BUFFER = 64  # chunks in flight per stream (1 MiB) before the proxy stops reading from the sender


class ProxyError(P2pflError, ValueError):
    """A link or fault setting that cannot be used."""


@dataclass
class Faults:
    """What one link does now (both of its directions)."""

    delay: float = 0.0  # seconds, one way
    jitter: float = 0.0  # seconds added, uniform in [0, jitter]
    rate: float = 0.0  # bytes per second each way; 0: no cap
    down: bool = False  # partitioned

    def check(self) -> Faults:
        for name in ("delay", "jitter", "rate"):
            v = getattr(self, name)
            if not v >= 0.0:
                raise ProxyError(f"{name}: must be a number >= 0, got {v!r}")
        return self


@dataclass
class Link:
    src: int
    dst: int
    listen: int  # the proxy's port for this link
    target: tuple[str, int]  # dst's real address
    faults: Faults = field(default_factory=Faults)
    server: asyncio.Server | None = None
    conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    healed: asyncio.Event = field(default_factory=asyncio.Event)
    resets: int = 0
    refused: int = 0
    bytes: int = 0


def _abort(w: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: the peer sees a reset connection."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


class Proxy:
    def __init__(self, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.host = host
        self.links: dict[tuple[int, int], Link] = {}
        self.rng = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, src: int, dst: int, listen: int, target: tuple[str, int], faults: Faults | None = None) -> Link:
        if (src, dst) in self.links:
            raise ProxyError(f"link {src}->{dst}: already proxied")
        link = Link(src, dst, listen, target, (faults or Faults()).check())
        link.healed.set()
        self.links[src, dst] = link
        return link

    async def start(self) -> None:
        for link in self.links.values():
            link.server = await asyncio.start_server(lambda r, w, link=link: self._accept(link, r, w), self.host, link.listen)

    async def close(self) -> None:
        for link in self.links.values():
            if link.server is not None:
                link.server.close()
            for a, b in list(link.conns):
                _abort(a)
                _abort(b)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # ------------------------------------------------------------------ faults over time

    def pairs(self, a: int, b: int, both: bool = True) -> list[Link]:
        """The directed links between peers a and b that are proxied (a -> b only, unless `both`)."""
        return [self.links[k] for k in (((a, b), (b, a)) if both else ((a, b),)) if k in self.links]

    def set(self, a: int, b: int, both: bool = True, **faults: float | bool) -> None:
        """Change the faults of the link between a and b (both ways, or what a sends to b)."""
        for link in self.pairs(a, b, both):
            down = link.faults.down
            link.faults = replace(link.faults, **faults).check()
            if down and not link.faults.down:
                link.healed.set()
            elif link.faults.down:
                link.healed.clear()

    def cut(self, groups: Iterable[Iterable[int]], reset: bool = False) -> list[tuple[int, int]]:
        """Partition: every proxied link between two different groups goes down; with `reset`
        its open connections are reset too. Returns the links cut."""
        side = {p: k for k, g in enumerate(groups) for p in g}
        cut = [key for key in self.links if side.get(key[0]) != side.get(key[1])]
        for src, dst in cut:
            self.set(src, dst, down=True)
            if reset:
                self.reset(src, dst)
        return cut

    def heal(self) -> None:
        for src, dst in list(self.links):
            self.set(src, dst, down=False)

    def reset(self, a: int, b: int) -> int:
        """Reset the open connections between a and b; how many."""
        n = 0
        for link in self.pairs(a, b):
            for pair in list(link.conns):
                _abort(pair[0])
                _abort(pair[1])
                link.conns.discard(pair)
                link.resets += 1
                n += 1
        return n

    # ------------------------------------------------------------------ the streams

    def _spawn(self, coro) -> asyncio.Task[None]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _accept(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if link.faults.down:  # a partition: no new connection either
            link.refused += 1
            _abort(writer)
            return
        try:
            ur, uw = await asyncio.open_connection(*link.target)
        except OSError:
            _abort(writer)  # the peer behind is not listening (yet): the dialer retries
            return
        pair = (writer, uw)
        link.conns.add(pair)
        tasks = [self._spawn(self._pump(link, reader, uw)), self._spawn(self._pump(link, ur, writer))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        if pair in link.conns:  # one side closed: close the other (a reset has aborted both already)
            link.conns.discard(pair)
            for w in pair:
                w.close()

    async def _pump(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read chunks, stamp when each may leave, write them in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(BUFFER)
        loop = asyncio.get_running_loop()
        out = self._spawn(self._deliver(link, queue, writer))
        try:
            while data := await reader.read(CHUNK):
                f = link.faults
                await queue.put((loop.time() + f.delay + self.rng.uniform(0.0, f.jitter), data))
            await queue.put((0.0, b""))  # end of stream, after what is queued
            await out
        except (ConnectionError, OSError):
            pass
        finally:
            out.cancel()

    async def _deliver(self, link: Link, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        free_at = 0.0  # when the capped stream has sent what came before
        while True:
            due, data = await queue.get()
            if not data:
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write_eof()
                return
            await link.healed.wait()
            f = link.faults
            start = max(due, free_at, loop.time())
            free_at = start + (len(data) / f.rate if f.rate > 0 else 0.0)
            if free_at > loop.time():
                await asyncio.sleep(free_at - loop.time())
            await link.healed.wait()  # cut while it waited: it leaves after the heal
            writer.write(data)
            link.bytes += len(data)
            await writer.drain()


PROFILE_KEYS = ("delay_ms", "jitter_ms", "rate_mbit", "reset_every_s", "links", "events")
LINK_KEYS = ("delay_ms", "jitter_ms", "rate_mbit")


@dataclass
class Profile:
    """A wide-area profile: each link's one-way delay drawn from `delay` (seconds, uniform per
    link), jitter, a rate cap, resets at random times (each link, `reset_every` seconds apart on
    average), per-link overrides, and partitions over time: (at seconds, groups) cuts, (at, None)
    heals."""

    delay: tuple[float, float] = (0.0, 0.0)
    jitter: float = 0.0
    rate: float = 0.0  # bytes per second
    reset_every: float = 0.0
    links: dict[tuple[int, int], Faults] = field(default_factory=dict)
    events: list[tuple[float, list[list[int]] | None]] = field(default_factory=list)

    @staticmethod
    def from_dict(doc: object, source: str = "<profile>") -> Profile:
        """The YAML form, e.g. `{delay_ms: [25, 75], jitter_ms: 5, rate_mbit: 20, reset_every_s: 60,
        links: {"3-4": {rate_mbit: 1}}, events: [{at: 10, cut: [[0, 1, 2, 3], [4, 5, 6, 7]]}, {at: 25, heal: true}]}`."""
        if not isinstance(doc, dict):
            raise ProxyError(f"{source}: a WAN profile is a mapping, got {type(doc).__name__}")
        for key in doc:
            if key not in PROFILE_KEYS:
                raise ProxyError(f"{source}: unknown key {key!r} (known: {', '.join(PROFILE_KEYS)})")
        d = doc.get("delay_ms", 0)
        lo, hi = (d, d) if isinstance(d, int | float) else tuple(d) if isinstance(d, list) and len(d) == 2 else (None, None)
        if not all(isinstance(v, int | float) and v >= 0 for v in (lo, hi)) or lo > hi:
            raise ProxyError(f"{source}: delay_ms must be a number or [low, high] milliseconds, got {d!r}")
        prof = Profile(delay=(lo / 1e3, hi / 1e3), **_link_values(doc, f"{source}", ("jitter_ms", "rate_mbit")),
                       reset_every=_number(doc, "reset_every_s", source))
        links = doc.get("links", {}) or {}
        if not isinstance(links, dict):
            raise ProxyError(f"{source}: links must map 'a-b' to settings")
        for name, entry in links.items():
            a, sep, b = str(name).partition("-")
            if not (sep and a.isdigit() and b.isdigit()) or not isinstance(entry, dict):
                raise ProxyError(f"{source}: links.{name}: expected 'a-b': {{delay_ms, jitter_ms, rate_mbit}}")
            for key in entry:
                if key not in LINK_KEYS:
                    raise ProxyError(f"{source}: links.{name}: unknown key {key!r} (known: {', '.join(LINK_KEYS)})")
            f = _link_values(entry, f"{source}: links.{name}", LINK_KEYS)
            prof.links[int(a), int(b)] = Faults(**f)
        events = doc.get("events", []) or []
        if not isinstance(events, list):
            raise ProxyError(f"{source}: events must be a list")
        for k, ev in enumerate(events):
            where = f"{source}: events[{k}]"
            if not isinstance(ev, dict) or not isinstance(ev.get("at"), int | float) or set(ev) - {"at", "cut", "heal"} \
                    or ("cut" in ev) == bool(ev.get("heal")):
                raise ProxyError(f"{where}: expected {{at: SECONDS, cut: [[ids], [ids], ...]}} or {{at: SECONDS, heal: true}}")
            cut = ev.get("cut")
            if cut is not None and not (isinstance(cut, list) and all(isinstance(g, list) and all(isinstance(p, int) for p in g) for g in cut)):
                raise ProxyError(f"{where}: cut must be a list of lists of peer ids")
            prof.events.append((float(ev["at"]), cut))
        prof.events.sort(key=lambda e: e[0])
        return prof


def _number(doc: dict, key: str, where: str) -> float:
    v = doc.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ProxyError(f"{where}: {key} must be a number >= 0, got {v!r}")
    return float(v)


def _link_values(doc: dict, where: str, keys: Iterable[str]) -> dict[str, float]:
    scale = {"delay_ms": ("delay", 1e-3), "jitter_ms": ("jitter", 1e-3), "rate_mbit": ("rate", 1e6 / 8)}
    return {scale[k][0]: _number(doc, k, where) * scale[k][1] for k in keys if k in doc}


async def play(proxy: Proxy, profile: Profile, seed: int = 0) -> None:
    """Apply `profile` to `proxy` and run its resets and events until cancelled (time 0 is now)."""
    rng = random.Random(seed)
    for a, b in sorted({tuple(sorted(k)) for k in proxy.links}):
        f = Faults(delay=rng.uniform(*profile.delay), jitter=profile.jitter, rate=profile.rate)
        over = profile.links.get((a, b)) or profile.links.get((b, a))
        proxy.set(a, b, **{**f.__dict__, **({k: v for k, v in over.__dict__.items() if k != "down"} if over else {})})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    pairs = sorted({tuple(sorted(k)) for k in proxy.links})
    timeline: list[tuple[float, list[list[int]] | None, tuple[int, int] | None]] = [(t, cut, None) for t, cut in profile.events]
    if profile.reset_every > 0:
        timeline += [(rng.expovariate(1 / profile.reset_every), None, p) for p in pairs]
    while timeline:
        timeline.sort(key=lambda e: e[0])
        at, cut, pair = timeline.pop(0)
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        if pair is not None:
            proxy.reset(*pair)
            timeline.append((at + rng.expovariate(1 / profile.reset_every), None, pair))
        elif cut is not None:
            proxy.cut(cut)
        else:
            proxy.heal()


def route(topo: Topology, base_port: int, links: Iterable[tuple[int, int]] | None = None) -> tuple[Topology, Proxy]:
    """A copy of `topo` whose directed links (default: every edge, both ways) go through a new
    `Proxy` on ports `base_port`, `base_port + 1`, ... in the order of `links`. The network id
    is unchanged: `via` is an extra key."""
    pairs = list(links) if links is not None else sorted({(a, b) for e in topo.graph.edges for a, b in (e, e[::-1])})
    proxy = Proxy(host=topo.peers[topo.ids[0]].host)
    via: dict[int, dict[int, str]] = {}
    for k, (a, b) in enumerate(pairs):
        spec = topo.peers[b]
        proxy.add(a, b, base_port + k, (spec.host, spec.port))
        via.setdefault(b, {})[a] = f"{proxy.host}:{base_port + k}"
    peers = {p: PeerSpec(p, s.host, s.port, {**s.extra, "via": via[p]} if p in via else s.extra) for p, s in topo.peers.items()}
    return replace(topo, peers=peers, _memo={}), proxy
