"""Differential output preservation (ai-toolkit's diff_output_preservation): the class captions, the
frozen target, the gradient it adds, and that it keeps the class word's meaning while the subject trains."""

from pathlib import Path

import pytest
import torch

from trainer.data import datasets
from trainer.data.augment import Augmentation
from trainer.data.captions import preservation_caption
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.families.conditioning import Conditioning
from trainer.loop import flow
from trainer.loop.memory import MemoryConfig
from trainer.loop.preservation import Preservation
from trainer.loop.text_phase import TextPhase, text_targets
from trainer.loop.trainer import TrainConfig, Trainer, fixed_noise_loss, step_loss, train
from trainer.lora.targets import LayerSpec
from trainer.lora.text_encoder import TEXT_COMPONENTS
from trainer.lora.weights import LoraSet
from trainer.outputs.progress import ProgressTracker

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"  # "a photo of sks toy …"


@pytest.mark.parametrize("caption, expected", [
    ("a photo of sks person, smiling", "a photo of person, smiling"),  # the class word is not doubled
    ("sks Person at the beach", "Person at the beach"),  # … and stays as written
    ("sks, smiling, outdoors", "person, smiling, outdoors"),  # punctuation right after the trigger
    ("(sks) with sks's dog; sks.", "(person) with person's dog; person."),  # every occurrence
    ("asks sks about sksy things", "asks person about sksy things"),  # only the word itself
    ("sks persons", "person persons"),  # 'persons' is not the class word
    ("a photo of sks man", "a photo of person"),  # the dataset's class word ('man') is replaced too
])
def test_the_class_caption_replaces_the_trigger_word(caption, expected):
    assert preservation_caption(caption, "sks", "person", written_class="man") == expected


def test_the_settings_are_checked_by_name():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dop_multiplier is .*use 0 \\(off\\)"):
            TrainConfig(dop_multiplier=bad)
    with pytest.raises(ValueError, match="dop_class is '\\[trigger\\] person'"):
        TrainConfig(dop_multiplier=1.0, dop_class="[trigger] person")
    assert TrainConfig(dop_class="dog").preservation_class() is None  # off: no class captions
    assert TrainConfig(dop_multiplier=0.5, dop_class=" dog ").preservation_class() == "dog"


def options(**kw):
    return datasets.Options(**{"trigger_word": "sks", "class_word": "toy", "shaping": Shaping(64, bucketing=False),
                               **kw})


@pytest.fixture(scope="module")
def examples(tiny_flux):
    return encode_dataset(datasets.from_folder(QUICKSTART, options()), tiny_flux, dop_class="")[0]


def test_class_captions_are_encoded_once_for_every_caption_version(tiny_flux, tmp_path):
    (tmp_path / "p").mkdir()
    for name in ("01.jpg", "02.jpg"):
        (tmp_path / "p" / name).write_bytes((QUICKSTART / name).read_bytes())
    (tmp_path / "p" / "01.txt").write_text("sks toy, smiling, outdoors, red scarf")  # tag shuffles
    (tmp_path / "p" / "02.txt").write_text("a photo of sks")
    subject = datasets.from_folder(tmp_path / "p", options(augment=Augmentation(caption_dropout=0.2,
                                                                                shuffle_tags=True)))
    regularisation = datasets.from_folder(QUICKSTART, options(trigger_word="")).with_items(regularisation=True)
    examples, _ = encode_dataset(subject + regularisation, tiny_flux, dop_class="plush")
    shuffled, plain = examples[0], examples[1]
    assert len(shuffled.preserve) == 1 + len(shuffled.texts) + 1 and len(plain.preserve) == 2
    expected = [tiny_flux.encode_text(c) for c in ("plush, smiling, outdoors, red scarf", "a photo of plush",
                                                   "plush")]  # 'sks toy' -> 'plush'; the dropout caption too
    for (context, pooled), (want_context, want_pooled) in zip([shuffled.preserve[0], *plain.preserve], expected):
        assert torch.equal(context, want_context) and torch.equal(pooled, want_pooled)
    assert all(not e.preserve for e in examples if e.regularisation)  # no trigger, no preservation term


def test_a_dataset_without_a_class_word_or_trigger_stops_before_encoding(tiny_flux):
    with pytest.raises(datasets.DatasetError, match="'sks' have no class word.*set dop_class"):
        encode_dataset(datasets.from_folder(QUICKSTART, options(class_word="")), tiny_flux, dop_class="")
    with pytest.raises(datasets.DatasetError, match="no trigger word.*dop_multiplier to 0"):
        encode_dataset(datasets.from_folder(QUICKSTART, options(trigger_word="")), tiny_flux, dop_class="toy")
    plain = encode_dataset(datasets.from_folder(QUICKSTART, options()), tiny_flux)[0]
    backend = tiny_flux.backend()
    with pytest.raises(ValueError, match="dop_multiplier is 1, but no example has a class caption"):
        Trainer(backend, new_lora(backend), plain, TrainConfig(dop_multiplier=1.0))


