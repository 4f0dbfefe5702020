"""Zero-shot augmentation: the ResNet (BatchNorm) variant and its LoRA, both synthesis methods,
determinism, trainer wiring, and the fairness figures of metrics/report."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from p2pfl.host.files import read_jsonl
from p2pfl.learn import augment
from p2pfl.learn.data import load_peer_data
from p2pfl.learn.foundation import SHAPES_CLIP_RN, ModelError, load_foundation
from p2pfl.learn.model import AdaptedClip, LoraSpec, has_resnet_tower
from p2pfl.learn.trainer import Trainer, TrainerConfig, TrainerError
from p2pfl.ops.report import fairness_figures, summarize

from .conftest import make_topology, wait_all

FAST = dict(samples_per_peer=96, global_test_size=120, batch_size=16, local_steps=3, augment_steps=8, augment_per_class=2)


@pytest.fixture(scope="module")
def rn():
    return load_foundation(SHAPES_CLIP_RN)


@pytest.fixture(scope="module")
def vit():
    return load_foundation("shapes-clip")


@pytest.fixture(scope="module")
def peer():
    """A skewed peer's share (shapes task, default shifted domain): most classes absent."""
    return load_peer_data("shapes", "shape", "", "dirichlet:0.05", 0, 8, 0)


def _randomise_b(model: AdaptedClip, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in model.travelling:
            model.lora[k].copy_(torch.randn(model.lora[k].shape, generator=g) * 0.05)


# ---------------------------------------------------------------- the ResNet variant


def test_rn_variant_is_a_batchnorm_tower_with_zero_shot_skill(rn, peer):
    assert has_resnet_tower(rn.clip) and not has_resnet_tower(load_foundation("shapes-clip").clip)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in rn.clip.visual.modules())
    clean = load_peer_data("shapes", "shape", "clean", "iid", 0, 1, 0, samples_per_peer=200)
    from p2pfl.learn.foundation import zero_shot_accuracy

    acc = zero_shot_accuracy(rn, clean.train.images, clean.train.labels, clean.train.class_names, clean.train.templates)
    assert acc > 0.5  # chance 0.125; the model card states the measured figure


def test_rn_conv_lora_forward_equals_merged_weights():
    fm = load_foundation(SHAPES_CLIP_RN)
    ref = load_foundation(SHAPES_CLIP_RN)
    model = AdaptedClip(fm, LoraSpec(rank=4, alpha=8.0))  # ViT default names: "conv" is added for the image tower
    assert model.spec.targets[-1] == "conv"
    assert model.travelling and all(".conv" in k and k.endswith("lora_B") for k in model.travelling)
    _randomise_b(model, 1)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        got = fm.encode_images(x)
        for name, delta in model.delta_weights().items():
            w = ref.clip.get_submodule(name).weight
            assert delta.shape == w.shape  # (out, in, kh, kw)
            w += delta
        want = ref.encode_images(x)
        base = load_foundation(SHAPES_CLIP_RN).encode_images(x)
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(got, want, atol=1e-5)


