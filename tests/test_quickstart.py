import json

import numpy as np
from PIL import Image

from trainer import quickstart
from trainer.outputs import export


def test_the_readme_main_command_trains_saves_and_samples(tmp_path):
    quickstart.main(["--out", str(tmp_path)])
    summary = json.loads((tmp_path / "loss_history.json").read_text())
    assert summary["fixed_noise_loss_after"] < 0.8 * summary["fixed_noise_loss_before"]
    assert len(summary["losses"]) == quickstart.DEFAULTS["steps"]

    sd = export.load(tmp_path / "quickstart_lora.safetensors")
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in sd)
    assert all(k.replace(".lora_down.weight", ".alpha") in sd for k in downs)
    meta = export.read_metadata(tmp_path / "quickstart_lora.safetensors")
    assert meta["dreambooth.trigger_word"] == "sks" and meta["dreambooth.steps"] == "60"

    before = np.asarray(Image.open(tmp_path / "sample_before.png"), dtype=np.float32)
    after = np.asarray(Image.open(tmp_path / "sample_after.png"), dtype=np.float32)
    assert before.shape == after.shape == (128, 128, 3)
    assert np.abs(before - after).mean() > 2.0  # the LoRA changed the sample
