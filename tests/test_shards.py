"""Shards: written by diffusion-prepare format=shards, read by dataset=shards in an exact, resumable order, local or
through fsspec, with bad shards named and skipped."""

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.cli.train import train
from diffusion.data import ImageFolderDataset, LowResolutionPairs, ShardDataset
from diffusion.data.loader import EpochBatchSampler, shard_window_order, to_model_range
from diffusion.data.prepare_folder import prepare
from diffusion.data.resize import area_downsample
from diffusion.data.shard_format import INDEX, Layout, write_shard_set
from diffusion.data.training_data import TrainingData
from diffusion.errors import ConfigError, DataError
from tests.conftest import REPO, compose_config, smoke_overrides


def prepare_with(src: Path, dst: Path, *overrides: str) -> dict:
    """``diffusion-prepare src=SRC dst=DST OVERRIDES`` in this process, its run directory beside dst; the report."""
    run_dir = dst.parent / f"prepare_run_{len(list(dst.parent.glob('prepare_run_*')))}"
    return prepare(compose_config("prepare", [f"src={src}", f"dst={dst}", "min_size=0", *overrides], run_dir))


def random_images(count: int, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def shard_set(folder: Path, count: int = 50, shard_size: int = 10, size: int = 8, channels: int = 3) -> np.ndarray:
    """A shard set of ``count`` random images of classes a/b/c; returns the images."""
    images = random_images(count, size, channels)
    write_shard_set(folder, images, ["abc"[i % 3] for i in range(count)], shard_size)
    return images


def as_model_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def source_folder(root: Path, per_class: int = 12) -> Path:
    """Two classes of random PNGs of assorted sizes, a corrupt file and an image beside the class folders."""
    rng = np.random.default_rng(1)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"junk" * 10)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "loose.png")
    return root


# --- writing ---------------------------------------------------------------------------------------


def test_prepare_format_shards_holds_the_images_and_classes_the_folder_output_holds(tmp_path):
    src = source_folder(tmp_path / "src")
    report = prepare_with(src, tmp_path / "shards", "image_size=16", "format=shards", "shard_size=5")
    prepare_with(src, tmp_path / "folder", "image_size=16")
    shards = ShardDataset(str(tmp_path / "shards"), image_size=16)
    folder = ImageFolderDataset(tmp_path / "folder", image_size=16)
    assert shards.classes == folder.classes == ["cats", "dogs"]
    assert len(shards) == len(folder) == 24 and shards.shard_sizes() == [5, 5, 5, 5, 4]
    for i in range(len(folder)):  # the same sorted order, the same pixels and labels
        image, label = folder[i]
        assert torch.equal(shards[i][0], image) and shards[i][1] == label
    assert torch.equal(shards.class_labels(), folder.class_labels())
    counts = report["counts"]
    assert counts["quarantined_by_reason"] == {"corrupt": 1} and counts["left_out"] == 1
    assert counts["shards"]["train"] == {"images": 24, "shards": 5}
    assert (tmp_path / "shards" / ".quarantine" / "corrupt" / "cats" / "broken.jpg").is_file()
    assert not list((tmp_path / "shards").glob("*/*.png"))


def test_preparing_shards_again_rewrites_nothing_until_the_source_changes(tmp_path):
    src, dst = source_folder(tmp_path / "src"), tmp_path / "dst"
    prepare_with(src, dst, "image_size=16", "format=shards", "shard_size=5")
    times = {path.name: path.stat().st_mtime_ns for path in dst.glob("*.tar")}
    again = prepare_with(src, dst, "image_size=16", "format=shards", "shard_size=5")
    assert again["counts"]["decoded"] == 0 and again["counts"]["written"] == 0
    assert {path.name: path.stat().st_mtime_ns for path in dst.glob("*.tar")} == times

    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(src / "cats" / "00a.png")  # sorts second
    changed = prepare_with(src, dst, "image_size=16", "format=shards", "shard_size=5")
    assert changed["counts"]["shards"]["train"] == {"images": 25, "shards": 5}
    assert torch.equal(ShardDataset(str(dst), image_size=16)[1][0], torch.full((3, 16, 16), -1.0))

    shutil.rmtree(src / "dogs")  # fewer shards: the stale ones go
    prepare_with(src, dst, "image_size=16", "format=shards", "shard_size=5")
    assert sorted(path.name for path in dst.glob("*.tar")) == [f"train-00000{k}.tar" for k in range(3)]
    prepare_with(src, dst, "image_size=16")  # back to a folder: no shard is left to be read by mistake
    assert not list(dst.glob("*.tar")) and not (dst / INDEX).exists() and len(list(dst.glob("cats/*.png"))) == 13


