"""Host tests for training as a job: samples, checkpoints, resume, cancel, events (in-process)."""

import shutil
import threading
import time

import numpy as np
import pytest
import torch
from comfyui_host import requires_host, train_prompt
from PIL import Image

pytestmark = requires_host

VALIDATION = {"prompts": "a photo of [trigger] toy on the beach\n[trigger] toy in the snow", "seeds": "7",
              "guidance": "3.5", "sample_steps": "6", "width": 64, "height": 64, "every_n_steps": 3,
              "sampler_name": "euler", "scheduler": "simple", "before_training": True}


def job_prompt(run_name, steps=6, save_every=3, resume="", validation=True, **train_inputs):
    prompt = train_prompt(steps=steps, run=["21", 0], **train_inputs)
    prompt["21"] = {"class_type": "FluxDreamBoothRun", "inputs": {
        "run_name": run_name, "save_every_n_steps": save_every, "keep_last": 0, "resume_from": resume,
        "plot_every_n_steps": 2}}
    if validation:
        prompt["20"] = {"class_type": "FluxDreamBoothValidation", "inputs": dict(VALIDATION)}
        prompt["4"]["inputs"]["validation"] = ["20", 0]
    return prompt


def run_dir(host, name):
    return host.root / "output" / "flux_dreambooth" / name


def checkpoint_lora(host, run, step):
    import comfy.utils

    path = run_dir(host, run) / "checkpoints" / f"step_{step:06d}" / "lora.safetensors"
    return comfy.utils.load_torch_file(str(path))