def test_peft_on_attention_pool_projections_is_inert(rn):
    """Why the attention pool is not a target: it reads q/k/v/c_proj.weight directly."""
    clip = load_foundation(SHAPES_CLIP_RN).clip
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        before = clip.encode_image(x)
    names = [f"visual.attnpool.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "c_proj")]
    pm = get_peft_model(clip, LoraConfig(r=2, lora_alpha=4, target_parameters=names))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
        assert torch.equal(pm.base_model.model.encode_image(x), before)


def test_conv_target_on_a_vit_is_a_clear_error(vit):
    with pytest.raises(ModelError, match="'conv' needs a ModifiedResNet"):
        AdaptedClip(load_foundation("shapes-clip"), LoraSpec(targets=("conv",)))


def test_training_keeps_batchnorm_running_statistics_frozen():
    cfg = TrainerConfig(model=SHAPES_CLIP_RN, partition="dirichlet:0.05", seed=2, **FAST)
    tr = Trainer(cfg, 1, 4)
    stats = {k: v.clone() for k, v in tr.foundation.clip.state_dict().items() if "running_" in k}
    tr.train_round()
    after = tr.foundation.clip.state_dict()
    assert stats and all(torch.equal(v, after[k]) for k, v in stats.items())


# ---------------------------------------------------------------- synthesis


def test_under_represented_classes():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    # uniform share of 14 labels over 4 classes is 3.5; threshold 0.5 -> below 1.75
    assert augment.under_represented(labels, 4, 0.5) == [2, 3]
    assert augment.under_represented(labels, 4, 1.0) == [1, 2, 3]
    assert augment.under_represented(labels, 4, 0.0) == [3]  # never-seen classes always count
    with pytest.raises(augment.AugmentError, match=r"1\.5"):
        augment.under_represented(labels, 4, 1.5)


def test_deep_inversion_matches_bn_statistics_and_the_requested_class(rn):
    protos = rn.class_embeddings(("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent"))
    classes = list(range(8))
    cfg = augment.SynthesisConfig(per_class=3, steps=60, confidence=1.0)  # plain DeepInversion: to convergence
    syn = augment.synthesize(rn, protos, classes, cfg, seed=5)
    assert syn.kind == "image" and syn.inputs.shape == (24, 3, 32, 32)
    assert float(syn.inputs.min()) >= 0 and float(syn.inputs.max()) <= 1
    assert syn.losses["bn_last"] < 0.5 * syn.losses["bn_first"]
    noise = (torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 0.125 + 0.5).clamp(0, 1)
    assert augment.bn_statistics_loss(rn, syn.inputs) < augment.bn_statistics_loss(rn, noise)
    with torch.no_grad():
        pred = rn.logits(syn.inputs, protos).argmax(1)  # the stored [0, 1] images, no jitter
    assert (pred == syn.labels).float().mean() > 0.6  # chance 0.125
    assert syn.seconds_per_sample > 0


def test_feature_space_samples_score_highest_on_their_class(vit, peer):
    protos = vit.class_embeddings(peer.train.class_names, peer.train.templates)
    classes = augment.under_represented(peer.train.labels, 8, 0.5)
    assert len(classes) >= 4  # Dirichlet 0.05: most classes missing at this peer
    syn = augment.synthesize(vit, protos, classes, augment.SynthesisConfig(per_class=3, steps=30), 7,
                             peer.train.images, peer.train.labels)
    assert syn.kind == "feature" and syn.inputs.shape[:2] == (3 * len(classes), vit.clip.visual.conv1.out_channels)
    with torch.no_grad():
        logits = augment.synthetic_logits(vit, syn, torch.arange(len(syn)), protos)
    assert torch.equal(logits.argmax(1), syn.labels)
    assert syn.losses["ce_last"] < syn.losses["ce_first"] and syn.losses["anchor_last"] < syn.losses["anchor_first"]


def test_image_anchor_pulls_embeddings_to_the_class_text_anchor(rn, peer):
    """With the peer's own images, DeepInversion's embeddings move towards the gap-corrected text
    anchors of their classes (the term the feature-space method uses), still scoring as their class."""
    protos = rn.class_embeddings(peer.train.class_names, peer.train.templates)
    classes = [1, 2, 4, 6]
    cfg = augment.SynthesisConfig(per_class=3, steps=40, confidence=1.0)
    plain = augment.synthesize(rn, protos, classes, cfg, 3)
    anchored = augment.synthesize(rn, protos, classes, cfg, 3, peer.train.images, peer.train.labels)
    prior = augment.anchor_prior(rn, peer.train.images, peer.train.labels, protos)
    anchors = torch.nn.functional.normalize(protos[anchored.labels] + prior.gap, dim=-1).detach()

    def cos_to_anchor(syn: augment.SyntheticSet) -> float:
        with torch.no_grad():
            z = torch.nn.functional.normalize(rn.clip.encode_image(rn.preprocess(syn.inputs)), dim=-1)
        return float((z * anchors).sum(-1).mean())

    assert cos_to_anchor(anchored) > cos_to_anchor(plain) + 0.02
    with torch.no_grad():
        pred = rn.logits(anchored.inputs, protos).argmax(1)
    assert (pred == anchored.labels).float().mean() > 0.6  # chance 0.125


def test_synthesis_defaults_follow_the_method_and_settings_override_them():
    rn_t = Trainer(TrainerConfig(model=SHAPES_CLIP_RN, augment="zero-shot", **{**FAST, "augment_steps": None}), 0, 2)
    vit_t = Trainer(TrainerConfig(augment="zero-shot", **{**FAST, "augment_steps": None}), 0, 2)
    for t, method in ((rn_t, "image"), (vit_t, "feature")):
        d = augment.METHOD_DEFAULTS[method]
        assert augment.method_of(t.foundation) == method
        assert (t.synthesis.steps, t.synthesis.confidence, t.augment_claim) == (d.steps, d.confidence, d.claim)
    assert augment.METHOD_DEFAULTS["image"] != augment.METHOD_DEFAULTS["feature"]
    mine = Trainer(TrainerConfig(model=SHAPES_CLIP_RN, augment="zero-shot", augment_confidence=0.7, augment_claim=0.0, **FAST), 0, 2)
    assert (mine.synthesis.steps, mine.synthesis.confidence, mine.augment_claim) == (FAST["augment_steps"], 0.7, 0.0)


@pytest.mark.parametrize("confidence", [0.6, 0.9])
def test_samples_stop_at_the_confidence_target(rn, confidence):
    """Boundary samples: each stops moving once its class probability reaches the target."""
    protos = rn.class_embeddings(("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent"))
    cfg = augment.SynthesisConfig(per_class=2, steps=40, confidence=confidence)
    syn = augment.synthesize(rn, protos, list(range(8)), cfg, seed=9)
    with torch.no_grad():
        p = rn.logits(syn.inputs, protos).softmax(-1).gather(1, syn.labels[:, None]).squeeze(1)
    assert (p >= confidence - 0.15).float().mean() >= 0.75  # reached (jitter-free re-evaluation moves p a little)
    assert float(p.median()) < 0.995  # not driven to certainty, unlike confidence=1.0


def test_synthesis_is_deterministic_under_a_seed(rn, vit, peer):
    protos = rn.class_embeddings(peer.train.class_names)
    cfg = augment.SynthesisConfig(per_class=2, steps=5)
    a, b = (augment.synthesize(rn, protos, [0, 3], cfg, seed=11) for _ in range(2))
    c = augment.synthesize(rn, protos, [0, 3], cfg, seed=12)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    vp = vit.class_embeddings(peer.train.class_names)
    f1, f2 = (augment.synthesize(vit, vp, [1, 2], cfg, 3, peer.train.images, peer.train.labels) for _ in range(2))
    assert torch.equal(f1.inputs, f2.inputs)


# ---------------------------------------------------------------- trainer wiring


@pytest.mark.parametrize("model", ["shapes-clip", SHAPES_CLIP_RN])
def test_trainer_augment_round_is_deterministic_and_reports_cost(model):
    cfg = TrainerConfig(model=model, partition="dirichlet:0.05", augment="zero-shot", seed=4, **FAST)
    runs = []
    for _ in range(2):
        tr = Trainer(cfg, 0, 4)
        stats = tr.train_round()
        runs.append((tr.adapter_state(), stats))
    (s1, m1), (s2, _) = runs
    assert tr.augment_classes and m1["synthetic_samples"] == 2 * len(tr.augment_classes)
    assert m1["synth_seconds_per_sample"] > 0
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    plain = Trainer(TrainerConfig(model=model, partition="dirichlet:0.05", seed=4, **FAST), 0, 4)
    plain.train_round()
    assert any(not torch.equal(plain.adapter_state()[k], s1[k]) for k in s1)  # the synthetic samples count


def test_invalid_augment_options_name_the_value():
    with pytest.raises(TrainerError, match="'deepinv'"):
        Trainer(TrainerConfig(augment="deepinv", **FAST), 0, 2)
    with pytest.raises(TrainerError, match=r"augment_threshold 2\.0"):
        Trainer(TrainerConfig(augment="zero-shot", augment_threshold=2.0, **FAST), 0, 2)


def test_unseen_at_peer_accuracy():
    tr = Trainer(TrainerConfig(partition="dirichlet:0.05", seed=4, **FAST), 0, 4)
    seen = set(tr.data.train.labels.tolist())
    assert tr.unseen_classes == [c for c in range(8) if c not in seen] and tr.unseen_classes
    ev = tr.evaluate(global_eval=True)
    g = tr.data.global_test
    mask = torch.isin(g.labels, torch.tensor(tr.unseen_classes))
    with torch.no_grad():
        pred = tr.model.logits(g.images[mask], tr._head(g)).argmax(1)
    assert ev["unseen_accuracy"] == pytest.approx((pred == g.labels[mask]).float().mean().item())
    iid = Trainer(TrainerConfig(seed=4, **FAST), 0, 1)
    assert math.isnan(iid.evaluate(global_eval=True)["unseen_accuracy"])


# ---------------------------------------------------------------- fairness figures


def test_fairness_figures_by_hand():
    f = fairness_figures([0.5, 0.9, 0.7, None, float("nan"), 0.3], [0.1, None, 0.3])
    assert f["peers"] == 4 and f["mean"] == pytest.approx(0.6)
    assert f["std"] == pytest.approx(math.sqrt((0.01 + 0.09 + 0.01 + 0.09) / 4))
    assert f["worst"] == f["worst10"] == pytest.approx(0.3) and f["worst_gap"] == pytest.approx(0.3)
    assert f["unseen_mean"] == pytest.approx(0.2) and f["unseen_peers"] == 2
    f20 = fairness_figures([i / 20 for i in range(20)])
    assert f20["worst10"] == pytest.approx((0 + 0.05) / 2)  # worst 10% of 20 peers = 2 peers


def test_report_summarizes_fairness_across_peers():
    recs = {
        p: [{"peer": p, "round": 0, "global_accuracy": 0.2 + 0.2 * p, "unseen_accuracy": 0.1 * p},
            {"peer": p, "round": 1, "accuracy": 0.9}]
        for p in range(3)
    }
    s = summarize(recs, None)
    f = s["accuracy_fairness"]
    assert f["basis"] == "global_accuracy" and f["mean"] == pytest.approx(0.4) and f["worst"] == pytest.approx(0.2)
    assert f["std"] == pytest.approx(math.sqrt(0.08 / 3)) and f["unseen_mean"] == pytest.approx(0.1)


def test_invalid_confidence_names_the_value():
    with pytest.raises(TrainerError, match=r"augment_confidence: 1\.5"):
        Trainer(TrainerConfig(augment="zero-shot", augment_confidence=1.5, **FAST), 0, 2)


# ---------------------------------------------------------------- neighbours as synthesis teachers


def test_assign_teachers_gives_each_class_to_the_teacher_claiming_it_most():
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.2], [0.1, 0.6, 0.1, 0.2], [0.2, 0.2, 0.4, 0.2]])
    assert augment.assign_teachers(scores, [1, 2, 3]) == {1: [1], 2: [2], 0: [3]}  # tie on 3: lower index
    assert augment.assign_teachers(scores, []) == {}
    own = torch.tensor([0.2, 0.2, 0.3, 0.05])
    # claim 2: class 1 (0.6 >= 2 x 0.2) and 3 (0.2 >= 2 x 0.05) pass; class 2 (0.4 < 2 x 0.3) is left out
    assert augment.assign_teachers(scores, [1, 2, 3], own, claim=2.0) == {1: [1], 0: [3]}


