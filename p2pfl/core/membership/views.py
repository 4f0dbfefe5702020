"""HyParView (Leitão, Pereira, Rodrigues, DSN 2007) for one peer, sans-IO: every call takes `now`
and returns the messages to send as ``(dest, ViewMsg)``; the host moves them and reads the views.

Why HyParView rather than Cyclon: its active view is symmetric and small (a link exists at both
ends or at neither), which is what CHOCO needs: each link carries a replica pair that is created
from an exact state and lives as long as the link, and Metropolis-Hastings weights need symmetric
degrees. It repairs reactively, promoting a passive entry the moment the liveness layer reports
a neighbour down, so links change only on joins, leaves and failures. Cyclon's views are
asymmetric and every shuffle swaps entries, so its neighbourhood, and every replica with it,
would be rebuilt each period. Shuffles here touch only the passive view.

The protocol as in the paper: a joiner sends JOIN to a contact, which takes it into its active
view, answers with a sample of its views, and starts a FORWARD_JOIN walk on every other active
link; the walk's end (ttl 0, or a peer with no other neighbour) links to the joiner, and the peer
at hop `prwl` adds it to its passive view. A peer short of neighbours asks passive entries with
NEIGHBOR (high priority while it holds at most half its active view; the paper: when empty).
Every `shuffle_period` a peer sends a SHUFFLE walk with a sample of its views; the walk's end
answers with a sample of its passive view and both add what they got to their passive views.
A new peer also makes `rewires` switches (`_rewire`) so the overlay's links are not an imprint of
the order in which peers joined.

Rules against a valid member that lies in its view messages (it is authenticated, so lies are
about others, about priorities and about walk lengths):
- Size: `messages.decode` bounds every field; a message holds at most ka + kp entries.
- Rate: each sender has a token bucket of `rate` messages per second (`burst` deep); more is
  refused (`ViewRefused`, reason ``rate``, for the host to count as a strike). At most `tracked`
  buckets are kept; a bucket is forgotten only when full (forgetting it gives nothing back), and
  senders beyond that share one. Stray messages (a walk that crossed a DISCONNECT, a late or
  unasked reply) are dropped and counted in `counts`: an attacker can provoke them in honest peers.
- Passive view: entries enter only from a SHUFFLE that ends here (from an active neighbour), a
  SHUFFLE_REPLY or JOIN reply we asked for (nonce or pending request), a walk at hop `prwl`, and
  peers we drop ourselves. One sender inserts at most ka + kp entries per shuffle period (a second
  bucket), a random subset of what it sent; in a full view each replaces a uniformly random entry,
  so the sender chooses neither the victims nor, beyond its budget, how many. A relayed payload
  never overwrites one already held; only a peer's own messages update its payload.
- Active view: a request is accepted outright only while active plus our own pending requests are
  below `active` (a peer that lost a neighbour claims the slot for its own passive choice first,
  and only a passive entry asking for itself takes a slot so held, never a walk's joiner). A full
  view takes a peer in only by eviction (a JOIN, a high-priority NEIGHBOR, the end of a
  FORWARD_JOIN walk: one slot per walk) and evicts the entry that last got in that way; if that
  one is gone, it evicts a random entry only if it has not done so since it last lost another
  neighbour, else it refuses. So others' requests, from any number of identities, push out at
  most one of a peer's neighbours per neighbour it loses otherwise; every other change of its
  active view is its own uniform choice from its passive view. What no local rule bounds is an
  attacker's own degree: one that accepts every link is where short peers' requests succeed
  (docs/membership.md measures both).
- FORWARD_JOIN and SHUFFLE are taken only from active neighbours (walks travel on links);
  replies only when asked for.
- State: at most `ViewConfig.state_bytes` of protocol data per peer (28 KiB at the
  defaults: 28,856 bytes), whatever the network's size.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import replace

from p2pfl.core.membership.messages import Entry, ViewConfig, ViewKind, ViewMsg
from p2pfl.errors import P2pflError

Out = list[tuple[int, ViewMsg]]


class MembershipError(P2pflError, ValueError):
    """A call the view protocol cannot honour (a bad id, a non-finite time)."""


class ViewRefused(MembershipError):
    """A well-formed view message this peer will not act on; `reason` names the rule."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Bucket:
    """Messages (`tokens`) and passive-view insertions (`inserts`) a sender has left."""

    __slots__ = ("inserts", "last", "tokens")

    def __init__(self, cfg: ViewConfig, now: float) -> None:
        self.tokens, self.inserts, self.last = float(cfg.burst), float(cfg.max_entries), now

    def refill(self, cfg: ViewConfig, now: float) -> bool:
        """Top up to `now`; True if both are full (the bucket then holds no information)."""
        dt = max(0.0, now - self.last)
        self.last = max(self.last, now)
        self.tokens = min(float(cfg.burst), self.tokens + dt * cfg.rate)
        self.inserts = min(float(cfg.max_entries), self.inserts + dt * cfg.max_entries / cfg.shuffle_period)
        return self.tokens >= cfg.burst and self.inserts >= cfg.max_entries


