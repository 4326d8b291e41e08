"""What other tools' base-model quantization settings become here: the one table the config readers
(mflux, SimpleTuner, ai-toolkit) look them up in.

Our recipe key is `train.memory.base_quantization`: `none`, or `int8` (the blocks' Linear weights
held in int8 by torchao for the run, trainer/loop/quantize.py). The recipe has no lower bit width:
in ComfyUI 4-bit (and 3-, 5-, 6-bit) bases are GGUF files (Q4_K, Q5_K, …) loaded with city96's
ComfyUI-GGUF and its Unet Loader (GGUF) node, and fp8 is the stock Load Diffusion Model's
`weight_dtype fp8_e4m3fn`; the pack trains on either as loaded, with base_quantization none. So a
setting that asks for fewer bits maps to int8 (the smallest the recipe holds) with a note naming
the loader that gives those bits.

A reader calls `lookup(tool, key, value)`; with a `Quantization` it sets `KEY` to `.value` and
passes `.note` on, with None the value is unknown: the key is unsupported, naming `choices()`.
"""

from __future__ import annotations

from dataclasses import dataclass

KEY = "train.memory.base_quantization"


@dataclass(frozen=True)
class Quantization:
    value: str  # our train.memory.base_quantization: "none" or "int8"
    note: str = ""  # what the user is told (empty: the same thing)


def _fewer_bits(setting: str, gguf: str) -> Quantization:
    return Quantization("int8", f"{setting} asks for fewer bits than int8, the smallest base_quantization; for "
                                f"{setting} in ComfyUI, load a GGUF {gguf} file of the model with ComfyUI-GGUF's "
                                "Unet Loader (GGUF) and set base_quantization to none.")


_FP8 = ("base_quantization none: load the model with Load Diffusion Model's weight_dtype fp8_e4m3fn in ComfyUI to "
        "train on fp8 weights")

QUANTIZATION: dict[tuple[str, str], dict[object, Quantization]] = {
    ("mflux", "quantize"): {
        None: Quantization("none"),
        8: Quantization("int8", "mflux's quantize 8 becomes base_quantization int8 (torchao weight-only int8; a "
                                "GGUF Q8_0 file through ComfyUI-GGUF's Unet Loader (GGUF) is the other 8-bit way)."),
        6: _fewer_bits("mflux's quantize 6", "Q6_K"),
        5: _fewer_bits("mflux's quantize 5", "Q5_K"),
        4: _fewer_bits("mflux's quantize 4", "Q4_K"),
        3: _fewer_bits("mflux's quantize 3", "Q3_K"),
    },
    ("SimpleTuner", "base_model_precision"): {
        "no_change": Quantization("none"),
        "int8-quanto": Quantization("int8", "SimpleTuner's int8-quanto (optimum-quanto qint8, weight-only) becomes "
                                            "base_quantization int8 (torchao's weight-only int8)."),
        "int8-torchao": Quantization("int8"),
        "fp8-quanto": Quantization("none", f"SimpleTuner's fp8-quanto becomes {_FP8}."),
        "fp8uz-quanto": Quantization("none", f"SimpleTuner's fp8uz-quanto becomes {_FP8}."),
        "fp8-torchao": Quantization("none", f"SimpleTuner's fp8-torchao becomes {_FP8}."),
        "int4-quanto": _fewer_bits("SimpleTuner's int4-quanto", "Q4_K"),
        "int4-torchao": _fewer_bits("SimpleTuner's int4-torchao", "Q4_K"),
        "nf4-bnb": _fewer_bits("SimpleTuner's nf4-bnb", "Q4_K"),
        "int2-quanto": _fewer_bits("SimpleTuner's int2-quanto", "Q2_K"),
    },
    ("ai-toolkit", "model.quantize"): {
        False: Quantization("none"),
        True: Quantization("none", "ai-toolkit's quantize (optimum-quanto, qfloat8 by default) is 8-bit float: load "
                                   "the model with Load Diffusion Model's weight_dtype fp8_e4m3fn in ComfyUI for the "
                                   "same, or set base_quantization to int8 for int8 weights."),
    },
}


def lookup(tool: str, key: str, value: object) -> Quantization | None:
    """What `tool`'s `key: value` becomes (None: a value this table does not know). Strings match
    without regard to case; a whole float (8.0) as the int."""
    table = QUANTIZATION[(tool, key)]
    if isinstance(value, str):
        value = value.strip().lower()
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or value is None:
        return table.get(value)
    return next((q for v, q in table.items() if not isinstance(v, bool) and v == value), None)


def choices(tool: str, key: str) -> list[str]:
    """The values `lookup` knows, as the tool writes them (for an unsupported value's message)."""
    return [str(v).lower() if isinstance(v, bool) else "null" if v is None else str(v)
            for v in QUANTIZATION[(tool, key)]]


def honour(m, tool: str, key: str, file_key: str, value: object) -> None:
    """An importer's quantization setting (`key` in the table, written as `file_key` in the file)
    set on a `Mapping` as base_quantization with its note, or named unsupported with the choices."""
    q = lookup(tool, key, value)
    if q is None:
        m.drop(file_key, f"{value!r} is not a quantization this pack knows for {tool}'s {key}; "
                         f"choose {', '.join(choices(tool, key))}.")
    else:
        m.set(file_key, KEY, q.value, note=q.note or None)
