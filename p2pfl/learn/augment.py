"""Zero-shot data augmentation: synthesise samples of a peer's under-represented classes.

Under strong label skew a peer sees some classes rarely or never; local steps on its own labels
then pull the shared adapter towards those labels and its accuracy on the rest lags. Zero-shot
data augmentation (Hao et al., "Towards Fair Federated Learning with Zero-Shot Data
Augmentation", CVPR 2021 workshops) synthesises data for what a peer lacks from the model alone,
so no peer shares data. Here a peer synthesises, at the start of each round and from its current
(already gossip-mixed) model, a few samples of every class below ``threshold`` of its uniform
share, caches them for the round, and mixes them into its batches with a stated loss weight.
The label space and the class logits are CLIP's zero-shot heads (cosine similarity to frozen
text embeddings of class prompts), which is what lets a peer name and target classes it never
saw (federated zero-shot learning with CLIP semantics, Sun et al., 2022).

Two synthesis methods, chosen by the image tower:

* **BatchNorm towers** (open_clip ``ModifiedResNet``, e.g. ``shapes-clip-rn``): image-space
  DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020), the generator-free form of
  ZSDA's synthesis. Pixels ``x`` (in the model's normalised input space, kept inside the valid
  pixel range) minimise ``CE(logits(x), c) + a_bn * sum_l (||mu_l(x) - running_mean_l||_2 +
  ||var_l(x) - running_var_l||_2) + a_tv * TV(x) + a_l2 * mean(x^2) + a_anchor (1 - cos(f(x),
  a_{c,j}))`` over every BN layer ``l`` of the image tower, with random jitter (roll by up to 2 px)
  each step. The running statistics stored in the frozen BN layers stand in for the pretraining
  data; the anchor term is the feature-space method's text anchor (below), which pulls the image
  embedding to where the peer's real images of a class would lie rather than just past the
  decision boundary. Two image priors keep a short optimisation on the image manifold: pixels
  are optimised at ``image_res`` (8x8) and bilinearly upsampled (a smooth parameterisation, cf.
  Mordvintsev et al., "Differentiable Image Parameterizations", Distill 2018), and they start at
  the normalisation mean (the pretraining data's mean colour) with small noise, not from white
  noise: white-noise starts at full resolution give images a teacher finds confident but that are
  noise with coloured blobs to the eye, and training on them hurts (docs/experiments.md).

* **LayerNorm towers** (ViT): no running statistics exist, so synthesis happens in feature space,
  anchored on the text embeddings of the class prompts (CLIP's aligned space). The variable is the
  ViT's patch-embedding map ``e`` (output of ``visual.conv1``, shape ``(k, width, gh, gw)``), which
  the remaining frozen tower and every LoRA-adapted block consume, so training on it reaches
  the same adapter weights as training on images. Steps:

  1. prior: per-channel mean ``mu`` and std ``sigma`` of ``conv1`` outputs over the peer's own
     images (class-agnostic; ``conv1`` is frozen, so this is fixed per peer);
  2. anchors: for class ``c``, ``a_c = normalise(t_c + g)`` where ``t_c`` is the class's prompt
     embedding and ``g`` the modality gap measured on the peer's own images,
     ``g = mean_i (z_i - t_{y_i})`` (image and text embeddings of CLIP occupy offset cones; Liang
     et al., NeurIPS 2022); per-sample targets ``a_{c,j} = normalise(a_c + s * xi_j)``, with
     ``xi_j ~ N(0, I)`` and ``s`` the per-dimension RMS spread of the peer's image embeddings
     around their anchors, give diversity;
  3. ``e = mu + sigma * eps`` then Adam on ``CE(s_logit cos(f(e), T), c) + a_anchor (1 -
     cos(f(e), a_{c,j})) + a_stat (||mean(e) - mu||^2 + ||std(e) - sigma||^2) / width +
     a_l2 mean(((e - mu) / sigma)^2)`` (the statistics term is the LayerNorm-tower analogue of
     DeepInversion's BN matching, with statistics the peer estimates from its own images).

In both methods a sample stops moving once the model gives its class probability
``confidence`` (1.0 = optimise to convergence as DeepInversion does; the trainer's defaults per
method are ``METHOD_DEFAULTS``: 0.6 in feature space, 1.0 for images). Samples
synthesised from the very model that then trains on them carry almost no gradient when driven to
certainty (docs/experiments.md has the runs). Samples left near the decision boundary (cf.
boundary-supporting samples, Heo et al., AAAI 2019) keep each missing class's region from
shrinking while local steps pull the adapter towards the peer's own labels.

Which model synthesises: samples made by the very model that then trains on them add nothing that
model does not already hold. In a decentralized run a peer holds exact replicas ``xhat_j`` of its
neighbours' public models (CHOCO), and the neighbours trained on the classes it lacks, so the
trainer (``Trainer.set_teachers``) synthesises each class with the neighbour that claims it most
(``assign_teachers``), optionally distilling that neighbour's soft labels (``SyntheticSet.probs``):
data-free knowledge transfer from neighbours (cf. FedFTG, Zhang et al. CVPR 2022; DENSE, Zhang et
al. NeurIPS 2022), with no extra communication.

Everything is seeded by (run seed, peer id, round), so a round's synthetic set is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.learn.foundation import Foundation
from p2pfl.learn.model import has_resnet_tower
from p2pfl.learn.options import AugmentError, check_synthesis


@dataclass(frozen=True)
class SynthesisConfig:
    """Knobs of both synthesis methods (defaults measured on the shapes world, 32x32)."""

    per_class: int = 4  # synthetic samples per under-represented class per round
    steps: int = 60  # optimisation steps per round's synthesis (the trainer uses METHOD_DEFAULTS)
    lr: float = 0.1
    # A sample stops moving once the model gives its class this probability: samples near the
    # decision boundary still carry a training signal, over-optimised ones (p ~ 1) carry none.
    confidence: float = 0.6
    # image space (DeepInversion)
    bn_weight: float = 0.05
    tv_weight: float = 1e-2
    l2_weight: float = 1e-4
    jitter: int = 2
    image_res: int = 8  # pixels are optimised at this resolution and upsampled (0 = the model's)
    init_std: float = 0.2  # start: the normalisation mean plus noise of this std (normalised units)
    # text anchor (both methods) and feature space
    anchor_weight: float = 1.0
    stat_weight: float = 1.0
    feature_l2_weight: float = 1e-2

    def __post_init__(self) -> None:
        check_synthesis(self.per_class, self.steps, self.confidence)
        if self.lr <= 0 or self.image_res < 0:
            raise AugmentError(f"synthesis: lr {self.lr} (> 0) / image_res {self.image_res} (>= 0) invalid")


@dataclass(frozen=True)
class MethodDefaults:
    """What the trainer uses per method unless told otherwise (measured on bench/fairness.py)."""

    steps: int
    confidence: float
    claim: float  # see assign_teachers


# Images are optimised to convergence (as DeepInversion does) over more steps: a boundary sample in
# pixel space is still mostly its starting noise. On the ResNet a teacher's claim of 2x was right
# about the class only about half the time, so image teachers need a stronger claim (the runs that
# chose 5x: docs/experiments.md).
METHOD_DEFAULTS = {"image": MethodDefaults(100, 1.0, 5.0), "feature": MethodDefaults(30, 0.6, 2.0)}


def method_of(fm: Foundation) -> str:
    """``"image"`` on BatchNorm towers (DeepInversion), ``"feature"`` otherwise."""
    return "image" if has_resnet_tower(fm.clip) else "feature"


def _still_moving(logits: torch.Tensor, labels: torch.Tensor, confidence: float) -> torch.Tensor:
    """(k, 1, 1, 1) mask of samples whose class probability is still below ``confidence``."""
    if confidence >= 1:
        return torch.ones(len(labels), 1, 1, 1, device=logits.device)
    p = logits.detach().softmax(-1).gather(1, labels[:, None]).squeeze(1)
    return (p < confidence).float().view(-1, 1, 1, 1)


@dataclass(frozen=True)
class SyntheticSet:
    """One round's synthetic samples: ``[0, 1]`` images (kind "image") or patch maps ("feature")."""

    kind: str
    inputs: torch.Tensor
    labels: torch.Tensor
    seconds: float
    losses: dict[str, float]  # first/last values of the synthesis loss terms (for reports and tests)
    # class probabilities the synthesising model gives the final samples: soft labels to distil
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / max(1, len(self))


