"""Data sets: folders of images, the digits, the resumable order, and bad input."""

import os

import pytest
import torch
from PIL import Image

from diffusion.cli.train import train
from diffusion.data import DigitsDataset, EpochBatchSampler, ImageFolderDataset, TensorImageDataset
from diffusion.errors import ConfigError, LoaderWorkerDied, exit_code_of
from tests.conftest import compose_config, smoke_overrides


def make_folder(root, classes=("cats", "dogs"), per_class=3, size=(40, 30)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * c, 100 + i, 200)).save(root / name / f"{i}.{['png', 'jpg', 'bmp'][i % 3]}")
    return root


def test_image_folder_labels_sizes_and_range(tmp_path):
    dataset = ImageFolderDataset(make_folder(tmp_path / "data"), image_size=16, channels=3)
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 6
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and label == 1
    # colour (40, 101, 200) scaled to [-1, 1]
    torch.testing.assert_close(image[:, 8, 8], torch.tensor([40, 101, 200]) / 127.5 - 1, atol=0.02, rtol=0)
    gray, _ = ImageFolderDataset(tmp_path / "data", image_size=8, channels=1)[0]
    assert gray.shape == (1, 8, 8)


def test_images_directly_in_the_root_form_one_class(tmp_path):
    for i in range(2):
        Image.new("L", (8, 8), 255).save(tmp_path / f"{i}.png")
    dataset = ImageFolderDataset(tmp_path, image_size=8, channels=1)
    assert len(dataset) == 2 and dataset.num_classes == 1
    assert dataset[0][0].min().item() == 1.0


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "cats" / "0.png").write_bytes(b"not an image at all")
    dataset = ImageFolderDataset(root, image_size=8)
    image, label = dataset[0]  # the next readable image takes its place
    assert image.shape == (3, 8, 8) and label == 0
    assert dataset.skipped == {0}


def test_missing_and_empty_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*one sub-folder of images per class"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images.*one sub-folder per class"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="dataset.root is not set: run with dataset.root="):
        ImageFolderDataset(None)


def test_digits_are_the_sklearn_digits_scaled():
    dataset = DigitsDataset(image_size=16)
    assert len(dataset) == 1797 and dataset.classes == [str(i) for i in range(10)]
    images, labels = dataset.__getitems__([0, 1])
    assert images.shape == (2, 1, 16, 16) and labels.tolist() == [0, 1]
    assert images.min().item() == -1.0 and 0.9 < images.max().item() <= 1.0


def test_digits_splits_are_disjoint_stratified_and_fixed():
    train, test = DigitsDataset(image_size=8, split="train"), DigitsDataset(image_size=8, split="test")
    assert (len(train), len(test)) == (1437, 360)
    full = torch.bincount(DigitsDataset(image_size=8).labels)
    assert ((torch.bincount(test.labels) - 0.2 * full).abs() <= 1).all()  # stratified: 20% of every class
    flat = lambda d: {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(d.images, d.labels)}
    assert len(flat(train) & flat(test)) < 5  # a handful of identical digits may exist in the data itself
    assert torch.equal(DigitsDataset(image_size=8, split="test").images, test.images)
    with pytest.raises(ValueError, match="dataset.split='val' is not known"):
        DigitsDataset(split="val")


def test_an_image_folders_fingerprint_follows_its_files_names_sizes_and_times(tmp_path):
    root = make_folder(tmp_path / "data")
    fingerprint = ImageFolderDataset(root, image_size=8).fingerprint()
    assert ImageFolderDataset(root, image_size=8, random_flip=False).fingerprint() == fingerprint  # flips: same images
    assert ImageFolderDataset(root, image_size=16).fingerprint() != fingerprint
    assert ImageFolderDataset(root, image_size=8, channels=1).fingerprint() != fingerprint
    dataset = ImageFolderDataset(root, image_size=8)
    image = root / "dogs" / "1.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: it may hold another picture
    assert dataset.fingerprint() != fingerprint
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dataset.fingerprint() == fingerprint
    image.rename(root / "dogs" / "9.jpg")  # same files, another name
    assert ImageFolderDataset(root, image_size=8).fingerprint() != fingerprint
    # the folder's place is not part of what it serves
    (root / "dogs" / "9.jpg").rename(image)
    root.rename(tmp_path / "moved")
    assert ImageFolderDataset(tmp_path / "moved", image_size=8).fingerprint() == fingerprint


