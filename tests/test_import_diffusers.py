"""diffusers' train_dreambooth_lora_flux.py argument lists read as recipes: the settings of the
diffusers + peft write-up (rank 32, alpha 16, lr 1e-4, AdamW with weight decay 1e-4, batch 8, 1024 px,
logit-normal σ; tests/data/diffusers_arthur.sh) flag by flag; the shell syntax people keep them in;
what can't be used, by flag; paths; and a few steps on the tiny FLUX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainer import cli
from trainer.cli import train as cli_train
from trainer.recipe import build, formats, shell
from trainer.recipe.text import UnreadableConfig

DATA = Path(__file__).resolve().parent / "data"


def photos(folder: Path, count: int, captions: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (80, 72), (30 * i % 255, 120, 200)).save(folder / f"{i:02d}.png")
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(
            json.dumps({"file_name": f"{i:02d}.png", "text": f"Arthur in place {i}"}) for i in range(count)))


def load(tmp_path: Path, text: str, name: str = "train.sh"):
    (tmp_path / name).write_text(text)
    return formats.load(tmp_path / name)


def test_the_write_ups_settings_are_read_flag_by_flag(tmp_path):
    shutil.copy(DATA / "diffusers_arthur.sh", tmp_path)
    photos(tmp_path / "arthur", 50, captions=True)
    imported = formats.load(tmp_path / "diffusers_arthur.sh")
    r = imported.recipe
    assert imported.format == "diffusers" and imported.unsupported == []
    assert r.dataset.folders == ["arthur"] and r.dataset.captions == "metadata"
    assert r.dataset.default_caption == "Arthur" and r.dataset.trigger == ""
    assert (r.dataset.resolution, r.dataset.bucketing, r.dataset.crop) == ([1024], False, "random")
    assert (r.layers.rank, r.layers.alpha) == (32, 16.0)
    assert r.layers.layer_types == ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    t = r.train
    assert (t.learning_rate, t.batch_size, t.seed, t.weight_decay, t.optimizer) == (1e-4, 8, 0, 1e-4, "adamw")
    assert (t.lr_schedule, t.warmup_steps, t.memory.checkpointing) == ("constant", 0, "blocks")
    assert (t.timesteps.mode, t.timesteps.logit_mean, t.timesteps.logit_std, t.loss.weighting) == (
        "logit_normal", 0.0, 1.0, "none")
    assert t.steps == 800 * 7  # 50 photos in batches of 8: 7 steps an epoch
    assert (r.validation.every, r.validation.prompts) == (25 * 7, ["A picture of Arthur. He is wearing a tuxedo."])
    assert (r.save.every, r.save.output) == (500, "arthur-flux-lora")
    assert set(imported.honoured) == {
        "--pretrained_model_name_or_path", "--dataset_name", "--caption_column", "--instance_prompt", "--output_dir",
        "--resolution", "--train_batch_size", "--gradient_checkpointing", "--rank", "--lora_alpha", "--lora_layers",
        "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--optimizer", "--adam_weight_decay",
        "--weighting_scheme", "--logit_mean", "--logit_std", "--mode_scale", "--num_train_epochs",
        "--validation_prompt", "--validation_epochs", "--checkpointing_steps", "--seed",
        "--mixed_precision"}  # accelerate's, before the script
    notes = "\n".join(imported.notes)
    assert "--mode_scale: diffusers uses it only with --weighting_scheme mode." in notes
    assert "--guidance_scale 3.5 (here train.guidance 1.0)" in notes  # diffusers' default, not in the file
    assert "black-forest-labs/FLUX.1-dev" in notes  # $MODEL_NAME of the export line


def test_the_shell_syntax_of_scripts_and_readmes(tmp_path):
    text = ("# a comment\nexport OUT=runs  # where\nINSTANCE=dog accelerate launch --num_processes 1 \\\n"
            "  examples/dreambooth/train_dreambooth_lora_flux.py --instance_data_dir=$INSTANCE \\\n"
            "  --instance_prompt 'a photo of sks dog' --output_dir ${OUT}/lora --center_crop --rank=8 \\\n"
            "  --random_flip --logit_mean -0.5 --checkpointing_steps \"100\"\n")
    command = shell.parse(text, {"center_crop", "random_flip"})
    assert command.script == "train_dreambooth_lora_flux.py" and command.launcher == {"num_processes": "1"}
    assert command.flags == {"instance_data_dir": "dog", "instance_prompt": "a photo of sks dog",
                             "output_dir": "runs/lora", "center_crop": True, "rank": "8", "random_flip": True,
                             "logit_mean": "-0.5", "checkpointing_steps": "100"}
    assert shell.parse("--rank 4\n--instance_prompt=x y\n").flags == {"rank": "4", "instance_prompt": "x"}
    assert shell.parse("--rank 4\n--instance_prompt=x y\n").strays == ["y"]
    with pytest.raises(UnreadableConfig, match="line 2.*quote"):
        load(tmp_path, "python train_dreambooth_lora_flux.py \\\n--rank 4\n --instance_prompt='a photo\n")


def test_flags_that_cant_be_used_are_listed_by_flag_and_others_noted(tmp_path):
    photos(tmp_path / "dog", 5)
    imported = load(tmp_path, (
        "accelerate launch --multi_gpu train_dreambooth_lora_flux.py --pretrained_model_name_or_path=x "
        "--instance_data_dir=dog --instance_prompt='photo of sks dog' --train_text_encoder --text_encoder_lr 1e-5 "
        "--lora_dropout 0.1 --resume_from_checkpoint latest --train-batch-size 2 --weight_decay 0.1 --rank "
        "--weighting_scheme logit --push_to_hub --hub_token hf_x --report_to wandb --adam_weight_decay_text_encoder 0.1"
        " --max_train_steps 300 --lr_warmup_steps 300 --center_crop extra --dataset_config_name x"))
    why = {u.key: u.why for u in imported.unsupported}
    assert set(why) == {"--adam_weight_decay_text_encoder",
                        "--lora_dropout", "--resume_from_checkpoint", "--train-batch-size", "--weight_decay", "--rank",
                        "--weighting_scheme", "--lr_warmup_steps", "extra", "--dataset_config_name"}
    assert imported.recipe.train.text_encoder_lr == 1e-5 and "layers.dropout" in why["--lora_dropout"]
    assert "'--train_batch_size'" in why["--train-batch-size"] and "'--adam_weight_decay'" in why["--weight_decay"]
    assert "no value" in why["--rank"] and "logit_normal" in why["--weighting_scheme"]
    assert "warmup_steps is 300" in why["--lr_warmup_steps"] and "--resume latest" in why["--resume_from_checkpoint"]
    notes = "\n".join(imported.notes)
    for flag in ("accelerate --multi_gpu", "--push_to_hub", "--hub_token", "--report_to"):
        assert f"{flag}: " in notes
    assert imported.recipe.train.steps == 300 and imported.recipe.dataset.crop == "center"  # the rest still applies


def test_prior_preservation_becomes_the_regularisation_set_with_its_caption(tmp_path):
    photos(tmp_path / "dog", 5)
    photos(tmp_path / "class", 9)
    base = ("python train_dreambooth_lora_flux.py --instance_data_dir dog --instance_prompt 'photo of sks dog' "
            "--class_data_dir class --class_prompt 'a photo of a dog' --prior_loss_weight 0.5 --train_batch_size 2 "
            "--gradient_accumulation_steps 2 --num_train_epochs 3")
    plain = load(tmp_path, base)
    assert plain.recipe.dataset.regularisation == [] and plain.unsupported == []
    assert "--class_data_dir: diffusers uses it only with --with_prior_preservation." in plain.notes
    assert plain.recipe.train.steps == 3 * 2  # ⌈⌈5 / 2⌉ / 2⌉ = 2 steps an epoch
    d = load(tmp_path, base + " --with_prior_preservation").recipe.dataset
    assert (d.regularisation, d.regularisation_caption, d.regularisation_weight) == (["class"], "a photo of a dog", 0.5)
    assert load(tmp_path, base + " --with_prior_preservation").recipe.train.steps == 3 * 3  # 9 class photos an epoch
    items = build.dataset(load(tmp_path, base + " --with_prior_preservation").recipe.with_settings(["resolution=64"]),
                          tmp_path).items
    assert {i.caption for i in items if not i.regularisation} == {"photo of sks dog"}
    assert {i.caption for i in items if i.regularisation} == {"a photo of a dog"}  # not the instance prompt


@pytest.mark.parametrize("scheme, mode, weighting, mean", [
    ("logit_normal", "logit_normal", "none", -0.5), ("mode", "mode", "none", 0.0),
    ("cosmap", "uniform", "cosmap", 0.0), ("sigma_sqrt", "uniform", "sigma_sqrt", 0.0),
    ("none", "uniform", "none", 0.0)])
def test_weighting_schemes_as_diffusers_draws_sigma(tmp_path, scheme, mode, weighting, mean):
    imported = load(tmp_path, f"--instance_data_dir dog --weighting_scheme {scheme} --logit_mean 0.5 --mode_scale 1.0")
    t = imported.recipe.train
    assert (t.timesteps.mode, t.loss.weighting, t.timesteps.logit_mean) == (mode, weighting, mean)
    assert t.timesteps.mode_scale == (1.0 if scheme == "mode" else 1.29)


def test_lora_layers_match_as_peft_does_and_paths_are_named_by_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    imported = load(tmp_path, "--instance_data_dir ~/dog --class_data_dir 'C:\\photos\\class' --class_prompt dog "
                              "--with_prior_preservation --lora_layers 'proj_out, ff.net.0.proj,linear,x_embedder,no'")
    assert imported.recipe.layers.layer_types == ["proj_out", "ff.net.0.proj", "norm1.linear", "norm1_context.linear",
                                                  "norm.linear"]
    notes = "\n".join(imported.notes)
    assert "proj_out, norm_out.linear, x_embedder outside the blocks" in notes and "no names no layer" in notes
    assert f"--instance_data_dir: '~/dog' does not exist here ({tmp_path / 'home' / 'dog'})" in notes
    assert any(n.startswith("--class_data_dir: ") and "a Windows path" in n for n in imported.notes)


def test_the_write_up_trains_a_few_steps_on_the_tiny_model(tmp_path, tiny_flux, monkeypatch):
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    shutil.copy(DATA / "diffusers_arthur.sh", tmp_path)
    photos(tmp_path / "arthur", 3, captions=True)
    assert cli.main(["train", "--config", str(tmp_path / "diffusers_arthur.sh"), "--model", "tiny",
                     "--set", "steps=2", "--set", "resolution=64", "--set", "batch_size=1",
                     "--set", "rank=4", "--set", "validation.steps=2",
                     "--set", "validation.before_training=false", "--set", "dataset.crop=center"]) == 0  # one view each
    run = tmp_path / "arthur-flux-lora" / "flux_lora_001"  # --output_dir, relative to the file
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and (run.parent / "flux_lora_001.safetensors").is_file()
