"""Peer datasets and partitioners, computed by every peer alone.

There is no coordinator: each peer regenerates the same global pool from the run seed, runs the
same deterministic partitioner over its labels, and keeps its own share, so shares are disjoint
and cover the pool without any message. Sources: the shapes world (tasks x domain shifts), sklearn
digits, and a user folder ``root/peer-<id>/<class_name>/*.png``. A caption peer's images come with
one caption each (shapes: the pretraining's caption grammar, held-out pairs never drawn; digits:
the prompt templates; folders: ``captions.tsv``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from p2pfl.config import dataset_key
from p2pfl.learn import shapes
from p2pfl.learn.options import (
    DataError,
    check_task,
    dataset_kind,
    parse_domain,
    parse_groups,
    parse_partition,
)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a picture of a {}.")


@dataclass(frozen=True)
class Split:
    """Images in [0, 1] (n, 3, h, w), labels into ``class_names``, prompt templates for the head."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PeerData:
    train: Split
    test: Split
    global_test: Split
    task: str
    domain: str
    group: int  # planted cluster (task/domain group); 0 unless partition is "groups:..."
    share: np.ndarray  # this peer's indices into its (group's) global pool, train and test
    captions: tuple[str, ...] = ()  # a caption peer's: one per training image (else empty)


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent deterministic stream per (seed, purpose, ...)."""
    return np.random.default_rng([seed, *(k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys)])


# ---------------------------------------------------------------- partitioners (pure)


def partition(labels: np.ndarray, n_peers: int, scheme: str, seed: int, min_size: int = 4) -> list[np.ndarray]:
    """Disjoint index sets, one per peer, over ``labels``: "iid", "dirichlet:A" or "classes:K"."""
    if n_peers < 1:
        raise DataError(f"n_peers: {n_peers} must be >= 1")
    labels = np.asarray(labels)
    rng = rng_for(seed, "partition", scheme)
    kind, value = parse_partition(scheme)
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_peers)]
    if kind == "dirichlet":
        return _dirichlet(labels, n_peers, value, rng, min_size)
    return _k_classes(labels, n_peers, int(value), rng)


def _dirichlet(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator, min_size: int) -> list[np.ndarray]:
    """Per class, split its samples across peers in Dirichlet(alpha) proportions (Hsu et al. 2019)."""
    classes = np.unique(labels)
    min_size = min(min_size, len(labels) // n)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:  # still too small: top up from the largest share, keeping shares disjoint
        for p in range(n):
            while len(parts[p]) < min_size:
                big = max(range(n), key=lambda q: len(parts[q]))
                parts[p].append(parts[big].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _k_classes(labels: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Peer i holds k classes (round-robin over a seeded class order); a class is shared evenly."""
    classes = rng.permutation(np.unique(labels))
    k = min(k, len(classes))
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for p in range(n):
        for j in range(k):
            owners[int(classes[(p * k + j) % len(classes)])].append(p)
    parts: list[list[int]] = [[] for _ in range(n)]
    for c, peers in owners.items():
        if peers:
            for p, chunk in zip(peers, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(peers)), strict=True):
                parts[p].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def group_of(peer_id: int, n_peers: int, n_groups: int) -> int:
    """Contiguous blocks of peers form the planted groups."""
    return peer_id * n_groups // n_peers


