import dataclasses

import pytest
import torch
from torch import nn

from trainer.loop.blocks import BlockRunner
from trainer.loop.memory import MemoryConfig

CPU = torch.device("cpu")


class InplaceBlock(nn.Module):
    """Shaped like ComfyUI's FLUX double block: norms, then residual adds in place."""

    def __init__(self, d, outplace=False):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)
        self.outplace = outplace

    def forward(self, img, txt, vec):
        if self.outplace:
            img = img + self.attn(self.norm(img)) * vec
            img = img + self.mlp(self.norm(img))
            return img, txt + self.attn(self.norm(txt))
        img += self.attn(self.norm(img)) * vec
        img += self.mlp(self.norm(img))
        txt += self.attn(self.norm(txt))
        return img, txt


def _grads(outplace, memory=None, lora_in=(True, True, False), runners=None):
    torch.manual_seed(0)
    blocks = [InplaceBlock(8, outplace).requires_grad_(False) for _ in range(3)]
    loras = [torch.zeros(8, 8, requires_grad=True) for _ in blocks]
    with torch.no_grad():
        for p in loras:
            p.normal_()
    handles = [b.attn.register_forward_hook(lambda m, a, o, p=p: o + a[0] @ p)
               for b, p, on in zip(blocks, loras, lora_in) if on]
    runner = BlockRunner(blocks, list(lora_in), [("img", "txt")] * 3, memory, CPU) if memory else None
    if runners is not None:
        runners.append(runner)
    try:
        img, txt, vec = torch.randn(2, 5, 8), torch.randn(2, 3, 8), torch.randn(2, 1, 8)
        for b in blocks:
            img, txt = b(img, txt, vec)
        (img.square().mean() + txt.square().mean()).backward()
    finally:
        if runner:
            runner.restore()
        for h in handles:
            h.remove()
    return [p.grad for p, on in zip(loras, lora_in) if on]


def test_inplace_blocks_break_plain_autograd():
    with pytest.raises(RuntimeError, match="inplace"):
        _grads(outplace=False)


MODES = [MemoryConfig("off"), MemoryConfig("blocks"), MemoryConfig("blocks", checkpoint_every=2),
         MemoryConfig("offload"), MemoryConfig("off", swap_blocks=2), MemoryConfig("offload", swap_blocks=3)]


@pytest.mark.parametrize("memory", MODES, ids=MemoryConfig.describe)
def test_runner_gives_the_gradients_of_the_out_of_place_maths(memory):
    reference = _grads(outplace=True)
    got = _grads(outplace=False, memory=memory)
    for g, r in zip(got, reference):
        assert torch.allclose(g, r, atol=1e-6)


def test_swapped_blocks_load_for_forward_and_recompute_and_go_back():
    """Each swapped block with a LoRA loads twice a step (forward, recompute), each from a
    prefetch but the first; the last stays loaded from its forward to its recompute; nothing is
    copied for the block without a LoRA in backward; afterwards the weights are the module's own."""
    runners = []
    _grads(outplace=False, memory=MemoryConfig("off", swap_blocks=3), lora_in=(False, True, True), runners=runners)
    swap = runners[0].swap
    assert swap.loads == 1 + 2 + 2 and swap.prefetched == 4
    assert swap.copies == 4  # block 0 once, block 1 twice, block 2 once (kept for backward)
    assert swap.host == {} and swap.ready == {}


def test_blocks_without_lora_before_the_first_lora_build_no_graph():
    """Not even the checkpoint node that would make them recompute in backward for nothing."""
    block = InplaceBlock(8).requires_grad_(False)
    runner = BlockRunner([block], [False], [("img", "txt")], MemoryConfig(), CPU)
    img, txt = block(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.ones(1, 1, 8))
    runner.restore()
    assert not img.requires_grad and not txt.requires_grad
    assert "forward" not in block.__dict__


def test_a_swap_that_fails_half_way_puts_every_weight_back(monkeypatch):
    import trainer.loop.memory as memory

    blocks = [InplaceBlock(8).requires_grad_(False) for _ in range(3)]
    before = [[p.clone() for p in b.parameters()] for b in blocks]
    real_empty, calls = torch.empty, []

    def failing_empty(*args, **kwargs):  # pinning fails at block 1's second tensor (4 per block)
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("out of pinned memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(memory.torch, "empty", failing_empty)
    with pytest.raises(RuntimeError, match="pinned"):
        BlockRunner(blocks, [True] * 3, [("img", "txt")] * 3, MemoryConfig(swap_blocks=3), CPU)
    monkeypatch.undo()
    for block, saved in zip(blocks, before):
        assert "forward" not in block.__dict__
        assert all(torch.equal(p, q) for p, q in zip(block.parameters(), saved))


def test_compile_that_cannot_work_here_is_refused_by_name(monkeypatch):
    import trainer.loop.blocks

    monkeypatch.setattr(trainer.loop.blocks, "compile_problem", lambda: "InductorError: no C compiler")
    block = InplaceBlock(8).requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"compile is on.*no C compiler.*turn compile off"):
        BlockRunner([block], [True], [("img", "txt")], MemoryConfig(compile=True), CPU)
    assert "forward" not in block.__dict__


@dataclasses.dataclass
class Modulation:
    """Shaped like ComfyUI's ModulationOut: FLUX.2's blocks get a tuple of these, made at model level."""

    shift: torch.Tensor
    scale: torch.Tensor


class SharedModulationBlock(nn.Module):
    """Shaped like ComfyUI's FLUX.2 single block: its modulation comes in as (Modulation, None)."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.linear = nn.Linear(d, d)

    def forward(self, x, vec):
        mod, _ = vec
        x += self.linear(self.norm(x) * (1 + mod.scale) + mod.shift)
        return x


def _shared_modulation_grads(memory):
    """Gradients of a LoRA-like weight on the shared modulation layer (before the blocks) and on
    the blocks: the modulation's tensors must travel through checkpoints as inputs."""
    torch.manual_seed(0)
    blocks = [SharedModulationBlock(8).requires_grad_(False) for _ in range(3)]
    shared = torch.randn(8, 16, requires_grad=True)
    delta = torch.zeros(8, 8, requires_grad=True)
    with torch.no_grad():
        delta.normal_()
    hooks = [b.linear.register_forward_hook(lambda m, a, o: o + a[0] @ delta) for b in blocks[:1]]
    runner = BlockRunner(blocks, [True, False, False], [("x",)] * 3, memory, CPU) if memory else None
    try:
        x, t = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
        shift, scale = (t @ shared).chunk(2, dim=-1)
        vec = (Modulation(shift, scale), None)
        for b in blocks:
            x = b(x, vec)
        x.square().mean().backward()
    finally:
        if runner:
            runner.restore()
        for h in hooks:
            h.remove()
    return shared.grad, delta.grad


@pytest.mark.parametrize("memory", [MemoryConfig("blocks"), MemoryConfig("offload")])
def test_modulation_passed_as_dataclasses_keeps_its_gradient_through_checkpoints(memory):
    plain = _shared_modulation_grads(MemoryConfig("off"))
    got = _shared_modulation_grads(memory)
    for g, r in zip(got, plain):
        assert r is not None and r.abs().max() > 0 and torch.allclose(g, r, atol=1e-6)