def new_lora(backend, seed=0, random_up=False):
    lora = LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=4).targets(backend.dims), torch.float32, seed)
    if random_up:  # as after some training: the LoRA changes the prediction
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in lora:
                w.up.copy_(torch.randn(w.up.shape, generator=generator) * 0.05)
    return lora


def _run(tiny_flux, examples, **config):
    backend, seen = tiny_flux.backend(), []
    lora = new_lora(backend)
    result = train(backend, lora, examples, TrainConfig(**{"steps": 4, "learning_rate": 1e-3, "seed": 3, **config}),
                   on_step=lambda info: seen.append(info.preservation_loss))
    return result.losses, [p.detach().clone() for p in lora.parameters()], seen


def test_dop_off_trains_bit_for_bit_as_without_class_captions(tiny_flux, examples):
    plain = encode_dataset(datasets.from_folder(QUICKSTART, options()), tiny_flux)[0]
    losses, params, seen = _run(tiny_flux, examples, dop_class="toy")
    assert (losses, seen) == (_run(tiny_flux, plain)[0], [None] * 4)
    assert all(torch.equal(p, q) for p, q in zip(params, _run(tiny_flux, plain)[1]))


def test_the_frozen_target_is_the_model_without_the_lora(tiny_flux, examples):
    backend = tiny_flux.backend()
    lora, calls = new_lora(backend, random_up=True), []
    velocity = backend.velocity

    def recording(*args):
        out = velocity(*args)
        calls.append((torch.is_grad_enabled(), [a.detach().clone() if torch.is_tensor(a) else a for a in args],
                      out.detach().clone()))
        return out

    backend.velocity = recording
    with backend.training(lora, MemoryConfig("blocks")):
        step_loss(backend, examples[:2], TrainConfig(batch_size=2), torch.Generator().manual_seed(0),
                  preserve=Preservation(lora, 1.0, backend.device))
    backend.velocity = velocity
    (_, subject, _), (frozen_grad, frozen_args, target), (_, class_args, with_lora) = calls
    assert not frozen_grad and torch.equal(frozen_args[0], subject[0]) and torch.equal(frozen_args[1], subject[1])
    assert torch.equal(frozen_args[2].context, torch.stack([e.preserve[0][0] for e in examples[:2]]))  # class captions
    bare = velocity(*frozen_args)  # no hooks attached now: the model as loaded
    assert torch.allclose(target, bare, atol=1e-6)
    assert torch.equal(class_args[2].context, frozen_args[2].context)
    assert (with_lora - bare).abs().max() > 1e-3  # the LoRA side


MODES = [MemoryConfig("off"), MemoryConfig("blocks"), MemoryConfig("offload"), MemoryConfig("blocks", swap_blocks=3)]


@pytest.mark.parametrize("memory", MODES, ids=MemoryConfig.describe)
def test_the_gradient_is_the_subject_loss_plus_the_preservation_term(tiny_flux, examples, memory):
    backend, multiplier, batch = tiny_flux.backend(), 0.7, examples[:2]
    config = TrainConfig(batch_size=2, memory=memory)
    lora = new_lora(backend, random_up=True)
    with backend.resident(lora, memory), backend.training(lora, memory):
        step_loss(backend, batch, config, torch.Generator().manual_seed(5),
                  preserve=Preservation(lora, multiplier, backend.device))
    trained = [p.grad.clone() for p in lora.trainable()]
    lora.zero_grad(set_to_none=True)

    generator = torch.Generator().manual_seed(5)  # by hand: the same draws, one graph, the target from the bare model
    latents = torch.stack([e.latents for e in batch])
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = config.timesteps.sample(2, backend.family.tokens(*latents.shape[-2:]), generator)
    noisy = flow.noisy_latents(latents, noise, sigmas)
    context, pooled = (torch.stack([e.preserve[0][i] for e in batch]) for i in range(2))
    with torch.no_grad():
        target = backend.velocity(noisy, sigmas, Conditioning(context, pooled))
    with backend.lora_applied(lora):
        v = backend.velocity(noisy, sigmas, Conditioning.of([(e.context, e.pooled) for e in batch]))
        subject = flow.flow_matching_loss(v, flow.velocity_target(latents, noise)).mean()
        kept = (backend.velocity(noisy, sigmas, Conditioning(context, pooled)) - target).square().flatten(1).mean(1)
        kept = kept.mean()
        (subject + multiplier * kept).backward()
    for got, want in zip(trained, (p.grad for p in lora.trainable())):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_the_preservation_loss_is_reported_apart_with_accumulation_batches_and_ema(tiny_flux, examples):
    losses, _, seen = _run(tiny_flux, examples, dop_multiplier=1.0, batch_size=2, gradient_accumulation_steps=2,
                           ema_decay=0.9, memory=MemoryConfig("blocks"))
    assert seen[0] == 0.0  # the LoRA starts as a no-op (up = 0): its class prediction is the frozen one
    assert all(0 < s < 1e-2 for s in seen[1:]), seen
    assert len(losses) == 4 and all(loss > 0.5 for loss in losses)  # the subject's loss alone, as without DOP
    assert "dop 0.0012" in ProgressTracker(4, torch.device("cpu")).update(1, 1.0, 1e-4, 0.00123).line()


