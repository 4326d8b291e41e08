"""LoRA variants (DoRA, LoKr, LoHa): a no-op at the start, the update their papers define, on
ComfyUI's fused layers and diffusers' separate ones, in every memory mode; their files give
ComfyUI exactly the weights trained; they resume."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.families.conditioning import Conditioning
from trainer.families.flux1.layers import DOUBLE, SINGLE, FluxDims
from trainer.loop import flow
from trainer.loop.memory import MemoryConfig
from trainer.loop.trainer import TrainConfig, Trainer, fixed_noise_loss
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.lora.variants import factorization
from trainer.lora.weights import LoraSet, attach, detach_all
from trainer.outputs import checkpoints, export

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
DIMS = FluxDims(hidden_size=32, mlp_hidden=128, double_blocks=1, single_blocks=1)
VARIANTS = ["dora", "lokr", "loha"]
KINDS = [("dora", {}), ("lokr", {}), ("lokr", {"lokr_full_rank": True}), ("lokr", {"lokr_factor": 4}), ("loha", {})]
KIND_IDS = ["dora", "lokr", "lokr_full_rank", "lokr_factor_4", "loha"]


def _spec(variant, **kw):
    """q and the MLP of the fused single-block linear1 (two slices), a whole layer, double-block k."""
    return LayerSpec((LayerGroup(SINGLE, 0, 1, ("attn.to_q", "proj_mlp", "proj_out"), 4, 2.0, variant, **kw),
                      LayerGroup(DOUBLE, 0, 1, ("attn.to_k",), 2, None, variant, **kw)))


def _layers(seed=0):
    """BFL-layout Linears (ComfyUI's fused q/k/v/mlp), with biases."""
    torch.manual_seed(seed)
    return {name: nn.Linear(*DIMS.shape(name), bias=True).requires_grad_(False)
            for name in ("single_blocks.0.linear1", "single_blocks.0.linear2", "double_blocks.0.img_attn.qkv")}


def _perturb(lora, seed=1, scale=0.3):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in lora.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean().clamp_min(0.1))


def _expected_rows(w, weight):
    """This target's rows of the merged weight, by each paper's formula, from its own tensors."""
    a, b = w.rows
    rows = weight[a:b]
    if w.variant == "dora":
        merged = rows + w.scale * w.up @ w.down
        return w.magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True).detach()
    if w.variant == "lokr":
        w2 = w.lokr_w2 if w.full else w.lokr_w2_a @ w.lokr_w2_b
        return rows + w.scale * torch.kron(w.lokr_w1, w2)
    return rows + w.scale * (w.hada_w1_a @ w.hada_w1_b) * (w.hada_w2_a @ w.hada_w2_b)


