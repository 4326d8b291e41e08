"""One LoRA layer group per node; chain them into a selection (mflux's art-style template
uses two: some double blocks' attention and some single blocks' projections)."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.families.flux1.layers import DOUBLE, SINGLE
from ..trainer.families.flux1.layers import VOCABULARY as FLUX1
from ..trainer.families.flux2.layers import MODULATION, MODULATION_LAYERS
from ..trainer.families.flux2.layers import VOCABULARY as FLUX2
from ..trainer.lora.targets import LayerGroup, LayerSpec, parse_layer_types, preset_names
from ..trainer.lora.variants import VARIANTS
from . import ids, sockets


class LoraLayerGroup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.LAYERS,
            display_name="LoRA Layer Group",
            category=sockets.Category.TRAINING,
            description="Which layers get a LoRA, in mflux/diffusers names. Chain several groups through "
                        "`previous`. ComfyUI fuses q/k/v into one layer; picking attn.to_q alone trains only "
                        "its slice.",
            inputs=[
                sockets.LoraLayers.Input("previous", optional=True,
                                         tooltip="Groups from another LoRA Layer Group node."),
                io.Combo.Input("blocks", options=[SINGLE, DOUBLE, MODULATION], default=SINGLE,
                               tooltip="single_transformer_blocks (38 in FLUX.1, later layers, details) or "
                                       "transformer_blocks (19, the double-stream layers, broader features). "
                                       "FLUX.2 only: modulation, the shared layers every block's shift, scale "
                                       "and gate come from (start 0, end 1; layer_types "
                                       f"{', '.join(MODULATION_LAYERS)}); a LoRA there changes every block, "
                                       "so give it a low rank (2–4) next to a block group."),
                io.Int.Input("start", default=0, min=0, max=100,
                             tooltip="First block of the range. The people template starts at 10 to leave early "
                                     "layers (composition) alone."),
                io.Int.Input("end", default=38, min=1, max=100,
                             tooltip="End of the range, exclusive as in mflux: 38 covers all single blocks, 19 all "
                                     "double blocks."),
                io.String.Input("layer_types", default="proj_out, proj_mlp, attn.to_q, attn.to_k, attn.to_v",
                                tooltip="Comma-separated diffusers names. "
                                        f"FLUX.1 single blocks: {FLUX1.names(SINGLE)}; "
                                        f"double blocks: {FLUX1.names(DOUBLE)}. "
                                        f"FLUX.2 single blocks: {FLUX2.names(SINGLE)}; "
                                        f"double blocks: {FLUX2.names(DOUBLE)}. "
                                        f"Presets (the same layers in each family): {', '.join(preset_names())}. "
                                        "Attention (q, k, v) holds likeness; projections and MLPs hold style."),
                io.Int.Input("rank", default=8, min=1, max=256,
                             tooltip="LoRA rank: 4–8 for a pet or object, 8–16 for a face, 16–32 for a style. "
                                     "Higher learns more detail, takes more memory, overfits sooner."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank "
                                       "(scale 1). Half the rank (rank 32, alpha 16 as in diffusers' FLUX DreamBooth "
                                       "script) trains gentler."),
                io.Combo.Input("variant", options=list(VARIANTS), default="lora", optional=True,
                               tooltip="What each layer trains. lora: the usual choice. dora: LoRA with its "
                                       "magnitude learned apart (peft's use_dora), a little closer to full "
                                       "fine-tuning, ~10% slower. lokr: Kronecker factors (ai-toolkit's "
                                       "network.type: lokr, LyCORIS's algo), small files, good for styles. loha: "
                                       "Hadamard product, more expressive per rank, slower. All load in "
                                       "ComfyUI's LoraLoader (save as kohya; diffusers holds lora and dora)."),
                io.Int.Input("lokr_factor", default=-1, min=-1, max=1024, optional=True,
                             tooltip="LoKr only: size of the small Kronecker factor (ai-toolkit's lokr_factor). "
                                     "-1 picks it from the layer size, the usual choice; 4–16 gives smaller files "
                                     "and a coarser update. Leave at -1 unless memory is tight. 0 is not allowed."),
                io.Boolean.Input("lokr_full_rank", default=False, optional=True,
                                 tooltip="LoKr only: train the large factor whole instead of as a rank-`rank` pair "
                                         "(ai-toolkit's lokr_full_rank). More capacity, bigger file; rank and "
                                         "alpha are then not used (scale 1)."),
            ],
            outputs=[sockets.LoraLayers.Output(display_name="lora_layers")],
        )

    @classmethod
    def execute(cls, blocks, start, end, layer_types, rank, alpha, previous=None, variant="lora", lokr_factor=-1,
                lokr_full_rank=False) -> io.NodeOutput:
        group = LayerGroup(blocks, start, end, parse_layer_types(layer_types, blocks), rank, alpha or None, variant,
                           lokr_factor, lokr_full_rank)
        groups = (previous.groups if previous is not None else ()) + (group,)
        return io.NodeOutput(LayerSpec(groups))
