"""The ComfyUI face of the pack: thin node classes, the work is done in ../trainer."""

from comfy_api.latest import ComfyExtension, io

from . import routes
from .captions import CaptionImages
from .class_images import ClassImages
from .dataset import (
    DatasetAugmentation,
    DatasetFromFolder,
    DatasetFromImages,
    DatasetFromMfluxConfig,
    DatasetReport,
    RegularisationSet,
)
from .import_config import ImportTrainingConfig
from .layers import LoraLayerGroup
from .lora_io import ApplyFluxLora, SaveFluxLora, TinyFluxLoader
from .runs import LoadCheckpointLora, RunSettingsNode
from .settings import TrainingSettingsNode
from .train import TrainFluxLora
from .validation import ValidationSamples

NODES = [
    TinyFluxLoader,
    # datasets
    DatasetFromFolder, DatasetFromMfluxConfig, DatasetFromImages, DatasetAugmentation, RegularisationSet,
    ClassImages, CaptionImages, DatasetReport,
    # training
    ImportTrainingConfig, LoraLayerGroup, ValidationSamples, RunSettingsNode, TrainingSettingsNode, TrainFluxLora,
    # using the LoRA
    LoadCheckpointLora, ApplyFluxLora, SaveFluxLora,
]

routes.register()


class FluxDreamBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> FluxDreamBoothExtension:
    return FluxDreamBoothExtension()