def test_holdout_sets_aside_a_share_of_images_by_content_as_the_val_split(tmp_path):
    src = source_folder(tmp_path / "src", per_class=40)
    prepare_with(src, tmp_path / "dst", "image_size=8", "format=shards", "shard_size=16", "holdout=0.25")
    train_set = ShardDataset(str(tmp_path / "dst"), image_size=8)
    val_set = ShardDataset(str(tmp_path / "dst"), image_size=8, split="val")
    assert len(train_set) + len(val_set) == 80 and 10 <= len(val_set) <= 30
    train_images = {tuple(train_set[i][0].flatten().tolist()) for i in range(len(train_set))}
    assert not any(tuple(val_set[i][0].flatten().tolist()) in train_images for i in range(len(val_set)))
    with pytest.raises(DataError, match="holds no val images: prepare it with holdout=0.05"):
        shard_set(tmp_path / "no_val")
        ShardDataset(str(tmp_path / "no_val"), image_size=8, split="val")


@pytest.mark.parametrize("option, message", [
    ("format=zip", "format must be one of folder, shards, got 'zip'"),
    ("shard_size=0", "shard_size must be a positive number of images per shard, got 0"),
    ("holdout=1.0", r"holdout must be a share of the images in \[0, 1\)"),
])
def test_bad_shard_options_are_refused_with_the_fix(tmp_path, option, message):
    src = source_folder(tmp_path / "src", per_class=1)
    with pytest.raises(ConfigError, match=message):
        prepare_with(src, tmp_path / "dst", "format=shards", option)


def test_image_j_of_a_shard_lies_at_j_record_bytes_and_the_tar_lists_it(tmp_path):
    import tarfile

    images = shard_set(tmp_path, count=7, shard_size=4, size=5, channels=3)
    layout, data = Layout(5, 3), (tmp_path / "train-000001.tar").read_bytes()
    for j in range(3):
        start = j * layout.record_bytes + layout.pixel_offset
        assert np.array_equal(np.frombuffer(data[start:start + 75], np.uint8).reshape(5, 5, 3), images[4 + j])
    with tarfile.open(tmp_path / "train-000001.tar") as tar:
        assert tar.getnames() == [f"00000000{k}.{ext}" for k in (4, 5, 6) for ext in ("npy", "cls")]
        assert np.array_equal(np.load(io.BytesIO(tar.extractfile("000000005.npy").read())), images[5])
        assert tar.extractfile("000000005.cls").read() == b"c"


# --- reading and the order ------------------------------------------------------------------------


def test_the_shards_serve_their_images_labels_and_downsampled_pairs(tmp_path):
    images = shard_set(tmp_path, count=30, shard_size=7)
    dataset = ShardDataset(str(tmp_path), image_size=8)
    batch, labels = dataset.__getitems__([0, 29, 8])
    assert torch.equal(batch, as_model_input(images[[0, 29, 8]]))
    assert labels.tolist() == [0, 2, 2] and dataset.classes == ["a", "b", "c"]
    half = ShardDataset(str(tmp_path), image_size=4)
    assert torch.equal(half[3][0], area_downsample(as_model_input(images[3:4]), 4)[0])
    pairs = LowResolutionPairs(dataset, 2)
    high, label, low = pairs.__getitems__([5, 6])
    assert torch.equal(low, area_downsample(as_model_input(images[5:7]), 2)) and pairs.random_flip is True
    with pytest.raises(ConfigError, match="the shards hold 8x8 images: dataset.image_size must be 8 or divide it"):
        ShardDataset(str(tmp_path), image_size=6)
    with pytest.raises(ConfigError, match="the shards hold 3-channel images: set dataset.channels=3"):
        ShardDataset(str(tmp_path), image_size=8, channels=1)


