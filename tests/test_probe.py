"""The fixed-noise loss the Train node reports is measured on the subjects' own photos, never on
regularisation or class images chained before them."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.loop import trainer as loop
from trainer.loop.job import Job, JobSpec, probe_examples
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs import export
from trainer.outputs.checkpoints import RunFolder, RunSettings

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


@pytest.fixture(scope="module")
def chained(tiny_flux):
    """Class images first (as the Class Images node is chained), then two subjects."""
    shaping = Shaping(64, bucketing=False)
    regs = datasets.from_folder(QUICKSTART, datasets.Options(trigger_word="sks", default_caption="toy",
                                                             captions="filename", shaping=shaping))
    regs = regs.with_items(regularisation=True)
    sks = datasets.from_folder(QUICKSTART, datasets.Options(trigger_word="sks", shaping=shaping))
    xyz = datasets.from_images(torch.rand(2, 64, 64, 3), ["a photo of [trigger]"],
                               datasets.Options(trigger_word="xyz", shaping=shaping))
    return encode_dataset(regs + sks + xyz, tiny_flux)[0]


def test_the_probe_takes_each_subjects_photos_and_no_regularisation_image(chained):
    assert [e.regularisation for e in chained[:6]] == [True] * 6  # what PROBE_EXAMPLES = 4 used to measure
    probe = probe_examples(chained)
    assert len(probe) == 4 and not any(e.regularisation for e in probe)
    assert [e.subject for e in probe] == ["sks", "xyz", "sks", "xyz"]  # in turn, each subject's own
    assert [e.subject for e in probe_examples(chained, count=1)] == ["sks", "xyz"]  # at least one of each
    regs_only = [e for e in chained if e.regularisation]
    assert probe_examples(regs_only) == regs_only[:4]


def test_the_job_reports_the_loss_on_the_subjects_photos(tiny_flux, chained, tmp_path):
    backend = tiny_flux.backend()
    spec = LayerSpec.preset("attention", backend.dims, rank=2)
    config = loop.TrainConfig(steps=1, learning_rate=1e-3, seed=0)
    examples = [replace(e, latents=torch.zeros_like(e.latents)) if e.regularisation else e for e in chained]
    job = Job(JobSpec(backend, examples, config, spec.targets(backend.dims), RunFolder(tmp_path / "run_001"),
                      RunSettings(save_every=1), export.LoraMetadata(spec, ("sks", "xyz"), "tiny")))
    job.run(QuietHost())
    untrained = LoraSet(spec.targets(backend.dims), seed=0)
    subjects = loop.fixed_noise_loss(backend, untrained, probe_examples(examples), config.guidance)
    first_four = loop.fixed_noise_loss(backend, untrained, examples[:4], config.guidance)
    assert abs(job.loss_before - subjects) < 1e-5 and abs(first_four - subjects) > 1e-3


class QuietHost:
    """A JobHost with nothing to render and no one to tell."""

    def check_cancel(self):
        pass

    def is_cancel(self, error):
        return False

    def render(self, lora, step, should_stop):
        return None

    def __getattr__(self, name):  # on_status, on_progress, on_checkpoint, on_samples, release_memory…
        return lambda *args, **kwargs: None
