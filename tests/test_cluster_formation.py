"""PPFM cluster formation, hysteresis, overlays and meta-level updates (sans-IO, synthetic updates).

Updates are planted: peer i of group g moves by u_i = dir_g + noise (|dir_g| = 1, |noise| about
`noise`), optionally plus a direction shared by all groups; fingerprints are the real shared-seed
`Sketcher` of u_i, as every peer would compute them.
"""

from __future__ import annotations

import json
import random

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from p2pfl.core.consensus import Sketcher
from p2pfl.core.topology import generate_graph
from p2pfl.ppfm import cluster as C

D = 4099  # not a power of two: the sketch pads
SKETCH = Sketcher(D, 1024, seed=11)


def directions(rng: np.random.Generator, g: int) -> np.ndarray:
    v = rng.standard_normal((g, D))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def updates(rng: np.random.Generator, dirs: np.ndarray, groups: list[int], noise: float, common: np.ndarray | None = None) -> np.ndarray:
    """One update per peer: peer i follows direction dirs[groups[i]]."""
    u = dirs[groups] + rng.standard_normal((len(groups), D)) * noise / np.sqrt(D)
    return u + common if common is not None else u


def fingerprints(u: np.ndarray) -> dict[int, torch.Tensor]:
    return {i: SKETCH(torch.from_numpy(row)) for i, row in enumerate(u)}


def planted(sizes: list[int]) -> list[int]:
    return [g for g, s in enumerate(sizes) for _ in range(s)]


def ari(truth: list[int], labels: dict[int, int]) -> float:
    return adjusted_rand_score(truth, [labels[i] for i in range(len(truth))])


def peer_copy(fps: dict[int, torch.Tensor], rng: random.Random, eps: float = 1e-12) -> dict:
    """What another peer holds: other arrival order, last-bit-level differences, maybe numpy."""
    order = list(fps)
    rng.shuffle(order)
    out: dict = {}
    for p in order:
        v = fps[p] * (1 + eps * torch.randn(fps[p].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rng.randrange(2**31))))
        out[p] = v.numpy() if rng.random() < 0.5 else v
    return out


def assert_canonical(labels: dict[int, int]) -> None:
    firsts = [labels[p] for p in sorted(labels)]
    seen: list[int] = []
    for c in firsts:
        if c not in seen:
            seen.append(c)
    assert seen == list(range(len(seen)))


# ---------------------------------------------------------------- formation

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shared", [False, True])
def test_planted_clusters_recovered_identically_on_every_peer(seed, shared):
    rng = np.random.default_rng(seed)
    sizes = [[4, 5, 6], [6, 4, 5], [5, 5, 5]][seed % 3]
    truth = planted(sizes)
    perm = rng.permutation(len(truth))  # group members are not contiguous ids
    truth = [truth[i] for i in perm]
    common = directions(rng, 1)[0] if shared else None
    fps = fingerprints(updates(rng, directions(rng, 3), truth, noise=1.0, common=common))
    ref = C.cluster_fingerprints(fps, "auto")
    assert ari(truth, ref) >= 0.95
    assert ari(truth, C.cluster_fingerprints(fps, 3)) >= 0.95
    assert_canonical(ref)
    prng = random.Random(seed)
    for _ in truth:  # every peer, from its own copy
        assert C.cluster_fingerprints(peer_copy(fps, prng), "auto") == ref


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("noise", [0.3, 1.0, 3.0])
def test_homogeneous_population_is_one_cluster(seed, noise):
    rng = np.random.default_rng(100 + seed)
    n = [4, 8, 12, 16, 20, 24][seed]
    fps = fingerprints(updates(rng, directions(rng, 1), [0] * n, noise=noise))
    assert set(C.cluster_fingerprints(fps, "auto").values()) == {0}


def test_pure_noise_is_one_cluster_even_with_small_sketches():
    rng = np.random.default_rng(5)
    for m in (16, 32, 64):
        for n in (4, 6, 10):
            fps = {i: rng.standard_normal(m) for i in range(n)}
            assert set(C.cluster_fingerprints(fps, "auto").values()) == {0}, (m, n)


