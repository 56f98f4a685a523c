"""diffusion-eval and its feature extractors: real digits score near zero, noise far worse, caches are reused."""

import json
import shutil

import numpy
import pytest
import torch
from hydra.errors import InstantiationException
from PIL import Image

from diffusion.cli.eval import evaluate
from diffusion.cli.train import train
from diffusion.data import DigitsDataset, ImageFolderDataset
from diffusion.evaluation.evaluator import METRIC_KEYS, reference_statistics
from diffusion.evaluation.features import DigitsClassifier, InceptionV3, extract, in_batches
from diffusion.evaluation.metrics import high_frequency_energy
from diffusion.process.samplers import steps_for_nfe
from diffusion.reports.images import save_images
from tests.conftest import cli, compose_config, smoke_overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return DigitsClassifier(cache_dir=str(cache_dir))


def eval_config(out, cache_dir, *overrides):
    return compose_config("eval", [f"paths.cache_dir={cache_dir}", "device=cpu", *overrides], out)


@pytest.mark.slow
def test_the_digits_classifier_is_accurate_and_trained_only_once(classifier, cache_dir):
    assert classifier.trained and classifier.weights_path.parent == cache_dir / "features"
    test = DigitsDataset(image_size=16, split="test")
    accuracy = (classifier.logits(test.images).argmax(1) == test.labels).double().mean().item()
    assert accuracy == pytest.approx(classifier.test_accuracy) and accuracy >= 0.97
    written = classifier.weights_path.stat().st_mtime_ns
    again = DigitsClassifier(cache_dir=str(cache_dir))
    assert not again.trained and again.name == classifier.name
    assert classifier.weights_path.stat().st_mtime_ns == written
    assert torch.equal(again.features(test.images), classifier.features(test.images))
    assert classifier.features(test.images).shape == (360, 128)
    # other resolutions and RGB go through the same 16x16 grayscale network
    test_rgb32 = DigitsDataset(image_size=32, channels=3, split="test")
    assert (classifier.logits(test_rgb32.images).argmax(1) == test.labels).double().mean() >= 0.95


def test_a_classifier_below_the_accuracy_floor_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"classifies only .* of the test digits correctly .* train it longer"):
        DigitsClassifier(cache_dir=str(tmp_path), epochs=1, min_test_accuracy=0.999)