@torch.no_grad()
def class_drift(backend, lora, examples) -> float:
    """Mean squared difference between the LoRA's and the frozen model's velocity for the class
    captions, at fixed noise and σ: how far training moved what the class word means."""
    generator, total = torch.Generator().manual_seed(1), []
    with backend.lora_applied(lora):
        for e in examples:
            for sigma in (0.3, 0.5, 0.7):
                noise = torch.randn((1, *e.latents.shape), generator=generator)
                noisy, s = flow.noisy_latents(e.latents[None], noise, torch.tensor([sigma])), torch.tensor([sigma])
                context, pooled = e.preserve[0][0][None], e.preserve[0][1][None]
                on = backend.velocity(noisy, s, Conditioning(context, pooled))
                with lora.disabled():
                    off = backend.velocity(noisy, s, Conditioning(context, pooled))
                total.append((on - off).square().mean().item())
    return sum(total) / len(total)


def test_dop_keeps_the_class_word_while_the_subject_trains(tiny_flux, examples):
    backend = tiny_flux.backend()
    results = {}
    for multiplier in (0.0, 1.0):
        lora = new_lora(backend)
        before = fixed_noise_loss(backend, lora, examples)
        train(backend, lora, examples, TrainConfig(steps=20, learning_rate=3e-3, seed=0, dop_multiplier=multiplier))
        results[multiplier] = (fixed_noise_loss(backend, lora, examples) / before, class_drift(backend, lora, examples))
    (plain_loss, plain_drift), (dop_loss, dop_drift) = results[0.0], results[1.0]
    assert dop_drift < 0.35 * plain_drift, results  # measured: 0.82 without, 0.17 with (4.7× less)
    assert dop_loss < 0.9 and plain_loss < 0.8, results  # the subject's fixed-noise loss still falls (−19%; −27%)


def _te_dop_step(tiny_flux, examples, lora, text, dop: float):
    """One step_loss of the text encoder's phase (batch 2, seed 0); (the velocity calls' args, the
    text-encoder LoRA's gradients)."""
    backend, calls = tiny_flux.backend(), []
    velocity = backend.velocity

    def recording(*args):
        calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return velocity(*args)

    config = TrainConfig(batch_size=2, text_encoder_lr=1e-4, dop_multiplier=dop)
    phase = TextPhase.of(config, lora, text)
    lora.zero_grad(set_to_none=True)
    backend.velocity = recording
    try:
        with backend.training(lora, MemoryConfig("off")), phase.embeddings(lora) as embed:
            step_loss(backend, examples[:2], config, torch.Generator().manual_seed(0),
                      preserve=Preservation(lora, dop, backend.device) if dop else None, text=embed, lora=lora)
    finally:
        backend.velocity = velocity
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for p in lora.part(*TEXT_COMPONENTS).parameters()]
    return calls, grads


def test_dop_in_the_text_encoders_phase_reads_class_captions_through_the_trained_encoder(tiny_flux, examples):
    """In the text encoder's phase the LoRA's side of DOP gets the class caption's live embeddings
    (they move with the text encoder's LoRA), the frozen target the frozen encoder's (they don't),
    and DOP's gradient reaches the text encoder's LoRA."""
    backend, text = tiny_flux.backend(), tiny_flux.trainable_text()
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    config = TrainConfig(text_encoder_lr=1e-4)
    lora = LoraSet(spec.targets(backend.dims) + text_targets(config, text, spec), seed=1)
    seen = []
    for seed in (1, 2):  # two different text-encoder LoRAs
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in lora.part(*TEXT_COMPONENTS):
                w.up.copy_(torch.randn(w.up.shape, generator=generator) * 0.5)
        calls, _ = _te_dop_step(tiny_flux, examples, lora, text, 1.0)
        _, target, with_lora = calls  # the subjects', DOP's frozen target, DOP's LoRA side
        seen.append((target, with_lora))
    frozen = [torch.stack([e.preserve[0][i] for e in examples[:2]]) for i in range(2)]
    for target, _ in seen:  # the target: the cached class captions of the frozen encoder, every time
        assert torch.equal(target[2].context, frozen[0]) and torch.equal(target[2].pooled, frozen[1])
    (_, first), (_, second) = seen
    first, second = first[2].pooled.detach(), second[2].pooled.detach()
    assert (first - frozen[1]).abs().max() > 1e-3  # CLIP-L's pooled vector through the LoRA…
    assert (first - second).abs().max() > 1e-3  # …which moves when the LoRA does
    _, without = _te_dop_step(tiny_flux, examples, lora, text, 0.0)
    _, with_dop = _te_dop_step(tiny_flux, examples, lora, text, 1.0)
    difference = max((a - b).abs().max().item() for a, b in zip(with_dop, without))
    assert difference > 1e-6  # DOP's term adds its own gradient into the text encoder's LoRA
