"""Checkpoints and run directories at URLs (fsspec): reading, resuming, fine-tuning from, and uploading to them."""

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

import diffusion.engine.trainer as trainer_module
from diffusion.cli.train import train
from diffusion.engine import storage
from diffusion.engine.callbacks.checkpointing import Checkpointing
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.run_dir import checkpoint_to_resume, run_dir_for
from diffusion.engine.trainer import Trainer
from diffusion.errors import ConfigError, PathNotFound
from tests.conftest import compose_config, smoke_overrides

REMOTE = "memory://bucket/run"
TIMING = ("images_per_sec", "train_seconds", "data_wait")


@pytest.fixture(autouse=True)
def memory():
    """fsspec's memory file system, empty for each test (it is one per process)."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


def run_overrides(**extra: object) -> list[str]:
    """A smoke run with a checkpoint every 2 steps, two step files kept, and dropout (so random states matter)."""
    return smoke_overrides(**{"trainer.max_steps": 6, "callbacks.checkpoint.every": 2, "callbacks.checkpoint.keep": 2,
                              "model.dropout": 0.1, "callbacks.sample_grid.every": 3, **extra})


def logged(run_dir: Path, after: int = 0) -> list[dict]:
    """The metrics of every logged step after ``after``, without the timing."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r["step"] > after]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def remote_names(fs, root: str) -> list[str]:
    """Every file under ``root`` of ``fs``, relative to it."""
    return sorted(path[len(root.rstrip("/")) + 1:] for path in fs.find(root))


def stop_with_sigterm_at(step: int, monkeypatch) -> None:
    """Make the running process receive SIGTERM during optimizer step ``step``."""
    original = Trainer.train_step

    def train_step(self, batches):
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_run_uploads_its_checkpoints_and_mirrors_its_directory(tmp_path, memory):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")  # what Hydra writes before the run starts
    result = train(compose_config("train", run_overrides(**{"callbacks.checkpoint.upload_to": REMOTE}), run))
    assert result["step"] == 6

    local = load_checkpoint(run / "checkpoints" / "last.pt")
    remote = load_checkpoint(f"{REMOTE}/checkpoints/last.pt")  # read_file through a local copy
    assert remote["step"] == 6
    assert_same_tensors(local["model"], remote["model"])
    assert_same_tensors(local["ema"]["state_dict"], remote["ema"]["state_dict"])
    names = remote_names(memory, "/bucket/run")
    assert names == [".hydra/config.yaml", "checkpoints/last.pt", "checkpoints/step_4.pt", "checkpoints/step_6.pt",
                     "metrics.jsonl", "samples/step_3.png", "samples/step_6.png"]  # pruned to keep=2, no .tmp
    for name in names:
        assert memory.cat_file(f"/bucket/run/{name}") == (run / name).read_bytes(), name
    assert not any(name.endswith(".tmp") for name in memory.store)


def test_resuming_from_an_uploaded_checkpoint_equals_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
    train(compose_config("train", run_overrides(), tmp_path / "straight"))
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(3, patch)
        result = train(compose_config("train", run_overrides(**{"callbacks.checkpoint.upload_to": REMOTE}),
                                      tmp_path / "stopped"))
    assert result["stopped_by_signal"] == signal.SIGTERM and result["step"] == 3
    assert "uploaded to memory://bucket/run/checkpoints/last.pt" in caplog.text  # on_stop waited for it
    shutil.rmtree(tmp_path / "stopped")  # the machine is gone: only the upload is left

    fresh = tmp_path / "fresh"
    result = train(compose_config("train", run_overrides(resume=REMOTE), fresh))  # the remote run directory
    assert result["step"] == 6
    # the remote run's metrics came with its checkpoint: the series goes on where it left off
    assert logged(fresh) == logged(tmp_path / "straight") and logged(fresh, after=3) != []
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(fresh / "checkpoints" / "last.pt")
    assert_same_tensors(straight["model"], resumed["model"])
    assert_same_tensors(straight["ema"]["state_dict"], resumed["ema"]["state_dict"])


def test_resume_url_continues_in_a_new_run_directory(tmp_path):
    task_dir = tmp_path / "runs" / "train"
    chosen = Path(run_dir_for(f"{REMOTE}/checkpoints/last.pt", str(task_dir)))
    assert chosen.parent == task_dir and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", chosen.name)


