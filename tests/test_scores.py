"""Likeness and drift per checkpoint (trainer/outputs/scores.py, trainer/loop/scoring.py): the maths
on controlled embeddings, the best checkpoint, and a tiny run on the command line that writes
scores.csv/json at every validation step, names a best checkpoint that exists, and keeps its rows
and its base samples when resumed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer import cli
from trainer.cli import embedder
from trainer.cli import train as cli_train
from trainer.loop import scoring
from trainer.outputs import scores
from trainer.outputs.checkpoints import RunFolder
from trainer.outputs.scores import Score

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
RECIPE = """\
dataset: {folders: photos, trigger: sks, class_word: toy, resolution: 64, bucketing: false}
layers: {preset: attention, rank: 4}
train: {steps: 4, learning_rate: 3e-3, seed: 0, memory: {checkpointing: "off"}}
save: {every: 2, keep_last: 0, name: toy, output: runs}
validation:
  prompts: ["a photo of [trigger]", "a red cube"]
  every: 2
  steps: 2
  size: 64
  scores: pixels
"""


def test_likeness_is_highest_when_samples_are_the_training_images():
    g = torch.Generator().manual_seed(0)
    photos = torch.rand(4, 32, 32, 3, generator=g)
    embed = scores.PooledPixels()
    same = scores.likeness(embed(photos), embed(photos))
    other = scores.likeness(embed(torch.rand(4, 32, 32, 3, generator=g)), embed(photos))
    halfway = scores.likeness(embed(0.5 * photos + 0.5 * torch.rand(4, 32, 32, 3, generator=g)), embed(photos))
    assert other < halfway < same
    # one sample equal to each photo scores its own 1 and its cosine with the others: the mean over every pair
    e = torch.eye(3)
    assert scores.likeness(e[:1], e) == pytest.approx(1 / 3)
    assert scores.likeness(torch.tensor([[1.0, 1.0, 0.0]]), e[:2]) == pytest.approx(2 ** -0.5)


def test_drift_is_zero_for_identical_samples_and_grows_as_they_move():
    base = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    assert scores.drift(base, base) == pytest.approx(0.0, abs=1e-6)
    assert scores.drift(3 * base, base) == pytest.approx(0.0, abs=1e-6)  # a cosine: scale doesn't count
    assert scores.drift(-base, base) == pytest.approx(2.0)
    noisy = [scores.drift(base + s * torch.randn(5, 16, generator=torch.Generator().manual_seed(2)), base)
             for s in (0.1, 0.5, 2.0)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    with pytest.raises(ValueError, match="one base sample per sample"):
        scores.drift(base[:2], base)


def test_best_is_the_most_alike_checkpoint_within_max_drift():
    rows = [Score(0, 0.2, 0.0), Score(10, 0.5, 0.05), Score(20, 0.8, 0.15), Score(30, 0.9, 0.4), Score(40, 0.95, 0.1)]
    chosen = scores.best(rows, [10, 20, 30], max_drift=0.2)  # 40 has no checkpoint (kept out by keep_last)
    assert chosen.score.step == 20 and chosen.within
    assert chosen.line() == "best checkpoint: step 20 (likeness 0.800, drift 0.150)"
    assert scores.best(rows, [10, 20, 30, 40]).score.step == 40
    fallback = scores.best(rows, [30], max_drift=0.2)  # none within: the least drift, said so
    assert fallback.score.step == 30 and not fallback.within and "drifts least" in fallback.line()
    assert scores.best(rows, []) is None


def test_the_loss_plot_draws_likeness_and_drift_when_there_are_scores():
    import numpy as np

    from trainer.outputs import progress

    history = [(s, 1.0 / s, 1.0 / s, 1e-3) for s in range(1, 21)]
    rows = [Score(0, 0.3, 0.0), Score(10, 0.5, 0.1), Score(20, 0.6, 0.2)]

    def has(image, colour):
        return bool((np.asarray(image) == colour).all(-1).any())

    plain, scored = progress.loss_plot(history), progress.loss_plot(history, rows)
    assert not has(plain, (30, 150, 60)) and not has(plain, (200, 50, 40))
    assert has(scored, (30, 150, 60)) and has(scored, (200, 50, 40))  # likeness green, drift red


def test_drift_prompts_put_the_class_word_in_place_of_the_trigger():
    got = scoring.drift_prompts(["a photo of [trigger]", "[trigger] on a beach", "a red cube"], ["sks"], ["dog"])
    assert got[:2] == ("a photo of dog", "dog on a beach") and got[2:] == scores.UNRELATED_PROMPTS
    assert scoring.drift_prompts(["a photo of [trigger]"], ["sks"], [""])[0] == "a photo of"
    assert scoring.drift_prompts(["a photo of [trigger] dog"], ["sks"], ["dog"])[0] == "a photo of dog"


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_only_the_rows_up_to_it(tmp_path):
    rows = [Score(s, 0.1 * s, 0.01 * s) for s in (0, 2, 4, 6)]
    scores.write_scores(tmp_path, rows)
    plan = scoring.ScoringPlan(scores.PooledPixels(), torch.zeros(1, 8, 8, 3), (0,), ("a bowl of fruit",))
    assert [r.step for r in scoring.Scorer(plan, tmp_path, resumed_step=4).rows] == [0, 2, 4]
    assert scoring.Scorer(plan, tmp_path, resumed_step=None).rows == []  # a fresh run keeps none
    (tmp_path / scores.SCORES_JSON).write_text('{"rows": [{"step": "x"}]}')
    with pytest.raises(ValueError, match="not a scores file"):
        scoring.Scorer(plan, tmp_path, resumed_step=4)


@pytest.mark.parametrize("kind", ["CLIPVisionModelWithProjection", "CLIPModel"])
def test_a_local_transformers_vision_model_embeds_for_the_command_line(tmp_path, kind):
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    if kind == "CLIPModel":
        config = transformers.CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2), vision_config=vision,
                                         projection_dim=16)
    else:
        config = transformers.CLIPVisionConfig(**vision)
    getattr(transformers, kind)(config).save_pretrained(tmp_path / "vision")
    embed = embedder.load(str(Path("vision")), tmp_path, torch.device("cpu"))
    photos = torch.rand(3, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    out = embed(photos)
    assert out.shape == (3, 16)
    assert scores.likeness(embed(photos[:1]), out[:1]) == pytest.approx(1.0, abs=1e-5)
    assert scores.drift(embed(photos.flip(1)), out) > 1e-4  # upside down: another embedding


@pytest.fixture
def recipe(tmp_path, tiny_flux, monkeypatch):
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_a_run_scores_every_validation_step_names_its_best_checkpoint_and_resume_keeps_them(
        recipe, tmp_path, monkeypatch, caplog):
    base_renders = []
    render_prompts = cli_train.ConsoleHost.render_prompts

    def counted(self, lora, prompts, should_stop):
        if lora is None:
            base_renders.append(list(prompts))
        return render_prompts(self, lora, prompts, should_stop)

    monkeypatch.setattr(cli_train.ConsoleHost, "render_prompts", counted)
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny"]) == 0
    run = tmp_path / "runs" / "toy_001"
    saved = json.loads((run / "scores.json").read_text())
    assert [r["step"] for r in saved["rows"]] == [0, 2, 4]
    with open(run / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [0, 2, 4] and list(table[0]) == ["step", "likeness", "drift"]
    assert saved["rows"][0]["drift"] == pytest.approx(0.0, abs=1e-5)  # step 0: the LoRA is still zero
    assert saved["rows"][-1]["drift"] > 1e-4  # trained: the class and unrelated prompts moved
    assert all(-1 <= r["likeness"] <= 1 for r in saved["rows"])
    best = saved["best"]["step"]
    assert (run / "checkpoints" / f"step_{best:06d}").is_dir()
    assert f"best checkpoint: step {best} (likeness" in caplog.text
    assert json.loads((run / "summary.json").read_text())["best_checkpoint"] == best
    assert 'scores: "pixels"' in (run / "recipe.yaml").read_text()  # the run's recipe scores too
    assert base_renders == [["a photo of toy", *scores.UNRELATED_PROMPTS]]  # once, with the class word
    assert len(list((run / scoring.BASE_FOLDER).glob("base_*.png"))) == 4
    before = {p.name: p.stat().st_mtime_ns for p in (run / scoring.BASE_FOLDER).iterdir()}

    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--set", "steps=6",
                     "--resume", "latest"]) == 0
    resumed = json.loads((run / "scores.json").read_text())
    assert resumed["rows"][:3] == saved["rows"]  # the earlier rows kept as they were
    assert [r["step"] for r in resumed["rows"]] == [0, 2, 4, 6]
    assert len(base_renders) == 1  # the base samples came from the run folder
    assert {p.name: p.stat().st_mtime_ns for p in (run / scoring.BASE_FOLDER).iterdir()} == before
    assert resumed["best"]["step"] in [int(c.name.split("_")[1]) for c in RunFolder(run).checkpoints()]
    # another validation seed: the kept base samples no longer match, so they are rendered again
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--set", "steps=8",
                     "--set", "validation.seed=7", "--resume", "latest"]) == 0
    assert len(base_renders) == 2
    assert json.loads((run / scoring.BASE_FOLDER / "base.json").read_text())["render"].startswith("seed 7,")


def test_scores_without_a_subject_prompt_or_with_a_missing_model_folder_fail_by_name(recipe, caplog):
    recipe.write_text(RECIPE.replace('"a photo of [trigger]", ', ""))
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny"]) == 1
    assert "names the subject ([trigger])" in caplog.text
    assert not (recipe.parent / "runs").exists()
    recipe.write_text(RECIPE.replace("scores: pixels", "scores: no_such_model"))
    caplog.clear()
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny"]) == 1
    assert "validation.scores 'no_such_model'" in caplog.text
    assert not (recipe.parent / "runs").exists()  # before anything was written
