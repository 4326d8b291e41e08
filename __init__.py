"""comfyui-flux-dreambooth: train a FLUX LoRA of your subject inside ComfyUI, on the model the
workflow already loaded. Nodes are registered through ComfyUI's V3 entry point.

Outside ComfyUI (tests, `python -m trainer`) there is no host to register with: only the
standalone `trainer` library is used then.
"""

try:
    import comfy_api.latest  # noqa: F401  (present only when ComfyUI is loading us)
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint

    WEB_DIRECTORY = "./web/js"
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