def same_lora(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.fixture(scope="module")
def job(host):
    """One run with samples every 3 steps and checkpoints every 3 steps."""
    outputs = host.run(job_prompt("job"))
    return outputs, list(host.server.events)


def test_a_run_leaves_checkpoints_samples_grid_strip_plots_and_history(host, job):
    folder = run_dir(host, "job_001")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    names = sorted(p.name for p in (folder / "samples").iterdir())
    assert names == [f"step_{s:06d}_{e:02d}.png" for s in (0, 3, 6) for e in (0, 1)]
    for f in ("grid.png", "progress.gif", "loss.png", "loss_history.csv", "loss_history.json", "samples.json"):
        assert (folder / f).is_file(), f
    with Image.open(folder / "progress.gif") as gif:
        assert gif.n_frames == 3
    assert len((folder / "loss_history.csv").read_text().splitlines()) == 1 + 6


def test_progress_samples_and_checkpoints_reach_the_websocket(job):
    outputs, events = job
    progress = [d for e, d in events if e == "flux_dreambooth.progress"]
    assert progress[-1]["step"] == 6 and progress[-1]["total"] == 6
    for field in ("loss", "loss_smooth", "lr", "seconds_per_step", "eta_seconds", "peak_memory_gib"):
        assert np.isfinite(progress[-1][field]), field
    samples = [d for e, d in events if e == "flux_dreambooth.samples"]
    assert [d["step"] for d in samples] == [0, 3, 6] and len(samples[0]["images"]) == 2
    assert samples[0]["images"][0]["subfolder"] == "flux_dreambooth/job_001/samples"
    assert [d["step"] for e, d in events if e == "flux_dreambooth.checkpoint"] == [3, 6]
    states = [d["state"] for e, d in events if e == "flux_dreambooth.status"]
    assert states == ["training", "done"]


def test_samples_are_the_images_comfyui_renders_with_that_checkpoint(host, job):
    """Copy checkpoint 3's LoRA into models/loras and render entry 1 with stock nodes: the same pixels."""
    shutil.copy(run_dir(host, "job_001") / "checkpoints" / "step_000003" / "lora.safetensors",
                host.root / "loras" / "job_step3.safetensors")
    stock = {
        "1": {"class_type": "FluxDreamBoothTinyFlux", "inputs": {"seed": 0, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "job_step3.safetensors",
                                                              "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "sks toy in the snow"}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 7, "steps": 6, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "stock"}},
    }
    rendered = np.asarray(Image.open(host.output_file(host.run(stock)["8"])))
    ours = np.asarray(Image.open(run_dir(host, "job_001") / "samples" / "step_000003_01.png"))
    before = np.asarray(Image.open(run_dir(host, "job_001") / "samples" / "step_000000_01.png"))
    assert np.array_equal(rendered, ours)
    assert not np.array_equal(ours, before)  # and the LoRA at step 3 does change the image


def test_rendering_samples_does_not_disturb_training(host, job):
    host.run(job_prompt("quiet", validation=False))
    assert same_lora(checkpoint_lora(host, "quiet_001", 6), checkpoint_lora(host, "job_001", 6))


def test_resume_latest_gives_the_uninterrupted_lora(host, job):
    host.run(job_prompt("resumed", steps=3, validation=False))  # stops after step 3
    outputs = host.run(job_prompt("resumed", steps=6, resume="latest", validation=False))
    assert outputs["4"]["text"][0].startswith("6 steps")
    assert sorted(p.name for p in (run_dir(host, "resumed_001") / "checkpoints").iterdir()) == \
        ["step_000003", "step_000006"]
    assert same_lora(checkpoint_lora(host, "resumed_001", 6), checkpoint_lora(host, "job_001", 6))


def test_load_checkpoint_lora_picks_a_checkpoint(host, job):
    prompt = {"1": {"class_type": "FluxDreamBoothLoadCheckpoint",
                    "inputs": {"checkpoint": "job_001/checkpoints/step_000003"}},
              "2": {"class_type": "FluxDreamBoothSave", "inputs": {"lora": ["1", 0], "filename_prefix": "picked",
                                                                   "format": "kohya", "precision": "fp32"}}}
    saved = host.run(prompt)["2"]["text"][0]
    import comfy.utils

    assert same_lora(comfy.utils.load_torch_file(str(host.root / "loras" / saved)), checkpoint_lora(host, "job_001", 3))


def test_bad_resume_is_named(host):
    with pytest.raises(RuntimeError, match="no run called 'never' has a checkpoint"):
        host.run(job_prompt("never", resume="latest", validation=False))
    with pytest.raises(RuntimeError, match="leaves the flux_dreambooth folder"):
        host.run(job_prompt("x", resume="../../etc", validation=False))


def test_cancel_saves_a_checkpoint_that_resumes_exactly(host, job):
    import comfy.model_management

    prompt = job_prompt("cancelled", steps=2000, save_every=1000, validation=False)
    loras_before = sorted((host.root / "loras").rglob("*"))
    host.server.events.clear()
    result = {}
    runner = threading.Thread(target=lambda: result.update(ok=_run_quietly(host, prompt)))
    runner.start()
    deadline = time.time() + 120
    while not _progress(host) and time.time() < deadline:
        time.sleep(0.05)
    assert _progress(host) >= 1, "training never reported progress"
    comfy.model_management.interrupt_current_processing(True)
    runner.join(timeout=60)
    assert not runner.is_alive() and result["ok"] is False
    assert sorted((host.root / "loras").rglob("*")) == loras_before  # nothing half-saved into models/loras
    saved = [d["step"] for e, d in list(host.server.events) if e == "flux_dreambooth.checkpoint"]
    assert len(saved) == 1 and 1 <= saved[0] <= _progress(host) + 1  # the step under way may finish
    assert (run_dir(host, "cancelled_001") / "checkpoints" / f"step_{saved[0]:06d}" / "state.pt").is_file()
    assert [d["state"] for e, d in host.server.events if e == "flux_dreambooth.status"][-1] == "cancelled"
    import gc

    gc.collect()
    assert not [o for o in gc.get_objects() if type(o).__name__ in ("Trainer", "TrainingSession")]  # memory freed
    # ComfyUI is left as it was: kernels flag off, no LoRA hooks or wrapped blocks on any FLUX
    import comfy.ldm.flux.model

    assert not comfy.model_management.in_training
    fluxes = [o for o in gc.get_objects() if type(o) is comfy.ldm.flux.model.Flux]
    assert fluxes and not any(m._forward_hooks for f in fluxes for m in f.modules())
    assert not any("forward" in b.__dict__ for f in fluxes for b in [*f.double_blocks, *f.single_blocks])
    # continuing it gives what the uninterrupted run gave (the lr schedule is constant, so steps=2000
    # before and 6 now train the same)
    host.run(job_prompt("cancelled", steps=6, save_every=1000, resume="latest", validation=False))
    assert same_lora(checkpoint_lora(host, "cancelled_001", 6), checkpoint_lora(host, "job_001", 6))


def _progress(host) -> int:
    return max((d["step"] for e, d in list(host.server.events) if e == "flux_dreambooth.progress"), default=0)


def _run_quietly(host, prompt) -> bool:
    try:
        host.run(prompt)
        return True
    except RuntimeError:
        return False


def _start(host, prompt):
    host.server.events.clear()
    result = {}
    runner = threading.Thread(target=lambda: result.update(ok=_run_quietly(host, prompt)))
    runner.start()
    return runner, result


def _wait_for(host, kind, timeout=120):
    deadline = time.time() + timeout
    while not [d for e, d in list(host.server.events) if e == kind] and time.time() < deadline:
        time.sleep(0.02)
    assert [d for e, d in list(host.server.events) if e == kind], f"no {kind} event"


def _statuses(host):
    return [d["state"] for e, d in list(host.server.events) if e == "flux_dreambooth.status"]


def test_cancel_before_the_first_step_does_not_hang(host, monkeypatch):
    """Cancel while the loop is still measuring its starting loss (slowed down here)."""
    import comfy.model_management

    session = host.pack.trainer.loop.job
    measure = session.fixed_noise_loss

    def slow(*args, **kwargs):
        time.sleep(2)
        return measure(*args, **kwargs)

    monkeypatch.setattr(session, "fixed_noise_loss", slow)
    runner, result = _start(host, job_prompt("early", validation=False))
    _wait_for(host, "flux_dreambooth.status")
    comfy.model_management.interrupt_current_processing(True)
    runner.join(timeout=60)
    assert not runner.is_alive() and result["ok"] is False
    assert _statuses(host) == ["training", "cancelled"]


def test_cancel_during_a_render_stops_it(host):
    import comfy.model_management

    prompt = job_prompt("render_cancel", steps=60)
    prompt["20"]["inputs"].update(seeds=" ".join(str(s) for s in range(40)))  # 80 images before step 1
    runner, result = _start(host, prompt)
    _wait_for(host, "flux_dreambooth.rendering")
    time.sleep(0.5)
    comfy.model_management.interrupt_current_processing(True)
    runner.join(timeout=120)
    assert not runner.is_alive() and result["ok"] is False
    assert _statuses(host)[-1] == "cancelled"
    rendered = list((run_dir(host, "render_cancel_001") / "samples").glob("*.png"))
    assert len(rendered) < 80


def test_nan_stops_the_run_keeps_earlier_checkpoints_and_says_why(host, monkeypatch):
    train_module = host.pack.trainer.loop.trainer
    real, calls = train_module.step_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(train_module, "step_loss", poisoned)
    with pytest.raises(RuntimeError, match="The loss became nan at step 3"):
        host.run(job_prompt("nan", save_every=1, validation=False))
    folder = run_dir(host, "nan_001")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert (folder / "loss_history.csv").is_file()
    assert _statuses(host)[-1] == "error"


def test_resuming_an_earlier_checkpoint_with_samples_on(host, job):
    """A branch from step 3 of a finished run: same step-6 LoRA, samples listed once each."""
    import json

    first = checkpoint_lora(host, "job_001", 6)
    host.run(job_prompt("job", resume="job_001/checkpoints/step_000003"))
    assert same_lora(checkpoint_lora(host, "job_001", 6), first)
    listed = [(s["step"], s["entry"]) for s in json.loads((run_dir(host, "job_001") / "samples.json").read_text())]
    assert sorted(listed) == sorted(set(listed)) == [(s, e) for s in (0, 3, 6) for e in (0, 1)]


def test_block_swap_keeps_swapped_blocks_off_and_trains_and_renders_alike(host, job, monkeypatch):
    """swap_blocks 3: ComfyUI's loader never moves the swapped blocks (not at the start, nor in any
    load around a render), while it does move the others; the LoRA is the unswapped run's, and the
    samples (rendered through ComfyUI's sampler with the blocks streamed in) match its samples."""
    import comfy.model_management

    models = host.pack.nodes.host.models
    real_load, real_gpu, real_apply = models.load_for_training, comfy.model_management.load_models_gpu, \
        torch.nn.Module._apply
    blocks, keep_offs, loading, moved = {}, [], [], set()

    def load_for_training(patcher, keep_off=(), again=False):
        dit = patcher.model.diffusion_model
        for name, block in [*dit.double_blocks.named_children(), *dit.single_blocks.named_children()]:
            kind = "double_blocks" if block in list(dit.double_blocks) else "single_blocks"
            blocks.update({id(m): f"{kind}.{name}" for m in block.modules()})
        keep_offs.append(list(keep_off))
        return real_load(patcher, keep_off, again)

    def load_models_gpu(*args, **kwargs):
        loading.append(1)
        try:
            return real_gpu(*args, **kwargs)
        finally:
            loading.pop()

    def _apply(module, *args, **kwargs):
        if loading and id(module) in blocks:
            moved.add(blocks[id(module)])
        return real_apply(module, *args, **kwargs)

    monkeypatch.setattr(models, "load_for_training", load_for_training)
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load_models_gpu)
    monkeypatch.setattr(torch.nn.Module, "_apply", _apply)
    host.run(job_prompt("swapped", swap_blocks=3))
    monkeypatch.undo()

    swapped = ["single_blocks.1", "single_blocks.2", "single_blocks.3"]
    assert keep_offs[0] == swapped and len(keep_offs) == 1 + 3  # the start, then after each render
    assert moved == {"double_blocks.0", "double_blocks.1", "single_blocks.0"}
    a, b = checkpoint_lora(host, "swapped_001", 6), checkpoint_lora(host, "job_001", 6)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)

    def image(run, step):
        return np.asarray(Image.open(run_dir(host, run) / "samples" / f"step_{step:06d}_01.png"), dtype=np.float32)

    assert np.array_equal(image("swapped_001", 0), image("job_001", 0))  # LoRA still zero: the very same
    lora_effect = np.abs(image("job_001", 6) - image("job_001", 0)).mean()
    assert np.abs(image("swapped_001", 6) - image("job_001", 6)).mean() < 0.05 * lora_effect


def test_block_swap_trains_on_the_loras_already_on_the_model(host, job):
    """A LoRA loaded onto the MODEL before training reaches the swapped blocks too (applied in CPU
    memory): the same LoRA as without swapping, and not the one trained on the bare model. The
    header names the model file chain's LoRA."""
    shutil.copy(run_dir(host, "job_001") / "checkpoints" / "step_000003" / "lora.safetensors",
                host.root / "loras" / "upstream.safetensors")
    trained = {}
    for swap in (0, 3):
        prompt = job_prompt(f"upstream{swap}", validation=False, swap_blocks=swap)
        prompt["30"] = {"class_type": "LoraLoaderModelOnly",
                        "inputs": {"model": ["1", 0], "lora_name": "upstream.safetensors", "strength_model": 1.0}}
        prompt["4"]["inputs"]["model"] = ["30", 0]
        host.run(prompt)
        trained[swap] = checkpoint_lora(host, f"upstream{swap}_001", 6)
    assert all(torch.allclose(trained[3][k], trained[0][k], rtol=1e-5, atol=1e-7) for k in trained[0])
    bare = checkpoint_lora(host, "job_001", 6)
    assert not all(torch.allclose(trained[3][k], bare[k], rtol=1e-3, atol=1e-5) for k in bare)
    meta = host.pack.trainer.outputs.export.read_metadata(
        run_dir(host, "upstream3_001") / "checkpoints" / "step_000006" / "lora.safetensors")
    assert meta["dreambooth.base_model_loras"] == "upstream.safetensors"