class Views:
    """One peer's active and passive views. `payload` is its own contact (address, certificate)."""

    def __init__(self, me: int, cfg: ViewConfig | None = None, seed: int = 0, payload: bytes = b"") -> None:
        self.cfg = cfg = ViewConfig() if cfg is None else cfg
        if isinstance(me, bool) or not isinstance(me, int) or me < 0:
            raise MembershipError(f"Views: me must be a peer id >= 0, got {me!r}")
        if not isinstance(payload, bytes) or len(payload) > cfg.max_payload:
            raise MembershipError(f"Views: payload must be bytes of at most {cfg.max_payload}")
        self.me, self.payload = me, payload
        self._rng = random.Random(f"views/{seed}/{me}")
        self._active: dict[int, bytes] = {}
        self._passive: dict[int, bytes] = {}
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._forced: int | None = None  # the entry of a full view that got in by eviction
        self._spent = False  # a random eviction happened since an entry other than _forced was lost
        self._pending: dict[int, tuple[float, bool]] = {}  # JOIN/NEIGHBOR asked: deadline, is a JOIN
        self._shuffle: tuple[int, float] | None = None  # open shuffle: nonce, deadline
        self._next_shuffle: float | None = None
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()
        self._shared: _Bucket | None = None
        self._contact: int | None = None
        self._walks, self._walked = cfg.burst / 2, -math.inf  # join walks this peer may start
        self._tried: set[int] = set()  # asked for a link since the last tick
        self._rewires, self._next_rewire = cfg.rewires, -math.inf  # switches left (`_rewire`), when next
        self._left = False
        self.counts: Counter[str] = Counter()  # evictions, refills, shuffles, ... (fixed keys)

    # -- what the host reads ------------------------------------------------------------------
    @property
    def active(self) -> frozenset[int]:
        return frozenset(self._active)

    @property
    def passive(self) -> frozenset[int]:
        return frozenset(self._passive)

    def contact(self, peer: int) -> bytes | None:
        """The payload of a peer in either view, or one this peer just addressed outside them."""
        for book in (self._active, self._passive, self._recent):
            if peer in book:
                return book[peer]
        return None

    # -- events -------------------------------------------------------------------------------
    def join(self, contact: int, now: float) -> Out:
        """Enter the network through `contact` (asked again by `tick` while this peer is alone)."""
        self._clock(now)
        if isinstance(contact, bool) or not isinstance(contact, int) or contact < 0 or contact == self.me:
            raise MembershipError(f"Views.join: contact must be another peer's id, got {contact!r}")
        self._contact = contact
        self._pending[contact] = (now + self.cfg.request_timeout, True)
        return [(contact, ViewMsg(ViewKind.JOIN, contact=self.payload))]

    def receive(self, sender: int, msg: ViewMsg, now: float) -> Out:
        """Act on `msg` from an authenticated `sender`; `ViewRefused` if a rule refuses it."""
        self._clock(now)
        if self._left:
            return []
        if sender == self.me:
            raise ViewRefused("self", f"peer {self.me}: a view message from myself")
        bucket = self._bucket(sender, now)
        if bucket.tokens < 1.0:
            raise ViewRefused("rate", f"peer {sender}: over {self.cfg.rate} view messages/s")
        bucket.tokens -= 1.0
        for book in (self._active, self._passive):
            if msg.contact and sender in book:
                book[sender] = msg.contact
        self._remember(sender, msg.contact)  # a reply to a sender outside both views (a refused JOIN) needs its contact
        handler = getattr(self, f"_on_{msg.kind.value}")
        return handler(sender, msg, now, bucket)

    def tick(self, now: float) -> Out:
        """Timers: give up unanswered requests, refill, rejoin when alone, shuffle when due."""
        self._clock(now)
        if self._left:
            return []
        out: Out = []
        self._tried.clear()
        for p, (deadline, is_join) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[p]
                if not is_join:
                    self._passive.pop(p, None)  # it did not answer: gone or unreachable
        if self._shuffle is not None and now >= self._shuffle[1]:
            self._shuffle = None
        out += self._refill(now)
        if not self._active and not self._passive and not self._pending and self._contact is not None:
            out += self.join(self._contact, now)
        if self._next_shuffle is None:
            self._next_shuffle = now + self._rng.uniform(0.0, self.cfg.shuffle_period)
        elif now >= self._next_shuffle:
            self._next_shuffle = now + self.cfg.shuffle_period
            out += self._start_shuffle(now)
        if now >= self._next_rewire:
            out += self._rewire(now)
        return out

    def _rewire(self, now: float) -> Out:
        """One switch of a young peer: drop a random neighbour (it keeps us as a passive entry and
        refills) and ask a random passive entry with high priority. Joins through one contact
        leave links among peers that arrived together (docs/membership.md measures the spectral
        gap); `rewires` switches per peer, at most one per `request_timeout`,
        undo that at a one-time cost of a few new links."""
        if self._rewires <= 0 or len(self._active) < self.cfg.active or self._pending:
            return []
        cands = sorted(self._passive.keys() - self._tried)
        if not cands:
            return []
        self._rewires -= 1
        self._next_rewire = now + self.cfg.request_timeout
        b = self._rng.choice(sorted(self._active))
        c = self._rng.choice(cands)
        self._drop_active(b)
        self._to_passive(b, self.contact(b) or b"")
        self._tried.add(c)
        self._pending[c] = (now + self.cfg.request_timeout, False)
        return [(b, ViewMsg(ViewKind.DISCONNECT)), (c, ViewMsg(ViewKind.NEIGHBOR, contact=self.payload, high=True))]

    def down(self, peer: int, now: float) -> Out:
        """The liveness layer found `peer` dead or unreachable: forget it and promote from passive."""
        self._clock(now)
        if self._left:
            return []
        self._drop_active(peer)
        self._passive.pop(peer, None)
        self._recent.pop(peer, None)
        self._pending.pop(peer, None)
        return self._refill(now)

    def leave(self, now: float) -> Out:
        """Say goodbye to every neighbour; the views are emptied and later calls do nothing."""
        self._clock(now)
        out: Out = [(p, ViewMsg(ViewKind.DISCONNECT, leaving=True)) for p in sorted(self._active)]
        self._active.clear()
        self._passive.clear()
        self._pending.clear()
        self._left = True
        return out

    # -- handlers -----------------------------------------------------------------------------
    def _on_join(self, s: int, msg: ViewMsg, now: float, _: _Bucket) -> Out:
        sample = self._sample([p for p in self._active if p != s] + [p for p in self._passive if p != s],
                              self.cfg.max_entries)
        reply = ViewMsg(ViewKind.NEIGHBOR_REPLY, contact=self.payload, accept=True, entries=sample)
        if s in self._active:
            return [(s, reply)]  # a repeated JOIN starts no new walks
        out = self._admit(s, msg.contact, forced=True)
        if out is None:  # full, no eviction left: the joiner asks the sample instead
            return [(s, replace(reply, accept=False))]
        # Walks at half the rate a neighbour takes from us: a crowd joining through one contact
        # gets links from the samples instead of being refused at the contact's neighbours.
        self._walks = min(self.cfg.burst / 2, self._walks + max(0.0, now - self._walked) * self.cfg.rate / 2)
        self._walked = max(self._walked, now)
        if self._walks >= 1.0:
            self._walks -= 1.0
            walk = ViewMsg(ViewKind.FORWARD_JOIN, peer=s, peer_contact=msg.contact, ttl=self.cfg.arwl)
            out += [(q, walk) for q in sorted(self._active) if q != s]
        return [*out, (s, reply)]

    def _on_forward_join(self, s: int, msg: ViewMsg, now: float, bucket: _Bucket) -> Out:
        if s not in self._active:
            self.counts["not_neighbour"] += 1  # a walk that crossed our DISCONNECT
            return []
        n = msg.peer
        if n == self.me or n in self._active:
            return []
        nxt = [q for q in self._active if q not in (s, n)]
        if msg.ttl == 0 or not nxt:
            out = self._admit(n, msg.peer_contact, forced=True, relayed=True)
            if out is None:
                self._insert(((n, msg.peer_contact),), bucket)
                return []
            return [*out, (n, ViewMsg(ViewKind.NEIGHBOR, contact=self.payload, high=True))]
        if msg.ttl == self.cfg.prwl:
            self._insert(((n, msg.peer_contact),), bucket)
        return [(self._rng.choice(sorted(nxt)), ViewMsg(ViewKind.FORWARD_JOIN, peer=n,
                                                       peer_contact=msg.peer_contact, ttl=msg.ttl - 1))]

    def _on_neighbor(self, s: int, msg: ViewMsg, now: float, _: _Bucket) -> Out:
        yes = ViewMsg(ViewKind.NEIGHBOR_REPLY, contact=self.payload, accept=True)
        if s in self._active:
            return [(s, yes)]
        out = self._admit(s, msg.contact, forced=msg.high)
        if out is None:
            self._remember(s, msg.contact)
            return [(s, replace(yes, accept=False))]
        return [*out, (s, yes)]

    def _on_neighbor_reply(self, s: int, msg: ViewMsg, now: float, bucket: _Bucket) -> Out:
        asked = self._pending.pop(s, None)
        if asked is None:
            if s in self._active and not msg.accept:  # our walk-end link was declined
                self._drop_active(s)
                self._to_passive(s, msg.contact)
                return self._refill(now)
            if s in self._active or not msg.accept:
                return []
            return [(s, ViewMsg(ViewKind.DISCONNECT))]  # it linked to us after we gave up: undo it
        if asked[1]:
            self._insert(msg.entries, bucket)
        if not msg.accept:
            self._to_passive(s, msg.contact)
            return self._refill(now)
        if len(self._active) >= self.cfg.active:  # filled meanwhile: undo the link at the other end
            self._to_passive(s, msg.contact)
            return [(s, ViewMsg(ViewKind.DISCONNECT))]
        return self._admit(s, msg.contact, forced=False, own=True) or []

    def _on_revoke(self, s: int, msg: ViewMsg, now: float, _: _Bucket) -> Out:
        return []  # revocations are the admission layer's (`node.membership.Open`); the rate limit is this one's

    def _on_disconnect(self, s: int, msg: ViewMsg, now: float, _: _Bucket) -> Out:
        was = s in self._active
        contact = self._active.get(s, b"")
        self._drop_active(s)
        self._pending.pop(s, None)
        if msg.leaving:
            self._passive.pop(s, None)
        elif was:
            self._to_passive(s, contact)
        return self._refill(now) if was else []

    def _on_shuffle(self, s: int, msg: ViewMsg, now: float, bucket: _Bucket) -> Out:
        if s not in self._active:
            self.counts["not_neighbour"] += 1  # a walk that crossed our DISCONNECT
            return []
        o = msg.peer
        if o == self.me:
            return []
        nxt = [q for q in self._active if q not in (s, o)]
        if msg.ttl > 0 and nxt:
            return [(self._rng.choice(sorted(nxt)), ViewMsg(ViewKind.SHUFFLE, peer=o, peer_contact=msg.peer_contact,
                                                           ttl=msg.ttl - 1, nonce=msg.nonce, entries=msg.entries))]
        sample = self._sample([p for p in self._passive if p != o], self.cfg.max_entries)
        self._remember(o, msg.peer_contact)
        self._insert(((o, msg.peer_contact), *msg.entries), bucket)
        self.counts["shuffled"] += 1
        return [(o, ViewMsg(ViewKind.SHUFFLE_REPLY, nonce=msg.nonce, entries=sample))]

    def _on_shuffle_reply(self, s: int, msg: ViewMsg, now: float, bucket: _Bucket) -> Out:
        if self._shuffle is None or self._shuffle[0] != msg.nonce:
            self.counts["unsolicited"] += 1  # late, or a shuffle someone sent in our name: not the replier's fault
            return []
        self._shuffle = None
        self._insert(msg.entries, bucket)
        return []

    # -- the views ----------------------------------------------------------------------------
    def _admit(self, p: int, contact: bytes, forced: bool, own: bool = False, relayed: bool = False) -> Out | None:
        """Put `p` in the active view, with the DISCONNECT of the entry a full view evicts for it
        (only when `forced`; see the rules); None if it cannot take `p`. Slots held for our own
        pending requests are free only to the answers (`own`) and to peers of our passive view
        asking for themselves, which we might have asked (else two short peers asking others
        refuse each other); not to a walk's joiner (`relayed`: attackers' walk ends took them)."""
        if p == self.me or p in self._active:
            return []
        out: Out = []
        held = 0 if own or (p in self._passive and not relayed) else len(self._pending.keys() - {p})
        if len(self._active) + held >= self.cfg.active:
            full = len(self._active) >= self.cfg.active
            if not forced or not full or (self._forced is None and self._spent):
                return None
            if self._forced is None:
                victim, self._spent = self._rng.choice(sorted(self._active)), True
            else:
                victim = self._forced
            vc = self._active.pop(victim)
            self._to_passive(victim, vc)
            out.append((victim, ViewMsg(ViewKind.DISCONNECT)))
            self._forced = p
            self.counts["evicted"] += 1
        self._active[p] = contact or self._passive.get(p, b"") or self._recent.get(p, b"")
        self._passive.pop(p, None)
        self._pending.pop(p, None)
        return out

    def _drop_active(self, p: int) -> None:
        if self._active.pop(p, None) is None:
            return
        if p == self._forced:
            self._forced = None  # its slot is not a new allowance
        else:
            self._spent = False  # a neighbour of ours is gone: one random eviction allowed again

    def _refill(self, now: float) -> Out:
        """Ask uniformly drawn passive entries for a link, one per free slot not already asked, at
        most 2 x `active` requests between ticks. High priority while this peer holds at most
        half its active view: a full peer then makes room (see the eviction rule), so links
        spread from full peers to short ones instead of short peers waiting for one another."""
        out: Out = []
        free = self.cfg.active - len(self._active) - len(self._pending)
        free = min(free, 2 * self.cfg.active - len(self._tried))
        candidates = sorted(self._passive.keys() - self._pending.keys() - self._tried)
        for p in self._rng.sample(candidates, max(0, min(free, len(candidates)))):
            high = len(self._active) <= self.cfg.active // 2
            self._tried.add(p)
            self._pending[p] = (now + self.cfg.request_timeout, False)
            out.append((p, ViewMsg(ViewKind.NEIGHBOR, contact=self.payload, high=high)))
            self.counts["asked"] += 1
        return out

    def _start_shuffle(self, now: float) -> Out:
        if not self._active:
            return []
        target = self._rng.choice(sorted(self._active))
        entries = self._sample([p for p in self._active if p != target], self.cfg.ka) \
            + self._sample(list(self._passive), self.cfg.kp)
        nonce = self._rng.randrange(1 << 62)
        self._shuffle = (nonce, now + self.cfg.request_timeout)
        return [(target, ViewMsg(ViewKind.SHUFFLE, peer=self.me, peer_contact=self.payload,
                                 ttl=self.cfg.shuffle_ttl, nonce=nonce, entries=tuple(entries)))]

    def _sample(self, ids: list[int], k: int) -> tuple[Entry, ...]:
        pick = self._rng.sample(sorted(ids), min(k, len(ids)))
        return tuple((p, self.contact(p) or b"") for p in pick)

    def _insert(self, entries: tuple[Entry, ...], bucket: _Bucket) -> None:
        """Admit at most the sender's insertion budget of `entries` (a random subset) to passive."""
        fresh = [e for e in entries if e[0] != self.me and e[0] not in self._active and e[0] not in self._passive]
        take = min(len(fresh), int(bucket.inserts))
        bucket.inserts -= take
        for p, c in self._rng.sample(fresh, take):
            self._to_passive(p, c)

    def _to_passive(self, p: int, contact: bytes) -> None:
        if p == self.me or p in self._active or p in self._passive:
            return
        if len(self._passive) >= self.cfg.passive:
            victim = self._rng.choice(sorted(self._passive.keys() - self._pending.keys()) or sorted(self._passive))
            del self._passive[victim]
        self._passive[p] = contact

    def _remember(self, p: int, contact: bytes) -> None:
        """Keep the contact of an addressee outside both views (bounded, oldest out first)."""
        if contact and p not in self._active and p not in self._passive:
            self._recent[p] = contact
            self._recent.move_to_end(p)
            while len(self._recent) > self.cfg.recent:
                self._recent.popitem(last=False)

    def _bucket(self, sender: int, now: float) -> _Bucket:
        b = self._buckets.get(sender)
        if b is None:
            if len(self._buckets) >= self.cfg.tracked:
                full = next((q for q, qb in self._buckets.items() if qb.refill(self.cfg, now)), None)
                if full is None:
                    if self._shared is None:
                        self._shared = _Bucket(self.cfg, now)
                    self._shared.refill(self.cfg, now)
                    return self._shared
                del self._buckets[full]
            b = self._buckets[sender] = _Bucket(self.cfg, now)
        b.refill(self.cfg, now)
        return b

    @staticmethod
    def _clock(now: float) -> None:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise MembershipError(f"Views: now must be a finite number of seconds, got {now!r}")


def mh_weights(my_degree: int, neighbour_degrees: Mapping[int, int], me: int) -> dict[int, float]:
    """Metropolis-Hastings weights of my row, self included: w_ij = 1 / (1 + max(d_i, d_j)) over
    the given (live) neighbours, the rest on `me`. Symmetric and doubly stochastic when every peer
    uses the degrees of the same round; a neighbour missing from `neighbour_degrees` (down) gives
    its weight to self, as a static graph does."""
    if isinstance(my_degree, bool) or not isinstance(my_degree, int) or my_degree < len(neighbour_degrees):
        raise MembershipError(f"mh_weights: my_degree must be an int >= the {len(neighbour_degrees)} neighbours "
                              f"given, got {my_degree!r}")
    row: dict[int, float] = {}
    for j, d in neighbour_degrees.items():
        if j == me or isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise MembershipError(f"mh_weights: neighbour {j!r} needs a degree >= 1 (and not me), got {d!r}")
        row[j] = 1.0 / (1.0 + max(my_degree, d))
    row[me] = 1.0 - math.fsum(row.values())
    return row
