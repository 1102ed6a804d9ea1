"""Image checks and decoding: what ingest accepts, and how every later op opens it."""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

from PIL import Image, ImageColor, UnidentifiedImageError

from model.errors import PipelineError
from ops.storage import read_bytes


class ImageRejected(PipelineError):
    """An input that the pipeline skips and records in `rejects`, with this reason."""


@dataclass(frozen=True)
class ImageLimits:
    min_side: int
    max_side: int
    max_pixels: int

    @classmethod
    def from_conf(cls, images: dict) -> "ImageLimits":
        return cls(images["min_side"], images["max_side"], images["max_pixels"])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_image(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """(width, height) of a fully decodable image within limits, else ImageRejected.

    The size is checked from the header before decoding, so a 20000x20000 image is
    refused without allocating it; then the whole image is decoded, which is what
    catches truncated files.
    """
    if not data:
        raise ImageRejected("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if min(width, height) < limits.min_side:
                raise ImageRejected(f"too small: {width}x{height}, sides must be >= {limits.min_side}")
            if max(width, height) > limits.max_side or width * height > limits.max_pixels:
                raise ImageRejected(
                    f"too large: {width}x{height}, limits are {limits.max_side} a side "
                    f"and {limits.max_pixels} pixels"
                )
            im.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(f"corrupt image: {e}") from None
    return width, height


log = logging.getLogger("ops.images")
_said_alpha = False


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def decode_image(data: bytes, background: str) -> Image.Image:
    """The image as RGB; one with transparency composited onto `background` (conf
    images.alpha_background: a colour name or #rrggbb), not onto the black that a plain
    RGB conversion leaves under transparent pixels."""
    global _said_alpha
    with Image.open(io.BytesIO(data)) as im:
        if not has_alpha(im):
            return im.convert("RGB")
        if not _said_alpha:  # once a process: a catalogue of cut-outs would repeat it for every image
            log.warning("images with transparency are composited onto %s (images.alpha_background)",
                        background)
            _said_alpha = True
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, ImageColor.getcolor(background, "RGBA"))
        return Image.alpha_composite(flat, rgba).convert("RGB")


def load_image(uri: str, s3: dict | None, background: str,
               expected_sha256: str | None = None) -> Image.Image:
    """Read and decode an image for a model; ImageRejected if it is gone or changed since ingest."""
    try:
        data = read_bytes(uri, s3)
    except (FileNotFoundError, OSError) as e:
        raise ImageRejected(f"cannot read {uri}: {e}") from None
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise ImageRejected(f"{uri} changed since ingest (sha256 differs): re-run ingest")
    try:
        return decode_image(data, background)
    except Exception as e:
        raise ImageRejected(f"corrupt image: {e}") from None