@pytest.mark.slow
def test_held_out_real_digits_score_near_zero_and_noise_far_worse(classifier, cache_dir, tmp_path):
    real = evaluate(eval_config(tmp_path / "real", cache_dir, "real_split=test", "save_images=true"))
    assert json.loads((tmp_path / "real" / "eval.json").read_text()) == json.loads(json.dumps(real))
    assert real["num_images"] == 360 and real["reference"]["num_images"] == 1437
    assert real["features"] == classifier.name
    noise = torch.rand(360, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_images(noise, tmp_path / "noise")
    noisy = evaluate(eval_config(tmp_path / "noisy", cache_dir, f"images={tmp_path / 'noise'}"))
    r, n = real["metrics"], noisy["metrics"]
    assert r["fd"] < 0.02 * n["fd"] and r["fd"] < 10
    assert abs(r["kid"]) < 3 * r["kid_std"] and n["kid"] > 10 * n["kid_std"]
    assert r["precision"] > 0.8 and r["recall"] > 0.8 and n["precision"] < 0.1 and n["recall"] < 0.05
    assert r["inception_score"] > 8 and n["inception_score"] < 3
    assert r["conditional_accuracy"] == pytest.approx(classifier.test_accuracy)  # real labels, known classes
    assert n["conditional_accuracy"] is None  # a flat folder says nothing about classes
    assert r["broken_images"] == 0 and not (tmp_path / "real" / "broken.png").exists()
    assert n["broken_images"] == 360
    with Image.open(tmp_path / "noisy" / "broken.png") as grid:  # the 64 worst: 8 rows of 8 images of 16 + 2 pixels
        assert grid.size == (8 * 18 + 2, 8 * 18 + 2)
    # the PNGs written by save_images measure (almost) as the tensors did
    png = evaluate(eval_config(tmp_path / "png", cache_dir, f"images={tmp_path / 'real' / 'images'}"))
    assert len(list((tmp_path / "real" / "images").glob("*.png"))) == 360
    assert png["metrics"]["fd"] == pytest.approx(r["fd"], rel=0.01) and png["metrics"]["broken_images"] == 0
    # five of them replaced by noise: exactly those five are broken, the one of highest energy first in broken.png
    planted = [3, 77, 150, 151, 358]
    for index, image in zip(planted, noise):
        save_images(image[None], tmp_path / "real" / "images", start=index)
    mixed = evaluate(eval_config(tmp_path / "mixed", cache_dir, f"images={tmp_path / 'real' / 'images'}"))
    assert mixed["metrics"]["broken_images"] == 5
    files = [tmp_path / "real" / "images" / f"{index:06d}.png" for index in planted]
    folder = ImageFolderDataset(str(tmp_path / "real" / "images"), image_size=16, channels=1)
    worst = files[high_frequency_energy(torch.stack([folder.load(file) for file in files])).argmax()]
    with Image.open(tmp_path / "mixed" / "broken.png") as grid, Image.open(worst) as image:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 3 + 2 images of 16 + 2 pixels
        assert numpy.array_equal(numpy.array(grid)[2:18, 2:18], numpy.array(image))


@pytest.mark.slow
def test_reference_statistics_are_computed_once_per_data_set_split_and_extractor(classifier, cache_dir, tmp_path):
    fresh = tmp_path / "cache"
    shutil.copytree(cache_dir / "features", fresh / "features")  # the classifier, not the reference features
    first = evaluate(eval_config(tmp_path / "a", fresh, "real_split=test"))
    path = first["reference"]["cache"]
    assert not first["reference"]["cached"] and path.startswith(str(fresh / "reference" / classifier.name))
    written = (tmp_path / "cache").joinpath(path[len(str(fresh)) + 1 :]).stat().st_mtime_ns
    second = evaluate(eval_config(tmp_path / "b", fresh, "real_split=test"))
    assert second["reference"]["cached"] and second["reference"]["cache"] == path
    assert (tmp_path / "cache").joinpath(path[len(str(fresh)) + 1 :]).stat().st_mtime_ns == written
    assert second["metrics"] == first["metrics"]
    other = evaluate(eval_config(tmp_path / "c", fresh, "real_split=test", "reference_split=all"))
    assert not other["reference"]["cached"] and other["reference"]["cache"] != path
    assert other["reference"]["num_images"] == 1797


def save_digit(digits: DigitsDataset, index: int, path) -> None:
    """Digit ``index`` of ``digits`` as an 8-bit grayscale PNG."""
    pixels = ((digits.images[index, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def test_replacing_an_image_of_a_folder_recomputes_its_reference_statistics(classifier, tmp_path):
    digits = DigitsDataset(image_size=16, split="test")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        save_digit(digits, i, folder / f"{i}.png")
    config = {"_target_": "diffusion.data.ImageFolderDataset", "root": str(folder), "image_size": 16, "channels": 1,
              "random_flip": False}

    def statistics():
        dataset = ImageFolderDataset(str(folder), image_size=16, channels=1, random_flip=False)
        return reference_statistics(classifier, dataset, config, tmp_path / "cache", torch.device("cpu"))

    def features_of_file_2():
        image = ImageFolderDataset(str(folder), image_size=16, channels=1).load(folder / "2.png")
        return classifier.features(image[None])[0]

    first = statistics()
    assert not first["cached"]
    again = statistics()  # an unchanged folder hits the cache
    assert again["cached"] and again["path"] == first["path"] and torch.equal(again["mu"], first["mu"])
    old, before = features_of_file_2(), (folder / "2.png").stat()
    save_digit(digits, 10, folder / "2.png")  # same count, same names, another digit in one file
    assert (folder / "2.png").stat().st_size != before.st_size and len(list(folder.iterdir())) == 6
    replaced = statistics()
    assert not replaced["cached"] and replaced["path"].parent == first["path"].parent
    assert replaced["path"].name.startswith("imagefolderdataset-all-16px-")
    # the mean feature moves by exactly (new image's features - old image's features) / 6
    torch.testing.assert_close(replaced["mu"] - first["mu"], (features_of_file_2() - old).double() / 6,
                               atol=1e-5, rtol=1e-4)
    assert (replaced["mu"] - first["mu"]).abs().max() > 1e-2
    assert statistics()["cached"]  # and the new content is cached in its turn
    # the broken-image threshold's energies are cached beside the features; a cache written without them is redone
    images = torch.stack([ImageFolderDataset(str(folder), image_size=16, channels=1).load(folder / f"{i}.png")
                          for i in range(6)])
    torch.testing.assert_close(statistics()["high_frequency_energy"], high_frequency_energy(images))
    old = torch.load(replaced["path"], weights_only=True)
    del old["high_frequency_energy"]
    torch.save(old, replaced["path"])
    redone = statistics()
    assert not redone["cached"] and redone["path"] == replaced["path"] and statistics()["cached"]
    torch.testing.assert_close(redone["high_frequency_energy"], high_frequency_energy(images))


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(compose_config("train", smoke_overrides(**{"model.num_classes": "auto"}), run))
    return run / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_diffusion_eval_of_a_checkpoint_writes_every_metric(conditional_checkpoint, cache_dir, tmp_path):
    overrides = [f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache_dir}", f"checkpoint={conditional_checkpoint}",
                 "num_images=20", "batch_size=10", "device=cpu", "guidance_scale=2"]
    cli("eval", *overrides, cwd=tmp_path)
    [result_file] = tmp_path.glob("eval/*/eval.json")
    result = json.loads(result_file.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert all(isinstance(result["metrics"][key], float) for key in METRIC_KEYS if key != "broken_images")
    assert isinstance(result["metrics"]["broken_images"], int)
    assert 0 <= result["metrics"]["conditional_accuracy"] <= 1 and result["metrics"]["fd"] > 0
    assert result["num_images"] == 20 and result["source"]["checkpoint"] == str(conditional_checkpoint)
    assert result["source"]["step"] == 4 and result["source"]["weights"] == "ema_0.999"


@pytest.mark.slow
def test_a_sampler_sweep_ends_with_a_report_of_every_job(conditional_checkpoint, cache_dir, tmp_path):
    cli("eval", "-m", "sampler=ddim,heun", "sampler.steps=3,5", f"checkpoint={conditional_checkpoint}",
        "num_images=10", "batch_size=10", "device=cpu", f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
        cwd=tmp_path)
    sweep = next((tmp_path / "eval" / "multirun").iterdir())
    report = json.loads((sweep / "report.json").read_text())
    assert [row["overrides"] for row in report] == [
        "sampler=ddim sampler.steps=3", "sampler=ddim sampler.steps=5",
        "sampler=heun sampler.steps=3", "sampler=heun sampler.steps=5"]
    assert [row["nfe"] for row in report] == [3, 5, 5, 9]  # Heun: 2 steps - 1 network evaluations
    for row in report:
        job = json.loads((sweep / str(row["job"]) / "eval.json").read_text())
        assert row["fd"] == job["metrics"]["fd"] and row["seconds_per_image"] > 0
        assert row["broken_images"] == job["metrics"]["broken_images"]
    table = (sweep / "report.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "| job | overrides | nfe | fd |" in table[0]
    assert "| conditional_accuracy | broken_images | seconds_per_image |" in table[0]


@pytest.mark.slow
def test_the_sampler_study_runs_every_sampler_on_a_budget_of_network_evaluations(
        conditional_checkpoint, cache_dir, tmp_path):
    # the study's own grid, narrowed on the command line (command-line sweeps win over hydra.sweeper.params)
    cli("eval", "-m", "study=samplers", "sampler=ddpm,heun", "nfe=3,6", f"checkpoint={conditional_checkpoint}",
        "num_images=10", "batch_size=10", "device=cpu", f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
        cwd=tmp_path)
    sweep = next((tmp_path / "sampler_study" / "multirun").iterdir())
    report = json.loads((sweep / "report.json").read_text())
    assert [row["overrides"] for row in report] == ["sampler=ddpm nfe=3", "sampler=ddpm nfe=6",
                                                    "sampler=heun nfe=3", "sampler=heun nfe=6"]
    assert [row["nfe"] for row in report] == [3, 6, 3, 5]  # Heun: the most steps with 2 steps - 1 <= nfe
    text = (sweep / "report.md").read_text()
    fd = {(row["overrides"]): row["fd"] for row in report}
    assert f"| ddpm | {fd['sampler=ddpm nfe=3']:.4g} | {fd['sampler=ddpm nfe=6']:.4g} |" in text
    assert "| conditional_accuracy | nfe=3 | nfe=6 |" in text
    with Image.open(sweep / "report.png") as figure:  # four panels: FD, precision, recall, conditional accuracy
        assert figure.size == (int(4 * 4.2 * 110), int(3.6 * 110))


def test_a_budget_of_network_evaluations_gives_each_sampler_its_steps():
    assert [steps_for_nfe(n, "diffusion.process.samplers.sample_heun") for n in (1, 2, 3, 10, 1000)] == [1, 1, 2, 5, 500]
    assert [steps_for_nfe(n, "dpmpp_2m") for n in (1, 10, 1000)] == [1, 10, 1000]
    with pytest.raises(ValueError, match="nfe must be a positive number of network evaluations per image, got 0"):
        steps_for_nfe(0, "ddim")


def test_a_checkpoint_of_another_size_than_the_reference_names_the_fix(conditional_checkpoint, cache_dir, tmp_path):
    cfg = eval_config(tmp_path, cache_dir, f"checkpoint={conditional_checkpoint}", "dataset.image_size=32")
    with pytest.raises(ValueError, match=r"16x16 images .* 32x32 ones: run with dataset.image_size=16"):
        evaluate(cfg)


@pytest.mark.parametrize("overrides, message", [
    ([], "pass exactly one of checkpoint=PATH, images=FOLDER, real_split=test or cascade=<name>"),
    (["real_split=test", "images=somewhere"], r"got \['images', 'real_split'\]"),
    (["real_split=test", "dataset=image_folder", "dataset.root=."], "real_split='test' needs a data set with splits"),
])
def test_bad_options_name_the_fix(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluate(eval_config(tmp_path, tmp_path, *overrides))


def test_an_unknown_feature_extractor_lists_the_choices(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not find 'features/clip'[\s\S]*digits[\s\S]*inception"):
        eval_config(tmp_path, tmp_path, "real_split=test", "features=clip")


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights saved as a weights file: nothing is downloaded."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # the constructor would download its weights and load them: keep the random initialisation instead
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict, *a, **k: None)
        network = FeatureExtractorInceptionV3("random", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pt"
    torch.save(network.state_dict(), path)
    return path


def test_the_inception_extractor_gives_2048_features_and_1008_logits(random_inception_weights):
    extractor = InceptionV3(weights_path=str(random_inception_weights))
    assert extractor.name.startswith("inception-v3-") and extractor.feature_dim == 2048
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features, probabilities = extract(extractor, in_batches(images, 1))
    assert features.shape == (2, 2048) and probabilities.shape == (2, 1008)
    assert torch.isfinite(features).all() and torch.allclose(probabilities.sum(1), torch.ones(2, dtype=torch.float64))
    assert not torch.equal(features[0], features[1])
    # a gray image counts as its RGB copy
    assert torch.allclose(extractor.features(images[:1].expand(-1, 3, -1, -1)), features[:1], atol=1e-5)


def test_the_inception_extractor_without_weights_says_where_to_get_them(tmp_path):
    for weights_path in (None, str(tmp_path / "missing.pth")):
        with pytest.raises(ValueError, match=r"nothing is downloaded at run time: fetch https://github.com/toshas/"
                           r"torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
                           r".*features.weights_path="):
            InceptionV3(weights_path=weights_path)
    with pytest.raises(InstantiationException, match="needs the Inception-v3 weights file"):  # Hydra wraps it
        evaluate(compose_config("eval", ["real_split=test", "features=inception", f"paths.cache_dir={tmp_path}"], tmp_path))
