"""ai-toolkit's per-dataset network_weight: the LoRA's multiplier while training on a dataset's photos."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.families.flux1.layers import FluxDims
from trainer.loop.memory import MemoryConfig
from trainer.loop.trainer import TrainConfig, step_loss
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.lora.weights import LoraSet, attach, detach_all
from trainer.recipe import build
from trainer.recipe.schema import Recipe

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


@pytest.mark.parametrize("variant", ["lora", "dora", "lokr", "loha"])
def test_a_multiplier_scales_each_variants_update_and_zero_is_the_frozen_layer(variant):
    dims = FluxDims(hidden_size=64, mlp_hidden=256, double_blocks=1, single_blocks=1)
    group = LayerGroup("transformer_blocks", 0, 1, ("attn.to_q",), rank=4, variant=variant, lokr_factor=4)
    lora = LoraSet(LayerSpec((group,)).targets(dims), torch.float32, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)  # as after training: a real update
    layer = nn.Linear(64, 64)
    handles = attach(lora, lambda w: layer, split=True)
    x = torch.randn(2, 5, 64, generator=generator)
    frozen = F.linear(x, layer.weight, layer.bias)
    full = layer(x)
    with lora.multiplied(0.5):
        half = layer(x)
    with lora.multiplied(0.0):
        off = layer(x)
    detach_all(handles)
    assert not torch.allclose(full, frozen, atol=1e-4)  # the update is there
    assert torch.allclose(half, frozen + 0.5 * (full - frozen), atol=1e-6) and torch.equal(off, frozen)


def test_photos_of_a_dataset_at_network_weight_zero_give_the_lora_no_gradient(tiny_flux):
    options = datasets.Options("sks", "toy", shaping=Shaping(64, bucketing=False))
    examples = encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0][:2]
    backend = tiny_flux.backend()

    def gradients(weight):
        lora = LoraSet(LayerSpec.preset("attention", backend.dims, rank=4).targets(backend.dims), torch.float32, 0)
        with torch.no_grad():
            for w in lora:
                w.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        batch = [e.__class__(**{**e.__dict__, "network_weight": weight}) for e in examples]
        with backend.training(lora, MemoryConfig("blocks")):  # backward recomputes the blocks: same multiplier
            step_loss(backend, batch, TrainConfig(batch_size=2), torch.Generator().manual_seed(0), lora=lora)
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in lora.parameters()])

    full, half, none = gradients(1.0), gradients(0.5), gradients(0.0)
    assert full.abs().sum() > 0 and not torch.allclose(half, full) and none.abs().sum() == 0


def test_the_recipe_puts_the_multipliers_on_the_subject_and_regularisation_photos(tmp_path):
    recipe = Recipe().with_settings([f"dataset.folders=[{QUICKSTART}]", f"dataset.regularisation=[{QUICKSTART}]",
                                     "dataset.class_word=toy", "resolution=64", "dataset.network_weight=0.8",
                                     "dataset.regularisation_network_weight=-1"])
    items = build.dataset(recipe, tmp_path).items
    assert {i.network_weight for i in items if not i.regularisation} == {0.8}
    assert {i.network_weight for i in items if i.regularisation} == {-1.0}