def concat_sets(sets: Sequence[SyntheticSet]) -> SyntheticSet:
    """One set from several of the same kind (e.g. one per teacher); losses are the first set's."""
    sets = [s for s in sets if len(s)]
    if not sets:
        raise AugmentError("augment: nothing to concatenate")
    if len({s.kind for s in sets}) > 1:
        raise AugmentError(f"augment: cannot concatenate kinds {sorted({s.kind for s in sets})}")
    probs = torch.cat([s.probs for s in sets]) if all(s.probs is not None for s in sets) else None
    return SyntheticSet(
        sets[0].kind, torch.cat([s.inputs for s in sets]), torch.cat([s.labels for s in sets]),
        sum(s.seconds for s in sets), sets[0].losses, probs,
    )


def assign_teachers(
    scores: torch.Tensor, classes: Sequence[int], own: torch.Tensor | None = None, claim: float = 0.0
) -> dict[int, list[int]]:
    """Each class to the teacher that claims it most: ``scores[t, c]`` is teacher ``t``'s mean
    probability of class ``c`` over the peer's own images (a model trained on ``c`` leaks mass to
    it on any input, one that never saw ``c`` squeezes it out). Ties go to the lower index.

    With ``claim > 0`` a class goes to a teacher only if that teacher's score is at least ``claim``
    times ``own[c]``, the peer's own model's score: a class no neighbour knows better than the peer
    itself is left out (a neighbour that claims a class well above the peer's own model has mostly
    trained on it; the diagnostic that chose the ratio is in docs/experiments.md)."""
    out: dict[int, list[int]] = {}
    for c in classes:
        t = int(scores[:, c].argmax())
        if claim > 0 and own is not None and scores[t, c] < claim * own[c]:
            continue
        out.setdefault(t, []).append(int(c))
    return out


