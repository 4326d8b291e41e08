"""The text encoder's LoRA (ai-toolkit recipes' late text-encoder finetune, diffusers'
--train_text_encoder) on the tiny FLUX: frozen before its start, live embeddings after, resume
across the start, export names."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from trainer import files
from trainer.data import datasets
from trainer.data.augment import Augmentation
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.loop.text_phase import text_targets
from trainer.loop.trainer import TrainConfig, Trainer, fixed_noise_loss
from trainer.lora.targets import LayerSpec
from trainer.lora.text_encoder import CLIP_L, T5XXL, TEXT_COMPONENTS
from trainer.lora.weights import LoraSet
from trainer.outputs import checkpoints, export

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


@pytest.fixture(scope="module")
def examples(tiny_flux):
    augment = Augmentation(caption_dropout=0.3, shuffle_tags=True)
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False), augment=augment)
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0]


class Counting:
    """The tiny FLUX's encoders, counting the captions they encode."""

    def __init__(self, text):
        self.text, self.captions = text, []

    def encoders(self):
        return self.text.encoders()

    def encode(self, caption, components):
        self.captions.append(caption)
        return self.text.encode(caption, components)

    def ready(self, trained):
        return self.text.ready(trained)


def te_trainer(tiny_flux, examples, steps=6, start=0.5, t5=False, **overrides):
    backend = tiny_flux.backend()
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    config = TrainConfig(**{"steps": steps, "learning_rate": 1e-3, "seed": 3, "text_encoder_lr": 5e-4,
                            "text_encoder_start": start, "text_encoder_t5": t5, **overrides})
    text = Counting(tiny_flux.trainable_text())
    lora = LoraSet(spec.targets(backend.dims) + text_targets(config, text, spec), seed=1)
    return Trainer(backend, lora, examples, config, text), spec


def text_weights(trainer):
    return [p.detach().clone() for p in trainer.lora.part(*TEXT_COMPONENTS).parameters()]


def test_frozen_before_the_start_step_then_trained_at_its_own_rate(tiny_flux, examples):
    trainer, _ = te_trainer(tiny_flux, examples, steps=6, start=0.5)
    assert trainer.text.start == 3 and [c for c in trainer.lora.components()] == ["transformer", CLIP_L]
    initial = text_weights(trainer)
    assert not any(w.up.any() for w in trainer.lora.part(CLIP_L))  # zero delta at the start
    trainer.run(until=3)
    assert all(torch.equal(a, b) for a, b in zip(initial, text_weights(trainer)))  # not stepped, not decayed
    group = trainer.optimizer.param_groups[1]
    assert group["lr"] == 5e-4 and trainer.optimizer.param_groups[0]["lr"] == 1e-3
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.lora.part(CLIP_L).parameters()}
    trainer.run()
    assert all(not torch.equal(a, b) for a, b in zip(initial, text_weights(trainer)))  # every down and up moved


def test_cached_embeddings_before_the_start_live_ones_after(tiny_flux, examples):
    """Before the start nothing is encoded; after it every caption is, and the cache is never
    read (it is poisoned with NaN from the start on: a step that read it would fail)."""
    trainer, _ = te_trainer(tiny_flux, examples, steps=6, start=3)
    trainer.run(until=3)
    assert trainer.text.text.captions == []
    saved = [(e.pooled, e.texts, e.dropout_text) for e in trainer.examples]
    for e in trainer.examples:  # CLIP-L only: its pooled vectors must come live, T5's tokens from the cache
        nan = torch.full_like(e.pooled, math.nan)
        e.pooled, e.texts = nan, [(c, nan) for c, _ in e.texts]
        e.dropout_text = (e.dropout_text[0], nan) if e.dropout_text else None
    try:
        trainer.run()
    finally:
        for e, (pooled, texts, dropout) in zip(trainer.examples, saved):
            e.pooled, e.texts, e.dropout_text = pooled, texts, dropout
    assert all(math.isfinite(loss) for loss in trainer.losses)
    encoded = trainer.text.text.captions
    assert len(encoded) == 3  # one caption per step (batch 1)
    known = {c for e in examples for c in [e.caption, e.dropout_caption, *e.shuffled_captions]}
    assert set(encoded) <= known


