"""The benchmark's FLOP count and its machine-readable line (figures themselves are not tested)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from trainer.families.flux1.layers import FluxDims
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["train_step"]


def test_flop_count_puts_the_1024_step_at_the_known_compute_floor(bench):
    """FLUX.1-dev at 1024² (4096 image + 512 text tokens), rank 16 on attention and MLP, with
    checkpointing: ≈ 0.25 s at an H100's 989 dense bf16 TFLOP/s (the issue's compute floor)."""
    dims = FluxDims()
    with_lora = LoraSet(LayerSpec.preset("attention+mlp", dims, rank=16).targets(dims))
    flops = bench.step_flops(dims, 4096, 512, with_lora, recomputed=1.0)
    assert 0.22 < flops / 989e12 < 0.27
    without_recompute = bench.step_flops(dims, 4096, 512, with_lora, recomputed=0.0)
    assert 1.3 < flops / without_recompute < 1.5  # one more forward of about a third of the step
    every_2nd = bench.step_flops(dims, 4096, 512, with_lora, recomputed=0.5)
    assert every_2nd == pytest.approx((flops + without_recompute) / 2)
    assert bench.step_flops(dims, 1024, 512, with_lora, 1.0) < flops / 3  # 512²: fewer tokens


def test_cpu_run_ends_with_a_result_line(bench, capsys, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)  # diffusers' model, whatever the session has
    bench.main(["--device", "cpu", "--resolution", "64", "--steps", "2", "--warmup", "1", "--no-native"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert last.startswith("RESULT ") and fields["device"] == "cpu" and fields["mode"] == "fp32"
    assert float(fields["s_per_step"]) > 0 and float(fields["tflops"]) > 0
    assert set(fields) >= {"resolution", "peak_mem_gib", "mfu", "native_s_per_step", "speedup_vs_native"}


def test_swap_mode_reports_fewer_weights_on_the_device(bench, capsys, monkeypatch):
    """Four of the tiny FLUX's six blocks swapped: at most two of them on the device at once."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    bench.main(["--device", "cpu", "--resolution", "64", "--steps", "1", "--warmup", "1", "--no-native",
                "--mode", "fp32+swap4"])
    fields = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert fields["mode"] == "fp32+swap4"
    assert 0 < float(fields["weights_on_device_gib"]) < float(fields["weights_gib"])


def test_flux2_flops_count_its_swiglu_and_a_cpu_run_names_the_family(bench, capsys, monkeypatch):
    """FLUX.2 [klein] 4B's MLP in is gate + up (2·9216 rows), so a double block's linear work is
    2·(4·3072² + 3·3072·9216) per token; the tiny FLUX.2 runs on the CPU with 512 text tokens."""
    from trainer.families.flux2.layers import Flux2Dims

    dims, empty = Flux2Dims(), LoraSet([])
    one_double = bench.step_flops(Flux2Dims(3072, 9216, 1, 0), 1, 0, empty, 0.0)
    linears, attention = 2 * (4 * 3072**2 + 3 * 3072 * 9216), 4 * 3072  # per token, forward
    assert one_double == 2 * linears + 3 * attention  # one token: the linears forward and back, attention ×3
    assert 0.05 < bench.step_flops(dims, 4096, 512, empty, 1.0) / 989e12 < 0.15  # 4B: a fifth of FLUX.1's work
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    bench.main(["--device", "cpu", "--family", "flux2", "--resolution", "64", "--steps", "1", "--warmup", "1"])
    fields = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert (fields["family"], fields["size"], fields["mode"]) == ("flux2", "tiny", "fp32")
    assert float(fields["s_per_step"]) > 0 and float(fields["tflops"]) > 0
