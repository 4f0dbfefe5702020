"""Pretrain the embedded foundation model: a tiny open_clip CLIP on the procedural shapes world.

Contrastive image-caption training where a caption counts as a positive for every image it truly
describes ("a red shape" fits all red scenes), so repeated captions in a batch are not false
negatives. Held-out shape x colour pairs never appear. Writes ``shapes_clip.json`` (config),
``shapes_clip.safetensors`` (weights) and ``MODEL_CARD.md`` to ``--out``.

``--arch rn`` trains the BatchNorm variant ``shapes-clip-rn`` instead: the same text tower and
recipe with open_clip's ``ModifiedResNet`` image tower (BatchNorm layers whose running statistics
DeepInversion-style synthesis matches, see ``p2pfl/learn/augment.py``); it writes ``shapes_clip_rn.*``,
``MODEL_CARD_RN.md`` and ``pretrain_log_rn.json`` and leaves the ViT files alone.

    .venv/bin/python scripts/pretrain_foundation.py --steps 1500 --max-minutes 16
    .venv/bin/python scripts/pretrain_foundation.py --arch rn --rn-width 16 --rn-layers 1,1,1,1 --max-minutes 14 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from p2pfl.learn import shapes
from p2pfl.learn.foundation import (
    SHAPES_CLIP,
    SHAPES_CLIP_RN,
    Foundation,
    compact_token_spec,
    foundation_from_spec,
)
from p2pfl.learn.tasks import contrastive_loss
from p2pfl.learn.trainer import shapes_zero_shot_report

log = logging.getLogger("pretrain")
EXTRA_WORDS = [
    *["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    *["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    *["digit", "number", "handwritten", "written", "the", "photo", "picture", "image", "of"],
]


def model_spec(args: argparse.Namespace) -> dict:
    """The JSON that fully describes the architecture, tokenizer and preprocessing."""
    tok = compact_token_spec(shapes.vocabulary() + EXTRA_WORDS, keep_below=1024, hash_buckets=512)
    vocab = len([i for i in tok["bpe_ids"] if i < 49406]) + tok["hash_buckets"] + 2
    rn = args.arch == "rn"
    return {
        "name": SHAPES_CLIP_RN if rn else SHAPES_CLIP,
        "model_cfg": {
            "embed_dim": args.embed_dim,
            "vision_cfg": rn_vision_cfg(args) if rn else {
                "image_size": shapes.IMAGE_SIZE,
                "patch_size": args.patch,
                "width": args.width,
                "layers": args.vision_layers,
                "head_width": 64,
                "mlp_ratio": 4.0,
                "pos_embed_type": "sin_cos_2d",  # fixed 2-D positions and mean pooling: faster to learn
                "pool_type": "avg",
            },
            "text_cfg": {
                "context_length": 20,
                "vocab_size": vocab,
                "width": args.width,
                "heads": args.width // 64,
                "layers": args.text_layers,
            },
        },
        "tokenizer": tok,
        "preprocess": {"image_size": shapes.IMAGE_SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "templates": list(shapes.TEMPLATES["shape"]),
        "weights": f"{stem(args)}.safetensors",
    }


def stem(args: argparse.Namespace) -> str:
    """File stem of the outputs: the ViT default and the ResNet variant never overwrite each other."""
    return "shapes_clip_rn" if args.arch == "rn" else "shapes_clip"


def rn_vision_cfg(args: argparse.Namespace) -> dict:
    """open_clip ``ModifiedResNet`` (a list of layers selects it): 32x32 input is 1x1 after layer4.

    Stem width ``rn_width``, stage widths 1x..8x with bottleneck expansion 4, so the attention
    pool works on ``32 * rn_width`` channels with heads of width 64.
    """
    layers = [int(v) for v in args.rn_layers.split(",")]
    if len(layers) != 4 or min(layers) < 1:
        raise SystemExit(f"--rn-layers: {args.rn_layers!r} must be four positive integers")
    return {"image_size": shapes.IMAGE_SIZE, "layers": layers, "width": args.rn_width, "head_width": 64}


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """Decay matrices only; embeddings stay out so never-seen tokens keep their distinct init."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (keep if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": keep, "weight_decay": 0.0}]


