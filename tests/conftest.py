import pytest
import torch

from trainer.families.flux1 import tiny


@pytest.fixture(scope="session")
def tiny_flux():
    """The embedded tiny FLUX (diffusers + transformers classes), built once."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return tiny.build(seed=0)


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """ComfyUI from COMFYUI_PATH with this pack loaded (host tests only)."""
    from comfyui_host import COMFYUI_PATH, SKIP_REASON, Host

    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON)
    return Host(tmp_path_factory.mktemp("comfyui"))