def test_the_loader_moves_pixels_unless_the_images_are_box_filtered_or_paired(tmp_path):
    from diffusion.data.loader import build_loader

    images = shard_set(tmp_path, count=16, shard_size=8)
    for dataset, dtype in ((ShardDataset(str(tmp_path), image_size=8), torch.uint8),
                           (ShardDataset(str(tmp_path), image_size=4), torch.float32),
                           (LowResolutionPairs(ShardDataset(str(tmp_path), image_size=8), 4), torch.float32)):
        loader = build_loader(dataset, 4, 0, 0, False)
        batch = next(iter(loader))
        first = loader.batch_sampler.batch_indices(0, 0)
        assert batch[0].dtype == dtype and len(batch) == (3 if isinstance(dataset, LowResolutionPairs) else 2)
        expected = area_downsample(as_model_input(images[first]), dataset.image_size)
        assert torch.equal(to_model_range(batch[0]), expected)


def test_the_streaming_order_shuffles_whole_shards_in_windows():
    order, windows = shard_window_order([10] * 5, 2, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(50))
    assert [start for start, _ in windows] == [0, 20, 40]
    for (start, shards), end in zip(windows, (20, 40, 50), strict=True):  # each window: the images of whole shards
        assert {i // 10 for i in order[start:end]} == set(shards)
    assert sorted(shard for _, shards in windows for shard in shards) == list(range(5))
    assert order[:20] != sorted(order[:20], key=lambda i: (i // 10, i))  # shuffled within the window
    uneven, _ = shard_window_order([10, 10, 3, 7], 3, torch.Generator().manual_seed(1))
    assert sorted(uneven) == list(range(30))


def epoch_of(batch_size: int, world_size: int, epoch: int, sizes: list[int], window: int) -> list[list[int]]:
    """Each batch of an epoch as the processes read it together: their rows concatenated in rank order."""
    samplers = [EpochBatchSampler(sum(sizes), batch_size, 3, rank, world_size, sizes, window)
                for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_position(epoch)
    return [sum(rows, []) for rows in zip(*samplers, strict=True)]


def test_an_epoch_reads_every_image_once_in_the_same_order_for_any_number_of_processes():
    sizes = [100, 100, 100, 100, 57]
    one = epoch_of(40, 1, 0, sizes, 2)
    assert one == epoch_of(40, 2, 0, sizes, 2) == epoch_of(40, 4, 0, sizes, 2)
    read = [i for batch in one for i in batch]
    assert len(read) == len(set(read)) == 440  # the last partial batch (17 images) is dropped
    assert one != epoch_of(40, 1, 1, sizes, 2)  # another epoch, another order
    whole = [100, 100, 100, 100, 60]  # a batch size that divides the images: every one of them, once
    assert sorted(i for batch in epoch_of(46, 2, 0, whole, 3) for i in batch) == list(range(460))


def test_loader_workers_read_the_batches_the_sampler_orders_and_the_run_records(tmp_path):
    shard_set(tmp_path, count=60, shard_size=8)
    dataset = ShardDataset(str(tmp_path), image_size=8, shuffle_shards=2)
    batches = {}
    for workers in (0, 2):
        data = TrainingData(dataset, batch_size=6, num_workers=workers, seed=5, keep_recent=1)
        data.load_state_dict({"epoch": 1, "batch_in_epoch": 3})  # a resumed position
        stream = data.batches()
        batches[workers] = []
        for _ in range(9):  # across the end of epoch 1
            pixels, labels = next(stream)  # uint8 as stored, a quarter of the bytes between processes
            (epoch, number, indices), = data.recent
            expected_images, expected_labels = dataset.__getitems__(indices)
            assert pixels.dtype == torch.uint8 and torch.equal(to_model_range(pixels), expected_images)
            assert torch.equal(labels, expected_labels)
            batches[workers].append((epoch, number, indices))
    assert batches[0] == batches[2]
    assert [b[:2] for b in batches[0]] == [(1, k) for k in range(3, 10)] + [(2, 0), (2, 1)]


# --- remote storage and bad shards -----------------------------------------------------------------


def copy_to(url: str, folder: Path) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    for file in folder.iterdir():
        fs.put_file(str(file), f"{path}/{file.name}")


@pytest.fixture
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_remote_shards_are_fetched_once_into_the_cache_and_read_alike(tmp_path, memory_fs, scheme):
    images = shard_set(tmp_path / "local", count=25, shard_size=10)
    url = "memory://bucket/set" if scheme == "memory" else f"file://{tmp_path}/remote"
    if scheme == "file":
        (tmp_path / "remote").mkdir()
    copy_to(url, tmp_path / "local")
    dataset = ShardDataset(url, image_size=8, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(dataset.__getitems__(list(range(25)))[0], as_model_input(images))
    (cached,) = (tmp_path / "cache").iterdir()
    assert sorted(path.name for path in cached.glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                                  "train-000002.tar"]
    assert (cached / "train-000001.tar").read_bytes() == (tmp_path / "local" / "train-000001.tar").read_bytes()


def test_the_loader_fetches_the_next_window_of_remote_shards_before_it_is_read(tmp_path, memory_fs):
    shard_set(tmp_path / "local", count=60, shard_size=10)
    copy_to("memory://bucket/set", tmp_path / "local")
    dataset = ShardDataset("memory://bucket/set", image_size=8, cache_dir=str(tmp_path / "cache"), shuffle_shards=2)
    asked = []
    sampler = EpochBatchSampler(60, 10, 0, shard_sizes=dataset.shard_sizes(), shuffle_shards=2,
                                prefetch=lambda shards: (asked.append(list(shards)), dataset.prefetch(shards)))
    _, windows = sampler.ordered(0)
    batches = iter(sampler)
    next(batches)  # the first batch: its window and the next are asked for
    assert asked == [windows[0][1], windows[1][1]]
    dataset.fetcher.shutdown(wait=True)  # the fetches done; the next prefetch starts a new thread
    dataset.fetcher = None
    assert sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar")) == sorted(
        f"train-00000{k}.tar" for k in windows[0][1] + windows[1][1])
    next(batches)  # the rest of window 0 (20 images) asks for nothing new
    assert len(asked) == 2
    next(batches)  # into window 1: window 2 is asked for
    assert asked[2] == windows[2][1]


def test_a_bad_copy_in_the_cache_is_fetched_again(tmp_path, memory_fs):
    images = shard_set(tmp_path / "local", count=20, shard_size=10)
    copy_to("memory://bucket/set", tmp_path / "local")
    ShardDataset("memory://bucket/set", image_size=8, cache_dir=str(tmp_path / "cache"))[0]
    (copy,) = (tmp_path / "cache").glob("*/train-000000.tar")
    damaged = bytearray(copy.read_bytes())
    damaged[700] ^= 0xFF
    copy.write_bytes(bytes(damaged))
    dataset = ShardDataset("memory://bucket/set", image_size=8, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(dataset[0][0], as_model_input(images[:1])[0]) and not dataset.bad


def read_epoch(dataset: ShardDataset, batch_size: int = 10) -> list[tuple[int, int]]:
    """The (shard, position) of every image one epoch of the loader reads, through the data set's own mapping."""
    sampler = EpochBatchSampler(len(dataset), batch_size, 0, shard_sizes=dataset.shard_sizes(), shuffle_shards=2)
    places = []
    for indices in sampler:
        dataset.__getitems__(indices)
        places += [dataset.locate(index) for index in indices]
    return places


def test_a_truncated_shard_is_named_and_skipped_and_every_other_image_is_read_once(tmp_path, caplog):
    index = write_shard_set(tmp_path, random_images(40), ["a"] * 40, shard_size=10)
    with open(tmp_path / "train-000001.tar", "r+b") as f:
        f.truncate(5000)
    with caplog.at_level(logging.WARNING):
        dataset = ShardDataset(str(tmp_path), image_size=8)
    size = index["splits"]["train"]["shards"][1]["bytes"]
    assert (f"shard {tmp_path}/train-000001.tar is 5000 bytes where the index says {size} (truncated): its 10 "
            "images are skipped") in caplog.text
    places = read_epoch(dataset)
    assert len(places) == 40 and all(shard != 1 for shard, _ in places)
    assert sorted(set(places)) == [(shard, j) for shard in (0, 2, 3) for j in range(10)]  # every good image, read
    assert sum(shard == 2 for shard, _ in places) == 20  # shard 2 also fills shard 1's places
    with pytest.raises(DataError, match=r"train-000001.tar is 5000 bytes .* set dataset.on_bad_shard=skip"):
        ShardDataset(str(tmp_path), image_size=8, on_bad_shard="error")


def test_a_corrupt_shard_of_the_right_size_is_caught_by_its_checksum_when_opened(tmp_path, caplog):
    images = shard_set(tmp_path, count=30, shard_size=10)
    path = tmp_path / "train-000002.tar"
    damaged = bytearray(path.read_bytes())
    damaged[2 * 2048 + 700] ^= 0x01  # one bit of one pixel of image 22
    path.write_bytes(bytes(damaged))
    dataset = ShardDataset(str(tmp_path), image_size=8)
    with caplog.at_level(logging.WARNING):
        image, _ = dataset[22]
    assert "train-000002.tar is corrupt (its CRC-32 is" in caplog.text and "its 10 images are skipped" in caplog.text
    assert torch.equal(image, as_model_input(images[2:3])[0])  # the place is read from the next good shard
    assert torch.equal(dataset[5][0], as_model_input(images[5:6])[0])
    strict = ShardDataset(str(tmp_path), image_size=8, on_bad_shard="error")
    with pytest.raises(DataError, match="train-000002.tar is corrupt"):
        strict[22]
    assert torch.equal(strict[3][0], as_model_input(images[3:4])[0])


def test_a_missing_index_or_an_empty_root_is_named(tmp_path):
    from diffusion.errors import PathNotFound

    with pytest.raises(PathNotFound, match=f"{tmp_path}/shards.json does not exist: point dataset.root at a folder"):
        ShardDataset(str(tmp_path), image_size=8)
    with pytest.raises(ConfigError, match="dataset.root is not set"):
        ShardDataset(None)
    source_folder(tmp_path / "images", per_class=1)
    with pytest.raises(PathNotFound, match="holds other files: for a folder of images use dataset=image_folder, or "
                                           f"write its shards with diffusion-prepare src={tmp_path / 'images'} dst="):
        ShardDataset(str(tmp_path / "images"), image_size=8)


# --- training ------------------------------------------------------------------------------------


def shard_overrides(root, *extra: str) -> list[str]:
    return smoke_overrides(**{"dataset": "shards", "dataset.root": root, "dataset.image_size": 8,
                              "model.num_classes": "auto", "callbacks": "[default,data_order]",
                              "callbacks.metrics.every": 1, "callbacks.sample_grid.every": 0}) + list(extra)


def test_a_run_on_shards_trains_on_their_classes_and_records_what_it_read(tmp_path):
    shard_set(tmp_path / "set", count=48, shard_size=10)
    result = train(compose_config("train", shard_overrides(tmp_path / "set", "trainer.max_steps=7"), tmp_path / "run"))
    assert result["step"] == 7
    lines = [json.loads(line) for line in (tmp_path / "run" / "data_order" / "rank_0.jsonl").read_text().splitlines()]
    assert [(line["step"], line["epoch"], line["batch"]) for line in lines] == [
        (s, (s - 1) // 6, (s - 1) % 6) for s in range(1, 8)]  # 48 images, batches of 8: 6 per epoch
    assert sorted(i for line in lines[:6] for i in line["indices"]) == list(range(48))


def test_a_super_resolution_stage_trains_on_shards_with_box_filtered_pairs(tmp_path):
    shard_set(tmp_path / "set", count=24, shard_size=8, size=16)
    overrides = [*smoke_overrides(**{"experiment": "sr_64_256", "dataset": "shards", "dataset.root": tmp_path / "set",
                                     "dataset.image_size": 16, "model.low_resolution": 8, "trainer.max_steps": 2,
                                     "trainer.batch_size": 4, "trainer.num_workers": 0, "trainer.precision": "fp32",
                                     "callbacks.sample_grid.every": 0})]
    assert train(compose_config("train", overrides, tmp_path / "run"))["step"] == 2


def test_validation_measures_the_val_split_the_shards_hold(tmp_path):
    images = random_images(40)
    write_shard_set(tmp_path / "set", images, ["a"] * 40, shard_size=8, splits=["train"] * 32 + ["val"] * 8)
    args = shard_overrides(tmp_path / "set", "trainer.max_steps=2", "callbacks=[default,validation_shards]",
                           "callbacks.validation.every=2", "callbacks.validation.num_images=8",
                           "callbacks.validation.batch_size=4", "callbacks.validation.bins=2")
    cfg = compose_config("train", args, tmp_path / "run")
    assert cfg.callbacks.validation.dataset.split == "val"
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [2]


# --- many processes (Done when) -----------------------------------------------------------------------


def start_torchrun(runs_dir: Path, processes: int, *args: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node=PROCESSES -m diffusion.cli.train ARGS`` writing under ``runs_dir``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "diffusion.cli.train", *args, f"paths.runs_dir={runs_dir}"]
    return subprocess.Popen(command, cwd=runs_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    children = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[parent].append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children[tree[-1]]
    return tree


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


def data_order(run: Path) -> dict[int, list[int]]:
    """Every step's images over all processes, in rank order."""
    steps: dict[int, list[int]] = defaultdict(list)
    for rank_file in sorted((run / "data_order").glob("rank_*.jsonl"), key=lambda p: int(p.stem.split("_")[1])):
        for line in rank_file.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] += record["indices"]
    return dict(steps)


def losses(run: Path) -> list[tuple]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records]


@pytest.mark.slow
def test_four_processes_read_each_image_once_per_epoch_resume_after_sigkill_and_match_two(tmp_path):
    """Done when: 4-process gloo torchrun on shards of 5,000 images, 2 epochs; SIGKILL and resume; 2 processes."""
    images = random_images(5000, size=8, channels=3, seed=2)
    write_shard_set(tmp_path / "set", images, [str(i % 10) for i in range(5000)], shard_size=500)
    args = shard_overrides(tmp_path / "set", "trainer.max_steps=100", "trainer.batch_size=100",
                           "callbacks.checkpoint.every=20", "model.dropout=0.1", "dataset.shuffle_shards=4")
    straight_dir, killed_dir, two_dir = tmp_path / "four", tmp_path / "killed", tmp_path / "two"
    finished(start_torchrun(straight_dir, 4, *args))
    (straight,) = (straight_dir / "train").iterdir()
    order = data_order(straight)
    assert sorted(order) == list(range(1, 101))
    for epoch in (0, 1):  # 50 steps of 100 images each
        read = [i for step in range(50 * epoch + 1, 50 * epoch + 51) for i in order[step]]
        assert sorted(read) == list(range(5000)), epoch

    process = start_torchrun(killed_dir, 4, *args)
    deadline = time.time() + 600
    while not list(killed_dir.glob("train/*/checkpoints/step_60.pt")):  # step 60: the middle of epoch 2
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)
    for pid in process_tree(process.pid):  # every process at once, mid-step: nothing is saved
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    (killed,) = (killed_dir / "train").iterdir()
    output = finished(start_torchrun(killed_dir, 4, *args, "resume=auto"))
    resumed_at = int(output.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 60 <= resumed_at < 100 and resumed_at % 20 == 0
    assert losses(killed) == losses(straight)  # the same loss series, the resumed steps included
    assert data_order(killed) == order

    finished(start_torchrun(two_dir, 2, *args))
    (two,) = (two_dir / "train").iterdir()
    assert data_order(two) == order  # the same images in the same order on 2 processes


def test_a_run_on_in_memory_shards_uploads_to_memory_and_resumes_from_the_uploaded_last_pt(tmp_path, memory_fs):
    """Done when: data and checkpoint upload on fsspec's in-memory file system; train, upload, resume from there."""
    shard_set(tmp_path / "set", count=48, shard_size=10)
    copy_to("memory://data/set", tmp_path / "set")
    args = shard_overrides("memory://data/set", "trainer.max_steps=10", "callbacks.checkpoint.every=4",
                           f"dataset.cache_dir={tmp_path / 'cache'}", "model.dropout=0.1", "trainer.num_workers=2")
    straight = tmp_path / "straight"
    train(compose_config("train", args, straight))

    interrupted = tmp_path / "interrupted"
    train(compose_config("train", [*args, "trainer.max_steps=6", "callbacks.checkpoint.upload_to=memory://runs/x"],
                         interrupted))
    uploaded = torch.load(memory_fs.open("/runs/x/checkpoints/last.pt", "rb"), weights_only=True)
    assert uploaded["step"] == 6
    shutil.rmtree(interrupted)  # the machine is gone: only the upload is left
    resumed = tmp_path / "resumed"
    train(compose_config("train", [*args, "resume=memory://runs/x/checkpoints/last.pt",
                                   "callbacks.checkpoint.upload_to=memory://runs/x"], resumed))
    assert losses(resumed) == losses(straight)  # steps 1-6 copied from the upload, 7-10 trained again
    assert data_order(resumed) == data_order(straight)
    final = torch.load(memory_fs.open("/runs/x/checkpoints/last.pt", "rb"), weights_only=True)
    reference = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert final["step"] == 10 and all(torch.equal(final["model"][k], v) for k, v in reference["model"].items())
    assert memory_fs.cat("/runs/x/metrics.jsonl") == (resumed / "metrics.jsonl").read_bytes()
