"""Models loaded from GGUF files by city96's ComfyUI-GGUF (its Unet Loader (GGUF) node).

Such a MODEL's Linear weights are ComfyUI-GGUF's `GGMLTensor`s: packed quantized blocks (Q8_0,
Q4_K, …) that its ops dequantize in every forward. Training needs nothing more from them: the
LoRA is added on activations after the layer, the packed weights are only read, and the library
copies them as opaque tensors where it must (trainer/families/flux1/comfy.py `prepare`, the block
swap). This module only tells such a model apart, without importing ComfyUI-GGUF: each of its
tensors names its GGML type in `tensor_type`.
"""

from __future__ import annotations

from collections import Counter

UNQUANTIZED = ("F32", "F16", "BF16")


def ggml_types(model) -> Counter:
    """GGML type name -> count of the diffusion model's tensors; empty for a model not from GGUF."""
    counts: Counter = Counter()
    for t in model.model.diffusion_model.parameters():
        kind = getattr(t, "tensor_type", None)
        if kind is not None:
            counts[getattr(kind, "name", str(kind))] += 1
    return counts


def quantization(model) -> str | None:
    """'GGUF Q4_K' (the most common quantized type; 'GGUF Q4_K+Q6_K' for a mix), 'GGUF F16' for an
    unquantized GGUF, or None for a model not loaded from a GGUF file."""
    counts = ggml_types(model)
    if not counts:
        return None
    quantized = [name for name, _ in counts.most_common() if name not in UNQUANTIZED]
    return "GGUF " + ("+".join(quantized) if quantized else counts.most_common(1)[0][0])