def test_small_and_degenerate_inputs():
    assert C.cluster_fingerprints({}, "auto") == {}
    assert C.cluster_fingerprints({7: np.ones(8)}, "auto") == {7: 0}
    assert C.cluster_fingerprints({7: np.ones(8)}, 3) == {7: 0}  # k clamped to the peers present
    fps = {5: np.array([1.0, 0, 0]), 2: np.array([0, 1.0, 0]), 9: np.array([0.99, 0.01, 0])}
    assert C.cluster_fingerprints(fps, 2) == {2: 0, 5: 1, 9: 1}
    assert C.cluster_fingerprints(fps, 1) == {2: 0, 5: 0, 9: 0}
    zero = {0: np.zeros(4), 1: np.array([1.0, 0, 0, 0]), 2: np.array([1.0, 0.01, 0, 0])}
    assert C.cluster_fingerprints(zero, 2) == {0: 0, 1: 1, 2: 1}  # a peer that did not move
    with pytest.raises(ValueError, match="different lengths"):
        C.cluster_fingerprints({0: np.ones(3), 1: np.ones(4)}, 2)
    with pytest.raises(ValueError, match="non-finite"):
        C.cluster_fingerprints({0: np.ones(3), 1: np.array([1.0, np.nan, 0])}, 2)
    for bad in (0, -1, "two", True):
        with pytest.raises(ValueError, match="k must be"):
            C.cluster_fingerprints(fps, bad)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 14), st.integers(1, 4), st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_labels_canonical_and_order_independent(n, k, seed, rnd):
    rng = np.random.default_rng(seed)
    ids = rng.choice(1000, size=n, replace=False).tolist()
    centers = rng.standard_normal((k, 32))
    fps = {p: centers[rng.integers(k)] + 0.3 * rng.standard_normal(32) for p in ids}
    for kk in ("auto", k):
        ref = C.cluster_fingerprints(fps, kk)
        assert_canonical(ref)
        assert C.canonical(ref) == ref
        shuffled = list(fps.items())
        rnd.shuffle(shuffled)
        assert C.cluster_fingerprints(dict(shuffled), kk) == ref


# ---------------------------------------------------------------- hysteresis

def test_hysteresis_keeps_labels_under_noise_and_a_held_split_only_splits_further():
    rng = np.random.default_rng(42)
    dirs = directions(rng, 3)
    # 3 groups of 5 plus two peers halfway between groups 0 and 1: fresh clusterings put them on
    # either side depending on the noise draw.
    truth = planted([5, 5, 5])
    n = len(truth) + 2

    def draw(groups: list[int]) -> dict[int, torch.Tensor]:
        u = updates(rng, dirs, groups, noise=1.0)
        mid = (dirs[0] + dirs[1]) / 2
        extra = mid + rng.standard_normal((2, D)) * 1.5 / np.sqrt(D)
        return fingerprints(np.vstack([u, extra]))

    state = C.ClusterState(k="auto", every=5, margin=0.1)
    peers = [C.ClusterState(k="auto", every=5, margin=0.1) for _ in range(3)]
    prng = random.Random(0)
    fresh, kept = set(), set()
    for r in range(0, 100, 5):
        fps = draw(truth)
        assert state.due(r) and not state.due(r + 1)
        changed = state.step(fps, r)
        assert changed == (r == 0)
        fresh.add(tuple(sorted(C.cluster_fingerprints(fps, "auto").items())))
        kept.add(tuple(sorted(state.labels.items())))
        for p in peers:
            p.step(peer_copy(fps, prng), r)
            assert p.labels == state.labels
    assert len(fresh) > 1, "the scenario must make fresh clusterings flap, or the test proves nothing"
    assert len(kept) == 1
    assert adjusted_rand_score(truth, [state.labels[i] for i in range(len(truth))]) >= 0.95
    assert state.adopted_round == 0

    # Once held, the split is never redrawn across its clusters, nor merged: accumulated
    # fingerprints change their structure by label skew inside clusters, not by tasks.
    held = dict(state.labels)
    moved = [truth[(i + 2) % len(truth)] for i in range(len(truth))]
    moved = [[2, 0, 1][g] if i % 2 else g for i, g in enumerate(moved)]
    assert adjusted_rand_score(truth, moved) < 0.5
    assert C.cluster_fingerprints(draw(moved), "auto") != held  # a fresh clustering would move peers
    assert not state.step(draw(moved), 100)
    assert not state.step(fingerprints(updates(rng, dirs, [0] * n, noise=1.0)), 105)
    assert state.labels == held and state.adopted_round == 0

    # It splits further where a held cluster's own members now follow two directions, and only there.
    fourth = np.vstack([dirs, directions(rng, 1)])
    sub = [*truth[:10], 2, 2, 2, 3, 3]

    def draw_sub() -> dict[int, torch.Tensor]:
        u = updates(rng, fourth, sub, noise=1.0)
        mid = (dirs[0] + dirs[1]) / 2
        return fingerprints(np.vstack([u, mid + rng.standard_normal((2, D)) * 1.5 / np.sqrt(D)]))

    assert state.step(draw_sub(), 110) and state.adopted_round == 110
    assert len(set(state.labels.values())) == len(set(held.values())) + 1
    together = {(p, q) for p in range(n) for q in range(n) if state.labels[p] == state.labels[q]}
    assert all(held[p] == held[q] for p, q in together)  # every new cluster lies inside an old one
    assert adjusted_rand_score(sub, [state.labels[i] for i in range(15)]) >= 0.95
    fixed = C.ClusterState(k=2, every=5, margin=0.1)
    assert fixed.step(draw(truth), 0) and not fixed.step(draw_sub(), 5)  # an explicit k has its clusters


