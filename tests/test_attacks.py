"""The `--byzantine` attack suite: each attack against its formula, the spec parser, and small
networks where each attack harms plain gossip and robust mixing bounds the harm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from p2pfl.core import topology as T
from p2pfl.core.consensus import exact_distance, flatten, network_mean
from p2pfl.core.gossip import ChocoEngine
from p2pfl.core.robust import (
    ByzantineSpec,
    NormGuard,
    RobustError,
    RobustSpec,
    alie_z,
    flips_labels,
    inner_product,
    little_is_enough,
    noised,
    parse_byzantine,
    scaled,
    sign_flipped,
)
from p2pfl.core.state import State, synthetic_state
from p2pfl.learn.data import PeerData, Split, flipped_labels
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.sim.engines import EngineNetwork
from p2pfl.sim.simulation import train_network


def st(**tensors: list) -> State:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ------------------------------------------------------------------------ each attack's output

X = st(a=[1.0, 2.0], b=[[3.0]])  # the attacker's model after its local steps
R = st(a=[0.5, 0.5], b=[[1.0]])  # its public copy: what its neighbours hold of it
HONEST = [st(a=[1.0, 4.0], b=[[0.0]]), st(a=[2.0, -2.0], b=[[3.0]]), st(a=[6.0, 1.0], b=[[3.0]])]


def test_scale_and_noise():
    assert same(scaled(X, -2.0), st(a=[-2.0, -4.0], b=[[-6.0]]))
    assert same(noised(X, 0.0, 7), X)
    big = {"w": torch.zeros(200_000)}
    n1, n1_again, n2 = noised(big, 0.3, 1)["w"], noised(big, 0.3, 1)["w"], noised(big, 0.3, 2)["w"]
    assert torch.equal(n1, n1_again) and not torch.equal(n1, n2)  # seeded by the round
    assert float(n1.std()) == pytest.approx(0.3, rel=0.01) and abs(float(n1.mean())) < 0.01


def test_sign_flipping_sends_the_negated_update_from_the_public_copy():
    # r - F (x - r), F = 2: a: 0.5 - 2 * (0.5, 1.5); b: 1 - 2 * 2
    assert same(sign_flipped(X, R, 2.0), st(a=[-0.5, -2.5], b=[[-3.0]]))
    assert same(sign_flipped(X, X, 5.0), X)  # no update since the last delta: nothing to flip


def test_alie_z_is_the_papers_formula():
    for n, f in [(3, 1), (5, 1), (8, 1), (50, 12), (20, 4)]:
        s = math.floor(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(norm.ppf((n - s) / n), abs=1e-9)
    assert alie_z(3, 1) == pytest.approx(0.430727, abs=1e-6)  # Phi^-1(2/3), from a normal table
    assert alie_z(6, 1) == pytest.approx(0.0, abs=1e-12)  # s = 3 of 6: Phi^-1(1/2)
    for n, f in [(4, 0), (4, 3), (1, 1)]:
        with pytest.raises(RobustError, match="n // 2"):
            alie_z(n, f)


def test_a_little_is_enough_is_mean_minus_z_std_per_coordinate():
    z = 1.5
    stack = {k: np.stack([h[k].numpy() for h in HONEST]) for k in HONEST[0]}
    want = {k: torch.from_numpy(v.mean(0) - z * v.std(0, ddof=0)) for k, v in stack.items()}
    assert same(little_is_enough(HONEST, z), want)
    # by hand, coordinate a[0]: values 1, 2, 6 -> mean 3, population std sqrt(14/3)
    assert float(little_is_enough(HONEST, z)["a"][0]) == pytest.approx(3 - z * math.sqrt(14 / 3))


def test_inner_product_manipulation_negates_the_mean_honest_update():
    eps = 0.5
    # mean of the honest copies: a = (3, 1), b = 2; r - eps (mean - r)
    assert same(inner_product(R, HONEST, eps), st(a=[0.5 - 0.5 * 2.5, 0.5 - 0.5 * 0.5], b=[[1.0 - 0.5 * 1.0]]))


def test_parsed_attacks_take_their_parameters_and_defaults():
    def attack(spec: str, honest: list[State]) -> State:
        fn = parse_byzantine(spec)
        assert fn is not None
        return fn(X, R, 3, honest)

    assert same(attack("scale:-2", HONEST), scaled(X, -2.0))
    assert same(attack("noise:0.5", HONEST), noised(X, 0.5, 3))
    assert same(attack("signflip", HONEST), sign_flipped(X, R, 1.0))
    assert same(attack("signflip:3", HONEST), sign_flipped(X, R, 3.0))
    assert same(attack("ipm", HONEST), inner_product(R, HONEST, 0.1))
    assert same(attack("ipm:2", HONEST), inner_product(R, HONEST, 2.0))
    assert same(attack("alie:0.7", HONEST), little_is_enough(HONEST, 0.7))
    # default z: the attacker's neighbourhood, 3 honest neighbours and itself, one Byzantine
    assert same(attack("alie", HONEST), little_is_enough(HONEST, norm.ppf((4 - 2) / 4)))
    assert same(attack("alie", HONEST[:2]), little_is_enough(HONEST[:2], norm.ppf(2 / 3)))
    for spec in ("alie", "alie:2", "ipm"):  # nobody to imitate: gossip honestly
        assert same(attack(spec, []), X)


# ------------------------------------------------------------------------ the spec parser


@pytest.mark.parametrize("spec, parsed", [
    (None, ByzantineSpec("off")), ("", ByzantineSpec("off")), ("off", ByzantineSpec("off")),
    ("scale:3", ByzantineSpec("scale", 3.0)), ("scale:-1", ByzantineSpec("scale", -1.0)),
    ("noise:0", ByzantineSpec("noise", 0.0)), ("labelflip", ByzantineSpec("labelflip")),
    ("signflip", ByzantineSpec("signflip")), ("signflip:2.5", ByzantineSpec("signflip", 2.5)),
    ("alie", ByzantineSpec("alie")), ("alie:-0.5", ByzantineSpec("alie", -0.5)),
    ("ipm", ByzantineSpec("ipm")), ("ipm:10", ByzantineSpec("ipm", 10.0)),
    ("abuse", ByzantineSpec("abuse")), ("abuse:400", ByzantineSpec("abuse", 400.0)),
])
def test_valid_specs(spec, parsed):
    assert ByzantineSpec.parse(spec) == parsed


@pytest.mark.parametrize("spec, problem", [
    ("flip", "unknown attack"), ("scale", "scale:F needs"), ("scale:x", "scale:F needs"), ("scale:inf", "scale:F needs"),
    ("noise:-1", "noise:S needs"), ("noise:nan", "noise:S needs"), ("labelflip:1", "takes no parameter"),
    ("signflip:0", r"signflip\[:F\] needs"), ("signflip:", r"signflip\[:F\] needs"), ("alie:inf", r"alie\[:Z\] needs"),
    ("ipm:-0.1", r"ipm\[:EPS\] needs"), ("abuse:0", r"abuse\[:RATE\] needs"),
])
def test_bad_specs_say_what_is_wrong_and_what_is_valid(spec, problem):
    with pytest.raises(RobustError, match=problem) as info:
        ByzantineSpec.parse(spec)
    assert str(spec) in str(info.value)
    if problem == "unknown attack":
        assert "off, scale:F, noise:S, labelflip, signflip[:F], alie[:Z], ipm[:EPS], abuse[:RATE]" in str(info.value)


def test_label_flipping_poisons_data_and_gossips_honestly():
    for spec in ("labelflip", "off", "abuse:50"):  # abuse attacks the protocol (p2pfl.core.abuse), not the model
        assert parse_byzantine(spec) is None
    assert flips_labels("labelflip") and not flips_labels("scale:2") and not flips_labels(None)
    assert not flips_labels("abuse")
    with pytest.raises(RobustError, match="unknown attack"):
        flips_labels("labelflop")


# ------------------------------------------------------------------------ the data hook


def test_flipped_labels_mirror_the_training_labels_only():
    names = ("a", "b", "c", "d")
    train = Split(torch.zeros(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 3]), names, ())
    test = Split(torch.zeros(2, 3, 2, 2), torch.tensor([0, 2]), names, ())
    data = PeerData(train, test, test, "shape", "clean", 0, np.arange(7))
    out = flipped_labels(data)
    assert out.train.labels.tolist() == [3, 2, 1, 0, 0]  # y -> C-1-y, C = 4
    assert out.test is test and out.global_test is test and out.train.images is train.images
    assert train.labels.tolist() == [0, 1, 2, 3, 3]  # the (possibly cached) original is untouched


def test_trainer_with_label_flip_learns_flipped_labels():
    cfg = TrainerConfig(samples_per_peer=96, global_test_size=60, partition="dirichlet:0.5", seed=2)
    honest, flipper = Trainer(cfg, 1, 4), Trainer(cfg, 1, 4, label_flip=True)
    c = len(honest.data.train.class_names)
    assert torch.equal(flipper.data.train.labels, c - 1 - honest.data.train.labels)
    assert torch.equal(flipper.data.test.labels, honest.data.test.labels)
    assert flipper.unseen_classes == sorted(c - 1 - k for k in honest.unseen_classes)


# ------------------------------------------------------------------------ small networks

KIND, N, BAD, ROUNDS, DIM, SEED = "exponential", 8, 3, 20, 512, 5
# spec -> whether it grows without bound under plain gossip: the attacker's distance to its
# neighbours' mean grows by about 1 + e - w per round, e its push away (scale: F - 1; signflip:
# F (1 - w_ii) = 5/6; ipm: eps) and w = 1/6 the MH weight that pulls it back.
GROWS = {"scale:3": True, "noise:1": False, "signflip": True, "alie": False, "ipm": False, "ipm:1": True}


def honest_deviation(attack: str | None, robust: str) -> float:
    """Honest peers' RMS distance from their initial mean after ROUNDS of pure averaging, in units
    of their initial consensus distance (1 at the start). `attack` None: the attacker is absent
    (down from the start, so the honest peers average among themselves)."""
    topo = T.generate(KIND, N)
    x0 = {p: synthetic_state(SEED, p, DIM) for p in topo.ids}  # coordinates of std ~1
    net = EngineNetwork(topo, x0, seed=SEED, wire=False)  # the mixing rules alone: the wire path is tested elsewhere
    for e in net.engines.values():
        e.robust, e.guard = RobustSpec.parse(robust), NormGuard(0)  # the mixing rule alone
    fn = parse_byzantine(attack) if attack is not None else None
    live = set(topo.ids) - ({BAD} if attack is None else set())
    bad: ChocoEngine = net.engines[BAD]
    for rnd in range(ROUNDS):
        if fn is not None:  # what the node does before every delta
            bad.x = fn(bad.x, bad.xhat, rnd, [bad.replicas[j].xhat for j in topo.neighbors(BAD)])
        net.step(live=live)
    honest = [p for p in topo.ids if p != BAD]
    d0, m0 = exact_distance([x0[p] for p in honest]), network_mean([x0[p] for p in honest])
    return math.sqrt(sum(float(((flatten(net.engines[p].x).double() - m0) ** 2).sum()) for p in honest) / len(honest)) / d0


@pytest.fixture(scope="module")
def alone() -> float:
    return honest_deviation(None, "off")


@pytest.mark.parametrize("attack", list(GROWS))
def test_each_attack_harms_plain_gossip_and_robust_mixing_bounds_it(attack, alone):
    # Without the attacker the honest subgraph (connected) averages to its own mean.
    assert alone < 1e-3
    plain = honest_deviation(attack, "off")
    assert plain > alone  # harm: the honest peers no longer reach their own mean
    if GROWS[attack]:
        assert plain > 1  # farther from their mean than they started: gossip is undone
    for robust in ("clip", "trimmed:1", "median"):
        # A rule that bounds one neighbour's pull per round by the honest spread keeps the honest
        # peers contracting, whatever the attacker sends (degree 5 >= 2B for trimmed:1).
        assert honest_deviation(attack, robust) < 1, robust


def test_label_flipping_hurts_plain_gossip_more_than_median_mixing():
    """Complete graph of 3, peer 0 trains on flipped labels: the honest peers' accuracy drop against
    the attack-free run with the same mixing rule is larger with plain gossip than with the median."""
    rounds = 3
    cfg = TrainerConfig(samples_per_peer=128, global_test_size=200, batch_size=16, local_steps=5, eval_every=rounds)
    topo = T.generate("complete", 3)

    def honest_accuracy(robust: str, flip: bool) -> float:
        trainers = {p: Trainer(cfg, p, 3, label_flip=flip and p == 0) for p in topo.ids}
        sim = train_network(topo, trainers, rounds, sketch_dim=0, robust=robust)
        return float(np.mean([sim.records[p][-1]["global_accuracy"] for p in (1, 2)]))

    harm = {r: honest_accuracy(r, False) - honest_accuracy(r, True) for r in ("off", "median")}
    assert harm["off"] > 0
    assert harm["median"] < harm["off"]