def test_in_memory_fingerprints_follow_the_images_they_serve():
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1])
    fingerprint = TensorImageDataset(images, labels).fingerprint()
    assert TensorImageDataset(images.clone(), labels.clone()).fingerprint() == fingerprint
    changed = images.clone()
    changed[2, 0, 3, 3] += 0.01
    assert TensorImageDataset(changed, labels).fingerprint() != fingerprint
    assert TensorImageDataset(images, labels.flip(0)).fingerprint() != fingerprint
    assert TensorImageDataset(images.reshape(4, 4, 4, 4), labels).fingerprint() != fingerprint  # same bytes
    test = DigitsDataset(image_size=8, split="test").fingerprint()
    assert DigitsDataset(image_size=8, split="test").fingerprint() == test
    others = [DigitsDataset(image_size=8, split="train"), DigitsDataset(image_size=16, split="test"),
              DigitsDataset(image_size=8, channels=3, split="test")]
    assert len({test, *(other.fingerprint() for other in others)}) == 4


def test_batch_order_resumes_mid_epoch():
    sampler = EpochBatchSampler(20, batch_size=3, seed=7)
    sampler.set_position(epoch=2)
    whole_epoch = list(sampler)
    sampler.set_position(epoch=2, start_batch=4)
    assert list(sampler) == whole_epoch[4:]
    assert len(whole_epoch) == 6 and len({i for b in whole_epoch for i in b}) == 18
    sampler.set_position(epoch=3)
    assert list(sampler) != whole_epoch


def test_a_batch_larger_than_the_data_set_is_explained():
    with pytest.raises(ValueError, match="fewer than one batch of 64: lower trainer.batch_size"):
        EpochBatchSampler(10, batch_size=64)


def test_a_loader_worker_that_dies_is_reported_with_the_file_it_was_reading(tmp_path):
    make_folder(tmp_path / "data", per_class=4, size=(16, 16))
    Image.new("RGB", (16, 16)).save(tmp_path / "data" / "dogs" / "poison.png")
    overrides = smoke_overrides(**{"dataset": "image_folder", "dataset._target_": "tests.helpers.PoisonedFolder",
                                   "dataset.root": str(tmp_path / "data"), "dataset.image_size": 16,
                                   "trainer.num_workers": 2, "trainer.batch_size": 3, "trainer.max_steps": 20})
    with pytest.raises(LoaderWorkerDied) as died:
        train(compose_config("train", overrides, tmp_path / "run"))
    message = str(died.value)
    assert f"a data-loader worker died while reading {tmp_path / 'data' / 'dogs' / 'poison.png'}: DataLoader " \
           "worker (pid" in message and "trainer.num_workers=2 (lower it)" in message
    assert exit_code_of(died.value) == 5


def test_a_small_train_split_keeps_each_class_alike_and_the_test_split_whole():
    whole, small = DigitsDataset(split="train"), DigitsDataset(split="train", train_images=100)
    assert len(small) == 100 and torch.bincount(small.labels).tolist() == [10] * 10
    # every kept digit is one of the train split's, with its label
    matches = (small.images.flatten(1)[:, None] == whole.images.flatten(1)[None]).all(-1)
    assert matches.any(1).all() and torch.equal(whole.labels[matches.float().argmax(1)], small.labels)
    assert len(DigitsDataset(split="test", train_images=100)) == 360
    assert small.fingerprint() != whole.fingerprint() == DigitsDataset(split="train", train_images=1437).fingerprint()
    with pytest.raises(ConfigError, match="dataset.train_images must be at least 10"):
        DigitsDataset(split="train", train_images=5)