def test_init_from_a_url_starts_from_its_weights(tmp_path, monkeypatch):
    train(compose_config("train", run_overrides(**{"trainer.max_steps": 2, "callbacks.checkpoint.upload_to": REMOTE}),
                         tmp_path / "teacher"))
    started = {}
    original = trainer_module.start_from_weights

    def start_from_weights(trainer, state):
        original(trainer, state)
        started.update({key: value.clone() for key, value in trainer.model.state_dict().items()})

    monkeypatch.setattr(trainer_module, "start_from_weights", start_from_weights)
    url = f"{REMOTE}/checkpoints/last.pt"
    result = train(compose_config("train", run_overrides(**{"trainer.max_steps": 2, "init_from": url}),
                                  tmp_path / "tuned"))
    assert result["step"] == 2
    assert_same_tensors(load_checkpoint(url)["model"], started)


def test_a_failed_upload_is_a_warning_and_the_next_checkpoint_is_uploaded(tmp_path, memory, monkeypatch, caplog):
    moved, original = [], MemoryFileSystem.mv

    def mv(self, path1, path2, *args, **kwargs):
        if not moved:
            moved.append(("failed", path2))
            raise OSError("connection reset by peer")
        original(self, path1, path2, *args, **kwargs)
        moved.append(("moved", path2))

    monkeypatch.setattr(MemoryFileSystem, "mv", mv)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        result = train(compose_config("train", run_overrides(**{"callbacks.checkpoint.upload_to": REMOTE}), run))
    assert result["step"] == 6
    assert moved[0] == ("failed", "/bucket/run/checkpoints/last.pt")  # the first checkpoint's
    assert re.search(r"WARNING .* could not upload memory://bucket/run/checkpoints/last\.pt \(OSError: connection "
                     r"reset by peer\): it is tried again at the next checkpoint", caplog.text)
    assert moved.count(("moved", "/bucket/run/checkpoints/last.pt")) == 2  # the checkpoints of steps 4 and 6
    assert load_checkpoint(f"{REMOTE}/checkpoints/last.pt")["step"] == 6
    assert remote_names(memory, "/bucket/run/checkpoints") == ["last.pt", "step_4.pt", "step_6.pt"]
    assert "uploaded the checkpoints and the run directory to memory://bucket/run" in caplog.text


def test_an_upload_appears_whole_at_its_destination(tmp_path, memory, monkeypatch):
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    old.write_bytes(b"old checkpoint")
    new.write_bytes(b"new checkpoint, longer")
    storage.upload(old, f"{REMOTE}/checkpoints/last.pt")
    seen, put_file, mv = [], MemoryFileSystem.put_file, MemoryFileSystem.mv

    def spying_put_file(self, lpath, rpath, *args, **kwargs):
        put_file(self, lpath, rpath, *args, **kwargs)
        # what a reader sees once the bytes are there, before they are moved into place
        seen.append(("put", rpath, self.cat_file("/bucket/run/checkpoints/last.pt")))

    def spying_mv(self, path1, path2, *args, **kwargs):
        seen.append(("mv", path1, path2))
        mv(self, path1, path2, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", spying_put_file)
    monkeypatch.setattr(MemoryFileSystem, "mv", spying_mv)
    storage.upload(new, f"{REMOTE}/checkpoints/last.pt")
    (_, tmp, content), (_, source, destination) = seen
    assert re.fullmatch(r"/bucket/run/checkpoints/\.last\.pt\.[0-9a-f]{32}\.tmp", tmp)
    assert content == b"old checkpoint"  # the old file, whole, until the move
    assert (source, destination) == (tmp, "/bucket/run/checkpoints/last.pt")
    assert memory.cat_file("/bucket/run/checkpoints/last.pt") == b"new checkpoint, longer"
    assert remote_names(memory, "/bucket/run") == ["checkpoints/last.pt"]


def test_a_failed_upload_leaves_no_temporary_file(tmp_path, memory, monkeypatch):
    local = tmp_path / "last.pt"
    local.write_bytes(b"checkpoint")

    def failing_mv(self, path1, path2, *args, **kwargs):
        raise OSError("network down")

    monkeypatch.setattr(MemoryFileSystem, "mv", failing_mv)
    with pytest.raises(OSError, match="network down"):
        storage.upload(local, f"{REMOTE}/checkpoints/last.pt")
    assert list(memory.store) == []


def test_a_missing_url_is_named(tmp_path, memory):
    with pytest.raises(PathNotFound, match="memory://nothing/here.pt"):
        train(compose_config("train", run_overrides(resume="memory://nothing/here.pt"), tmp_path / "run"))
    with pytest.raises(PathNotFound, match="memory://nothing/here.pt"):
        load_checkpoint("memory://nothing/here.pt")
    memory.pipe_file("/nothing/run/metrics.jsonl", b"{}\n")  # a run directory without a checkpoint
    with pytest.raises(PathNotFound, match="memory://nothing/run.*no checkpoints/last.pt"):
        checkpoint_to_resume("memory://nothing/run", tmp_path / "run")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_s3_without_s3fs_names_the_install_line(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("pip install 'diffusion[remote]'")):
        checkpoint_to_resume("s3://bucket/run/checkpoints/last.pt", tmp_path)
    with pytest.raises(ConfigError, match=re.escape("pip install 'diffusion[remote]'")):
        Checkpointing(upload_to="s3://bucket/run")


def test_a_local_folder_inside_the_run_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="inside the run directory"):
        train(compose_config("train", run_overrides(**{"callbacks.checkpoint.upload_to": tmp_path / "run" / "copy"}),
                             tmp_path / "run"))