def test_first_split_needs_the_margin_and_peer_set_change_adopts():
    rng = np.random.default_rng(3)
    dirs = directions(rng, 2)
    fps = fingerprints(updates(rng, dirs, planted([5, 5]), noise=1.0))
    fresh = C.cluster_fingerprints(fps, "auto")
    q = C.quality(fresh, fps)
    assert C.quality(dict.fromkeys(fresh, 0), fps) == C.split_bar(SKETCH.k) == C.MIN_SILHOUETTE
    assert q > C.MIN_SILHOUETTE
    strict = C.ClusterState(margin=q - C.MIN_SILHOUETTE + 0.01)
    assert strict.update(fps, 0) and set(strict.labels.values()) == {0}  # starts as one cluster
    # what the records report: the split came within the margin of the one-cluster start
    assert strict.scores == {"best_split_silhouette": q, "split_bar": C.MIN_SILHOUETTE, "held_quality": C.MIN_SILHOUETTE}
    loose = C.ClusterState(margin=q - C.MIN_SILHOUETTE - 0.01)
    assert loose.update(fps, 0) and loose.labels == fresh
    fps.pop(9)
    assert strict.update(fps, 10) and strict.labels == C.cluster_fingerprints(fps, "auto")
    fixed = C.ClusterState(k=2, margin=10.0)
    assert fixed.update(fps, 0) and len(set(fixed.labels.values())) == 2  # explicit k: no one-cluster start
    assert fixed.scores["held_quality"] == C.quality(fixed.labels, fps)


def test_cluster_state_round_trips_through_json():
    s = C.ClusterState(k=3, every=4, margin=0.05, labels={3: 1, 0: 0, 7: 1}, adopted_round=8, evaluated_round=12)
    back = C.ClusterState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    with pytest.raises(ValueError):
        C.ClusterState(every=0)


# ---------------------------------------------------------------- overlays

def assert_doubly_stochastic(g: nx.Graph) -> None:
    w = C.overlay_topology(g).mixing_matrix()
    assert (w >= 0).all()
    assert np.abs(w - w.T).max() < 1e-12
    assert np.abs(w.sum(0) - 1).max() < 1e-12 and np.abs(w.sum(1) - 1).max() < 1e-12
    if g.number_of_nodes() > 1:
        assert C.overlay_topology(g).mixing_lambda() < 1 - 1e-9  # connected: gossip converges


