"""Seconds per LoRA training step, peak memory and achieved FLOP/s, against ComfyUI's own trainer.

    COMFYUI_PATH=~/ComfyUI python benchmarks/train_step.py --device cuda --mode bf16 fp8 fp8+swap30
    COMFYUI_PATH=~/ComfyUI python benchmarks/train_step.py --device cpu      # tiny FLUX, vs TrainLoraNode
    python benchmarks/train_step.py --family flux2 --size klein4b klein9b dev  # FLUX.2, diffusers' model

On cuda the model is a full-size FLUX.1-dev transformer (19 double and 38 single blocks, hidden
3072, 24 heads) with random weights; on cpu the pack's tiny FLUX shape. The data are cached
latents and T5/CLIP embeddings (batch 1, 512 text tokens on cuda), the LoRA rank 16 on the
attention and MLP layers of every block. With COMFYUI_PATH set the model is ComfyUI's own FLUX
behind a ModelPatcher, and ComfyUI's TrainLoraNode trains the same model on the same data in the
same run (its best settings on that host; its per-step time is the difference of a long and a
short run). Without it the model is diffusers' FluxTransformer2DModel.

`--family flux2`: FLUX.2 [klein] 4B / 9B or [dev] at full size on cuda (`--size`), the tiny FLUX.2
shape on cpu, as diffusers' Flux2Transformer2DModel (random weights), 512 text tokens of the
text encoder's width (Qwen3's three layers, Mistral's for [dev]); no TrainLoraNode comparison.

A mode is weights[+option…]: weights bf16, fp8 (fp8_e4m3fn storage, bf16 compute) or fp32;
options nockpt, every2, every4, offload (checkpoint inputs kept on the CPU), swapN (N blocks
streamed from pinned CPU memory), compile. The last line is machine-readable (RESULT …).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
if os.environ.get("COMFYUI_PATH"):
    sys.path.insert(1, os.environ["COMFYUI_PATH"])

from comfy_side import comfy_model, native  # noqa: E402

from trainer.data.encode import Example  # noqa: E402
from trainer.families import FAMILIES  # noqa: E402
from trainer.loop.memory import MemoryConfig, swapped_indices  # noqa: E402
from trainer.loop.trainer import TrainConfig, Trainer  # noqa: E402
from trainer.lora.targets import LayerSpec  # noqa: E402
from trainer.lora.weights import LoraSet  # noqa: E402

log = logging.getLogger("benchmark")

FULL = dict(hidden=3072, heads=24, double=19, single=38, context=4096, pooled=768, txt_tokens=512)
TINY = dict(hidden=256, heads=2, double=2, single=4, context=64, pooled=64, txt_tokens=64)
# FLUX.2 (model_detection's sizes); its text is always padded to 512 tokens, without a pooled vector
FLUX2 = {"klein4b": dict(hidden=3072, heads=24, double=5, single=20, context=7680, guidance=False),
         "klein9b": dict(hidden=4096, heads=32, double=8, single=24, context=12288, guidance=False),
         "dev": dict(hidden=6144, heads=48, double=8, single=48, context=15360, guidance=True),
         "tiny": dict(hidden=256, heads=2, double=2, single=2, context=64, guidance=False)}
for _shape in FLUX2.values():
    _shape.update(pooled=None, txt_tokens=512, family="flux2")
# dense bf16 tensor-core peaks (no sparsity), for the MFU column
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "4090": 165, "A6000": 155, "3090": 71}
WEIGHTS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}


@dataclass
class Mode:
    name: str
    weights: torch.dtype
    memory: MemoryConfig

    @classmethod
    def parse(cls, text: str) -> "Mode":
        weights, *options = text.split("+")
        if weights not in WEIGHTS:
            raise SystemExit(f"--mode {text}: weights must be one of {', '.join(WEIGHTS)}")
        memory = MemoryConfig()
        for o in options:
            if o == "nockpt":
                memory.checkpointing = "off"
            elif o == "offload":
                memory.checkpointing = "offload"
            elif o.startswith("every"):
                memory.checkpoint_every = int(o[5:])
            elif o.startswith("swap"):
                memory.swap_blocks = int(o[4:])
            elif o == "compile":
                memory.compile = True
            else:
                raise SystemExit(f"--mode {text}: unknown option {o!r} (nockpt, every2, offload, swapN, compile)")
        return cls(text, WEIGHTS[weights], memory)


def step_flops(dims, img_tokens: int, txt_tokens: int, lora: LoraSet, recomputed: float) -> float:
    """FLOPs of one training step, batch 1. Linear layers: 2·in·out per token through the stream
    the token passes (a double block has an image and a text set of weights of the same shapes; a
    single block one fused set). Attention: 4·L²·d per block (QKᵀ and PV). Backward forms
    gradients for activations only (the base is frozen): once the linear work and twice the
    attention work; the LoRA also forms its weight gradients. Checkpointing adds the forward of
    the `recomputed` fraction of the blocks.
    Modulation, embedders and the final layer act per sample or are tiny and are left out."""
    d, tokens = dims.hidden_size, img_tokens + txt_tokens

    def linear_flops(*layers: str) -> int:  # the layers' shapes from the family's dims (FLUX.2's SwiGLU: 2 rows)
        return sum(2 * i * o for i, o in map(dims.shape, layers))

    double_linear = linear_flops(*(f"double_blocks.0.img_{n}" for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")))
    single_linear = linear_flops("single_blocks.0.linear1", "single_blocks.0.linear2")  # qkv+mlp in, out
    attention = 4 * tokens * tokens * d
    linear = tokens * (dims.double_blocks * double_linear + dims.single_blocks * single_linear)
    blocks = dims.double_blocks + dims.single_blocks
    lora_forward = 0
    for w in lora:
        t = w.target
        stream = txt_tokens if any(k in t.name for k in ("add_", "context", "to_add_out")) else \
            img_tokens if t.name.startswith("transformer_blocks") else tokens
        lora_forward += stream * 2 * t.rank * (t.in_features + t.rows[1] - t.rows[0])
    forward = linear + blocks * attention + lora_forward
    backward = linear + 2 * blocks * attention + 2 * lora_forward
    return forward + backward + recomputed * forward


def random_data(shape: dict, resolution: int):
    family = FAMILIES[shape.get("family", "flux1")]
    g = torch.Generator().manual_seed(0)
    side = resolution // family.downscale
    latents = torch.randn(family.latent_channels, side, side, generator=g)
    context = torch.randn(shape["txt_tokens"], shape["context"], generator=g)
    pooled = torch.randn(shape["pooled"], generator=g) if shape["pooled"] else None
    return latents, context, pooled


def diffusers_model(shape: dict, weights: torch.dtype, device: torch.device):
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    dtype = None if weights == torch.float32 else weights
    if shape.get("family") == "flux2":
        with torch.device(device):  # full size built in place: [dev] is 32B parameters
            model = Flux2Transformer2DModel(
                num_layers=shape["double"], num_single_layers=shape["single"], attention_head_dim=128,
                num_attention_heads=shape["heads"], joint_attention_dim=shape["context"],
                guidance_embeds=shape["guidance"])
        return (model.to(dtype=dtype) if dtype else model).eval().requires_grad_(False)

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=shape["double"], num_single_layers=shape["single"],
        attention_head_dim=128, num_attention_heads=shape["heads"], joint_attention_dim=shape["context"],
        pooled_projection_dim=shape["pooled"], guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def backend_for(model, device):
    if hasattr(model, "model_patches_to"):  # a ModelPatcher
        import comfy.model_management

        from trainer.families.flux1.comfy import ComfyFlux

        return ComfyFlux(model.model, device, lambda on: setattr(comfy.model_management, "in_training", on))
    if type(model).__name__ == "Flux2Transformer2DModel":
        from trainer.families.flux2.diffusers import DiffusersFlux2

        return DiffusersFlux2(model)
    from trainer.families.flux1.diffusers import DiffusersFlux

    return DiffusersFlux(model)


class Clock:
    """Per-step wall times; on cuda from events, so timing adds no sync to the steps."""

    def __init__(self, device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self, *_):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def weights_on_device(backend, step) -> tuple[int, int]:
    """(bytes of the model's weights, the most of them on the device at once during `step()`),
    counted as each layer runs: with block swap, only what is not one of its CPU copies."""
    module = getattr(backend, "dit", None) or backend.transformer
    tensors = [*module.parameters(), *module.buffers()]
    swap, peak = backend.block_swap, [0]

    def count(*_):
        on_host = {h.untyped_storage().data_ptr() for pairs in (swap.host.values() if swap else ()) for _, h in pairs}
        peak[0] = max(peak[0], sum(t.nbytes for t in tensors if t.untyped_storage().data_ptr() not in on_host))

    handles = [m.register_forward_pre_hook(count) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        step()
    finally:
        for h in handles:
            h.remove()
    return sum(t.nbytes for t in tensors), peak[0]


def ours(model, device, data, mode: Mode, rank: int, warmup: int, steps: int) -> tuple[float, LoraSet, int, int]:
    """Median seconds per step after `warmup` steps, in one run (so block swapping is set up
    once, and the peak memory counted from the warm-up on is the training's); then one more step
    counting the weights on the device (weights_on_device)."""
    backend = backend_for(model, device)
    backend.prepare()
    lora = LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=rank).targets(backend.dims), seed=0).to(device)
    example = Example(*data)
    trainer = Trainer(backend, lora, [example], TrainConfig(steps=warmup + steps + 1, memory=mode.memory))
    clock = Clock(device)

    def on_step(info):
        if info.step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if info.step >= warmup:
            clock.mark()

    with backend.resident(lora, mode.memory):  # as a job: the swap set up once
        trainer.run(warmup + steps, on_step=on_step)
        whole, on_device = weights_on_device(backend, lambda: trainer.run(warmup + steps + 1))
    return statistics.median(clock.seconds()), lora, whole, on_device


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", choices=["flux1", "flux2"], default="flux1",
                        help="flux1: FLUX.1-dev's shape; flux2: FLUX.2's (--size), diffusers' model")
    parser.add_argument("--size", nargs="+", choices=[s for s in FLUX2 if s != "tiny"],
                        help="FLUX.2's sizes on cuda (default klein4b); the tiny FLUX.2 on cpu")
    parser.add_argument("--resolution", type=int, nargs="+", help="default: 512 1024 on cuda, 256 on cpu")
    parser.add_argument("--mode", nargs="+",
                        help="default: bf16 fp8 fp8+swap30 on cuda (bf16 bf16+swap30 without ComfyUI), fp32 on cpu")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-native", action="store_true", help="skip ComfyUI's TrainLoraNode")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    flux2 = args.family == "flux2"
    shapes = {s: FLUX2[s] for s in (args.size or ["klein4b"])} if flux2 and cuda else \
        {"tiny": FLUX2["tiny"]} if flux2 else {"FLUX.1-dev" if cuda else "tiny": FULL if cuda else TINY}
    resolutions = args.resolution or ([512, 1024] if cuda else [256])
    host = bool(os.environ.get("COMFYUI_PATH")) and not flux2  # FLUX.2: diffusers' model, no TrainLoraNode
    default = (["bf16", "fp8", "fp8+swap30"] if host else ["bf16", "bf16+swap30"]) if cuda else ["fp32"]
    modes = [Mode.parse(m) for m in (args.mode or default)]
    if not host and any(m.weights == torch.float8_e4m3fn for m in modes):
        raise SystemExit("fp8 modes train on ComfyUI's fp8 layers: set COMFYUI_PATH to a ComfyUI checkout.")
    if host and not cuda:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before ComfyUI's model_management looks for a GPU
    peak = peak_tflops(device, args.peak_tflops)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    result = ""
    for size, shape, mode in ((size, shape, mode) for size, shape in shapes.items() for mode in modes):
        if mode is modes[0]:
            log.info("%s %s (%d double + %d single blocks, hidden %d) on %s, %s model, torch %s",
                     "FLUX.2" if flux2 else "FLUX.1", size, shape["double"], shape["single"], shape["hidden"],
                     machine, "ComfyUI's" if host else "diffusers'", torch.__version__)
        model = (comfy_model if host else diffusers_model)(shape, mode.weights, device)
        for resolution in resolutions:
            data = random_data(shape, resolution)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds, lora, weights, on_device = ours(model, device, data, mode, args.rank, args.warmup, args.steps)
            # cuda: the peak of tensors allocated during the run; cpu: the process's peak RSS
            peak_gib = (torch.cuda.max_memory_allocated(device) if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
            img_tokens = (resolution // 16) ** 2
            dims = backend_for(model, device).dims
            count = dims.double_blocks + dims.single_blocks
            swapped = set(swapped_indices(count, mode.memory.swap_blocks))
            recomputed = sum(mode.memory.checkpointed(i) or i in swapped for i in range(count)) / count
            flops = step_flops(dims, img_tokens, shape["txt_tokens"], lora, recomputed)
            tflops = flops / seconds / 1e12
            mfu = tflops / peak if peak else float("nan")
            native_s, settings = float("nan"), "not run"
            if host and not args.no_native and mode.memory.swap_blocks == 0:
                native_s, settings = native(model, data, device, args.warmup, args.steps, args.rank)
            log.info("%s %d²: %.3f s/step, peak %.2f GiB, weights on the device at most %.3f of %.3f GiB, "
                     "%.3g TFLOP/s (%.3g TFLOP per step), MFU %.1f%%; ComfyUI TrainLoraNode (%s): %.3f s/step, "
                     "ours %.2f× faster", mode.name, resolution, seconds, peak_gib, on_device / 2**30,
                     weights / 2**30, tflops, flops / 1e12, 100 * mfu, settings, native_s, native_s / seconds)
            result = (f"RESULT device={args.device} resolution={resolution} mode={mode.name} s_per_step={seconds:.4f} "
                      f"peak_mem_gib={peak_gib:.2f} tflops={tflops:.4g} mfu={mfu:.3f} native_s_per_step={native_s:.4f} "
                      f"speedup_vs_native={native_s / seconds:.2f} weights_gib={weights / 2**30:.4f} "
                      f"weights_on_device_gib={on_device / 2**30:.4f} family={args.family} size={size}")
            print(result, flush=True)  # noqa: T201 - the machine-readable line belongs on stdout
        del model
    return result


if __name__ == "__main__":
    main()
