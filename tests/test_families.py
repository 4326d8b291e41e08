"""The family registry: what each family states, and files of one family refused on another."""

from dataclasses import replace

import pytest
import torch

from trainer import families
from trainer.families.conditioning import Conditioning
from trainer.families.flux1 import FAMILY as FLUX1
from trainer.outputs import checkpoints


def test_every_family_names_the_same_presets_and_its_layout():
    for name, family in families.FAMILIES.items():
        assert family.name == name
        assert {"attention", "attention+mlp"} <= set(family.vocabulary.presets)
        assert families.of_layout(family.layout()) is family  # a checkpoint's dims find their family


def test_an_unknown_family_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="'flux9'.*flux1"):
        families.family("flux9")


def test_a_checkpoint_of_another_family_is_refused_by_name():
    other = replace(FLUX1, name="flux2", label="FLUX.2")
    with pytest.raises(ValueError, match="trained a FLUX.1 LoRA, but the MODEL is FLUX.2"):
        checkpoints.check_family({"family": "flux1"}, other)
    checkpoints.check_family({}, FLUX1)  # checkpoints from before families trained FLUX.1


def test_conditioning_batches_captions_with_and_without_a_pooled_vector():
    texts = [(torch.randn(5, 8), torch.randn(4)), (torch.randn(5, 8), torch.randn(4))]
    cond = Conditioning.of(texts, guidance=3.5)
    assert cond.context.shape == (2, 5, 8) and cond.pooled.shape == (2, 4) and cond.batch == 2
    bare = Conditioning.of([(t, None) for t, _ in texts])
    assert bare.pooled is None and bare.to(torch.device("cpu")).pooled is None
