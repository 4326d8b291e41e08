"""Socket types the pack's nodes pass between each other (their names are saved in workflows)."""

from comfy_api.latest import io

from .ids import CATEGORY

Dataset = io.Custom("FLUX_DREAMBOOTH_DATASET")
LoraLayers = io.Custom("FLUX_LORA_LAYERS")
Validation = io.Custom("FLUX_DREAMBOOTH_VALIDATION")
RunSettings = io.Custom("FLUX_DREAMBOOTH_RUN")
Augment = io.Custom("FLUX_DREAMBOOTH_AUGMENT")
TrainingSettings = io.Custom("FLUX_DREAMBOOTH_TRAINING_SETTINGS")


class Category:
    """Where the nodes sit in ComfyUI's node library."""

    DATASET = f"{CATEGORY}/dataset"
    TRAINING = f"{CATEGORY}/training"
    LORA = f"{CATEGORY}/LoRA"
    MODELS = f"{CATEGORY}/models"