def under_represented(labels: torch.Tensor | np.ndarray, n_classes: int, threshold: float) -> list[int]:
    """Classes whose share of the peer's labels is below ``threshold`` times the uniform share 1/C."""
    if not 0 <= threshold <= 1:
        raise AugmentError(f"augment_threshold: {threshold} not in [0, 1]")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]
    limit = threshold * counts.sum() / n_classes
    return [c for c in range(n_classes) if counts[c] < limit or counts[c] == 0]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & (2**63 - 1))


# ---------------------------------------------------------------- image space (BatchNorm towers)


class BNStatHooks:
    """Forward hooks on every BatchNorm2d of a module: distance of batch statistics to running ones."""

    def __init__(self, module: nn.Module) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.handles:
            raise AugmentError("augment: image-space synthesis needs BatchNorm layers; this image tower has none")

    def _hook(self, mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    def pop(self) -> torch.Tensor:
        loss, self.terms = torch.stack(self.terms).sum(), []
        return loss

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def bn_statistics_loss(fm: Foundation, images: torch.Tensor) -> float:
    """DeepInversion's BN term for ``[0, 1]`` images under the current model (no gradient)."""
    hooks = BNStatHooks(fm.clip.visual)
    try:
        with torch.no_grad():
            fm.clip.encode_image(fm.preprocess(images))
        return float(hooks.pop())
    finally:
        hooks.close()


def deep_inversion(
    fm: Foundation, class_emb: torch.Tensor, labels: torch.Tensor, cfg: SynthesisConfig, seed: int,
    prior: AnchorPrior | None = None,
) -> SyntheticSet:
    """Images of ``labels`` from the model alone (Yin et al. CVPR 2020), as ``[0, 1]`` pixels; with
    ``prior`` (the peer's own images) their embeddings are also pulled to the class's text anchor."""
    t0 = time.perf_counter()
    gen = _generator(seed)
    dev = fm.device
    mean = torch.tensor(fm.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(fm.std, device=dev).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    size = fm.image_size
    res = cfg.image_res or size
    # bilinear upsampling is a convex combination, so keeping x in [lo, hi] keeps every pixel valid
    # (noise is drawn on the CPU generator on every device: the same seed gives the same start)
    x = (torch.randn(len(labels), 3, res, res, generator=gen).to(dev) * cfg.init_std).clamp(lo, hi).requires_grad_(True)
    targets = None if prior is None or cfg.anchor_weight == 0 else anchor_targets(class_emb, labels, prior, gen)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    scale = fm.clip.logit_scale.exp().detach()
    hooks = BNStatHooks(fm.clip.visual)
    losses: dict[str, float] = {}
    try:
        for step in range(cfg.steps + 1):
            img = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if res != size else x
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
            xin = torch.roll(img, shifts=(dx, dy), dims=(2, 3)) if step < cfg.steps else img
            emb = F.normalize(fm.clip.encode_image(xin), dim=-1)
            logits = scale * emb @ class_emb.T
            ce = F.cross_entropy(logits, labels)
            bn = hooks.pop()
            loss = ce + cfg.bn_weight * bn + cfg.tv_weight * _tv(xin) + cfg.l2_weight * xin.pow(2).mean()
            if targets is not None:
                loss = loss + cfg.anchor_weight * (1 - (emb * targets).sum(-1)).mean()
            tag = "first" if step == 0 else "last"
            if step in (0, cfg.steps):
                losses.update({f"ce_{tag}": ce.item(), f"bn_{tag}": bn.item()})
            if step == cfg.steps:
                probs = logits.detach().softmax(-1)
                break  # the last pass only measures the final images
            (x.grad,) = torch.autograd.grad(loss, [x])
            moving, before = _still_moving(logits, labels, cfg.confidence), x.detach().clone()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.where(moving > 0, torch.maximum(torch.minimum(x, hi), lo), before))
    finally:
        hooks.close()
    images = (img.detach() * std + mean).clamp(0, 1)
    return SyntheticSet("image", images, labels.clone(), time.perf_counter() - t0, losses, probs)


# ---------------------------------------------------------------- text anchors (both methods)


@dataclass(frozen=True)
class AnchorPrior:
    """Where a peer's own image embeddings sit relative to their classes' text embeddings."""

    gap: torch.Tensor  # (D,) modality gap: mean image embedding minus its class's text embedding
    spread: float  # per-dimension RMS of image embeddings around their gap-corrected anchors


@torch.no_grad()
def anchor_prior(fm: Foundation, images: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor) -> AnchorPrior:
    """Modality gap and spread from the peer's own images under the current model."""
    z = F.normalize(fm.clip.encode_image(fm.preprocess(images)), dim=-1)
    gap = (z - class_emb[labels]).mean(0)
    anchors = F.normalize(class_emb[labels] + gap, dim=-1)
    return AnchorPrior(gap, float((z - anchors).pow(2).mean().sqrt()))


def anchor_targets(class_emb: torch.Tensor, labels: torch.Tensor, prior: AnchorPrior, gen: torch.Generator) -> torch.Tensor:
    """Per-sample unit targets ``normalise(normalise(t_c + gap) + spread * xi)``, ``xi ~ N(0, I)``."""
    anchors = F.normalize(class_emb[labels] + prior.gap, dim=-1)
    return F.normalize(anchors + prior.spread * torch.randn(anchors.shape, generator=gen).to(anchors.device), dim=-1)


# ---------------------------------------------------------------- feature space (LayerNorm towers)


@contextmanager
def patches_injected(fm: Foundation, patches: torch.Tensor) -> Iterator[torch.Tensor]:
    """Within the block, ``visual.conv1`` returns ``patches``; yields dummy images of the batch size."""
    handle = fm.clip.visual.conv1.register_forward_hook(lambda _m, _i, _o: patches)
    try:
        yield torch.zeros(len(patches), 3, fm.image_size, fm.image_size, device=patches.device)
    finally:
        handle.remove()


def encode_patches(fm: Foundation, patches: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings of patch-embedding maps through the rest of the (adapted) ViT."""
    with patches_injected(fm, patches) as dummy:
        return F.normalize(fm.clip.encode_image(dummy), dim=-1)


def synthetic_logits(fm: Foundation, syn: SyntheticSet, idx: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Class logits of the synthetic samples at ``idx`` (images or patch maps)."""
    scale = fm.clip.logit_scale.exp()
    if syn.kind == "image":
        return fm.logits(syn.inputs[idx], class_emb)
    return scale * encode_patches(fm, syn.inputs[idx]) @ class_emb.T


@dataclass(frozen=True)
class FeaturePrior:
    """What a peer knows about its own images, class-agnostically and in CLIP's aligned space."""

    mu: torch.Tensor  # (width,) per-channel mean of patch embeddings
    sigma: torch.Tensor  # (width,) per-channel std
    anchor: AnchorPrior


@torch.no_grad()
def feature_prior(fm: Foundation, images: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor) -> FeaturePrior:
    """Patch statistics, modality gap and spread from the peer's own images under the current model."""
    patches = fm.clip.visual.conv1(fm.preprocess(images))
    mu, sigma = patches.mean(dim=(0, 2, 3)), patches.std(dim=(0, 2, 3)).clamp_min(1e-4)
    return FeaturePrior(mu, sigma, anchor_prior(fm, images, labels, class_emb))


def feature_synthesis(
    fm: Foundation, class_emb: torch.Tensor, labels: torch.Tensor, prior: FeaturePrior, cfg: SynthesisConfig, seed: int
) -> SyntheticSet:
    """Patch-embedding maps of ``labels`` anchored on their text embeddings (method in the module doc)."""
    t0 = time.perf_counter()
    gen = _generator(seed)
    visual = fm.clip.visual
    width = visual.conv1.out_channels
    grid = fm.image_size // visual.conv1.kernel_size[0]
    mu, sigma = prior.mu.view(1, -1, 1, 1), prior.sigma.view(1, -1, 1, 1)
    e = (mu + sigma * torch.randn(len(labels), width, grid, grid, generator=gen).to(mu.device)).requires_grad_(True)
    targets = anchor_targets(class_emb, labels, prior.anchor, gen)
    opt = torch.optim.Adam([e], lr=cfg.lr)
    scale = fm.clip.logit_scale.exp().detach()
    losses: dict[str, float] = {}
    for step in range(cfg.steps + 1):
        z = encode_patches(fm, e)
        logits = scale * z @ class_emb.T
        ce = F.cross_entropy(logits, labels)
        anchor = (1 - (z * targets).sum(-1)).mean()
        stat = ((e.mean(dim=(0, 2, 3)) - prior.mu).pow(2).sum() + (e.std(dim=(0, 2, 3)) - prior.sigma).pow(2).sum()) / width
        l2 = ((e - mu) / sigma).pow(2).mean()
        loss = ce + cfg.anchor_weight * anchor + cfg.stat_weight * stat + cfg.feature_l2_weight * l2
        if step in (0, cfg.steps):
            tag = "first" if step == 0 else "last"
            losses.update({f"ce_{tag}": ce.item(), f"anchor_{tag}": anchor.item(), f"stat_{tag}": stat.item()})
        if step == cfg.steps:
            probs = logits.detach().softmax(-1)
            break
        (e.grad,) = torch.autograd.grad(loss, [e])
        moving, before = _still_moving(logits, labels, cfg.confidence), e.detach().clone()
        opt.step()
        with torch.no_grad():
            e.copy_(torch.where(moving > 0, e, before))
    return SyntheticSet("feature", e.detach(), labels.clone(), time.perf_counter() - t0, losses, probs)


# ---------------------------------------------------------------- one round's synthetic set


def synthesize(
    fm: Foundation,
    class_emb: torch.Tensor,
    classes: Sequence[int],
    cfg: SynthesisConfig,
    seed: int,
    own_images: torch.Tensor | None = None,
    own_labels: torch.Tensor | None = None,
) -> SyntheticSet:
    """``cfg.per_class`` samples of each of ``classes``: image space on BN towers, else feature space.

    The caller's model must be in eval mode (BN uses its running statistics; no dropout).
    ``own_images``/``own_labels`` (the peer's training data) feed the text anchors (both methods;
    without them DeepInversion runs unanchored) and the feature-space statistics.
    """
    labels = torch.tensor([c for c in classes for _ in range(cfg.per_class)], dtype=torch.long, device=fm.device)
    if len(labels) == 0:
        empty = torch.zeros(0, 3, fm.image_size, fm.image_size, device=fm.device)
        return SyntheticSet("image", empty, labels, 0.0, {})
    t0 = time.perf_counter()  # the reported cost includes the priors measured on the peer's images
    own = own_images is not None and own_labels is not None and len(own_labels) > 0
    if method_of(fm) == "image":
        anchors = anchor_prior(fm, own_images, own_labels, class_emb) if own else None
        syn = deep_inversion(fm, class_emb, labels, cfg, seed, anchors)
    elif hasattr(fm.clip.visual, "conv1") and own:
        syn = feature_synthesis(fm, class_emb, labels, feature_prior(fm, own_images, own_labels, class_emb), cfg, seed)
    else:
        raise AugmentError("augment: feature-space synthesis needs a ViT image tower and the peer's own images")
    return replace(syn, seconds=time.perf_counter() - t0)
