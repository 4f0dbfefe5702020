"""What a peer learns from when its data are not labelled images: captions or no labels at all.

A caption peer (``data_kind: captions``) trains CLIP's own contrastive loss on its image-text
pairs, through the LoRA adapters of both towers. An unlabelled peer (``data_kind: unlabelled``)
self-trains: every round it labels its images with the current model's zero-shot heads, keeps
the confident predictions with a cap per class, and trains on those as if they were labels. Both
keep the one adapter space of the run, so their updates mix with the labelled peers' by gossip.
Pure functions of tensors; `p2pfl.learn.trainer.Trainer` calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from p2pfl.learn.foundation import Foundation


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, compat: torch.Tensor) -> torch.Tensor:
    """Soft-target CLIP loss: each side's target is uniform over the truly matching items.

    ``compat[i, j]`` says whether text j describes image i, so a caption repeated in a batch (or,
    in pretraining, one that fits several scenes) is no false negative. Texts that match no image
    (pretraining's swapped hard negatives) only act as negatives for the images.
    """
    logits = scale * img @ txt.T
    t = compat.float()
    i2t = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    cols = t.sum(0) > 0
    tc = t[:, cols]
    t2i = -(tc / tc.sum(0, keepdim=True) * F.log_softmax(logits[:, cols], dim=0)).sum(0).mean()
    return (i2t + t2i) / 2


def caption_targets(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions of a batch and, for each image, the index of its own among them.

    A caption peer knows only its pairs: two images are taken to match each other's text exactly
    when their captions are the same string."""
    texts = sorted(set(captions))
    index = {t: k for k, t in enumerate(texts)}
    return texts, torch.tensor([index[c] for c in captions], dtype=torch.long)


def caption_loss(foundation: Foundation, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, image-to-text logits, each image's caption index) of one batch of pairs.

    ``foundation`` is a `p2pfl.learn.foundation.Foundation` with the peer's adapter bound (both towers run
    through their LoRA layers); the logits' argmax against the targets is in-batch retrieval."""
    texts, targets = caption_targets(captions)
    targets = targets.to(images.device)
    img = foundation.encode_images(images)
    txt = foundation.encode_texts(texts)
    scale = foundation.clip.logit_scale.exp()
    compat = F.one_hot(targets, len(texts)).bool()
    return contrastive_loss(img, txt, scale, compat), scale * img @ txt.T, targets


def select_pseudo_labels(probs: torch.Tensor, threshold: float, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and labels of the pseudo-labels kept from class probabilities ``probs`` (n, C).

    A prediction is kept when its probability reaches ``threshold`` (the confidence threshold of
    pseudo-labelling and FixMatch), and each predicted class keeps at most its most confident
    ``fraction * n / C`` (class-balanced self-training, after Zou et al., ECCV 2018): on a shifted
    domain the zero-shot heads favour a few classes, and unbalanced pseudo-labels would teach the
    model to favour them more. Deterministic: ties keep the lower index."""
    n, c = probs.shape
    conf, pred = probs.max(dim=1)
    conf, pred = conf.cpu().numpy(), pred.cpu().numpy()
    cap = max(1, int(fraction * n / c))
    kept = []
    for k in range(c):
        idx = np.flatnonzero((pred == k) & (conf >= threshold))
        kept.append(idx[np.argsort(-conf[idx], kind="stable")][:cap])
    idx = np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
    return idx.astype(np.int64), pred[idx].astype(np.int64)