def test_neighbour_teachers_synthesise_and_the_student_model_is_restored():
    cfg = TrainerConfig(partition="dirichlet:0.05", augment="zero-shot", augment_distill=0.5, augment_claim=0.0, seed=4, **FAST)
    teacher = Trainer(replace(cfg, augment="off"), 1, 4)
    for _ in range(3):
        teacher.train_round()
    runs = []
    for _ in range(2):
        st = Trainer(cfg, 0, 4)
        zero = {k: torch.zeros_like(v) for k, v in teacher.adapter_state().items()}
        st.set_teachers([zero, teacher.adapter_state()])
        before = st.adapter_state()
        syn = st._synthesize()
        assert all(torch.equal(before[k], v) for k, v in st.adapter_state().items())  # student restored exactly
        runs.append((syn, dict(st.teacher_of), st))
    (s1, of1, st), (s2, of2, _) = runs
    assert torch.equal(s1.inputs, s2.inputs) and of1 == of2  # deterministic under the seed
    assert sorted(of1) == st.augment_classes and sorted(s1.labels.unique().tolist()) == st.augment_classes
    assert s1.probs is not None and s1.probs.shape == (len(s1), 8)
    torch.testing.assert_close(s1.probs.sum(-1), torch.ones(len(s1)))
    assert set(of1.values()) <= {0, 1}
    # each sample scores highest on its class under the teacher that made it (soft labels agree)
    assert (s1.probs.argmax(1) == s1.labels).float().mean() > 0.9


