"""Foundation loading, tokenizer, LoRA algebra (forward == W + B A scale, FFA exact averaging)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from p2pfl.learn import shapes
from p2pfl.learn.foundation import (
    CompactTokenizer,
    ModelError,
    compact_token_spec,
    foundation_from_spec,
    load_foundation,
)
from p2pfl.learn.model import AdaptedClip, LoraHost, LoraSpec
from p2pfl.learn.trainer import shapes_zero_shot_report

from .conftest import ROOT

TINY_WORDS = ["a", "red", "circle", "photo", "of", "."]


def tiny_spec() -> dict:
    tok = compact_token_spec(TINY_WORDS, keep_below=16, hash_buckets=8)
    vocab = len(tok["bpe_ids"]) + tok["hash_buckets"] + 2
    return {
        "name": "tiny",
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": vocab, "width": 32, "heads": 2, "layers": 2},
        },
        "tokenizer": tok,
        "preprocess": {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3},
        "weights": "tiny.safetensors",
    }


def tiny_foundation(seed: int = 0):
    torch.manual_seed(seed)
    return foundation_from_spec(tiny_spec())


def randomise(model: AdaptedClip, seed: int, only_b: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.lora.items():
            if not only_b or k.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- tokenizer and loading


def test_tokenizer_is_open_clip_bpe_shipped_in_package():
    bpe = Path(open_clip.tokenizer.default_bpe())
    assert bpe.is_file() and Path(open_clip.__file__).parent in bpe.parents  # no download needed
    spec = tiny_spec()["tokenizer"]
    tok = CompactTokenizer(spec["bpe_ids"], spec["hash_buckets"], context_length=8)
    raw = open_clip.tokenizer.SimpleTokenizer(context_length=8)(["a red circle.", "a zebra"])
    ids = tok(["a red circle.", "a zebra"])
    assert ids.shape == (2, 8) and int(ids.max()) == tok.vocab_size - 1
    assert torch.equal(ids.argmax(1), raw.argmax(1))  # end-of-text pooling position preserved
    assert len(set(ids[0, 1:5].tolist())) == 4  # known words get distinct rows
    zebra = tok.tok.encode("zebra")
    assert zebra[0] not in spec["bpe_ids"] and int(ids[1, 2]) >= len(spec["bpe_ids"])  # hashed row


def test_load_local_checkpoints_through_json(tmp_path):
    src = tiny_foundation(seed=1)
    spec = tiny_spec()
    (tmp_path / "tiny.json").write_text(json.dumps(spec))
    state = {k: v.contiguous() for k, v in src.clip.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    torch.save(state, tmp_path / "tiny.pt")
    for weights in (None, str(tmp_path / "tiny.pt")):
        fm = load_foundation(str(tmp_path / "tiny.json"), weights)
        got = fm.clip.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(ModelError, match=r"missing\.pt"):
        load_foundation(str(tmp_path / "tiny.json"), str(tmp_path / "missing.pt"))


def test_load_open_clip_model_name_from_local_file(tmp_path):
    cfg = tiny_spec()["model_cfg"] | {"text_cfg": {"context_length": 8, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "p2pfl-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "p2pfl-test-tiny.json")
    torch.manual_seed(2)
    src = open_clip.create_model("p2pfl-test-tiny")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fm = load_foundation("p2pfl-test-tiny", str(tmp_path / "w.safetensors"))
    assert all(torch.equal(fm.clip.state_dict()[k], v) for k, v in src.state_dict().items())
    assert fm.image_size == 16 and fm.tokenizer(["a red circle"]).shape == (1, 8)
    emb = fm.class_embeddings(["circle", "square"])
    assert emb.shape == (2, 16)


def test_no_downloads(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelError, match="not cached"):
        load_foundation("ViT-B-32", "openai")
    with pytest.raises(ModelError, match="no-such-tag"):
        load_foundation("ViT-B-32", "no-such-tag")
    with pytest.raises(ModelError, match="not-a-model"):
        load_foundation("not-a-model")


# ---------------------------------------------------------------- LoRA algebra


@pytest.mark.parametrize("targets,text", [(("in_proj", "c_fc", "c_proj"), False), (("in_proj", "c_proj"), True), (("c_fc",), False)])
def test_lora_forward_equals_merged_weights(targets, text):
    fm = tiny_foundation()
    base = copy.deepcopy(fm.clip)
    model = AdaptedClip(fm, LoraSpec(rank=3, alpha=5.0, targets=targets, text=text))
    randomise(model, seed=4)
    weights = dict(base.named_parameters())
    deltas = model.delta_weights()
    assert len(deltas) == len(model.lora) // 2
    with torch.no_grad():
        for key, delta in deltas.items():
            a, b = model.lora[key + ".lora_A"], model.lora[key + ".lora_B"]
            assert torch.equal(delta, b @ a * (5.0 / 3))
            weights[key + (".in_proj_weight" if key.endswith("attn") else ".weight")].add_(delta)
    images = torch.rand(5, 3, 16, 16)
    texts = fm.tokenizer(["a red circle.", "a photo of a circle"])
    with torch.no_grad():
        lora_img, lora_txt = model.clip.encode_image(fm.preprocess(images)), model.clip.encode_text(texts)
        merged_img, merged_txt = base.encode_image(fm.preprocess(images)), base.encode_text(texts)
    assert torch.allclose(lora_img, merged_img, atol=1e-5)
    assert torch.allclose(lora_txt, merged_txt, atol=1e-5)
    assert not torch.allclose(lora_img, tiny_foundation().clip.encode_image(fm.preprocess(images)), atol=1e-3)


def test_ffa_shares_a_and_averaging_b_averages_adapters():
    peers = [AdaptedClip(tiny_foundation(), LoraSpec(rank=4, seed=11)) for _ in range(3)]
    for i, p in enumerate(peers):
        assert all(k.endswith("lora_B") for k in p.adapter_state())  # only B travels
        randomise(p, seed=100 + i, only_b=True)
    a0 = {k: v for k, v in peers[0].lora.items() if k.endswith("lora_A")}
    for p in peers[1:]:
        assert all(torch.equal(a0[k], v) for k, v in p.lora.items() if k.endswith("lora_A"))
    deltas = [p.delta_weights() for p in peers]
    states = [p.adapter_state() for p in peers]
    mean_b = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    peers[0].load_adapter_state(mean_b)
    for key, d in peers[0].delta_weights().items():
        assert torch.allclose(d, torch.stack([x[key] for x in deltas]).mean(0), atol=1e-6)


def test_train_a_averaging_is_only_approximate():
    peers = [AdaptedClip(tiny_foundation(), LoraSpec(rank=4, train_a=True, seed=i)) for i in range(2)]
    for i, p in enumerate(peers):
        randomise(p, seed=200 + i)
    assert any(k.endswith("lora_A") for k in peers[0].adapter_state())
    deltas = [p.delta_weights() for p in peers]
    states = [p.adapter_state() for p in peers]
    peers[0].load_adapter_state({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
    gap = max((d - (deltas[0][k] + deltas[1][k]) / 2).abs().max().item() for k, d in peers[0].delta_weights().items())
    assert gap > 1e-2


def test_adapter_state_round_trip_bit_exact_and_validated():
    model = AdaptedClip(tiny_foundation(), LoraSpec(rank=2))
    randomise(model, seed=5)
    state = model.adapter_state()
    assert list(state) == sorted(state)
    assert all(v.dtype == torch.float32 and v.is_contiguous() and v.device.type == "cpu" for v in state.values())
    other = AdaptedClip(tiny_foundation(), LoraSpec(rank=2))
    other.load_adapter_state(state)
    back = other.adapter_state()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    key = next(iter(state))
    state[key].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(model.adapter_state()[key], state[key])
    with pytest.raises(ValueError, match="bogus"):
        other.load_adapter_state({**back, "bogus": back[key]})
    with pytest.raises(ValueError, match=key):
        other.load_adapter_state({**back, key: torch.zeros(3)})
    with pytest.raises(ValueError, match=key):
        other.load_adapter_state({k: v for k, v in back.items() if k != key})


def test_lora_spec_errors():
    with pytest.raises(ModelError, match="qkv"):
        AdaptedClip(tiny_foundation(), LoraSpec(targets=("qkv",)))
    with pytest.raises(ModelError, match="out_proj"):  # would be silently inert under nn.MultiheadAttention
        AdaptedClip(tiny_foundation(), LoraSpec(targets=("in_proj", "out_proj")))


# ---------------------------------------------------------------- the shipped model


def test_shipped_model_card_and_zero_shot_far_above_chance():
    fm = load_foundation()
    assets = Path(__file__).resolve().parents[1] / "p2pfl" / "learn" / "assets"
    assert (assets / "shapes_clip.safetensors").stat().st_size < 10e6
    assert "Zero-shot accuracy" in (assets / "MODEL_CARD.md").read_text()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report = shapes_zero_shot_report(fm, n=400)  # card (2000 per split): shape .92, colour 1.0, position .59
    chance_shape, chance_colour, chance_pair = 1 / len(shapes.SHAPES), 1 / len(shapes.COLOURS), 1 / 64
    assert report["shape"] > chance_shape + 0.6
    assert report["colour"] > chance_colour + 0.75
    assert report["size"] > 1 / 3 + 0.4
    assert report["position"] > 0.2 + 0.2
    assert report["background"] > 1 / 6 + 0.5
    assert report["seen_pair"] > chance_pair + 0.6
    assert report["unseen_colour"] > chance_colour + 0.75  # unseen shape x colour compositions
    assert report["unseen_pair"] > chance_pair + 0.25  # card: .40
    assert report["unseen_shape"] > chance_shape + 0.1  # card: .36


# ---------------------------------------------------------------- adapters sharing one host


def test_adapters_on_one_host_run_as_their_own_private_models():
    fm = tiny_foundation()
    host = LoraHost(fm, LoraSpec(rank=2, seed=3))
    views = [AdaptedClip(fm, LoraSpec(rank=2, seed=3), host) for _ in range(2)]
    privates = [AdaptedClip(tiny_foundation(), LoraSpec(rank=2, seed=3)) for _ in range(2)]
    for i, (v, p) in enumerate(zip(views, privates, strict=True)):
        randomise(v, seed=30 + i, only_b=True)
        p.load_adapter_state(v.adapter_state())
    images = torch.rand(4, 3, 16, 16)
    protos = privates[0].class_embeddings(["a red circle", "a photo"])
    for v, p in zip(views[::-1] + views, privates[::-1] + privates, strict=True):  # alternate the bound adapter
        loss = v.logits(images, protos).logsumexp(1).sum()
        loss.backward()
        assert torch.equal(v.logits(images, protos), p.logits(images, protos).detach())
    assert all(p.grad is not None for v in views for p in v.trainable())  # gradients land in each view's own tensors
    assert not torch.equal(views[0].trainable()[0].grad, views[1].trainable()[0].grad)
    a_key = next(k for k in host.frozen)
    assert views[0].lora[a_key] is views[1].lora[a_key] and torch.equal(views[0].lora[a_key], privates[0].lora[a_key])
    with pytest.raises(ModelError, match="another foundation or LoRA spec"):
        AdaptedClip(fm, LoraSpec(rank=4, seed=3), host)
    with pytest.raises(ModelError, match="another foundation or LoRA spec"):
        AdaptedClip(tiny_foundation(), LoraSpec(rank=2, seed=3), host)


# ---------------------------------------------------------------- torch's parametrization cache


def test_importing_the_model_module_leaves_torch_settings_alone():
    """The host application's `parametrize.cached` is its own: importing the learning stack
    (which used to switch it off for the whole process) changes nothing."""
    code = ("import torch.nn.utils.parametrize as P\nbefore = P.cached\nimport p2pfl.learn.model\n"
            "import p2pfl.learn.trainer\nprint(P.cached is before)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stdout + run.stderr


def test_a_forward_leaves_no_fused_weight_in_the_cache_another_thread_holds_on():
    """Another thread inside `parametrize.cached()` keeps torch's process-wide cache alive; a
    forward of ours must still read the adapter it has now, not the W + BA of its last forward."""
    fm = tiny_foundation()
    model = AdaptedClip(fm, LoraSpec(rank=2, targets=("in_proj",)))
    images = torch.rand(3, 3, 16, 16)
    protos = model.class_embeddings(["a red circle", "a photo"])
    with parametrize.cached():  # the other thread's forward, holding the switch on
        randomise(model, seed=5, only_b=True)
        first = model.logits(images, protos)
        randomise(model, seed=6, only_b=True)
        second = model.logits(images, protos)
    alone = model.logits(images, protos)  # nothing cached: W + BA of the adapter it has now
    assert torch.equal(second, alone) and not torch.allclose(first, second)