def test_live_embeddings_equal_the_cache_while_the_lora_is_zero(tiny_flux, examples):
    trainer, _ = te_trainer(tiny_flux, examples, t5=True)
    e = examples[0]
    with torch.no_grad(), trainer.text.embeddings(trainer.lora) as embed:
        context, pooled = embed(e.caption, torch.zeros(1), torch.zeros(1))
    assert torch.allclose(context, e.context, atol=1e-5) and torch.allclose(pooled, e.pooled, atol=1e-5)


def test_fixed_noise_loss_falls_with_the_text_encoder_trained(tiny_flux, examples):
    trainer, _ = te_trainer(tiny_flux, examples, steps=40, start=0.5, learning_rate=2e-3, text_encoder_lr=1e-3,
                            seed=0)
    probe = examples[:4]
    before = fixed_noise_loss(trainer.backend, trainer.lora, probe)
    trainer.run()
    with trainer.text_embeddings(trainer.lora) as text:
        assert text is not None
        after = fixed_noise_loss(trainer.backend, trainer.lora, probe, text=text)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("pause", [2, 5], ids=["before the start", "after the start"])
def test_resume_across_the_start_gives_the_uninterrupted_lora(tiny_flux, examples, tmp_path, pause):
    config = dict(steps=8, start=0.5, ema_decay=0.9, lr_schedule="cosine", warmup_steps=1, batch_size=2)
    straight, spec = te_trainer(tiny_flux, examples, **config)
    straight.run()
    first, _ = te_trainer(tiny_flux, examples, **config)
    first.run(until=pause)
    state = {**first.state(), **checkpoints.describe(spec, first.backend.dims, first.lora)}
    checkpoint = checkpoints.RunFolder(tmp_path).save(first.step, export.kohya_state_dict(first.result_lora()), {},
                                                      state)
    second, _ = te_trainer(tiny_flux, examples, **config)
    second.load_state(checkpoints.load_state(checkpoint))
    second.run()
    assert second.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(second.lora.parameters(), straight.lora.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(second.result_lora().parameters(),
                                                  straight.result_lora().parameters()))
    loaded = checkpoints.load_trained_lora(checkpoint)  # both parts rebuilt from the checkpoint alone
    assert loaded.keys() == export.kohya_state_dict(first.result_lora()).keys()


def test_resuming_a_checkpoint_without_the_text_encoder_is_named(tiny_flux, examples, tmp_path):
    plain, spec = te_trainer(tiny_flux, examples, steps=4, text_encoder_lr=0.0)
    assert plain.text is None and plain.lora.components() == ["transformer"]
    plain.run(until=2)
    state = {**plain.state(), **checkpoints.describe(spec, plain.backend.dims, plain.lora)}
    checkpoint = checkpoints.RunFolder(tmp_path).save(2, export.kohya_state_dict(plain.lora), {}, state)
    with_te, _ = te_trainer(tiny_flux, examples, steps=4)
    with pytest.raises(ValueError, match="trained no text encoder, this run trains clip_l"):
        with_te.load_state(checkpoints.load_state(checkpoint))


def test_kohya_and_diffusers_names_of_both_parts(tiny_flux, examples, tmp_path):
    trainer, _ = te_trainer(tiny_flux, examples, t5=True)
    with torch.no_grad():
        for i, w in enumerate(trainer.lora):
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    sd = export.kohya_state_dict(trainer.lora)
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in sd}
    assert all(f"{m}.alpha" in sd and f"{m}.lora_up.weight" in sd for m in modules)
    clip = sorted(m for m in modules if m.startswith("lora_te1_"))
    assert clip == sorted(f"lora_te1_text_model_encoder_layers_{i}_{kind}" for i in range(2)
                          for kind in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                       "self_attn_out_proj", "mlp_fc1", "mlp_fc2"))
    t5 = {m for m in modules if m.startswith("lora_te3_")}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5 and len(t5) == 2 * 7
    assert len(modules) == len(clip) + len(t5) + sum(m.startswith("lora_unet_") for m in modules)
    with pytest.raises(ValueError, match="T5-XXL.*kohya format"):
        export.state_dict(trainer.lora, "diffusers")


