"""Shapes world, partitioners and peer datasets: determinism, disjointness, skew, loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from p2pfl.learn import shapes
from p2pfl.learn.data import (
    DataError,
    clear_caches,
    group_of,
    label_entropy,
    load_image_folder,
    load_peer_data,
    partition,
)

LABELS = np.random.default_rng(3).integers(0, 8, size=1200)


def test_render_is_deterministic_and_in_range():
    a = shapes.sample_scenes(np.random.default_rng(1), 16, domain=shapes.parse_domain("clutter+noise"))
    b = shapes.sample_scenes(np.random.default_rng(1), 16, domain=shapes.parse_domain("clutter+noise"))
    dom = shapes.parse_domain("noise+clutter+blur")
    x, y = shapes.render(a, dom, seed=5), shapes.render(b, dom, seed=5)
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert np.array_equal(x, y)
    assert x.min() >= 0 and x.max() <= 1
    assert not np.array_equal(x, shapes.render(a, dom, seed=6))  # pixel noise follows the seed


def test_shape_is_drawn_in_its_colour():
    s = shapes.sample_scenes(np.random.default_rng(0), 64)
    img = shapes.render(s)
    # the pixel at the shape's centre of mass region: the most saturated pixel has the shape's colour
    flat = img.reshape(64, 3, -1)
    sat = flat.max(1) - flat.min(1)
    best = flat[np.arange(64), :, sat.argmax(1)]
    dist = ((best[:, None, :] - shapes.COLOUR_RGB[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == s.attrs[:, 1]).mean() > 0.9


def test_held_out_pairs_never_seen_and_only_unseen():
    rng = np.random.default_rng(0)
    seen = shapes.sample_attributes(rng, 4000, "seen")
    unseen = shapes.sample_attributes(rng, 500, "unseen")
    assert not any((s, c) in shapes.HELD_OUT_PAIRS for s, c in seen[:, :2])
    assert all((s, c) in shapes.HELD_OUT_PAIRS for s, c in unseen[:, :2])
    assert len({c for _, c in shapes.HELD_OUT_PAIRS}) == len(shapes.COLOURS)  # each colour held out once


def test_captions_describe_their_scene():
    rng = np.random.default_rng(0)
    attrs = shapes.sample_attributes(rng, 200)
    texts, mentions = shapes.sample_captions(rng, attrs)
    compat = shapes.compatibility(attrs, mentions)
    assert compat.diagonal().all()
    for t, m in zip(texts, mentions, strict=True):
        for k, v in enumerate(m):
            if v >= 0:
                assert shapes.VALUES[shapes.ATTRIBUTES[k]][v] in t
    assert shapes.caption([3, 1, None, None, None]) == "an orange star."
    assert shapes.fix_articles("a {} shape.".format("orange")) == "an orange shape."


def test_parse_domain_rejects_unknown():
    assert shapes.parse_domain("noise+rotation").full_rotation
    with pytest.raises(ValueError, match="sepia"):
        shapes.parse_domain("noise+sepia")


def _check_disjoint(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx))
    assert allidx.min() >= 0 and allidx.max() < n


@settings(max_examples=25, deadline=None)
@given(
    n_peers=st.integers(1, 12),
    scheme=st.sampled_from(["iid", "dirichlet:0.1", "dirichlet:1", "dirichlet:100", "classes:1", "classes:3"]),
    seed=st.integers(0, 2**16),
)
def test_partitions_deterministic_disjoint_covering(n_peers, scheme, seed):
    a = partition(LABELS, n_peers, scheme, seed)
    b = partition(LABELS, n_peers, scheme, seed)
    assert len(a) == n_peers
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    _check_disjoint(a, len(LABELS))
    k = int(scheme.split(":")[1]) if scheme.startswith("classes") else None
    if k is None or n_peers * k >= 8:  # every class has an owner: the shares cover the pool
        assert sum(len(p) for p in a) == len(LABELS)
    if k is not None:
        assert all(len(np.unique(LABELS[p])) <= k for p in a)


def test_classes_k_gives_each_peer_k_classes():
    parts = partition(LABELS, 8, "classes:2", seed=1)
    assert [len(np.unique(LABELS[p])) for p in parts] == [2] * 8


def test_dirichlet_alpha_controls_label_skew():
    def mean_entropy(alpha: float) -> float:
        parts = partition(LABELS, 10, f"dirichlet:{alpha}", seed=0)
        return float(np.mean([label_entropy(LABELS[p], 8) for p in parts]))

    low, high = mean_entropy(0.05), mean_entropy(100)
    assert low < 0.8 < np.log(8) - 0.1 < high  # near one class each vs near uniform


def test_bad_partition_specs():
    for bad in ["zipf", "dirichlet:x", "dirichlet:-1", "classes:0"]:
        with pytest.raises(DataError):
            partition(LABELS, 4, bad, 0)
    with pytest.raises(DataError, match="groups"):
        load_peer_data("shapes", "shape", "clean", "groups:colour=1,2", 0, 4, 0)


def test_peer_shares_are_disjoint_and_reproducible():
    n = 4
    peers = [load_peer_data("shapes", "shape", "noise", "dirichlet:0.5", p, n, seed=7, samples_per_peer=48,
                            global_test_size=20) for p in range(n)]
    _check_disjoint([p.share for p in peers], 48 * n)
    again = load_peer_data("shapes", "shape", "noise", "dirichlet:0.5", 2, n, seed=7, samples_per_peer=48,
                           global_test_size=20)
    assert torch.equal(again.train.images, peers[2].train.images)
    assert torch.equal(peers[0].global_test.images, peers[3].global_test.images)  # one global test set
    p = peers[1]
    assert len(p.train) + len(p.test) == len(p.share) and len(p.global_test) == 20
    assert p.train.class_names == shapes.SHAPES and p.train.images.shape[1:] == (3, 32, 32)


def test_task_groups_plant_clusters():
    n = 6
    peers = [load_peer_data("shapes", "shape", "clean", "groups:task=shape,colour", p, n, 0,
                            samples_per_peer=16, global_test_size=8) for p in range(n)]
    assert [p.group for p in peers] == [0, 0, 0, 1, 1, 1] == [group_of(i, n, 2) for i in range(n)]
    assert {p.task for p in peers[:3]} == {"shape"} and {p.task for p in peers[3:]} == {"colour"}
    assert peers[4].train.class_names == shapes.COLOURS
    dom = [load_peer_data("shapes", "colour", "clean", "groups:domain=clean,rotation+noise", p, 4, 0,
                          samples_per_peer=8, global_test_size=4).domain for p in range(4)]
    assert dom == ["clean", "clean", "rotation+noise", "rotation+noise"]


def test_digits_partition():
    peers = [load_peer_data("digits", "digit", "clean", "classes:3", p, 5, seed=0, global_test_size=300)
             for p in range(5)]
    _check_disjoint([p.share for p in peers], 1797)
    p = peers[0]
    assert p.train.class_names[3] == "three" and p.train.images.shape[1:] == (3, 32, 32)
    assert len(np.unique(np.concatenate([p.train.labels.numpy(), p.test.labels.numpy()]))) <= 3
    assert set(p.global_test.labels.tolist()) == set(range(10))
    with pytest.raises(DataError, match="digits"):
        load_peer_data("digits", "digit", "rotation", "iid", 0, 2, 0)


def _same_split(a, b) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            and (a.class_names, a.templates) == (b.class_names, b.templates))


@pytest.mark.parametrize("args", [
    ("shapes", "shape", "noise", "dirichlet:0.5", 6),
    ("shapes", "shape", "clean", "groups:task=shape,colour", 6),  # one cache entry per group
    ("digits", "digit", "clean", "classes:3", 5),
])
def test_process_cache_gives_the_uncached_splits_and_holds_shared_parts_once(args):
    dataset, task, domain, scheme, n = args
    kw = dict(samples_per_peer=24, global_test_size=40)
    clear_caches()
    cached = [load_peer_data(dataset, task, domain, scheme, p, n, 7, **kw) for p in range(n)]
    fresh = [load_peer_data(dataset, task, domain, scheme, p, n, 7, **kw, cache=False) for p in range(n)]
    for c, f in zip(cached, fresh, strict=True):
        assert _same_split(c.train, f.train) and _same_split(c.test, f.test) and _same_split(c.global_test, f.global_test)
        assert np.array_equal(c.share, f.share) and (c.task, c.domain, c.group) == (f.task, f.domain, f.group)
    for c in cached:  # peers of a group hold one global test set; uncached peers each their own
        first = next(o for o in cached if o.group == c.group)
        assert c.global_test is first.global_test
    assert fresh[0].global_test is not fresh[1].global_test
    group0 = np.concatenate([c.share for c in cached if c.group == 0])
    assert len(np.unique(group0)) == len(group0)  # each peer took its own share of the cached partition
    clear_caches()


def test_image_folder_loader(tmp_path):
    colours = {"red_thing": (255, 0, 0), "blue_thing": (0, 0, 255)}
    for name, rgb in colours.items():
        d = tmp_path / "peer-1" / name
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20 + i, 17), rgb).save(d / f"{i}.png")
    split = load_image_folder(tmp_path / "peer-1", size=32)
    assert split.class_names == ("blue thing", "red thing")
    assert split.images.shape == (8, 3, 32, 32)
    red = split.images[split.labels == 1]
    assert torch.allclose(red[:, 0], torch.ones(1)) and torch.allclose(red[:, 2], torch.zeros(1))
    peer = load_peer_data(f"folder:{tmp_path}", "", "", "iid", 1, 3, seed=0, test_fraction=0.25)
    assert len(peer.train) == 6 and len(peer.test) == 2 and peer.global_test.class_names == split.class_names
    with pytest.raises(DataError):
        load_peer_data(f"folder:{tmp_path}", "", "", "iid", 2, 3, seed=0)
