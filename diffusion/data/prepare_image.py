"""One file of ``diffusion-prepare``: read it, judge it, turn it into a square RGB or grayscale PNG.

Everything here runs in a worker process and depends only on the file and the settings, never on the other files
of the folder: duplicates and name clashes are decided by ``diffusion.data.prepare_folder``, which sees them all in
order.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# what can be wrong with a file on its own (diffusion.data.prepare_folder adds duplicate and duplicate_name)
DEFECTS = ("corrupt", "truncated", "not_an_image", "too_small")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
RESAMPLE = Image.Resampling.LANCZOS
# Pillow first shrinks by an integer factor while the image stays this many times larger than the target, then
# resamples with LANCZOS: from 3 on its documentation finds the result indistinguishable from LANCZOS alone
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class ImageSettings:
    """What a prepared image looks like (the command's options, checked by ``diffusion.data.prepare_folder``)."""

    image_size: int
    channels: int
    fit: str
    background: str
    pad_color: str
    min_size: int
    # png: the prepared image as PNG bytes (format=folder) | pixels: its uint8 pixels, row-major HWC (format=shards)
    output: str = "png"


@dataclass
class Inspection:
    """What one file is: its digest, its defect if it has one, else its source mode and size and the image made of
    it (PNG bytes or raw pixels, as ``ImageSettings.output`` says)."""

    sha256: str
    defect: str | None = None
    detail: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    png: bytes | None = None
    pixels: bytes | None = None


def prepare_file(path: str, settings: ImageSettings) -> Inspection:
    """Read ``path``, find its defect (corrupt, truncated, not_an_image, too_small) or make its PNG."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, (width, height) = decode(data, settings.image_size)
    except UnidentifiedImageError:
        return Inspection(digest, *unidentified_defect(path, data))
    except Exception as error:  # Pillow's plugins fail on broken data with OSError, SyntaxError, struct.error, ...
        defect = "truncated" if isinstance(error, EOFError) or "truncated" in str(error) else "corrupt"
        return Inspection(digest, defect, f"{type(error).__name__}: {error}")
    if min(width, height) < settings.min_size:
        return Inspection(digest, "too_small", f"{width}x{height}: shorter side under min_size={settings.min_size}",
                          image.mode, width, height)
    try:
        converted = to_output_mode(image, settings.channels, settings.background)
    except (ValueError, OSError) as error:  # a mode Pillow cannot convert (LAB, ...)
        return Inspection(digest, "corrupt", f"cannot convert mode {image.mode}: {error}", image.mode, width, height)
    square = FITS[settings.fit](converted, settings)
    if settings.output == "pixels":
        return Inspection(digest, None, "", image.mode, width, height, pixels=np.asarray(square).tobytes())
    return Inspection(digest, None, "", image.mode, width, height, encode_png(square))


def decode(data: bytes, image_size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode every byte of the first frame, upright (EXIF orientation applied); also its full upright size.

    A JPEG far larger than ``image_size`` is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as long as
    it stays at least 3 times ``image_size``, which the LANCZOS resize then brings down.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decompression-bomb and palette notes: the file is judged here instead
        image = Image.open(io.BytesIO(data))
        size = image.size
        image.draft(None, (3 * image_size, 3 * image_size))
        image.load()  # with ImageFile.LOAD_TRUNCATED_IMAGES off (checked by diffusion.data.prepare_folder), missing data raises
        upright = ImageOps.exif_transpose(image)
    return upright, size if upright.size == image.size else size[::-1]


def unidentified_defect(path: str, data: bytes) -> tuple[str, str]:
    """``not_an_image`` for text (notes, an HTML error page saved as .jpg) or an unknown extension; else ``corrupt``.

    Binary data under an image extension (``.jpg``, ``.png``, ...) that no decoder recognises is taken for a
    damaged image. Returns the defect and its detail.
    """
    head = data[:4096]
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "not_an_image", "text"
        except UnicodeDecodeError as error:
            if len(data) > len(head) and error.start >= len(head) - 3:  # a character cut by the 4 KiB window
                return "not_an_image", "text"
    if Path(path).suffix.lower() in Image.registered_extensions():
        return "corrupt", "binary data in no image format Pillow knows, under an image extension"
    return "not_an_image", "binary data in no image format Pillow knows"


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as 8-bit grayscale, scaled rather than clipped.

    ``I;16*`` files hold 0..65535 and are divided by 257. ``I`` and ``F`` say nothing about their range, so the
    values decide: floats in [0, 1] are multiplied by 255, values in [0, 255] kept, values in [0, 65535] divided by
    257 (Pillow reads 16-bit data into ``I`` too), anything else stretched from its minimum to its maximum.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257
    else:
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if image.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255
        elif low >= 0 and high <= 255:
            scaled = values
        elif low >= 0 and high <= 65535:
            scaled = values / 257
        else:
            scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_output_mode(image: Image.Image, channels: int, background: str) -> Image.Image:
    """RGB (``channels=3``) or L (``channels=1``); transparency composited over ``background``, high depth scaled."""
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        flat = Image.new("RGBA", image.size, background)
        flat.alpha_composite(image.convert("RGBA"))
        image = flat.convert("RGB")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # 1, P, CMYK, YCbCr, ...
    return image.convert("RGB" if channels == 3 else "L")


def center_crop(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """Resize the shorter side to ``image_size`` and keep the centre square: one resampling of the central box."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    size = (settings.image_size, settings.image_size)
    if side == settings.image_size:
        return image.crop(box)
    return image.resize(size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def pad(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """Resize the longer side to ``image_size`` and centre the image on a square of ``pad_color``."""
    width, height = image.size
    scale = settings.image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != image.size:
        image = image.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
    square = Image.new(image.mode, (settings.image_size, settings.image_size), settings.pad_color)
    square.paste(image, ((settings.image_size - size[0]) // 2, (settings.image_size - size[1]) // 2))
    return square


FITS = {"crop": center_crop, "pad": pad}


def encode_png(image: Image.Image) -> bytes:
    """The image as PNG bytes (lossless, no metadata carried over)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