def test_upload_and_resume_through_a_file_url(tmp_path, monkeypatch):
    train(compose_config("train", run_overrides(), tmp_path / "straight"))
    url = f"file://{tmp_path / 'bucket' / 'run'}"
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(5, patch)
        train(compose_config("train", run_overrides(**{"callbacks.checkpoint.upload_to": url}), tmp_path / "stopped"))
    uploaded = tmp_path / "bucket" / "run"
    assert sorted(p.name for p in (uploaded / "checkpoints").iterdir()) == ["last.pt", "step_2.pt", "step_4.pt"]
    assert (uploaded / "metrics.jsonl").read_bytes() == (tmp_path / "stopped" / "metrics.jsonl").read_bytes()
    assert not [p for p in uploaded.rglob("*") if p.name.endswith(".tmp")]
    shutil.rmtree(tmp_path / "stopped")

    fresh = tmp_path / "fresh"
    train(compose_config("train", run_overrides(resume=f"{url}/checkpoints/last.pt"), fresh))
    assert (fresh / "checkpoints" / "step_6.pt").is_file()
    assert logged(fresh) == logged(tmp_path / "straight") and logged(fresh, after=5) != []
    assert_same_tensors(load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"],
                        load_checkpoint(fresh / "checkpoints" / "last.pt")["model"])


def test_a_run_resumed_from_a_url_keeps_the_earlier_log_lines_before_its_own(tmp_path):
    """From the command line (Hydra's log file open from the start): the remote train.log's lines come first, and
    the resumed run's own lines still reach the file (it is extended in place, not replaced under the logger)."""
    from tests.conftest import cli

    url = f"file://{tmp_path / 'bucket' / 'run'}"
    common = [*smoke_overrides(**{"callbacks.sample_grid.every": 0}), f"callbacks.checkpoint.upload_to={url}",
              f"paths.runs_dir={tmp_path / 'runs'}"]
    remote = tmp_path / "bucket" / "run" / "train.log"
    cli("train", *common, "trainer.max_steps=4", cwd=tmp_path)
    uploaded = remote.read_text()  # the lines logged after the last upload (where it went) are local only
    cli("train", *common, "trainer.max_steps=8", f"resume={url}", cwd=tmp_path)
    first, resumed = sorted((tmp_path / "runs" / "train").iterdir())
    log = (resumed / "train.log").read_text()
    assert log.startswith(uploaded) and (first / "train.log").read_text().startswith(uploaded)
    assert "step 4/4" in uploaded
    assert "resumed from" in log[len(uploaded):] and "step 8/8" in log[len(uploaded):]
    assert log.startswith(remote.read_text()) and "step 8/8" in remote.read_text()