def test_overlay_connects_alternating_members_of_a_ring():
    base = nx.cycle_graph(12)
    labels = {p: p % 3 for p in range(12)}
    for c in range(3):
        assert base.subgraph(C.members(labels, c)).number_of_edges() == 0
    ov = C.overlay(labels, base)
    assert ov.representatives == {0: 0, 1: 1, 2: 2}
    for c, g in ov.clusters.items():
        assert sorted(g.nodes) == C.members(labels, c)
        assert nx.is_connected(g)
        assert max(d for _, d in g.degree) <= 2
        assert_doubly_stochastic(g)
    assert sorted(ov.reps.nodes) == [0, 1, 2] and nx.is_connected(ov.reps)
    assert set(map(frozenset, ov.reps.edges)) == {frozenset({0, 1}), frozenset({1, 2})}  # base links suffice
    assert_doubly_stochastic(ov.reps)
    row = C.mh_weights(ov.clusters[1], 4)
    assert row == pytest.approx({1: 1 / 3, 7: 1 / 3, 4: 1 / 3})


def test_overlay_keeps_a_connected_induced_subgraph():
    base = nx.path_graph(6)
    labels = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    ov = C.overlay(labels, base)
    assert set(map(frozenset, ov.clusters[0].edges)) == {frozenset({0, 1}), frozenset({1, 2})}
    assert ov.cluster_topology(1).neighbors(4) == [3, 5]
    assert C.representative(labels, 1) == 3
    with pytest.raises(ValueError):
        C.representative(labels, 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 24), st.integers(1, 5), st.integers(0, 10_000), st.sampled_from(["ring", "erdos_renyi", "small_world", "torus", "star"]))
def test_overlay_connected_and_weights_doubly_stochastic(n, k, seed, kind):
    base = generate_graph(kind, n, seed=seed)
    rng = random.Random(seed)
    labels = C.canonical({p: rng.randrange(k) for p in range(n)})
    ov = C.overlay(labels, base)
    assert sorted(ov.clusters) == sorted(set(labels.values()))
    for c, g in ov.clusters.items():
        assert sorted(g.nodes) == C.members(labels, c)
        assert nx.is_connected(g)
        assert set(map(frozenset, base.subgraph(g.nodes).edges)) <= set(map(frozenset, g.edges))
        assert_doubly_stochastic(g)
    assert sorted(ov.reps.nodes) == sorted(ov.representatives.values())
    assert nx.is_connected(ov.reps)
    assert_doubly_stochastic(ov.reps)
    assert C.overlay(dict(reversed(list(labels.items()))), base).clusters.keys() == ov.clusters.keys()


# ---------------------------------------------------------------- meta-level updates

def state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.lora_A": torch.randn(4, 8, generator=g).to(dtype), "a.lora_B": torch.randn(8, 4, generator=g).to(dtype)}


def test_cluster_update_is_a_reptile_step_and_pure():
    theta, phi = state(0), state(1)
    before = {k: v.clone() for k, v in theta.items()}
    out = C.cluster_update(theta, phi, 0.25)
    for k in theta:
        assert torch.allclose(out[k], theta[k] + 0.25 * (phi[k] - theta[k]), atol=1e-6)
        assert torch.equal(theta[k], before[k])
    assert all(torch.equal(C.cluster_update(theta, phi, 1.0)[k], phi[k]) for k in phi)
    assert all(torch.equal(C.cluster_update(theta, phi, 0.0)[k], theta[k]) for k in theta)
    cur = theta
    for _ in range(10):
        cur = C.cluster_update(cur, phi, 0.5)
    for k in theta:  # the residual contracts by (1 - beta) per step
        assert torch.allclose(cur[k] - phi[k], (theta[k] - phi[k]) * 0.5**10, atol=1e-6)


def test_global_pull_and_validation():
    theta_c, theta_g = state(2, torch.bfloat16), state(3, torch.bfloat16)
    out = C.global_pull(theta_c, theta_g, 0.5)
    for k in theta_c:
        assert out[k].dtype == torch.bfloat16
        want = (theta_c[k].float() + theta_g[k].float()) / 2
        assert torch.allclose(out[k].float(), want, atol=2e-2)
    with pytest.raises(ValueError, match="lam"):
        C.global_pull(theta_c, theta_g, 1.5)
    with pytest.raises(ValueError, match="keys"):
        C.cluster_update(state(0), {"b.lora_A": state(1)["b.lora_A"]}, 0.1)
    with pytest.raises(ValueError, match="shapes"):
        C.cluster_update(state(0), {**state(1), "a.lora_B": torch.zeros(4, 8)}, 0.1)
