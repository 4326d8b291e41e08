"""The ComfyUI face of the pack: thin node classes, the work is done in ../trainer."""

from comfy_api.latest import ComfyExtension, io

from .dataset import DatasetFromFolder, DatasetFromMfluxConfig
from .layers import LoraLayerGroup
from .lora_io import ApplyFluxLora, SaveFluxLora, TinyFluxLoader
from .train import TrainFluxLora

NODES = [TinyFluxLoader, DatasetFromFolder, DatasetFromMfluxConfig, LoraLayerGroup, TrainFluxLora,
         ApplyFluxLora, SaveFluxLora]


class FluxDreamBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> FluxDreamBoothExtension:
    return FluxDreamBoothExtension()