def test_set_teachers_checks_names_and_shapes():
    tr = Trainer(TrainerConfig(partition="dirichlet:0.05", augment="zero-shot", seed=4, **FAST), 0, 4)
    state = tr.adapter_state()
    k = sorted(state)[0]
    with pytest.raises(TrainerError, match=re.escape(repr(k))):
        tr.set_teachers([{kk: v for kk, v in state.items() if kk != k}])
    with pytest.raises(TrainerError, match="augment_teachers 'server'"):
        Trainer(TrainerConfig(augment="zero-shot", augment_teachers="server", **FAST), 0, 2)
    with pytest.raises(TrainerError, match=r"augment_distill 1\.5"):
        Trainer(TrainerConfig(augment="zero-shot", augment_distill=1.5, **FAST), 0, 2)
    with pytest.raises(TrainerError, match=r"augment_claim -1\.0"):
        Trainer(TrainerConfig(augment="zero-shot", augment_claim=-1.0, **FAST), 0, 2)


def test_claim_gate_skips_classes_no_neighbour_knows_better():
    """A teacher identical to the peer claims nothing twice as much: no synthetic samples, plain steps."""
    cfg = TrainerConfig(partition="dirichlet:0.05", augment="zero-shot", augment_claim=2.0, seed=4, **FAST)
    tr = Trainer(cfg, 0, 4)
    tr.set_teachers([tr.adapter_state()])
    stats = tr.train_round()
    assert tr.augment_classes and stats["synthetic_samples"] == 0 and tr.teacher_of == {}
    plain = Trainer(replace(cfg, augment="off", logit_adjust=tr.tau), 0, 4)  # the adjustment augmentation turns on
    plain.train_round()
    assert all(torch.equal(v, tr.adapter_state()[k]) for k, v in plain.adapter_state().items())


@pytest.mark.slow
def test_daemon_passes_neighbour_replicas_as_teachers(tmp_path, cluster_dir, spawn):
    """peer.py hands its CHOCO replicas to the trainer: every round's record counts the teachers."""
    topo, path = make_topology(tmp_path, "ring", 3)
    sets = ["--set", 'partition="dirichlet:0.05"', "--set", 'augment="zero-shot"', "--set", "local_steps=2",
            "--set", "augment_steps=3", "--set", "augment_per_class=1", "--set", "samples_per_peer=64"]
    blocks = ["0-1", "2"]  # peer 2's edges are TCP; two training processes keep the learning stack's load down
    procs = {b: spawn(path, b, cluster_dir, "--rounds", "3", "--min-wait", "30", *sets) for b in blocks}
    assert wait_all(procs, timeout=300) == {b: 0 for b in blocks}
    for p in topo.ids:
        recs = read_jsonl(cluster_dir / "metrics" / f"peer-{p}.jsonl")
        aug = [r for r in recs if "synthetic_samples" in r]
        assert [r["round"] for r in recs] == [0, 1, 2] and aug  # a skewed peer has classes to synthesise
        assert all(r["augment_teachers"] == 2 for r in aug)  # both ring neighbours, every round