def _inputs(*batch, grad=False, seed=0):
    """An input for each input width of the layers (linear2 reads 32 + 128)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*batch, n, generator=g).requires_grad_(grad) for n in (32, 160)}


def _run(layers, lora, xs):
    handles = attach(lora, lambda w: layers[w.target.bfl_module], split=False)
    try:
        return {name: layer(xs[layer.in_features]) for name, layer in layers.items()}
    finally:
        detach_all(handles)


@pytest.mark.parametrize("variant, kw", KINDS, ids=KIND_IDS)
def test_each_variant_starts_as_a_no_op(variant, kw):
    layers, xs = _layers(), _inputs(2, 3)
    base = {n: m(xs[m.in_features]) for n, m in layers.items()}
    lora = LoraSet(_spec(variant, **kw).targets(DIMS), seed=3)
    for name, y in _run(layers, lora, xs).items():
        assert torch.allclose(y, base[name], atol=1e-6), name


@pytest.mark.parametrize("variant, kw", KINDS, ids=KIND_IDS)
def test_the_update_and_its_gradients_are_the_papers_on_fused_slices(variant, kw):
    """Hooked on activations = the merged weight of the formula, values and gradients (DoRA's
    norm detached, as its paper's §4.3); untrained rows stay as they were."""
    layers, xs = _layers(), _inputs(2, 3, grad=True)
    lora = LoraSet(_spec(variant, **kw).targets(DIMS), seed=3)
    _run(layers, lora, xs)  # DoRA measures ‖W‖ on its first call
    _perturb(lora)
    out = _run(layers, lora, xs)
    loss = sum((y * torch.linspace(-1, 1, y.shape[-1])).square().sum() for y in out.values())
    got = torch.autograd.grad(loss, [*xs.values(), *lora.parameters()])
    merged = {n: m.weight.clone() for n, m in layers.items()}
    for w in lora:
        a, b = w.rows
        merged[w.target.bfl_module] = torch.cat([merged[w.target.bfl_module][:a],
                                                 _expected_rows(w, layers[w.target.bfl_module].weight),
                                                 merged[w.target.bfl_module][b:]])
    want = {n: F.linear(xs[m.in_features], merged[n], m.bias) for n, m in layers.items()}
    for name in out:
        assert torch.allclose(out[name], want[name], atol=1e-5, rtol=1e-5), name
    linear1 = layers["single_blocks.0.linear1"]
    assert torch.allclose(out["single_blocks.0.linear1"][..., 32:96], linear1(xs[32])[..., 32:96])
    loss_want = sum((y * torch.linspace(-1, 1, y.shape[-1])).square().sum() for y in want.values())
    expected = torch.autograd.grad(loss_want, [*xs.values(), *lora.parameters()])
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-4 * e.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_layers_train_the_same_update(variant):
    """diffusers' separate to_q Linear: the same weights give what the fused slice gives."""
    layers, xs = _layers(), _inputs(4)
    x = xs[32]
    lora = LoraSet(LayerSpec((LayerGroup(SINGLE, 0, 1, ("attn.to_q",), 4, 3.0, variant),)).targets(DIMS), seed=2)
    _run(layers, lora, xs)
    _perturb(lora)
    fused = _run(layers, lora, xs)["single_blocks.0.linear1"][:, :32]
    q = nn.Linear(32, 32)
    with torch.no_grad():
        q.weight.copy_(layers["single_blocks.0.linear1"].weight[:32])
        q.bias.copy_(layers["single_blocks.0.linear1"].bias[:32])
    handles = attach(lora, lambda w: q, split=True)
    split = q(x)
    detach_all(handles)
    assert torch.allclose(split, fused, atol=1e-5)


def test_lokr_factorization_follows_lycoris():
    assert factorization(128) == (8, 16) and factorization(1024) == (32, 32) and factorization(3072) == (48, 64)
    assert factorization(128, 4) == (4, 32) and factorization(127) == (1, 127) and factorization(250, 4) == (2, 125)
    lora = LoraSet(_spec("lokr", lokr_factor=4).targets(DIMS))
    w = lora.get("single_transformer_blocks.0.proj_mlp")  # 128×32: (4·32)×(4·8)
    assert w.lokr_w1.shape == (4, 4) and w.lokr_w2_a.shape == (32, 4) and w.lokr_w2_b.shape == (4, 8)
    with pytest.raises(ValueError, match="lokr_factor is 0"):
        LayerGroup(SINGLE, 0, 1, ("proj_out",), 4, None, "lokr", 0)
    with pytest.raises(ValueError, match="variant is 'lycoris'; choose lora, dora, lokr, loha"):
        LayerGroup(SINGLE, 0, 1, ("proj_out",), 4, None, "lycoris")


# ----- files: what ComfyUI's loader makes of them --------------------------------------------------
# ComfyUI's flux_to_diffusers, for the names these tests use: diffusers name -> (BFL module, rows)
COMFY_NAMES = {"single_transformer_blocks_0_attn_to_q": ("single_blocks.0.linear1", (0, 32)),
               "single_transformer_blocks_0_proj_mlp": ("single_blocks.0.linear1", (96, 224)),
               "single_transformer_blocks_0_proj_out": ("single_blocks.0.linear2", (0, 32)),
               "transformer_blocks_0_attn_to_k": ("double_blocks.0.img_attn.qkv", (32, 64))}


def comfy_merge(sd, weights):
    """The weights after ComfyUI's loader applies file `sd` (strength 1), by its conventions:
    alpha/rank of lora_down (LoHa: of hada_w1_b; LoKr: of lokr_w2_b, else 1); a per-row dora_scale
    scales W + ΔW by dora_scale/‖W‖ of the weight before the update."""
    out = {n: w.clone() for n, w in weights.items()}
    for key in {k.split(".")[0] for k in sd}:
        module, (a, b) = COMFY_NAMES[key.removeprefix("lycoris_")]
        t = {k[len(key) + 1:]: v.double() for k, v in sd.items() if k.startswith(key + ".")}
        rows = out[module][a:b]
        if "lora_up.weight" in t:
            diff = t["alpha"] / t["lora_down.weight"].shape[0] * t["lora_up.weight"] @ t["lora_down.weight"]
        elif "lokr_w1" in t:
            w2, alpha = (t["lokr_w2"], 1.0) if "lokr_w2" in t else (t["lokr_w2_a"] @ t["lokr_w2_b"],
                                                                    t["alpha"] / t["lokr_w2_b"].shape[0])
            diff = alpha * torch.kron(t["lokr_w1"], w2)
        else:
            diff = t["alpha"] / t["hada_w1_b"].shape[0] * (t["hada_w1_a"] @ t["hada_w1_b"]) * (
                t["hada_w2_a"] @ t["hada_w2_b"])
        new = rows + diff
        if "dora_scale" in t:
            assert t["dora_scale"].shape == (b - a, 1)
            new = new * t["dora_scale"] / rows.norm(dim=1, keepdim=True)
        out[module][a:b] = new
    return out


@pytest.mark.parametrize("variant, kw", KINDS, ids=KIND_IDS)
def test_kohya_file_is_the_in_memory_weight_in_comfyuis_reading(variant, kw):
    layers = _layers()
    lora = LoraSet(_spec(variant, **kw).targets(DIMS), seed=4)
    _run(layers, lora, _inputs(2))
    _perturb(lora, seed=9)
    sd = export.kohya_state_dict(lora)
    assert all(k.startswith("lycoris_") for k in sd) and sum(k.endswith(".alpha") for k in sd) == 4
    with torch.no_grad():  # the weights the hooked layers compute with: their outputs for unit inputs
        in_memory = {n: (y - layers[n].bias).T.double()
                     for n, y in _run(layers, lora, {n: torch.eye(n) for n in (32, 160)}).items()}
    from_file = comfy_merge(sd, {n: m.weight.double() for n, m in layers.items()})
    for name in layers:
        assert torch.allclose(from_file[name], in_memory[name], atol=1e-5), name


def test_dora_needs_the_model_it_ran_in_to_be_saved():
    lora = LoraSet(_spec("dora").targets(DIMS))
    with pytest.raises(ValueError, match="have not run through a model yet"):
        export.kohya_state_dict(lora)


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_diffusers_format_refuses_lokr_and_loha_by_name(variant):
    lora = LoraSet(_spec(variant).targets(DIMS))
    with pytest.raises(ValueError, match=f"format is 'diffusers', which holds LoRA and DoRA only.*variant '{variant}'"):
        export.state_dict(lora, "diffusers")


def test_dora_diffusers_file_loads_into_diffusers_with_the_same_outputs(tmp_path):
    from diffusers import FluxPipeline

    from trainer import files
    from trainer.families.flux1 import tiny

    model = tiny.build(seed=3)
    backend = model.backend()
    spec = LayerSpec((LayerGroup(DOUBLE, 0, 1, ("attn.to_q", "attn.to_out.0"), 4, 2.0, "dora"),
                      LayerGroup(SINGLE, 1, 3, ("attn.to_k", "proj_mlp"), 4, None, "dora")))
    lora = LoraSet(spec.targets(backend.dims), seed=1)
    torch.manual_seed(0)
    args = (torch.randn(1, 16, 8, 8), torch.tensor([0.5]),
            Conditioning(torch.randn(1, 10, 64), torch.randn(1, 64), 3.5))
    with torch.no_grad(), backend.lora_applied(lora):
        base = backend.velocity(*args)
    _perturb(lora, scale=0.05)
    with torch.no_grad(), backend.lora_applied(lora):
        expected = backend.velocity(*args)
    sd = export.state_dict(lora, "diffusers")
    assert sd["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"].shape == (256,)
    path = files.write_safetensors(tmp_path / "dora.safetensors", sd, {})
    state, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model.transformer,
                                            adapter_name="d")
    with torch.no_grad():
        got = backend.velocity(*args)
    assert (got - expected).abs().max() < 1e-3 * (expected - base).abs().max()


