"""The boundary to ComfyUI's internals: the only modules of the pack that import `comfy`,
`folder_paths`, `node_helpers` or `server`. Each wraps one part of the host:

    models    the MODEL, CLIP and VAE: training backends, loading, encoding, memory, Cancel, the
              int8 base for the run
    gguf      telling a MODEL from ComfyUI-GGUF's loader apart (its GGML weight types)
    loras     applying a LoRA the way the stock LoraLoader does; LoRA files in models/loras
    paths     ComfyUI's input, output and models folders
    events    websocket events, HTTP routes, progress bars
    sampling  rendering with ComfyUI's sampler, and its sampler and scheduler names
    tiny      the embedded tiny FLUX as ComfyUI objects
    vision    a CLIP_VISION as the scores' image embedder, and a toy-width one for tests

Node modules use ComfyUI's public node API (`comfy_api.latest.io`) and these, nothing else of
ComfyUI's; a test holds them to it.
"""
