"""Train FLUX LoRAs (DreamBooth-style) on a loaded model.

The library behind the ComfyUI nodes, usable on its own: no ComfyUI import anywhere in it.
`python -m trainer` runs the quickstart on an embedded tiny FLUX.
"""

__version__ = "0.1.0"