# ----- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples(tiny_flux):
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0][:2]


def _trainer(tiny_flux, examples, variant, steps=6, lr=4e-3, **config):
    backend = tiny_flux.backend()
    spec = LayerSpec((LayerGroup(SINGLE, 0, 4, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out"), 4, None,
                                 variant),))
    lora = LoraSet(spec.targets(backend.dims), seed=1)
    return Trainer(backend, lora, examples, TrainConfig(steps=steps, learning_rate=lr, seed=2, **config)), spec


@pytest.mark.parametrize("variant, lr", [("dora", 4e-3), ("lokr", 3e-2), ("loha", 4e-3)])
def test_fixed_noise_loss_falls(tiny_flux, examples, variant, lr):
    trainer, _ = _trainer(tiny_flux, examples, variant, steps=8, lr=lr)
    before = fixed_noise_loss(trainer.backend, trainer.lora, examples, sigmas=(0.3, 0.7))
    trainer.run()
    after = fixed_noise_loss(trainer.backend, trainer.lora, examples, sigmas=(0.3, 0.7))
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_modes_give_the_same_loss_and_gradients(tiny_flux, variant):
    backend = tiny_flux.backend()
    spec = LayerSpec((LayerGroup(DOUBLE, 0, 2, ("attn.to_q", "ff.net.2"), 3, None, variant),
                      LayerGroup(SINGLE, 0, 4, ("attn.to_v", "proj_out"), 3, None, variant)))
    torch.manual_seed(3)
    lat, noise, ctx = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 7, 64)
    pooled, sig = torch.randn(1, 64), torch.tensor([0.6])

    def step(memory):
        lora = LoraSet(spec.targets(backend.dims), seed=5)
        with torch.no_grad(), backend.lora_applied(lora):
            backend.velocity(lat, sig, Conditioning(ctx, pooled))
        _perturb(lora, scale=0.1)
        with backend.training(lora, memory):
            v = backend.velocity(flow.noisy_latents(lat, noise, sig), sig, Conditioning(ctx, pooled))
            loss = flow.flow_matching_loss(v, flow.velocity_target(lat, noise)).mean()
            loss.backward()
        return loss.item(), [p.grad for p in lora.parameters()]

    ref_loss, ref_grads = step(MemoryConfig("off"))
    for memory in (MemoryConfig("blocks"), MemoryConfig("offload", swap_blocks=3)):
        loss, grads = step(memory)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, atol=1e-5 * r.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_continues_bit_for_bit_and_refuses_another_variant(tiny_flux, examples, variant, tmp_path):
    straight, spec = _trainer(tiny_flux, examples, variant, ema_decay=0.9)
    straight.run()
    first, _ = _trainer(tiny_flux, examples, variant, ema_decay=0.9)
    first.run(until=3)
    state = {**first.state(), **checkpoints.describe(spec, first.backend.dims)}
    path = checkpoints.RunFolder(tmp_path).save(3, export.kohya_state_dict(first.result_lora()), {}, state)
    second, _ = _trainer(tiny_flux, examples, variant, ema_decay=0.9)
    second.load_state(checkpoints.load_state(path))
    second.run()
    assert second.losses == straight.losses
    for a, b in zip(second.result_lora().state_dict().values(), straight.result_lora().state_dict().values()):
        assert torch.equal(a, b)
    loaded = checkpoints.load_trained_lora(path)
    assert {k: torch.equal(v, loaded[k]) for k, v in export.kohya_state_dict(first.result_lora()).items()} \
        == dict.fromkeys(loaded, True)
    assert loaded.lora.variants() == first.lora.variants()
    other, _ = _trainer(tiny_flux, examples, "lora" if variant != "lora" else "dora")
    with pytest.raises(ValueError, match=f"trained single_transformer_blocks.0.attn.to_q as {variant}.*set the variant "
                                         f"back to {variant}"):
        other.load_state(checkpoints.load_state(path))


