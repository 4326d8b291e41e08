"""Optimizer memory and step time of each optimizer on a full-size FLUX.1 LoRA.

    python benchmarks/optimizer_state.py                          # CPU, rank 16 on attention+mlp
    python benchmarks/optimizer_state.py --device cuda --rank 32

The LoRA has the shapes the Train node gives FLUX.1-dev (its default: rank 16 on the attention and
MLP layers of all 57 blocks), fp32; every optimizer takes the same random gradients. Memory is the
bytes the optimizer keeps after its first step (its state tensors, not the weights or gradients);
time is the median of a few steps. An optimizer whose package is missing is listed as such. The
last line is machine-readable (RESULT …).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.families.flux1.layers import FluxDims  # noqa: E402
from trainer.log import logger  # noqa: E402
from trainer.loop import optimizers  # noqa: E402
from trainer.lora.targets import LayerSpec  # noqa: E402
from trainer.lora.weights import LoraSet  # noqa: E402

log = logger("benchmarks.optimizer_state")
LEARNING_RATES = {"prodigy": 1.0, "lion": 3e-5}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (each storage once)."""
    seen = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


def measure(name: str, lora: LoraSet, grads: list[torch.Tensor], steps: int) -> dict:
    params = lora.trainable()
    try:
        optimizer = optimizers.build(name, params, LEARNING_RATES.get(name, 1e-4), 1e-4)
    except RuntimeError as e:
        return {"optimizer": name, "missing": str(e).split(" (")[0]}
    times = []
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if params[0].is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.step()
        if params[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        optimizer.zero_grad(set_to_none=True)
    return {"optimizer": name, "state_mb": round(state_bytes(optimizer) / 2**20, 1),
            "step_ms": round(1000 * statistics.median(times), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", default="attention+mlp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizers", nargs="*", default=list(optimizers.OPTIMIZERS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dims = FluxDims()
    results = []
    for name in args.optimizers:
        lora = LoraSet(LayerSpec.preset(args.layers, dims, rank=args.rank).targets(dims)).to(args.device)
        generator = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=generator).mul_(1e-3).to(args.device) for p in lora.trainable()]
        weights_mb = sum(p.numel() * p.element_size() for p in lora.trainable()) / 2**20
        result = measure(name, lora, grads, args.steps)
        result["lora_mb"] = round(weights_mb, 1)
        results.append(result)
        if "missing" in result:
            log.info("%-20s %s", name, result["missing"])
        else:
            log.info("%-20s optimizer state %8.1f MB (%.2f× the LoRA's %.1f MB), step %8.1f ms", name,
                     result["state_mb"], result["state_mb"] / weights_mb, weights_mb, result["step_ms"])
        del lora, grads
    log.info("RESULT %s", json.dumps({"device": args.device, "rank": args.rank, "layers": args.layers,
                                      "results": results}))
    return results


if __name__ == "__main__":
    main()
