"""Socket types the nodes pass between each other."""

from comfy_api.latest import io

Dataset = io.Custom("FLUX_DREAMBOOTH_DATASET")
LoraLayers = io.Custom("FLUX_LORA_LAYERS")
Validation = io.Custom("FLUX_DREAMBOOTH_VALIDATION")
RunSettings = io.Custom("FLUX_DREAMBOOTH_RUN")
Augment = io.Custom("FLUX_DREAMBOOTH_AUGMENT")
CATEGORY = "FLUX DreamBooth"
