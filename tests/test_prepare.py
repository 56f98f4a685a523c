"""diffusion-prepare: a messy folder in, a clean training set out, bad files set aside with their reason."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.data import ImageFolderDataset
from diffusion.data.prepare_folder import REPORT, prepare
from diffusion.data.prepare_image import to_8bit, to_output_mode
from tests.conftest import cli, compose_config

SIZE = 32
KEPT_MODES = {
    "cats/a.jpg": "RGB", "cats/b.png": "RGB", "cats/cmyk.jpg": "CMYK", "cats/exif.jpg": "RGB", "cats/gray.png": "L",
    "cats/gray_alpha.png": "LA", "cats/palette.png": "P", "cats/rgb.jpg": "RGB", "cats/rgba.png": "RGBA",
    "dogs/big.png": "RGB", "dogs/bilevel.png": "1", "dogs/float.tif": "F", "dogs/int32.tif": "I",
    "dogs/sixteen.png": "I;16",
}
QUARANTINED = {
    "cats/a.png": "duplicate_name",  # cats/a.jpg, first in sorted order, became cats/a.png
    "cats/b.jpg": "corrupt",  # random bytes: so cats/b.png, the good one, gets the name
    "cats/fake.png": "not_an_image",  # an HTML error page saved as .png
    "cats/notes.txt": "not_an_image",
    "cats/tiny.png": "too_small",
    "dogs/copy.jpg": "duplicate",  # the bytes of cats/rgb.jpg
    "dogs/truncated.jpg": "truncated",
    "dogs/truncated.png": "truncated",
}


def make_messy_folder(src: Path) -> None:
    """Two classes of images in every mode Pillow opens, and every kind of bad file (see KEPT_MODES, QUARANTINED)."""
    rng = np.random.default_rng(0)
    cats, dogs = src / "cats", src / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir()

    def noise(*shape: int) -> np.ndarray:
        return rng.integers(0, 256, shape, dtype=np.uint8)

    Image.fromarray(noise(40, 48, 3)).save(cats / "rgb.jpg", quality=90)
    upright_left_red = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high: red left half, blue right half
    upright_left_red[:, :20] = (255, 0, 0)
    upright_left_red[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top, blue below
    Image.fromarray(upright_left_red).save(cats / "exif.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(noise(SIZE, SIZE)).save(cats / "gray.png")  # already the target size: copied pixel for pixel
    gray_alpha = np.zeros((40, 40, 2), np.uint8)
    gray_alpha[..., 0] = 100
    gray_alpha[:, 20:, 1] = 255  # left half transparent, right half opaque gray 100
    Image.fromarray(gray_alpha).save(cats / "gray_alpha.png")
    palette = Image.new("P", (36, 36), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255])  # index 0: green, transparent; index 1: blue
    palette.paste(1, (18, 0, 36, 36))
    palette.save(cats / "palette.png", transparency=0)
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(cats / "rgba.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cats / "cmyk.jpg", quality=95)
    Image.new("RGB", (40, 40), (0, 200, 0)).save(cats / "a.jpg", quality=95)
    Image.new("RGB", (40, 40), (255, 0, 255)).save(cats / "a.png")
    (cats / "b.jpg").write_bytes(rng.bytes(3000))
    Image.new("RGB", (36, 36), (10, 20, 200)).save(cats / "b.png")
    (cats / "notes.txt").write_text("labels checked by hand\n")
    (cats / "fake.png").write_text("<html><body>404 Not Found</body></html>\n")
    Image.new("RGB", (12, 10), (90, 90, 90)).save(cats / "tiny.png")
    (cats / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    ramp16 = np.tile(np.linspace(0, 65535, 64).round().astype("<u2"), (40, 1))  # left to right, full 16-bit range
    Image.frombytes("I;16", (64, 40), ramp16.tobytes()).save(dogs / "sixteen.png")
    ramp32 = np.tile(np.linspace(0, 100_000, 48)[:, None], (1, 40)).astype(np.int32)  # top to bottom, past 16 bits
    Image.fromarray(ramp32).save(dogs / "int32.tif")
    Image.fromarray(np.tile(np.linspace(0, 1, 48, dtype=np.float32), (36, 1))).save(dogs / "float.tif")
    bilevel = np.zeros((40, 40), bool)
    bilevel[:, 20:] = True
    Image.fromarray(bilevel).save(dogs / "bilevel.png")
    Image.fromarray(noise(60, 80, 3)).save(dogs / "big.png")
    for name, fmt in (("truncated.jpg", "JPEG"), ("truncated.png", "PNG")):
        Image.fromarray(noise(48, 48, 3)).save(dogs / name, format=fmt)
        data = (dogs / name).read_bytes()
        (dogs / name).write_bytes(data[: len(data) * 6 // 10])
    shutil.copy(cats / "rgb.jpg", dogs / "copy.jpg")


def run_prepare(src: Path, dst: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config("prepare", [f"src={src}", f"dst={dst}", f"image_size={SIZE}", "min_size=16",
                                     "num_workers=2", *overrides], output_dir=run_dir)
    return prepare(cfg)


def snapshot(folder: Path, leave_out: str = REPORT) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` (hidden ones too): modification time and bytes."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != leave_out}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert (image.size, image.mode) == ((SIZE, SIZE), "RGB"), path
        return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("prepare")
    make_messy_folder(root / "src")
    before = snapshot(root / "src")
    report = run_prepare(root / "src", root / "dst", root / "run")
    return root / "src", root / "dst", report, before


def test_each_file_is_kept_or_set_aside_with_its_reason(prepared):
    src, dst, report, src_before = prepared
    assert snapshot(src) == src_before  # src is only read
    records = {record["source"]: record for record in report["files"]}
    assert {s: r["reason"] for s, r in records.items() if r["status"] == "quarantined"} == QUARANTINED
    assert {s: r["mode"] for s, r in records.items() if r["status"] == "kept"} == KEPT_MODES
    assert {q["source"]: q["reason"] for q in report["quarantine"]} == QUARANTINED
    for source, reason in QUARANTINED.items():  # a copy of the file itself, under its reason
        assert (dst / ".quarantine" / reason / source).read_bytes() == (src / source).read_bytes()
    outputs = {p.relative_to(dst).as_posix() for p in dst.rglob("*.png") if ".quarantine" not in p.parts}
    assert outputs == {str(Path(source).with_suffix(".png")) for source in KEPT_MODES}
    for output in outputs:
        pixels(dst / output)
    assert report["counts"] == {
        "files": 22, "kept": 14, "resized": 13, "quarantined": 8, "decoded": 22, "written": 22, "unchanged": 0,
        "removed": 0,
        "skipped": 1,  # .DS_Store
        "converted": {"1": 1, "CMYK": 1, "F": 1, "I": 1, "I;16": 1, "L": 1, "LA": 1, "P": 1, "RGBA": 1},
        "quarantined_by_reason": {"corrupt": 1, "truncated": 2, "not_an_image": 2, "too_small": 1, "duplicate": 1,
                                  "duplicate_name": 1},
    }
    assert "truncated" in records["dogs/truncated.png"]["detail"]
    assert records["dogs/copy.jpg"]["detail"] == "same bytes as cats/rgb.jpg"
    assert records["cats/fake.png"]["detail"] == "text" and records["cats/b.jpg"]["detail"].startswith("binary")
    assert report["files_per_second"] > 0
    assert json.loads((dst / REPORT).read_text())["counts"] == report["counts"]


def test_images_come_out_upright_flattened_and_scaled_not_clipped(prepared):
    src, dst, _, _ = prepared
    exif = pixels(dst / "cats/exif.png")
    assert exif[4, 16, 0] > 200 and exif[4, 16, 2] < 60  # top: red, so the EXIF rotation was applied
    assert exif[27, 16, 2] > 200 and exif[27, 16, 0] < 60  # bottom: blue
    gray = np.asarray(Image.open(src / "cats/gray.png")).astype(int)
    assert (pixels(dst / "cats/gray.png") == gray[..., None]).all()  # 32x32 already: the same pixels, as RGB
    assert np.abs(pixels(dst / "cats/rgba.png") - (255, 127, 127)).max() <= 1  # half-transparent red over white
    gray_alpha = pixels(dst / "cats/gray_alpha.png")
    assert (gray_alpha[:, :4] >= 254).all() and (np.abs(gray_alpha[:, -4:] - 100) <= 1).all()
    palette = pixels(dst / "cats/palette.png")
    assert (palette[:, :4] >= 254).all()  # the transparent green index shows the white background
    assert (np.abs(palette[:, -4:] - (0, 0, 255)) <= 1).all()
    cmyk = pixels(dst / "cats/cmyk.png")
    assert (cmyk[..., 0] > 220).all() and (cmyk[..., 1:] < 40).all()
    assert np.abs(pixels(dst / "cats/a.png") - (0, 200, 0)).max() <= 4  # from a.jpg, not the magenta a.png
    assert np.abs(pixels(dst / "cats/b.png") - (10, 20, 200)).max() <= 1
    bilevel = pixels(dst / "dogs/bilevel.png")
    assert (bilevel[:, :4] <= 1).all() and (bilevel[:, -4:] >= 254).all()
    # 16-bit, 32-bit and float ramps stay ramps: 8-bit values spread from dark to bright, not clipped to white.
    # Each keeps its centre square: sixteen.png columns 12..52 of 0..63, so 49..206 (value = column * 255 / 63)
    sixteen = pixels(dst / "dogs/sixteen.png")[..., 0]
    assert abs(sixteen[16, 0] - 49) <= 2 and abs(sixteen[16, 16] - 130) <= 2 and abs(sixteen[16, -1] - 206) <= 2
    assert (np.diff(sixteen[16]) >= 0).all()
    int32 = pixels(dst / "dogs/int32.png")[..., 0]  # top to bottom, stretched: rows 4..44 of 0..47, so 22..233
    assert abs(int32[0, 16] - 22) <= 2 and abs(int32[-1, 16] - 233) <= 2 and (np.diff(int32[:, 16]) >= 0).all()
    float_ramp = pixels(dst / "dogs/float.png")[..., 0]  # [0, 1] times 255: columns 6..42 of 0..47, so 33..222
    assert abs(float_ramp[16, 0] - 33) <= 2 and abs(float_ramp[16, -1] - 222) <= 2


def test_the_prepared_folder_loads_without_any_image_skipped(prepared):
    _, dst, _, _ = prepared
    dataset = ImageFolderDataset(str(dst), image_size=SIZE, channels=3, random_flip=False)
    assert dataset.classes == ["cats", "dogs"]  # .quarantine is hidden from the loader
    assert len(dataset) == len(KEPT_MODES)
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, SIZE, SIZE) and label == int(dataset.samples[i][0].parent.name == "dogs")
    assert dataset.skipped == set()


def test_a_second_run_changes_nothing(prepared, tmp_path):
    src, dst, first, _ = prepared
    before = snapshot(dst)
    second = run_prepare(src, dst, tmp_path)
    assert snapshot(dst) == before
    assert second["counts"] == {**first["counts"], "decoded": 0, "written": 0, "unchanged": 22}  # nothing read again
    assert second["files"] == first["files"]


def test_a_rerun_redoes_changed_files_and_removes_what_no_longer_belongs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_messy_folder(src)
    run_prepare(src, dst, tmp_path / "run1")
    before = snapshot(dst)
    (src / "cats/b.png").unlink()  # its output goes
    Image.new("RGB", (50, 40), (1, 2, 3)).save(src / "dogs/big.png")  # redone
    (dst / "cats/gray.png").unlink()  # an output lost from dst: made again from its unchanged source
    report = run_prepare(src, dst, tmp_path / "run2")
    after = snapshot(dst)
    assert {key: report["counts"][key] for key in ("decoded", "written", "unchanged", "removed")} == {
        "decoded": 2, "written": 2, "unchanged": 19, "removed": 1}
    assert set(before) - set(after) == {"cats/b.png"}
    assert [name for name in after if after[name] != before[name]] == ["cats/gray.png", "dogs/big.png"]
    assert after["cats/gray.png"][1] == before["cats/gray.png"][1]
    assert (pixels(dst / "dogs/big.png") == (1, 2, 3)).all()


def test_pad_and_grayscale_on_a_folder_without_classes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (40, 20), (200, 200, 200)).save(src / "wide.png")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(src / "clear.png")
    run_prepare(src, tmp_path / "dst", tmp_path / "run", "channels=1", "fit=pad", "pad_color=gray",
                "background=black")
    with Image.open(tmp_path / "dst/wide.png") as wide:
        assert (wide.size, wide.mode) == ((SIZE, SIZE), "L")
        wide = np.asarray(wide)
    assert (wide[:8] == 128).all() and (wide[-8:] == 128).all()  # 40x20 became 32x16, centred on gray
    assert (wide[8:24] == 200).all()
    assert (np.asarray(Image.open(tmp_path / "dst/clear.png")) == 0).all()  # fully transparent over black
    dataset = ImageFolderDataset(str(tmp_path / "dst"), image_size=SIZE, channels=1, random_flip=False)
    assert len(dataset) == 2 and dataset[0][0].shape == (1, SIZE, SIZE) and not dataset.skipped


def test_high_depth_modes_are_scaled_to_8_bits():
    def values(mode: str, data: list) -> list[int]:
        array = np.array([data], dtype={"I;16": "<u2", "I": np.int32, "F": np.float32}[mode])
        image = Image.frombytes(mode, (len(data), 1), array.tobytes()) if mode == "I;16" else Image.fromarray(array)
        return np.asarray(to_8bit(image))[0].tolist()

    assert values("I;16", [0, 257 * 100, 65535]) == [0, 100, 255]
    assert values("I;16", [0, 1000]) == [0, 4]  # a dark 16-bit image stays dark
    assert values("I", [0, 100, 255]) == [0, 100, 255]  # 8-bit values in a 32-bit image
    assert values("I", [0, 30000, 65535]) == [0, 117, 255]  # 16-bit values, as Pillow also reads them
    assert values("I", [-5, 0, 5]) == [0, 128, 255]  # anything else: stretched
    assert values("F", [0.0, 0.5, 1.0]) == [0, 128, 255]
    assert values("F", [0.0, 2.0, 255.0]) == [0, 2, 255]


def test_palette_with_alpha_over_the_background():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 255])
    with_alpha = palette.convert("PA")
    with_alpha.putalpha(Image.frombytes("L", (2, 1), bytes([0, 255])))
    assert with_alpha.mode == "PA"
    assert np.asarray(to_output_mode(with_alpha, 3, "white")).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    assert np.asarray(to_output_mode(with_alpha, 1, "black")).tolist() == [[0, 29]]  # the luma of pure blue


@pytest.mark.parametrize("where, overrides, error, message", [
    ("missing", [], FileNotFoundError, r"src=.* does not exist or is not a folder: run with src="),
    ("same", [], ValueError, r"dst=.* is src or lies inside it"),
    ("inside", [], ValueError, r"dst=.* is src or lies inside it: .* choose a folder outside it"),
    ("around", [], ValueError, r"src=.* lies inside dst=.* choose a dst that does not hold src"),
    ("foreign", [], ValueError, r"already holds files that diffusion-prepare did not write"),
    ("ok", ["image_size=0"], ValueError, r"image_size must be a whole number of pixels of at least 1, got 0"),
    ("ok", ["fit=stretch"], ValueError, r"fit must be one of crop, pad, got 'stretch'"),
    ("ok", ["background=glitter"], ValueError, r"background='glitter' is not a colour"),
    ("ok", ["num_workers=0"], ValueError, r"num_workers must be a positive number"),
])
def test_user_errors_name_the_fix(tmp_path, where, overrides, error, message):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40)).save(images / "one.png")
    src, dst = {
        "missing": (tmp_path / "nowhere", tmp_path / "out"),
        "same": (images, images),
        "inside": (images, images / "out"),
        "around": (images, tmp_path),
        "foreign": (images, tmp_path / "theirs"),
        "ok": (images, tmp_path / "out"),
    }[where]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("someone's file")
    before = tree(dst)
    with pytest.raises(error, match=message):
        run_prepare(src, dst, tmp_path / "run", *overrides)
    assert tree(dst) == before  # dst, the folder each case is about, is left as it was found
    assert (before is None) == (where in ("missing", "inside", "ok"))  # absent there; elsewhere compared file by file


def tree(folder: Path) -> dict[str, bytes | None] | None:
    """Every entry under ``folder`` (folders as None, files with their bytes), or None where there is no folder."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_command_line_prepares_and_prints_the_summary(tmp_path):
    make_messy_folder(tmp_path / "src")
    result = cli("prepare", f"src={tmp_path / 'src'}", f"dst={tmp_path / 'dst'}", f"image_size={SIZE}", "min_size=16",
                 "num_workers=2", f"paths.runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    for line in (r"prepared 22 files of .* files/s, 2 workers\)", r"kept\s+14\s+-> .*dst \(32x32 RGB PNG, fit=crop\)",
                 r"resized\s+13", r"quarantined\s+8", r"truncated\s+2", r"not_an_image\s+2", r"duplicate_name\s+1",
                 r"too_small\s+1\s+shorter side < min_size=16"):
        assert re.search(line, result.stdout), (line, result.stdout)
    (run_dir,) = (tmp_path / "runs" / "prepare").iterdir()
    assert json.loads((run_dir / REPORT).read_text())["counts"]["kept"] == 14
    assert len(list((tmp_path / "dst" / "dogs").glob("*.png"))) == 5
