"""`python -m trainer config` and `train`, run in-process through `main(argv)`: the report of a
config file, training a recipe on the tiny FLUX with checkpoints, --set, --resume latest, Ctrl-C,
and the errors that come before anything is written."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from trainer import cli, quickstart
from trainer.cli import train as cli_train
from trainer.outputs import checkpoints, export
from trainer.outputs.checkpoints import RunFolder

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
RECIPE = """\
dataset:
  folders: photos          # relative to this file
  trigger: sks
  resolution: 64
  bucketing: false
layers:
  preset: attention
  rank: 4
train:
  steps: 100               # the tests --set fewer
  learning_rate: 3e-3
  seed: 0
  memory: {checkpointing: "off"}
save:
  every: 3
  keep_last: 0
  name: toy
  output: runs
"""


@pytest.fixture
def recipe(tmp_path, tiny_flux, monkeypatch):
    """A recipe beside a copy of the quickstart photos; the tiny model built once for all tests."""
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt", "04.jpg", "04.txt"):  # three photos: seconds per run
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def config_json(path, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["config", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_json_lists_what_took_effect_what_did_not_and_missing_paths(recipe, capsys):
    recipe.write_text(RECIPE.replace("  seed: 0\n", "  seed: 0\n  learning_rte: 1e-4\n").replace(
        "  bucketing: false\n", "  bucketing: false\n  regularisation: [~/no_such_reg_folder]\n"))
    report = config_json(recipe, capsys)
    assert report["format"] == "ours"
    assert report["settings"]["train"]["steps"] == 100 and report["settings"]["train"]["learning_rate"] == 3e-3
    assert report["settings"]["save"]["dtype"] == "fp16"  # defaults are filled in
    assert report["honoured"] == [
        "dataset.folders", "dataset.trigger", "dataset.resolution", "dataset.bucketing", "dataset.regularisation",
        "layers.preset", "layers.rank", "train.steps", "train.learning_rate", "train.seed",
        "train.memory.checkpointing", "save.every", "save.keep_last", "save.name", "save.output"]
    (unknown,) = report["unsupported"]
    assert unknown["key"] == "train.learning_rte" and "'train.learning_rate'" in unknown["why"]
    (note,) = report["notes"]
    assert "dataset.regularisation" in note and "no_such_reg_folder" in note and "does not exist" in note


def test_config_exits_2_on_an_unreadable_or_unsupported_file(tmp_path, capsys, caplog):
    assert cli.main(["config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in caplog.text
    (tmp_path / "broken.json").write_text('{"train": {"steps": 5,}')
    assert cli.main(["config", str(tmp_path / "broken.json"), "--json"]) == 2
    assert "not valid JSON" in caplog.text
    (tmp_path / "food.yaml").write_text("food: pizza\n")
    assert cli.main(["config", str(tmp_path / "food.yaml")]) == 2
    assert "not a training config this pack knows" in caplog.text and "SimpleTuner" in caplog.text
    assert capsys.readouterr().out == ""
    (tmp_path / "mflux.json").write_text('{"model": "dev", "training_loop": {}, "examples": {}}')
    assert cli.main(["config", str(tmp_path / "mflux.json")]) == 0  # read now
    assert "mflux format" in capsys.readouterr().out


def test_config_write_exports_a_recipe_that_reads_back_the_same(recipe, tmp_path, capsys):
    for name in ("shared.yaml", "shared.json"):
        assert cli.main(["config", str(recipe), "--write", str(tmp_path / name)]) == 0
        assert "Settings:" in capsys.readouterr().out
        assert config_json(tmp_path / name, capsys)["settings"] == config_json(recipe, capsys)["settings"]


def test_train_writes_checkpoints_lora_and_history_then_resume_latest_continues(recipe, tmp_path, caplog, capsys):
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--set", "steps=6",
                     "--set", "train.learning_rate=3e-3", "--log-every", "2"]) == 0
    run = tmp_path / "runs" / "toy_001"  # save.output, relative to the recipe's folder
    assert [c.name for c in RunFolder(run).checkpoints()] == ["step_000003", "step_000006"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and len(summary["losses"]) == 6
    assert summary["fixed_noise_loss_after"] < summary["fixed_noise_loss_before"]
    for name in ("loss_history.csv", "loss.png", "recipe.yaml", "recipe_ai_toolkit.yaml"):
        assert (run / name).is_file(), name
    # the run's recipe: what trained, --set included, its folders resolved, read back by `config`
    ran = config_json(run / "recipe.yaml", capsys)
    wanted = config_json(recipe, capsys)["settings"]
    wanted["train"]["steps"] = 6
    wanted["dataset"]["folders"] = [str(tmp_path / "photos")]
    wanted["save"]["output"] = str(tmp_path / "runs")
    assert ran["format"] == "ours" and ran["unsupported"] == [] and ran["settings"] == wanted
    assert config_json(run / "recipe_ai_toolkit.yaml", capsys)["format"] == "ai-toolkit"
    lora = tmp_path / "runs" / "toy_001.safetensors"
    sd, meta = export.load(lora), export.read_metadata(lora)
    assert sd and all(k.startswith("lora_unet_") for k in sd) and meta["dreambooth.steps"] == "6"
    assert json.loads(meta["dreambooth.recipe"])["train"]["steps"] == 6
    assert "step 2/6" in caplog.text and "s/step" in caplog.text and "ETA" in caplog.text

    caplog.clear()
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--set", "steps=9",
                     "--resume", "latest", "--log-format", "json"]) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == 9 and resumed["resumed_from"].endswith("step_000006")
    assert resumed["losses"][:6] == summary["losses"]  # continued from the checkpoint, not retrained
    assert "Resuming with changed settings: train.steps 6 -> 9." in caplog.text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert [line["step"] for line in lines] == [7, 9] and all(line["total"] == 9 for line in lines)
    assert checkpoints.load_state(RunFolder(run).latest())["step"] == 9
    assert not (tmp_path / "runs" / "toy_002").exists()


def test_ctrl_c_ends_within_a_step_with_a_checkpoint_and_exit_130(recipe, tmp_path, monkeypatch):
    shown = cli_train.ConsoleHost.on_progress

    def press_ctrl_c_at_step_2(self, progress, latest):
        shown(self, progress, latest)
        if progress.step == 2:
            signal.raise_signal(signal.SIGINT)  # through the handler the command installed

    monkeypatch.setattr(cli_train.ConsoleHost, "on_progress", press_ctrl_c_at_step_2)
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--set", "steps=50",
                     "--set", "save_every=100"]) == 130
    (saved,) = RunFolder(tmp_path / "runs" / "toy_001").checkpoints()
    assert 2 <= checkpoints.step_of(saved) <= 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's own handler is back


def test_bad_input_fails_by_name_before_anything_is_written(recipe, tmp_path, caplog):
    recipe.write_text(RECIPE.replace("folders: photos", "folders: [photos, ~/no_such_photos_here]"))
    cases = [([], "dataset.folders[1] is '~/no_such_photos_here'"),
             (["--set", "dataset.folders=elsewhere"], f"dataset.folders is 'elsewhere': {tmp_path / 'elsewhere'}"),
             (["--set", "steps=many"], "train.steps is 'many'"),
             (["--set", "rnak=4"], "did you mean 'rank'"),
             (["--set", "dataset.folders=photos", "--model", "flux-dev"], "--model 'flux-dev'"),
             (["--set", "dataset.folders=photos", "--resume", str(tmp_path / "photos")], "no checkpoint there")]
    for extra, message in cases:
        caplog.clear()
        argv = ["train", "--config", str(recipe), "--model", "tiny", *extra]
        assert cli.main(argv) == 1, extra
        assert message in caplog.text, caplog.text
        assert not (tmp_path / "runs").exists()
    recipe.write_text(RECIPE + "  colour: blue\n")
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny"]) == 1
    assert "save.colour" in caplog.text and not (tmp_path / "runs").exists()


def test_init_writes_a_commented_recipe_that_config_reads(tmp_path, capsys):
    path = tmp_path / "new.yaml"
    assert cli.main(["init", str(path), "--set", "steps=5"]) == 0
    assert "# LoRA rank" in path.read_text()
    report = config_json(path, capsys)
    assert report["settings"]["train"]["steps"] == 5 and report["unsupported"] == []
    assert any("dataset.folders is empty" in n for n in report["notes"])
    assert cli.main(["init", str(path)]) == 1  # never replaces a recipe unasked


def test_the_bundled_quickstart_recipe_reads_whole(capsys):
    report = config_json(Path(cli_train.__file__).parents[1] / "assets" / "quickstart_recipe.yaml", capsys)
    assert report["unsupported"] == [] and report["notes"] == []
    assert report["settings"]["train"]["steps"] == quickstart.DEFAULTS["steps"]


def test_help_lists_the_subcommands_and_no_subcommand_is_the_quickstart(monkeypatch, capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("config", "train", "init", "keys", "--steps", "--out"))
    seen = []
    monkeypatch.setattr(quickstart, "main", seen.append)
    assert cli.main(["--steps", "3", "--out", "x"]) == 0 and cli.main([]) == 0
    assert seen == [["--steps", "3", "--out", "x"], []]