def achromatic(s: shapes.Scenes, rng: np.random.Generator, frac: float) -> tuple[shapes.Scenes, np.ndarray]:
    """Paint a fraction of shapes grey (colour unknown: -1) so shape features cannot lean on hue."""
    grey = rng.random(len(s)) < frac
    level = np.where(s.bg_levels.mean(1) < 0.5, 0.9, 0.1) + rng.uniform(-0.08, 0.08, len(s))
    rgb = np.where(grey[:, None], level[:, None].astype(np.float32), s.rgb)
    attrs = s.attrs.copy()
    attrs[grey, 1] = -1
    return replace(s, rgb=rgb), attrs


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = model_spec(args)
    fm = foundation_from_spec(spec)
    clip = fm.clip.train()
    n_params = sum(p.numel() for p in clip.parameters())
    log.info("params %d, vocab %d", n_params, spec["model_cfg"]["text_cfg"]["vocab_size"])
    opt = torch.optim.AdamW(param_groups(clip, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(args.seed)
    mention_p = np.array([float(v) for v in args.mention.split(",")]) if args.mention else shapes.MENTION_P
    start, budget, history = time.time(), args.max_minutes * 60, []
    step = 0
    while step < args.steps:
        elapsed = time.time() - start
        progress = max(step / args.steps, elapsed / budget) if budget > 0 else step / args.steps
        if progress >= 1:
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = shapes.sample_scenes(rng, args.batch, "seen")
        scenes, attrs = achromatic(scenes, rng, args.achromatic) if args.achromatic else (scenes, scenes.attrs)
        images = torch.from_numpy(shapes.render(scenes, seed=int(rng.integers(2**31))))
        texts, mentions = shapes.sample_captions(rng, attrs, bool(args.hard_negatives), mention_p)
        uniq, first = np.unique(np.array(texts), return_index=True)
        compat = torch.from_numpy(shapes.compatibility(attrs, mentions[first]))
        img = fm.encode_images(images)
        txt = fm.encode_texts(list(uniq))
        loss = contrastive_loss(img, txt, clip.logit_scale.exp(), compat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % args.log_every == 0:
            history.append({"step": step, "loss": round(loss.item(), 4), "minutes": round(elapsed / 60, 2)})
            log.info("step %d loss %.4f lr %.2e scale %.1f %.1f min", step, loss.item(), lr,
                     clip.logit_scale.exp().item(), elapsed / 60)
        if args.eval_every and step % args.eval_every == 0:
            clip.eval()
            log.info("step %d zero-shot %s", step, shapes_zero_shot_report(fm, n=300))
            clip.train()
    minutes = (time.time() - start) / 60
    clip.eval()
    report = shapes_zero_shot_report(fm, n=args.eval_n)
    log.info("final after %d steps, %.1f min: %s", step, minutes, report)
    write_outputs(args, spec, clip, report, domain_report(fm), step, minutes, n_params, history)


def domain_report(fm: Foundation, n: int = 500) -> dict[str, dict[str, float]]:
    """Zero-shot shape and colour accuracy under each single domain shift (what peers start from)."""
    return {
        d: shapes_zero_shot_report(fm, n=n, seed=20241, domain=d, attrs=("shape", "colour"))
        for d in shapes.DOMAINS
    }


def write_outputs(args, spec, clip, report, domains, steps, minutes, n_params, history) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(out / spec["weights"]), metadata={"format": "pt", "name": spec["name"]})
    (out / f"{stem(args)}.json").write_text(json.dumps(spec, indent=1) + "\n")
    cfg = spec["model_cfg"]
    held = ", ".join(f"{shapes.COLOURS[c]} {shapes.SHAPES[s]}" for s, c in sorted(shapes.HELD_OUT_PAIRS))
    rows = "\n".join(f"| {k} | {v:.3f} | {1 / chance(k):.3f} |" for k, v in report.items())
    size_mb = (out / spec["weights"]).stat().st_size / 1e6
    domain_rows = "\n".join(f"| {d} | {r['shape']:.3f} | {r['colour']:.3f} |" for d, r in domains.items())
    domain_n = 500
    weakest = min(shapes.ATTRIBUTES, key=lambda k: report[k])
    vc = cfg["vision_cfg"]
    if args.arch == "rn":
        vision = (f"ModifiedResNet (BatchNorm), {vc['image_size']}x{vc['image_size']} input, stem width {vc['width']},\n"
                  f"  bottleneck layers {vc['layers']}, attention pool over {vc['width'] * 32} channels, head width 64")
    else:
        vision = (f"ViT, {vc['image_size']}x{vc['image_size']} input, patch {vc['patch_size']},\n"
                  f"  width {vc['width']}, {vc['layers']} layers, head width 64")
    card = f"""# {spec['name']}: {"the BatchNorm (ResNet) variant of " if args.arch == "rn" else ""}the embedded foundation model

A tiny open_clip `CLIP` pretrained by this project (`scripts/pretrain_foundation.py`) with
contrastive image-caption training on the procedural shapes world (`p2pfl/learn/shapes.py`). It exists
so that p2pfl runs with no download: peers adapt it with LoRA to shifted domains and other tasks.

## Architecture (`{stem(args)}.json`)
- vision: {vision}
- text: width {cfg['text_cfg']['width']}, {cfg['text_cfg']['layers']} layers, context {cfg['text_cfg']['context_length']},
  compact vocabulary of {cfg['text_cfg']['vocab_size']} rows over open_clip's own BPE tokenizer
  (listed BPE ids keep their own row, others share one of {spec['tokenizer']['hash_buckets']} hashed rows)
- joint embedding {cfg['embed_dim']}; {n_params:,} parameters; weights {size_mb:.1f} MB float32 safetensors
- input: RGB in [0, 1], normalised with mean {spec['preprocess']['mean']} and std {spec['preprocess']['std']}

## Training
- data: fresh procedural scenes every step (8 shapes x 8 colours x 3 sizes x 5 positions x 6
  greyscale backgrounds, colour jitter, tilt up to 0.3 rad); captions from templates mentioning a
  random subset of the attributes; a caption is a positive for every scene it truly describes
- options used: achromatic shapes {args.achromatic:.0%}, attribute-swapped hard-negative captions {"on" if args.hard_negatives else "off"},
  mention probabilities (shape, colour, size, position, background) {args.mention or ", ".join(map(str, shapes.MENTION_P))}
- held out of pretraining (never rendered): {held}
- {steps} steps of batch {args.batch}, AdamW lr {args.lr} (warmup {args.warmup}, cosine), weight decay {args.wd},
  seed {args.seed}, {args.threads} CPU threads (shared with other work), {minutes:.1f} minutes wall
- the cosine schedule follows max(step/steps, elapsed/budget) so a run fits its wall budget on a
  busy machine; `--steps {steps} --max-minutes 0` reruns it step-based and deterministic (not
  bit-identical to this run). Per-step losses: `{log_name(args)}`

## Zero-shot accuracy
Held-out evaluation scenes (clean domain, seed 20240, {args.eval_n} per split), prompt templates
from `shapes.TEMPLATES` averaged per class. `*_pair` is the 64-way "a {{colour}} {{shape}}" task;
`unseen_*` uses only the held-out shape x colour pairs.

| task | accuracy | chance |
|---|---|---|
{rows}

## Zero-shot accuracy under domain shift
Shape and colour tasks on {domain_n} seen-pair scenes per domain (seed 20241), as peers see them
before any adaptation (`p2pfl/learn/shapes.py:parse_domain`; combinations with `+` are harder still).

| domain | shape | colour |
|---|---|---|
{domain_rows}

## Limits
Knows only the shapes world. Words outside its caption grammar map to untrained token rows whose
prompt embeddings are nearly identical, so other label spaces (e.g. the digits "zero".."nine")
start at chance and need many adaptation steps. {weakest.capitalize()} ({report[weakest]:.2f}) is the weakest
attribute, and shape on unseen shape x colour pairs ({report['unseen_shape']:.2f}) is far below seen pairs:
the colour of a novel pair pulls the shape guess, although the joint 64-way prompt still finds
the right pair {report['unseen_pair']:.2f} of the time (chance 0.016). Zero-shot accuracy drops under the domain shifts of `p2pfl/learn/shapes.py` (noise, rotation, low contrast,
clutter, blur): that gap is what peers close with LoRA.
{VARIANT_NOTE if args.arch == "vit" else RN_NOTE}"""
    (out / ("MODEL_CARD_RN.md" if args.arch == "rn" else "MODEL_CARD.md")).write_text(card)
    log_json = {"steps": steps, "minutes": round(minutes, 2), "args": vars(args), "report": report,
                "domains": domains, "history": history}
    (out / log_name(args)).write_text(json.dumps(log_json, indent=1) + "\n")


VARIANT_NOTE = """
## Variant: shapes-clip-rn
`shapes-clip-rn` (`shapes_clip_rn.json`, card `MODEL_CARD_RN.md`) is the same recipe with an open_clip
ModifiedResNet image tower whose BatchNorm running statistics image-space zero-shot augmentation
matches (`p2pfl/learn/augment.py`); select it with `--set model=shapes-clip-rn`.
"""
RN_NOTE = """
## Use
`--set model=shapes-clip-rn`. LoRA goes on the bottleneck convolutions (peft Conv2d LoRA), BatchNorm
statistics stay frozen during adaptation, and `--set augment=zero-shot` synthesises images by
DeepInversion against them (`p2pfl/learn/augment.py`). Reproduce with
`scripts/pretrain_foundation.py --arch rn --rn-width 16 --rn-layers 1,1,1,1 --steps 4000 --max-minutes 14 --threads 1 --eval-every 0`.
"""


def log_name(args: argparse.Namespace) -> str:
    return "pretrain_log_rn.json" if args.arch == "rn" else "pretrain_log.json"


def chance(task: str) -> int:
    attr = task.removeprefix("unseen_")
    if attr.endswith("pair"):
        return len(shapes.SHAPES) * len(shapes.COLOURS)
    return len(shapes.VALUES[attr])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "p2pfl" / "learn" / "assets"))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--max-minutes", type=float, default=18.0,
                    help="wall budget; the cosine schedule follows max(step/steps, time/budget). 0 = steps only (deterministic)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--arch", choices=("vit", "rn"), default="vit",
                    help="image tower: vit (shapes-clip, LayerNorm) or rn (shapes-clip-rn, ModifiedResNet with BatchNorm)")
    ap.add_argument("--rn-width", type=int, default=16, help="rn: stem width (attention pool sees 32x this)")
    ap.add_argument("--rn-layers", default="1,1,1,1", help="rn: bottleneck blocks per stage (4 integers)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--achromatic", type=float, default=0.0, help="fraction of grey shapes (no colour named)")
    ap.add_argument("--hard-negatives", type=int, default=1, help="add one attribute-swapped caption per image")
    ap.add_argument("--mention", default="", help="caption mention probabilities per attribute (5 floats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=25)
    return ap


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
