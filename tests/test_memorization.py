"""The memorization check: copies of training images (and of their mirrors) are flagged, held-out real images are not,
in diffusion-eval, in training and in sweep reports."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from diffusion.cli.eval import check_memorization, evaluate, reference_dataset
from diffusion.cli.train import train
from diffusion.data import DigitsDataset
from diffusion.evaluation import memorization
from diffusion.evaluation.evaluator import reference_statistics
from diffusion.evaluation.features import (
    DigitsClassifier,
    FeatureExtractor,
    extract,
    in_batches,
)
from diffusion.evaluation.memorization import (
    TrainingImages,
    calibrate,
    check_settings,
    find_copies,
    memorization_reference,
    nearest_grid,
    neighbourhood_ratio,
    neighbourhoods,
    summary,
    thresholds,
    training_images,
)
from diffusion.reports.images import save_images
from diffusion.reports.sweep_report import SweepReport
from tests.conftest import compose_config, smoke_overrides

CPU = torch.device("cpu")


class PooledPixels(FeatureExtractor):
    """A feature space that needs no training: the 4x4 means of the pixels (16 features of a 16x16 digit)."""

    name = "pooled-pixels"
    feature_dim = 16

    def features_and_logits(self, images):
        return F.avg_pool2d(images.float(), 4).flatten(1), None


def features_of(extractor, images):
    return extract(extractor, in_batches(images, 500))[0]


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(image_size=16, split="train").images, DigitsDataset(image_size=16, split="test").images


def test_the_ratio_is_the_nearest_distance_over_the_mean_distance_to_the_k_nearest():
    distances = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 8.0], [2.0, math.inf, math.inf], [0.0, 0.0, 0.0],
                              [math.inf, math.inf, math.inf]])
    ratios = neighbourhood_ratio(distances)
    assert ratios[:4].tolist() == [0.5, 0.0, 1.0, 0.0]  # left-out (infinite) neighbours do not count
    assert math.isnan(ratios[4])  # nothing left to compare with


# two training images of 1x1x3 pixels; the keys are them, then their mirrors
T0, T1 = [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]


def constructed_keys(rows):
    images = torch.tensor(rows).reshape(len(rows), 1, 1, 3)
    return images, torch.cat([images, images.flip(-1)]).flatten(1)


def test_the_nearest_training_images_of_constructed_queries_mirrors_included():
    _, pixels = constructed_keys([T0, T1])  # t0, t1, mirror t0 = [0, 0, 1], mirror t1 = [0.5, 0, 0]
    queries = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.6]])
    found = neighbourhoods({"pixels": queries, "features": queries}, {"pixels": pixels, "features": pixels}, k=3)
    distances, indices = found["pixels"]
    # the first is the mirror of t0; the second is 0.1 from t1, 0.4 from t0's mirror, sqrt(0.61) from t1's mirror
    assert indices.tolist() == [[2, 1, 3], [1, 2, 3]]
    torch.testing.assert_close(distances, torch.tensor([[0.0, 0.5, math.sqrt(1.25)], [0.1, 0.4, math.sqrt(0.61)]]))
    torch.testing.assert_close(neighbourhood_ratio(distances),
                               torch.tensor([0.0, 0.1 / ((0.1 + 0.4 + math.sqrt(0.61)) / 3)]))


def test_leave_one_out_leaves_out_the_image_its_mirror_and_its_duplicates_with_theirs():
    # t0 twice (an unreadable file's slot served by the next image gives such duplicates), t1, and one near t0
    images, pixels = constructed_keys([T0, T0, T1, [0.8, 0.0, 0.0]])
    found = neighbourhoods({"pixels": images[:1].flatten(1), "features": images[:1].flatten(1)},
                           {"pixels": pixels, "features": pixels}, k=2, leave_out=torch.tensor([0]))
    distances, indices = found["pixels"]
    # neither t0, its duplicate, nor their mirrors: the next are [0.8, 0, 0] (0.2 away) and t1's mirror (0.5 away)
    assert indices.tolist() == [[3, 6]]
    torch.testing.assert_close(distances, torch.tensor([[0.2, 0.5]]))
    assert neighbourhood_ratio(distances).item() == pytest.approx(0.2 / 0.35)


def constructed_training_set() -> TrainingImages:
    images, pixels = constructed_keys([T0, T1])
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])  # t0, t1, their mirrors
    return TrainingImages(images=images, keys={"pixels": pixels, "features": features},
                          thresholds={"pixels": 0.5, "features": 0.5}, neighbours=2, calibration_quantile=0.005,
                          calibration="constructed")


def test_a_sample_is_a_copy_when_it_is_one_in_pixels_and_in_features():
    training = constructed_training_set()
    samples = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.6]]).reshape(3, 1, 1, 3)
    # A: t0's mirror in both; B: t0's mirror in pixels, equally far from every training image in features;
    # C: 0.1 from t1 in pixels (ratio 0.1 / 0.25 = 0.4), 0.5 from t1 in features (ratio 0.5 / 5 = 0.1)
    features = torch.tensor([[0.0, 10.0], [5.0, 5.0], [10.0, 0.5]])
    copies = find_copies(training, samples, features)
    torch.testing.assert_close(copies.ratios["pixels"], torch.tensor([0.0, 0.0, 0.4]))
    torch.testing.assert_close(copies.ratios["features"], torch.tensor([0.0, 1.0, 0.1]))
    torch.testing.assert_close(copies.scores, torch.tensor([0.0, 2.0, 0.8]))  # the larger of ratio / 0.5
    assert copies.flagged.tolist() == [True, False, True] and copies.share == pytest.approx(2 / 3)
    assert copies.closest(3).tolist() == [0, 2, 1]
    # nearest.png's rows: the sample, its nearest in pixels, its nearest in features (t0 mirrored for A)
    grid = nearest_grid(training, samples, copies, rows=2)
    expected = [samples[0], training.images[0].flip(-1), training.images[0].flip(-1),
                samples[2], training.images[1], training.images[1]]
    assert torch.equal(grid, torch.stack(expected))
    written = summary(training, copies, rows=1)
    assert written["memorized"] == pytest.approx(2 / 3) and written["copies"] == [0, 2]
    assert written["closest"] == [{"image": 0, "score": 0.0,
                                   "pixels": {"training_image": 0, "mirrored": True, "ratio": 0.0},
                                   "features": {"training_image": 0, "mirrored": True, "ratio": 0.0}}]


def test_the_thresholds_are_the_calibration_quantile_of_the_ratios_that_exist():
    ratios = torch.cat([torch.linspace(0, 1, 101), torch.tensor([math.nan])])
    assert thresholds({"pixels": ratios, "features": ratios * 2}, 0.05) == pytest.approx(
        {"pixels": 0.05, "features": 0.1})
    assert thresholds({"pixels": torch.tensor([math.nan])}, 0.05) == {"pixels": 0.0}  # exact copies only


def planted_copies(train: torch.Tensor):
    """200 training digits as they are, 200 mirrored, 200 mirrored with noise (std 0.05), and their indices."""
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randperm(len(train), generator=generator)[:600]
    noise = 0.05 * torch.randn(200, *train.shape[1:], generator=generator)
    planted = {"exact": train[chosen[:200]], "mirrored": train[chosen[200:400]].flip(-1),
               "mirrored, noisy": (train[chosen[400:]].flip(-1) + noise).clamp(-1, 1)}
    return planted, chosen


def check_planted_and_held_out(extractor, train, test, halves):
    """Calibrated on one half of the held-out digits, the check flags >= 95% of planted copies and <= 1% of the other
    half; an exact copy's nearest training image is its original, a mirrored one's its mirror."""
    train_features = features_of(extractor, train)
    planted, chosen = planted_copies(train)
    for calibration, held_out in halves(test):
        training = training_images(train, train_features, calibrate(extractor, train, train_features, calibration, CPU),
                                   neighbours=5, calibration_quantile=0.005, device=CPU)
        assert training.calibration == "180 held-out real images"
        assert find_copies(training, held_out, features_of(extractor, held_out)).share <= 0.01
        copies = {group: find_copies(training, images, features_of(extractor, images))
                  for group, images in planted.items()}
        assert all(found.share >= 0.95 for found in copies.values()), {group: c.share for group, c in copies.items()}
        for space in ("pixels", "features"):
            assert torch.equal(copies["exact"].nearest[space], chosen[:200])
            assert torch.equal(copies["mirrored"].nearest[space], chosen[200:400] + len(train))


def test_planted_copies_are_flagged_and_held_out_digits_are_not(digits):
    check_planted_and_held_out(PooledPixels(), *digits, halves=lambda test: [(test[0::2], test[1::2])])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return DigitsClassifier(cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.mark.slow
def test_planted_copies_are_flagged_and_held_out_digits_are_not_in_the_digits_classifiers_features(classifier, digits):
    check_planted_and_held_out(classifier, *digits,  # each half of the test split calibrates, the other is checked
                               halves=lambda test: [(test[0::2], test[1::2]), (test[1::2], test[0::2])])


def digits_config(split: str) -> dict:
    return {"_target_": "diffusion.data.DigitsDataset", "image_size": 16, "channels": 1, "random_flip": False,
            "split": split, "downsample_from": None}


def test_the_train_split_is_calibrated_on_the_test_split_once_and_the_whole_set_leave_one_out(tmp_path, monkeypatch):
    extractor = PooledPixels()
    train = DigitsDataset(image_size=16, split="train")
    reference = reference_statistics(extractor, train, digits_config("train"), tmp_path, CPU)
    first = memorization_reference(extractor, train, digits_config("train"), reference, CPU)
    assert first.calibration == "360 held-out real images (the 'test' split)" and len(first.images) == 1437
    assert torch.equal(first.keys["pixels"][1437:], train.images.flip(-1).flatten(1))
    cached = list((tmp_path / "reference" / extractor.name).glob("*-copies-*.pt"))
    assert len(cached) == 1 and cached[0].name.startswith(reference["path"].stem)

    def not_again(*args, **kwargs):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(memorization, "calibrate", not_again)
    again = memorization_reference(extractor, train, digits_config("train"), reference, CPU)
    assert again.thresholds == first.thresholds and again.calibration == first.calibration
    monkeypatch.undo()
    # another calibration quantile reads the same cached ratios: the threshold moves with it
    looser = memorization_reference(extractor, train, digits_config("train"), reference, CPU, calibration_quantile=0.5)
    assert all(looser.thresholds[space] > 1.5 * first.thresholds[space] for space in first.thresholds)
    everything = DigitsDataset(image_size=16, split="all")
    whole = memorization_reference(extractor, everything, digits_config("all"),
                                   reference_statistics(extractor, everything, digits_config("all"), tmp_path, CPU), CPU)
    assert whole.calibration == "1,797 training images, each against the others (leave-one-out)"
    capped = memorization_reference(extractor, everything, digits_config("all"),
                                    reference_statistics(extractor, everything, digits_config("all"), tmp_path, CPU),
                                    CPU, max_calibration_images=500)
    assert capped.calibration == "500 training images, each against the others (leave-one-out)"


@pytest.mark.parametrize("overrides, reason", [
    (["reference_split=test"], ("the reference is the held-out split 'test', not images a model trained on "
                               "(reference_split=train compares with the training images)")),
    (["memorization.enabled=false"], "memorization.enabled=false"),
])
def test_a_folder_without_training_images_to_compare_with_is_skipped_with_the_reason(overrides, reason, tmp_path,
                                                                                     caplog):
    cfg = compose_config("eval", [f"images={tmp_path}", "device=cpu", *overrides], tmp_path)
    reference = reference_dataset(cfg, split=cfg.reference_split)
    with caplog.at_level(logging.INFO, logger="diffusion.cli.eval"):
        result = check_memorization(cfg, None, reference, {}, torch.zeros(2, 1, 16, 16), torch.zeros(2, 4), CPU,
                                    tmp_path)
    assert result == {"skipped": reason}
    assert [record.getMessage() for record in caplog.records] == [f"memorization: skipped, {reason}"]
    assert not (tmp_path / "nearest.png").exists()


@pytest.mark.parametrize("settings, message", [
    ({"neighbours": 1}, r"memorization.neighbours must be at least 2 .*got 1"),
    ({"calibration_quantile": 0.0}, (r"memorization.calibration_quantile is the share of held-out images flagged, "
                                    r"between 0 and 1 \(e.g. 0.005\), got 0.0")),
    ({"max_calibration_images": 0}, "memorization.max_calibration_images must be positive, got 0"),
])
def test_settings_the_check_cannot_work_with_name_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        check_settings(**settings)
    cfg = compose_config("train", smoke_overrides(**{f"callbacks.evaluation.memorization.{key}": value
                                                     for key, value in settings.items()}))
    with pytest.raises(InstantiationException, match="callbacks.evaluation." + message):  # before training starts
        instantiate(cfg.callbacks.evaluation)


def test_sweep_reports_show_memorized_beside_the_other_metrics(tmp_path):
    for job, (fd, memorized) in enumerate([(3.5, 0.0), (2.0, 0.25)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- sampler.steps={10 * (job + 1)}\n")
        (folder / ".hydra" / "job_return.json").write_text(json.dumps(
            {"job": job, "overrides": [f"sampler.steps={10 * (job + 1)}"], "status": "completed", "value": fd}))
        metrics = {"fd": fd, "precision": 0.9, "recall": 0.8, "memorized": memorized, "broken_images": 0}
        (folder / "eval.json").write_text(json.dumps({"source": {}, "num_images": 10, "metrics": metrics}))
    SweepReport().write(tmp_path, final=True)
    table = (tmp_path / "report.md").read_text().splitlines()
    assert table[0] == "| job | overrides | fd | precision | recall | memorized | broken_images | value |"
    assert table[2:] == ["| 0 | sampler.steps=10 | 3.5 | 0.9 | 0.8 | 0 | 0 | 3.5 |",
                         "| 1 | sampler.steps=20 | 2 | 0.9 | 0.8 | 0.25 | 0 | 2 |"]
    # a training sweep's in-training evaluations: eval/memorized is a column, and lower is better
    for job, shares in enumerate([[0.5, 0.1], [0.05, 0.0]]):
        lines = [{"step": 10 * (i + 1), "loss": 0.1, "train_seconds": 10.0 * (i + 1), "eval/fd": 5.0,
                  "eval/memorized": share} for i, share in enumerate(shares)]
        (tmp_path / str(job) / "eval.json").unlink()
        (tmp_path / str(job) / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    plot = {"points": "evaluations", "x": "train_seconds", "y": ["memorized"], "lines": "sampler.steps",
            "target": {"metric": "memorized", "value": 0.1}}
    SweepReport(plot=plot).write(tmp_path, final=False, last_job=1)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["memorized"] for row in report["evaluations"]] == [0.5, 0.1, 0.05, 0.0]
    assert [(row["best_memorized"], row["train_seconds_to_target"]) for row in report["time_to_target"]] == [
        (0.1, 20.0), (0.0, 10.0)]
    assert "## train_seconds to memorized ≤ 0.1" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_diffusion_eval_counts_the_copies_in_a_folder_and_draws_them_beside_their_originals(classifier, digits,
                                                                                          tmp_path):
    train, test = digits
    planted = [3, 10, 11, 40]  # images 3, 10, 11 and 40 of the folder copy training digits 0, 7, 500 (mirrored), 1000
    images = test[:50].clone()
    images[planted] = torch.stack([train[0], train[7], train[500].flip(-1), train[1000]])
    save_images(images, tmp_path / "images")
    overrides = [f"images={tmp_path / 'images'}", f"paths.cache_dir={classifier.weights_path.parent.parent}",
                 "device=cpu"]
    result = evaluate(compose_config("eval", overrides, tmp_path / "run"))
    assert result["metrics"]["memorized"] == pytest.approx(4 / 50)
    checked = result["memorization"]
    assert checked["copies"] == planted and checked["calibration"] == "360 held-out real images (the 'test' split)"
    assert {(row["image"], row["pixels"]["training_image"], row["pixels"]["mirrored"])
            for row in checked["closest"][:4]} == {(3, 0, False), (10, 7, False), (11, 500, True), (40, 1000, False)}
    with Image.open(tmp_path / "run" / "nearest.png") as grid:  # 16 rows of 3 images of 16 + 2 pixels
        assert grid.size == (3 * 18 + 2, 16 * 18 + 2)
    skipped = evaluate(compose_config("eval", [*overrides, "reference_split=test"], tmp_path / "skipped"))
    assert skipped["metrics"]["memorized"] is None and "skipped" in skipped["memorization"]
    assert not (tmp_path / "skipped" / "nearest.png").exists()


@pytest.mark.slow
def test_in_training_evaluation_logs_eval_memorized_and_draws_the_nearest_training_images(classifier, tmp_path):
    overrides = smoke_overrides(**{"trainer.max_steps": 2, "callbacks.evaluation.every": 2,
                                   "callbacks.evaluation.num_images": 10, "callbacks.evaluation.batch_size": 10,
                                   "callbacks.evaluation.sampler.steps": 2, "dataset.split": "train",
                                   "callbacks.evaluation.memorization.grid_rows": 4,
                                   "paths.cache_dir": classifier.weights_path.parent.parent})
    train(compose_config("train", overrides, tmp_path / "run"))
    [line] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 2 and line["eval/memorized"] == 0.0  # a model 2 steps old draws noise, nothing's copy
    with Image.open(tmp_path / "run" / "samples" / "nearest_step_2.png") as grid:
        assert grid.size == (3 * 18 + 2, 4 * 18 + 2)
    # the same samples measured against the held-out digits: another FD, the same copies of the training digits
    train(compose_config("train", [*overrides, "callbacks.evaluation.reference_split=test"], tmp_path / "held_out"))
    [held_out] = [json.loads(line) for line in (tmp_path / "held_out" / "metrics.jsonl").read_text().splitlines()]
    assert held_out["eval/fd"] != line["eval/fd"] and held_out["eval/memorized"] == line["eval/memorized"]
    cached = classifier.weights_path.parent.parent / "reference" / classifier.name
    assert any(path.name.startswith("digitsdataset-test-16px") for path in cached.iterdir())
    off = [*overrides, "callbacks.evaluation.memorization.enabled=false", "callbacks.evaluation.metric=memorized"]
    with pytest.raises(ValueError, match=r"metric='memorized' cannot be measured in this run \(callbacks.evaluation."
                                         r"memorization.enabled is false\)"):
        train(compose_config("train", off, tmp_path / "off"))
