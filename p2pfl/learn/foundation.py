"""The frozen foundation model: an open_clip CLIP, its tokenizers, loading and zero-shot heads.

The foundation never changes and never travels: every peer of a run loads the same weights (the
embedded ones in `p2pfl/learn/assets/`, or a cached open_clip tag), and only LoRA adapters on top of it
(`p2pfl.learn.model`) are trained and exchanged. Class logits are cosine similarities with frozen text
embeddings of prompts for a peer's own class names, so peers with different label spaces share one
adapter space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from p2pfl.learn.options import ModelError
from p2pfl.learn.shapes import fix_articles

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES_CLIP = "shapes-clip"
SHAPES_CLIP_RN = "shapes-clip-rn"  # same recipe, ModifiedResNet image tower (BatchNorm): for image-space synthesis
EMBEDDED = {SHAPES_CLIP: "shapes_clip.json", SHAPES_CLIP_RN: "shapes_clip_rn.json"}
GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.")


# ---------------------------------------------------------------- tokenizer


@lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)  # BPE vocab ships inside open_clip


class CompactTokenizer:
    """open_clip's BPE tokenizer with ids folded into a small embedding table.

    Kept BPE ids get their own row; any other id shares one of ``hash_buckets`` rows; start/end
    of text take the two last rows so open_clip's argmax (end-of-text) pooling still works.
    """

    def __init__(self, bpe_ids: Sequence[int], hash_buckets: int, context_length: int) -> None:
        self.tok = _simple_tokenizer(context_length)
        sot, eot = self.tok.sot_token_id, self.tok.eot_token_id
        kept = [i for i in sorted(set(bpe_ids)) if i not in (sot, eot)]
        n_bpe = len(self.tok.encoder)
        table = len(kept) + torch.arange(n_bpe) % hash_buckets
        table[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        self.vocab_size = len(kept) + hash_buckets + 2
        table[sot], table[eot] = self.vocab_size - 2, self.vocab_size - 1
        self.table = table
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.table[self.tok(texts)]


def compact_token_spec(words: Sequence[str], keep_below: int = 1024, hash_buckets: int = 512) -> dict:
    """Tokenizer section of a model JSON: the BPE ids of ``words`` plus the ``keep_below`` first."""
    tok = _simple_tokenizer(77)
    ids = set(range(keep_below))
    for w in words:
        ids.update(tok.encode(w))
    return {"kind": "compact-bpe", "bpe_ids": sorted(ids), "hash_buckets": hash_buckets}


# ---------------------------------------------------------------- foundation


@dataclass
class Foundation:
    """A CLIP plus what is needed to feed it: tokenizer and image normalisation."""

    clip: nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = SHAPES_CLIP
    templates: tuple[str, ...] = GENERIC_TEMPLATES

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (n, 3, h, w) of any size, on any device -> normalised model input on the model's device."""
        images = images.to(self.device)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> unit-norm embeddings (through any LoRA injected into ``clip``)."""
        return F.normalize(self.clip.encode_image(self.preprocess(images)), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(self.tokenizer(list(texts)).to(self.device)), dim=-1)

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) unit-norm class prototypes: prompt embeddings averaged over templates."""
        templates = list(templates or self.templates)
        prompts = [fix_articles(t.format(c)) for c in class_names for t in templates]
        emb = self.encode_texts(prompts).view(len(class_names), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def logits(self, images: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """CLIP's scaled cosine similarities between images and class prototypes."""
        return self.clip.logit_scale.exp() * self.encode_images(images) @ class_emb.T


@torch.no_grad()
def zero_shot_accuracy(
    fm: Foundation,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy of the prompt head on ``images`` (no training)."""
    protos = fm.class_embeddings(class_names, templates)
    correct = 0
    for i in range(0, len(images), batch_size):
        pred = fm.logits(images[i : i + batch_size], protos).argmax(dim=1)
        correct += int((pred == labels[i : i + batch_size].to(pred.device)).sum())
    return correct / max(1, len(images))


def read_model_json(path: str | Path) -> dict:
    """A p2pfl model JSON: ``model_cfg`` (open_clip CLIP kwargs), ``tokenizer``, ``preprocess``."""
    spec = json.loads(Path(path).read_text())
    for key in ("model_cfg", "tokenizer", "preprocess"):
        if key not in spec:
            raise ModelError(f"model json {path}: missing {key!r}")
    return spec


def foundation_from_spec(spec: dict, weights: str | Path | None = None) -> Foundation:
    """Build the CLIP a model JSON describes (random init unless ``weights`` is given)."""
    cfg = spec["model_cfg"]
    clip = open_clip.CLIP(**cfg)
    tok_cfg = spec["tokenizer"]
    if tok_cfg.get("kind") != "compact-bpe":
        raise ModelError(f"tokenizer.kind: {tok_cfg.get('kind')!r} is not supported")
    ctx = cfg["text_cfg"]["context_length"]
    tokenizer = CompactTokenizer(tok_cfg["bpe_ids"], tok_cfg["hash_buckets"], ctx)
    if tokenizer.vocab_size != cfg["text_cfg"]["vocab_size"]:
        raise ModelError(f"text_cfg.vocab_size: {cfg['text_cfg']['vocab_size']} != tokenizer's {tokenizer.vocab_size}")
    if weights is not None:
        open_clip.load_checkpoint(clip, str(weights), strict=True, weights_only=True)
    pre = spec["preprocess"]
    return Foundation(
        clip=clip.eval(),
        tokenizer=tokenizer,
        image_size=int(pre["image_size"]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        name=spec.get("name", SHAPES_CLIP),
        templates=tuple(spec.get("templates", GENERIC_TEMPLATES)),
    )


def _cached_tag_file(model: str, tag: str) -> tuple[str, dict]:
    """Local file of an open_clip pretrained tag, from the Hugging Face cache only (no download)."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ModelError(f"pretrained: {tag!r} is neither a file nor a known tag of {model!r}")
    if "file" in cfg:
        return cfg["file"], cfg
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # "org/name/" means open_clip's default file names
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit, cfg
    raise ModelError(f"pretrained: tag {tag!r} of {model!r} is not cached locally and downloads are disabled")


def load_foundation(model: str = SHAPES_CLIP, pretrained: str | None = None) -> Foundation:
    """Load the embedded shapes CLIP, a p2pfl model JSON, or an open_clip model from local weights.

    ``pretrained``: a local ``.safetensors``/``.pt`` checkpoint, or an open_clip tag whose weights
    are already in the local cache. Nothing is ever downloaded.
    """
    if model in EMBEDDED or model.endswith(".json"):
        path = ASSETS / EMBEDDED[model] if model in EMBEDDED else Path(model)
        spec = read_model_json(path)
        weights = Path(pretrained) if pretrained else path.parent / spec["weights"]
        if not weights.is_file():
            raise ModelError(f"pretrained: checkpoint {str(weights)!r} not found")
        return foundation_from_spec(spec, weights)
    if model not in open_clip.list_models():
        raise ModelError(f"model: {model!r} is not one of {sorted(EMBEDDED)}, a model json, or an open_clip model")
    pre: dict = {}
    if pretrained is None:
        clip = open_clip.create_model(model, pretrained=None)
    elif os.path.isfile(pretrained):
        clip = open_clip.create_model(model, pretrained=pretrained, weights_only=True)
    else:
        path, tag_cfg = _cached_tag_file(model, pretrained)
        clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
        open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
        pre = tag_cfg
    pcfg = open_clip.get_model_preprocess_cfg(clip)
    size = pcfg.get("size", 224)
    return Foundation(
        clip=clip.eval(),
        tokenizer=open_clip.get_tokenizer(model),
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(pre.get("mean", pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))),
        std=tuple(pre.get("std", pcfg.get("std", open_clip.OPENAI_DATASET_STD))),
        name=model,
    )


# ---------------------------------------------------------------- LoRA
