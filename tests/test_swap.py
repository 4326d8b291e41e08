"""Block swap through a whole job, counted: the weights on the "device" (every model tensor that
is not a CPU copy a block swap keeps) never exceed a budget smaller than the model, while training,
at checkpoint and validation pauses, and while rendering; and swapping changes no result."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.loop.memory as memory
from trainer import files
from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.families.conditioning import Conditioning
from trainer.loop import trainer as loop
from trainer.loop.job import Job, JobSpec, ValidationSchedule
from trainer.loop.memory import MemoryConfig, swapped_indices
from trainer.lora.targets import LayerSpec
from trainer.outputs import export
from trainer.outputs.checkpoints import RunFolder, RunSettings
from trainer.outputs.progress import Sample
from trainer.outputs.sample import sample

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])


class DeviceBytes:
    """Counts device-resident weight bytes whenever a layer of the model runs (so inside each
    block, after its weights were loaded and the next block's prefetch began), and on demand."""

    def __init__(self, model: torch.nn.Module, monkeypatch):
        self.model, self.swaps = model, []
        self.seen: dict[str, int] = {}  # phase -> the most bytes counted in it
        init = memory.BlockSwap.__init__

        def recording_init(swap, *args, **kwargs):
            init(swap, *args, **kwargs)
            self.swaps.append(swap)

        monkeypatch.setattr(memory.BlockSwap, "__init__", recording_init)
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.handles = [m.register_forward_pre_hook(lambda *_: self.count() and None) for m in layers]

    def now(self) -> int:
        on_host = {h.untyped_storage().data_ptr() for s in self.swaps for pairs in s.host.values() for _, h in pairs}
        return sum(t.nbytes for t in [*self.model.parameters(), *self.model.buffers()]
                   if t.untyped_storage().data_ptr() not in on_host)

    def count(self, phase: str | None = None) -> int:
        if phase is None:
            phase = "training" if threading.current_thread().name == "flux-dreambooth-train" else "render"
        n = self.now()
        self.seen[phase] = max(self.seen.get(phase, 0), n)
        return n

    def remove(self):
        for h in self.handles:
            h.remove()


class CountingHost:
    """Renders with the library's sampler (LoRA on, as ComfyUI's renders are) and counts the
    device bytes at every pause."""

    def __init__(self, job: Job, model, meter: DeviceBytes):
        self.job, self.model, self.meter = job, model, meter
        self.images: dict[int, torch.Tensor] = {}

    def check_cancel(self):
        pass

    def is_cancel(self, error):
        return False

    def on_status(self, state, message):
        pass

    def on_progress(self, progress, latest):
        pass

    def on_checkpoint(self, step, path):
        self.meter.count("pause")

    def on_rendering(self, step, count):
        self.meter.count("pause")

    def render(self, lora, step, should_stop):
        backend = self.job.spec.backend
        context, pooled = self.model.encode_text("a photo of sks toy")
        with torch.inference_mode(), backend.lora_applied(lora):  # as on ComfyUI's node thread
            latents = sample(backend, Conditioning(context[None], pooled[None], 3.5), 8, 8, steps=2, seed=0)
        self.images[step] = latents.clone()
        pixels = self.model.decode(latents)
        image = Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        path = files.write_image(self.job.spec.run.path / "samples" / f"step_{step:06d}.png", image)
        return [Sample(step, 0, "sample", path)], pixels

    def on_samples(self, step, samples):
        self.meter.count("pause")

    def release_memory(self):
        pass


@pytest.fixture(scope="module")
def examples(tiny_flux):
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0][:1]


def _job(tiny_flux, examples, folder: Path, mem: MemoryConfig) -> Job:
    backend = tiny_flux.backend()
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    config = loop.TrainConfig(steps=2, learning_rate=1e-3, seed=0, memory=mem)
    return Job(JobSpec(backend, examples, config, spec.targets(backend.dims), RunFolder(folder),
                       RunSettings(save_every=1), export.LoraMetadata(spec, "sks", "tiny"),
                       validation=ValidationSchedule(1, True, 1)))


def test_swapped_blocks_never_exceed_the_budget_and_change_nothing(tiny_flux, examples, tmp_path, monkeypatch):
    swap = 5  # a double block and the four single blocks
    model = tiny_flux.transformer
    blocks = [m for _, m, _ in tiny_flux.backend().blocks()]
    swapped = [blocks[i] for i in swapped_indices(len(blocks), swap)]
    whole = _nbytes(model)
    # the card: the model less its swapped blocks, plus two of them in flight (one computing, one copying)
    budget = whole - sum(map(_nbytes, swapped)) + 2 * max(map(_nbytes, swapped))
    assert budget < whole
    before = {k: v.clone() for k, v in model.state_dict().items()}

    plain_job = _job(tiny_flux, examples, tmp_path / "plain", MemoryConfig("blocks"))
    plain_host = CountingHost(plain_job, tiny_flux, DeviceBytes(model, monkeypatch))
    plain = plain_job.run(plain_host)
    plain_host.meter.remove()

    job = _job(tiny_flux, examples, tmp_path / "swap", MemoryConfig("blocks", swap_blocks=swap))
    meter = DeviceBytes(model, monkeypatch)
    host = CountingHost(job, tiny_flux, meter)
    try:
        swapped_run = job.run(host)
    finally:
        meter.remove()

    assert set(meter.seen) == {"training", "render", "pause"}
    assert max(meter.seen.values()) <= budget, (meter.seen, budget, whole)
    assert meter.seen["pause"] == whole - sum(map(_nbytes, swapped))  # nothing swapped is left on at a pause
    assert plain_host.meter.seen["pause"] == whole  # (without swapping, everything is)
    # the same LoRA and the same validation images as without swapping
    for a, b in zip(swapped_run.lora.state_dict().values(), plain.lora.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert host.images.keys() == plain_host.images.keys() == {0, 1, 2}
    for step, image in host.images.items():
        assert torch.allclose(image, plain_host.images[step], atol=1e-5)
    # afterwards every weight is the model's own again, in ordinary memory
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(s.host == {} for s in meter.swaps) and meter.now() == whole