def test_recipe_keys_set_every_groups_variant():
    from trainer.recipe import build
    from trainer.recipe.fields import RecipeError
    from trainer.recipe.schema import Recipe

    recipe = Recipe.from_dict({"layers": {"variant": "lokr", "lokr_factor": 4, "lokr_full_rank": True,
                                          "groups": [{"blocks": SINGLE, "layer_types": ["proj_out"], "rank": 4},
                                                     {"blocks": DOUBLE, "layer_types": ["attn.to_q"], "rank": 2}]}})
    spec = build.layer_spec(recipe, DIMS)
    assert {(g.variant, g.lokr_factor, g.lokr_full_rank) for g in spec.groups} == {("lokr", 4, True)}
    preset = build.layer_spec(Recipe.from_dict({"layers": {"variant": "dora"}}), DIMS)
    assert {t.variant for t in preset.targets(DIMS)} == {"dora"}
    with pytest.raises(RecipeError, match="variant is 'lycoris'; choose lora, dora, lokr, loha"):
        Recipe.from_dict({"layers": {"variant": "lycoris"}})


def test_a_lokr_rank_above_the_layer_means_a_whole_w2_while_lora_refuses_it():
    from trainer.families.flux1.layers import FluxDims
    from trainer.lora.targets import LayerGroup, LayerSpec

    dims = FluxDims(hidden_size=64, mlp_hidden=256, double_blocks=1, single_blocks=1)
    group = dict(blocks="transformer_blocks", start=0, end=1, layer_types=("attn.to_q",), rank=10000, alpha=1.0)
    lokr = LoraSet(LayerSpec((LayerGroup(**group, variant="lokr", lokr_factor=4),)).targets(dims))
    weight = next(iter(lokr))
    assert weight.full and weight.scale == 1.0 and weight.lokr_w2.shape == (16, 16)  # LyCORIS's linear_dim 10000
    with pytest.raises(ValueError, match="a rank above 64 adds nothing"):
        LayerSpec((LayerGroup(**group),)).targets(dims)