def test_diffusers_format_loads_into_the_clip_with_the_same_pooled_output(tiny_flux, examples, tmp_path):
    from trainer.families.flux1 import tiny

    trainer, _ = te_trainer(tiny_flux, examples)
    with torch.no_grad():
        for i, w in enumerate(trainer.lora.part(CLIP_L)):
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    sd = export.state_dict(trainer.lora, "diffusers")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert not any(k.startswith(("text_encoder_2.", T5XXL)) for k in sd)
    e = examples[0]
    with torch.no_grad(), trainer.text.embeddings(trainer.lora) as embed:
        expected = embed(e.caption, e.context, e.pooled)[1]
    assert not torch.allclose(expected, e.pooled, atol=1e-3)
    fresh = tiny.build(seed=0)  # the same weights as the session's model, free to change
    path = files.write_safetensors(tmp_path / "d.safetensors", sd, {})
    state, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=fresh.clip,
                                             prefix="text_encoder")
    assert torch.allclose(fresh.encode_text(e.caption)[1], expected, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(text_encoder_lr=1e-5, text_encoder_start=1000), "text_encoder_start is 1000: step 1000, at or past steps"),
    (dict(text_encoder_lr=1e-5, text_encoder_start=0.9999), "step 1000, at or past steps"),
    (dict(text_encoder_start=2.5), "text_encoder_start is 2.5; use a fraction"),
    (dict(text_encoder_start=-0.1), "text_encoder_start is -0.1"),
    (dict(text_encoder_lr=-1e-5), "text_encoder_lr is -1e-05"),
    (dict(text_encoder_rank=-4), "text_encoder_rank is -4"),
    (dict(text_encoder_t5="yes"), "text_encoder_t5 is 'yes'")])
def test_bad_text_encoder_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=1000, **settings)


def test_start_is_a_fraction_below_one_else_a_step():
    assert TrainConfig(steps=7000, text_encoder_lr=5e-6, text_encoder_start=0.85).text_encoder_start_step() == 5950
    assert TrainConfig(steps=7000, text_encoder_lr=5e-6, text_encoder_start=5600).text_encoder_start_step() == 5600
    assert TrainConfig(steps=10, text_encoder_lr=5e-6).text_encoder_start_step() == 0


def test_rank_zero_is_the_transformers_rank_and_alpha(tiny_flux):
    backend = tiny_flux.backend()
    spec = LayerSpec.preset("attention", backend.dims, rank=4, alpha=2.0)
    text = tiny_flux.trainable_text()
    same = text_targets(TrainConfig(steps=10, text_encoder_lr=1e-5), text, spec)
    assert {(t.rank, t.scale, t.component) for t in same} == {(4, 0.5, CLIP_L)} and len(same) == 12
    own = text_targets(TrainConfig(steps=10, text_encoder_lr=1e-5, text_encoder_rank=8, text_encoder_t5=True),
                       text, spec)
    assert {(t.rank, t.scale) for t in own} == {(8, 1.0)} and {t.component for t in own} == {CLIP_L, T5XXL}
    assert text_targets(TrainConfig(steps=10), text, spec) == []
    with pytest.raises(ValueError, match="text_encoder_rank is 100 for CLIP-L's"):
        text_targets(TrainConfig(steps=10, text_encoder_lr=1e-5, text_encoder_rank=100), text, spec)


def test_command_line_trains_both_parts_and_renders_with_them(tiny_flux, tmp_path, monkeypatch):
    from trainer import cli
    from trainer.cli import train as cli_train

    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt"):
        (tmp_path / "photos" / name).write_bytes((QUICKSTART / name).read_bytes())
    (tmp_path / "recipe.yaml").write_text(
        "dataset: {folders: photos, trigger: sks, resolution: 64, bucketing: false}\n"
        "layers: {preset: attention, rank: 4}\n"
        "train: {steps: 4, learning_rate: 3e-3, text_encoder_lr: 1e-3, text_encoder_start: 0.5}\n"
        "save: {every: 2, name: te, output: runs}\n"
        "validation: {prompts: ['a photo of [trigger]'], every: 2, steps: 2, before_training: false}\n")
    assert cli.main(["train", "--config", str(tmp_path / "recipe.yaml"), "--model", "tiny"]) == 0
    run = checkpoints.RunFolder(tmp_path / "runs" / "te_001")
    at_start, last = (checkpoints.load_lora(c)[0] for c in run.checkpoints())
    clip_ups = [k for k in last if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert len(clip_ups) == 12 and all(not at_start[k].any() for k in clip_ups)  # step 2: not trained yet
    assert all(last[k].any() for k in clip_ups)  # step 4: trained
    saved = tmp_path / "runs" / "te_001.safetensors"
    assert export.read_metadata(saved)["dreambooth.text_encoders"] == CLIP_L
    assert set(export.load(saved)) == set(last)
    assert len(list((run.path / "samples").glob("step_*.png"))) == 2