def label_entropy(labels: np.ndarray, n_classes: int) -> float:
    """Shannon entropy (nats) of a label histogram: low = skewed share."""
    p = np.bincount(labels, minlength=n_classes) / max(1, len(labels))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def train_test_split(idx: np.ndarray, test_fraction: float, seed: int, peer_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-peer held-out split of the peer's own share."""
    perm = rng_for(seed, "split", peer_id).permutation(idx)
    n_test = round(len(perm) * test_fraction) if len(perm) > 1 else 0
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ---------------------------------------------------------------- sources (I/O-free except folders)


def shapes_pool(task: str, domain: str, n: int, seed: int, pairs: str = "all") -> tuple[shapes.Scenes, np.ndarray]:
    """A global pool of scene parameters (cheap) and its labels for ``task``; ``pairs="seen"``
    leaves out the held-out shape x colour pairs (`shapes.sample_attributes`)."""
    check_task(task)
    dom = parse_domain(domain)
    scenes = shapes.sample_scenes(rng_for(seed, "pool", task, dom.name), n, pairs, dom)
    return scenes, scenes.attrs[:, shapes.ATTRIBUTES.index(task)]


def shapes_split(scenes: shapes.Scenes, labels: np.ndarray, task: str, domain: str, render_seed: int) -> Split:
    dom = parse_domain(domain)
    images = torch.from_numpy(shapes.render(scenes, dom, seed=render_seed))
    return Split(images, torch.from_numpy(labels).long(), shapes.VALUES[task], shapes.TEMPLATES[task])


def digits_arrays(domain: str, seed: int, size: int = shapes.IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """sklearn's 8x8 digits (1797, a real dataset bundled with sklearn) upsampled to ``size``, RGB."""
    from sklearn.datasets import load_digits

    dom = parse_domain(domain, "digits")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    x = torch.from_numpy(shapes.pixel_shift(x.numpy(), dom, rng_for(seed, "digits-pixels")))
    return x, d.target.astype(np.int64)


def load_image_folder(root: str | Path, size: int) -> Split:
    """``root/<class_name>/*.png`` via torchvision's ImageFolder; images resized to ``size``."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder: {str(root)!r} is not a directory")
    tf = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    ds = ImageFolder(str(root), transform=tf, loader=_rgb_loader)
    images = torch.stack([ds[i][0] for i in range(len(ds))]) if len(ds) else torch.zeros(0, 3, size, size)
    names = tuple(c.replace("_", " ") for c in ds.classes)
    return Split(images, torch.tensor(ds.targets, dtype=torch.long), names, ())


def read_captions(path: Path) -> dict[str, str]:
    """``captions.tsv``: one ``file name<TAB>caption`` a line (blank lines and ``#`` comments skipped)."""
    if not path.is_file():
        raise DataError(f"captions: {str(path)!r} not found (a caption peer needs one 'file name<TAB>caption' line per image)")
    out: dict[str, str] = {}
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, tab, text = line.partition("\t")
        if not tab or not name.strip() or not text.strip():
            raise DataError(f"captions: {path}:{k}: expected 'file name<TAB>caption', got {line!r}")
        out[name.strip()] = text.strip()
    return out


def folder_captions(root: Path) -> tuple[str, ...]:
    """The caption of every image of ``root`` (`load_image_folder`'s order) from ``root/captions.tsv``,
    found by its path relative to ``root`` (``cat/001.png``) or, failing that, its file name."""
    from torchvision.datasets import ImageFolder

    table = read_captions(root / "captions.tsv")
    out = []
    for path, _ in ImageFolder(str(root), loader=_rgb_loader).samples:
        rel = Path(path).relative_to(root)
        text = table.get(rel.as_posix(), table.get(rel.name))
        if text is None:
            raise DataError(f"captions: {root / 'captions.tsv'} has no caption for {rel.as_posix()!r}")
        out.append(text)
    return tuple(out)


def _rgb_loader(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------- one peer's view


def _take(split: Split, idx: np.ndarray) -> Split:
    t = torch.from_numpy(idx)
    return replace(split, images=split.images[t], labels=split.labels[t])


def flipped_labels(data: PeerData) -> PeerData:
    """``data`` with training labels y -> C-1-y (C classes), test splits untouched: the data of a
    label-flipping Byzantine peer (`--byzantine labelflip`). The labels are a new tensor, since a
    split may share its tensors with the process cache."""
    train = data.train
    return replace(data, train=replace(train, labels=len(train.class_names) - 1 - train.labels))


# What every peer of a run (or planted group) computes identically: cached per process, so peers
# hosted together hold the global test set and the pool once and regenerate nothing. Callers
# must not modify what these return.
_CACHE_SIZE = 8


@lru_cache(maxsize=_CACHE_SIZE)
def _shapes_shares(task: str, domain: str, n: int, seed: int, members: int, scheme: str,
                   pairs: str = "all") -> tuple[shapes.Scenes, np.ndarray, tuple[np.ndarray, ...]]:
    """The scene pool, its labels and every member's share of it."""
    scenes, labels = shapes_pool(task, domain, n, seed, pairs)
    return scenes, labels, tuple(partition(labels, members, scheme, seed))


@lru_cache(maxsize=_CACHE_SIZE)
def _shapes_global(task: str, domain: str, n: int, seed: int, render_seed: int) -> Split:
    scenes, labels = shapes_pool(task, domain, n, seed)
    return shapes_split(scenes, labels, task, domain, render_seed)


@lru_cache(maxsize=_CACHE_SIZE)
def _digits_shares(domain: str, seed: int, size: int, global_test_size: int, members: int, scheme: str,
                   part_seed: int) -> tuple[Split, Split, tuple[np.ndarray, ...]]:
    """All digits, the global test split and every member's share (indices into all digits)."""
    images, labels = digits_arrays(domain, seed, size)
    perm = rng_for(seed, "digits-global").permutation(len(labels))
    n_global = min(global_test_size, len(labels) // 2)  # the rest is shared out among peers
    g_idx, pool = np.sort(perm[:n_global]), np.sort(perm[n_global:])
    full = Split(images, torch.from_numpy(labels), DIGIT_NAMES, DIGIT_TEMPLATES)
    return full, _take(full, g_idx), tuple(pool[p] for p in partition(labels[pool], members, scheme, part_seed))


@lru_cache(maxsize=_CACHE_SIZE)
def composition_test(domain: str, seed: int, size: int, pairs: str = "unseen") -> Split:
    """Held-out compositions: scenes of the shape x colour pairs that pretraining never showed and
    caption peers never draw, labelled by their 64-way pair "{colour} {shape}" (`shapes.PAIR_NAMES`).
    No peer trains on this label space, so accuracy on it is zero-shot: it measures what adapting
    the text tower does to composing attributes. ``pairs="seen"`` draws the other pairs instead,
    the seen half of compositional zero-shot learning's seen/unseen pair, which tells binding the
    pairs a peer trained on from composing new ones."""
    if pairs not in ("seen", "unseen"):
        raise DataError(f"compositions: pairs {pairs!r} is not seen or unseen")
    dom = parse_domain(domain)
    keys = ("compositions", dom.name) if pairs == "unseen" else ("compositions", dom.name, pairs)
    scenes = shapes.sample_scenes(rng_for(seed, *keys), size, pairs, dom)
    labels = scenes.attrs[:, 0] * len(shapes.COLOURS) + scenes.attrs[:, 1]
    images = torch.from_numpy(shapes.render(scenes, dom, seed=int(rng_for(seed, "compositions-render").integers(2**31))))
    return Split(images, torch.from_numpy(labels), shapes.PAIR_NAMES, shapes.TEMPLATES["shape"])


def global_test(dataset: str, task: str, domain: str, seed: int, size: int, image_size: int = shapes.IMAGE_SIZE) -> Split | None:
    """The global test set of one dataset of a run (`config.dataset_key`), as its own peers hold it
    (group 0's under a ``groups:`` partition), so any peer can be evaluated on another peer's task;
    None for a folder without ``test/``."""
    dataset, task, domain = dataset_key(dataset, task, domain)
    source = dataset_kind(dataset)
    if source == "shapes":
        return _shapes_global(task, domain, size, seed + 7919, seed + 7919)
    if source == "digits":
        return _digits_shares(domain, seed, image_size, size, 1, "iid", seed)[1]
    path = Path(dataset.removeprefix("folder:")) / "test"
    return load_image_folder(path, image_size) if path.is_dir() else None


def clear_caches() -> None:
    """Drop the per-process pools and global test sets (peers holding them keep theirs)."""
    for f in (_shapes_shares, _shapes_global, _digits_shares, composition_test):
        f.cache_clear()


def load_peer_data(
    dataset: str,
    task: str,
    domain: str,
    partition_scheme: str,
    peer_id: int,
    n_peers: int,
    seed: int,
    samples_per_peer: int = 256,
    test_fraction: float = 0.25,
    global_test_size: int = 500,
    image_size: int = shapes.IMAGE_SIZE,
    cache: bool = True,
    kind: str = "labelled",
) -> PeerData:
    """This peer's train/test share plus the global test set, from (seed, peer id, n peers) alone.

    With ``cache`` what all peers share comes from (and stays in) the process cache; without it
    everything is computed afresh and held by this peer alone. A ``kind="captions"`` peer also
    gets a caption per training image; its shapes pool leaves out the held-out pairs.
    """
    if not 0 <= peer_id < n_peers:
        raise DataError(f"peer_id: {peer_id} not in [0, {n_peers})")
    source = dataset_kind(dataset)
    domain = dataset_key(dataset, task, domain)[2]
    captions = kind == "captions"
    group, members, rank = 0, n_peers, peer_id
    scheme = partition_scheme
    if partition_scheme.startswith("groups:"):
        key, values = parse_groups(partition_scheme)
        group = group_of(peer_id, n_peers, len(values))
        members = sum(group_of(p, n_peers, len(values)) == group for p in range(n_peers))
        rank = peer_id - min(p for p in range(n_peers) if group_of(p, n_peers, len(values)) == group)
        task, domain = (values[group], domain) if key == "task" else (task, values[group])
        scheme = "iid"
    if source == "folder":
        return _folder_peer(dataset.removeprefix("folder:"), peer_id, seed, test_fraction, image_size, task, domain, captions)
    if source == "shapes":
        shares, global_split = (_shapes_shares, _shapes_global) if cache else (_shapes_shares.__wrapped__, _shapes_global.__wrapped__)
        scenes, labels, parts = shares(task, domain, samples_per_peer * members, seed + 1000 * group, members, scheme,
                                       "seen" if captions else "all")
        share = parts[rank]
        tr, te = train_test_split(share, test_fraction, seed, peer_id)
        rs = int(rng_for(seed, "render", peer_id).integers(2**31))
        texts = shapes.sample_captions(rng_for(seed, "captions", peer_id), scenes.attrs[tr])[0] if captions else ()
        return PeerData(
            shapes_split(scenes.subset(tr), labels[tr], task, domain, rs),
            shapes_split(scenes.subset(te), labels[te], task, domain, rs + 1),
            global_split(task, domain, global_test_size, seed + 7919 + 1000 * group, seed + 7919),
            task, domain, group, share, tuple(texts),
        )
    digits = _digits_shares if cache else _digits_shares.__wrapped__
    full, global_test, parts = digits(domain, seed, image_size, global_test_size, members, scheme, seed + 1000 * group)
    share = parts[rank]
    tr, te = train_test_split(share, test_fraction, seed, peer_id)
    texts = digit_captions(full.labels[tr].numpy(), rng_for(seed, "captions", peer_id)) if captions else ()
    return PeerData(_take(full, tr), _take(full, te), global_test, "digit", domain, group, share, texts)


def digit_captions(labels: np.ndarray, rng: np.random.Generator) -> tuple[str, ...]:
    """A caption per digit image: its name in one of the digit prompt templates, drawn at random."""
    forms = rng.integers(0, len(DIGIT_TEMPLATES), len(labels))
    return tuple(shapes.fix_articles(DIGIT_TEMPLATES[f].format(DIGIT_NAMES[y])) for f, y in zip(forms, labels, strict=True))


def _folder_peer(root: str, peer_id: int, seed: int, test_fraction: float, size: int, task: str, domain: str,
                 captions: bool) -> PeerData:
    """Own images from ``root/peer-<id>`` (with ``captions.tsv`` for a caption peer); the global
    test set is ``root/test`` when present."""
    mine = Path(root) / f"peer-{peer_id}"
    own = load_image_folder(mine, size)
    tr, te = train_test_split(np.arange(len(own)), test_fraction, seed, peer_id)
    gpath = Path(root) / "test"
    glob = load_image_folder(gpath, size) if gpath.is_dir() else _take(own, te)
    texts = tuple(np.array(folder_captions(mine), dtype=object)[tr]) if captions else ()
    return PeerData(_take(own, tr), _take(own, te), glob, task, domain, 0, np.arange(len(own)), texts)
