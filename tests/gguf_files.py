"""GGUF files of a FLUX state dict, laid out as city96's ComfyUI-GGUF reads them (its tools/convert.py
writes them so): BFL key names without a prefix, `general.architecture` flux, 1-D and small
tensors in F32, every other weight in the chosen GGML type where its rows fit that type's blocks
(F16 where they don't).

gguf-py quantizes Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 itself; it only dequantizes the k-quants, so
Q4_K is packed here (8 sub-blocks of 32 per 256 values, a 6-bit scale and min each, 4-bit values),
a plain min/max fit rather than llama.cpp's search, and checked against gguf-py's dequantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL = 1024  # ComfyUI-GGUF's convert.py keeps tensors up to this many values in F32


def q4_k(rows: np.ndarray) -> np.ndarray:
    """Q4_K blocks of a float matrix whose rows are multiples of 256 long: (rows, 144 bytes per 256)."""
    n_rows = rows.shape[0]
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(x.min(-1), 0)
    scale, mins = (x.max(-1) - low) / 15, -low
    d, dmin = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)

    def steps(values, unit):
        unit = unit.astype(np.float32)[:, None]
        return np.clip(np.round(np.divide(values, unit, out=np.zeros_like(values), where=unit > 0)), 0, 63
                       ).astype(np.uint8)

    sc, m = steps(scale, d), steps(mins, dmin)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.round(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    q = q.reshape(-1, 4, 2, 32)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, packed], axis=1)
    return blocks.reshape(n_rows, -1)


def quantize(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return q4_k(array)
    return gguf.quants.quantize(array, qtype)


def write(path: Path, state_dict: dict, qtype_name: str) -> dict[str, int]:
    """Write `state_dict` (name -> float tensor) as a FLUX GGUF file in `qtype_name` (e.g. 'Q4_K');
    returns how many tensors went into each type."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for key, tensor in state_dict.items():
        array = tensor.detach().float().cpu().numpy()
        if array.ndim == 1 or array.size <= SMALL:
            kind, data = gguf.GGMLQuantizationType.F32, array
        elif array.shape[-1] % block:
            kind, data = gguf.GGMLQuantizationType.F16, array.astype(np.float16)
        else:
            kind, data = qtype, quantize(array, qtype)
        writer.add_tensor(key, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
