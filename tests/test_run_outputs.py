"""Where a run writes, checked before it trains (issue 14): names that leave the root, a folder
that can't be written or a full disk, settings that would fail late, and the mode of what is written."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from trainer import files, quickstart
from trainer.data.encode import Example
from trainer.data.images import Shaping
from trainer.families.flux1.layers import FluxDims
from trainer.loop.job import Job, JobSpec
from trainer.loop.trainer import TrainConfig
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.outputs import checkpoints, export
from trainer.outputs.checkpoints import RunFolder, RunSettings

DIMS = FluxDims(hidden_size=256, mlp_hidden=1024, double_blocks=2, single_blocks=4)  # the tiny FLUX's
SD = {"w": torch.ones(2)}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----- 16. names, in the library --------------------------------------------------------------------
REFUSED = {"../x": "leaves", "/etc/x": "leaves", "C:/x": "leaves", "a\x00b": "contains '\\\\x00'",
           "x" * 300: "300 bytes", "CON": "Windows reserves", "people/nul.txt": "Windows reserves",
           "a/b?": "contains '\\?'", "name.": "trailing dot", "": "no name part"}


@pytest.mark.parametrize("name", list(REFUSED), ids=lambda n: repr(n[:12]))
def test_bad_output_names_are_refused_by_every_library_writer(tmp_path, name):
    root, outside = tmp_path / "root", tmp_path
    root.mkdir()
    before = listing(outside)
    for write in (lambda: checkpoints.next_run_folder(root, name).save(1, SD, {}, {"step": 1}),
                  lambda: RunFolder(name, root).save(1, SD, {}, {"step": 1}),
                  lambda: RunSettings(name).folder_and_checkpoint(root)[0].save(1, SD, {}, {"step": 1}),
                  lambda: export.save_numbered(root, name, SD, {})):
        with pytest.raises(ValueError, match=REFUSED[name]):
            write()
    assert listing(outside) == before  # nothing written, inside the root or out of it


def test_unicode_names_are_kept_in_one_form_inside_the_root(tmp_path):
    decomposed = "e\u0301lan/\u00dfchen"  # 'élan' typed with a combining accent (as macOS files are)
    path = export.save_numbered(tmp_path, decomposed, SD, {})
    assert path == (tmp_path / "\u00e9lan" / "\u00dfchen_00001.safetensors").resolve() and path.is_file()
    assert export.save_numbered(tmp_path, "\u00e9lan/\u00dfchen", SD, {}).name == "\u00dfchen_00002.safetensors"
    run = checkpoints.next_run_folder(tmp_path, "sujet_\u00e9t\u00e9")
    assert run.path.parent == tmp_path.resolve() and run.path.name == "sujet_\u00e9t\u00e9_001"


def test_links_out_of_the_root_are_neither_written_nor_listed(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (elsewhere / "flux_lora_007" / "checkpoints").mkdir(parents=True)
    root.mkdir()
    (root / "out").symlink_to(elsewhere)
    (root / "flux_lora_007").symlink_to(elsewhere / "flux_lora_007")
    with pytest.raises(ValueError, match="through a link"):
        export.save_numbered(root, "out/lora", SD, {})
    with pytest.raises(ValueError, match="through a link"):
        RunFolder("out", root)
    assert checkpoints.runs(root) == []  # a linked run folder is not one of this root's runs
    assert checkpoints.next_run_folder(root, "flux_lora").path.name == "flux_lora_001"
    assert listing(elsewhere) == ["flux_lora_007", "flux_lora_007/checkpoints"]


def test_run_names_with_a_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="plain name"):
        checkpoints.next_run_folder(tmp_path, "people/alice")


# ----- 15. the output location, before training -----------------------------------------------------
def examples(n=2):
    return [Example(torch.zeros(16, 8, 8), torch.zeros(7, 64), torch.zeros(64), source=f"{i}.png") for i in range(n)]


class Backend:
    """Never used: a job that fails its checks must fail before it touches the model."""

    device = torch.device("cpu")
    dims = DIMS

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the checks")


class Host:
    def release_memory(self):
        pass


def job(folder: Path, n_examples=2, **config) -> Job:
    spec = LayerSpec.preset("attention", DIMS, rank=4)
    config = TrainConfig(**{"steps": 4, **config})
    return Job(JobSpec(Backend(), examples(n_examples), config, spec.targets(DIMS), RunFolder(folder),
                       RunSettings(save_every=2), export.LoraMetadata(spec)))


def test_a_run_folder_under_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="file is a file, not a folder"):
        job(tmp_path / "file" / "run_001").run(Host())


def test_an_unwritable_folder_fails_before_training(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: refuse as a read-only mount would
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    else:
        tmp_path.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="run folder .*run_001 is not writable"):
            job(tmp_path / "run_001").run(Host())
    finally:
        tmp_path.chmod(0o755)
    assert not (tmp_path / "run_001").exists()


def test_a_disk_too_full_for_the_checkpoints_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 10))
    with pytest.raises(OSError, match="Disk full: the run folder .*run_001 has 0 MiB free"):
        job(tmp_path / "run_001").run(Host())
    with pytest.raises(OSError, match="Disk full"):
        quickstart.run(tmp_path / "quickstart", **quickstart.DEFAULTS)
    assert listing(tmp_path) == []


def test_a_disk_that_fills_during_a_write_says_disk_full_and_where(tmp_path, monkeypatch):
    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full)
    run = RunFolder(tmp_path / "run_001")
    with pytest.raises(OSError, match="Disk full: could not write .*lora.safetensors.*MiB free there") as e:
        run.save(1, SD, {}, {"step": 1})
    assert e.value.errno == errno.ENOSPC
    assert run.checkpoints() == [] and not any(run.checkpoint_dir.glob(".tmp-*"))


def test_the_quickstart_checks_its_output_folder_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        quickstart.run(tmp_path / "file" / "out", **quickstart.DEFAULTS)


# ----- 17. settings, before anything is loaded or written -------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("steps", -5, "steps is -5"), ("steps", 2.5, "steps is 2.5; train a whole number"),
    ("learning_rate", 0.0, "learning_rate is 0.0; use a positive"),
    ("learning_rate", float("inf"), "learning_rate is inf"),
    ("learning_rate", float("nan"), "learning_rate is nan"), ("weight_decay", float("nan"), "weight_decay is nan"),
    ("weight_decay", float("inf"), "weight_decay is inf"), ("guidance", -1.0, "guidance is -1.0"),
    ("guidance", float("nan"), "guidance is nan"), ("seed", -1, "seed is -1; use a whole number, 0 or more"),
    ("batch_size", 1.5, "batch_size is 1.5"), ("ema_decay", float("nan"), "ema_decay is nan")])
def test_bad_train_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 100, field: value})


def test_whole_number_settings_given_as_floats_become_ints():
    config = TrainConfig(steps=10.0, batch_size=2.0, seed=3.0)
    assert (config.steps, config.batch_size, config.seed) == (10, 2, 3) and isinstance(config.steps, int)


def test_a_batch_larger_than_the_dataset_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="batch_size is 3 but the dataset has 2 image\\(s\\); use batch_size 2"):
        job(tmp_path / "run_001", batch_size=3).run(Host())
    assert not (tmp_path / "run_001").exists()


@pytest.mark.parametrize("make, message", [
    (lambda: LayerGroup("transformer_blocks", 0, 2, ("attn.to_q",), rank=0), "lora_rank is 0"),
    (lambda: LayerSpec((LayerGroup("transformer_blocks", 0, 2, ("attn.to_q",), rank=300),)).targets(DIMS),
     "lora_rank is 300 for transformer_blocks.0.attn.to_q, a 256→256 layer"),
    (lambda: LayerSpec((LayerGroup("transformer_blocks", 0, 2, ("attn.to_qq",)),)).targets(DIMS),
     "Unknown layer type 'attn.to_qq'"),
    (lambda: LayerSpec((LayerGroup("single_transformer_blocks", 0, 9, ("proj_out",)),)).targets(DIMS),
     "ends at 9, but this model has 4"),
    (lambda: Shaping(100), "resolution 100 must be a multiple of 16")])
def test_bad_layer_and_image_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ----- 17. the mode of what is written --------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_checkpoints_and_exports_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        checkpoint = RunFolder(tmp_path / "run").save(1, SD, {}, {"step": 1})
        exported = export.save_numbered(tmp_path, "lora", SD, {})
    finally:
        os.umask(old)
    for path in (checkpoint / checkpoints.LORA_FILE, checkpoint / checkpoints.STATE_FILE, exported):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
