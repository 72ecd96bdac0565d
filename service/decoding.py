"""Decoding untrusted upload bytes into a Pillow image, with every limit checked first.

Any bytes a client sends end in a loaded, upright image or an ``ApiError`` subclass, never
in a Pillow exception: 400 for empty, undecodable or truncated bytes, 413 for an image over
the pixel budget (checked from the header, before any pixel is decompressed), 415 for a
recognisable but refused format (PDF, HEIC, ICO, EPS, ...).
"""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

try:  # libspng: an 8-bit PNG in half Pillow's time (a 280x280 canvas: 1.0 ms, not 2.0)
    import pyspng
except ImportError:  # no wheel for this platform: Pillow decodes every PNG
    pyspng = None

# MPO: the multi-picture JPEGs many phone cameras write.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "MPO"})
# No digit needs a longer side, and decoders pay per row: a thin strip is slow to decode.
MAX_SIDE = 30_000
# Each progressive JPEG scan is a pass over the whole image; encoders write about 10.
# Scan markers cannot occur in entropy-coded data (0xFF is stuffed there), so counting
# them is exact but for EXIF thumbnails and MPO frames, which add a few.
MAX_JPEG_SCANS = 100
_JPEG_SOS = b"\xff\xda"

# Image.open(formats=...) takes plugin ids; MPO files are opened by the JPEG plugin.
_OPEN_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
# Well-known non-image or not-supported types, named in the 415 message.
_MAGIC = (
    (b"%PDF-", "PDF"),
    (b"%!PS", "PostScript"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


def decode_image(data: bytes, *, max_pixels: int, min_size: int | None = None) -> Image.Image:
    """Decode client bytes into a loaded, upright Pillow image (first frame if animated).

    ``max_pixels`` is enforced from the header, before any pixel data is decompressed.
    ``min_size``: JPEGs may be decoded by libjpeg at 1/2, 1/4 or 1/8 scale as long as the
    longer side stays above min_size / 2 -- several times faster for phone photos (the
    handler passes ``mnist_form.WORK_SIZE``, the resolution normalisation works at anyway).
    """
    return load_image(open_image(data, max_pixels=max_pixels), min_size=min_size)


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Read only the header: format and size checked, no pixel data decompressed yet
    (cheap, so a request's images can all be checked before any is decoded)."""
    if not data:
        raise InvalidImage("empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning is only an exception under a strict warnings filter;
        # otherwise our max_pixels check below catches the same image).
        raise PayloadTooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as exc:  # hostile headers raise anything from SyntaxError to struct.error
        raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc

    if image.format not in ALLOWED_FORMATS:  # defensive: _OPEN_FORMATS already restricts
        raise UnsupportedMediaType(f"image format {image.format} is not supported")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage("image has no pixels")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if max(width, height) > MAX_SIDE:
        raise PayloadTooLarge(f"image is {width}x{height}; no side may exceed {MAX_SIDE} pixels")
    if image.format in ("JPEG", "MPO") and (scans := data.count(_JPEG_SOS)) > MAX_JPEG_SCANS:
        raise PayloadTooLarge(
            f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are decoded (encoders "
            "write about 10)"
        )
    return image


def load_image(image: Image.Image, *, min_size: int | None = None) -> Image.Image:
    """Decompress an ``open_image`` result: loaded, upright, first frame."""
    fast = _plain_png(image)
    if fast is not None:
        return fast
    try:
        if min_size and image.format in ("JPEG", "MPO"):
            # Grayscale straight out of libjpeg when the file is YCbCr: luma is all we use.
            image.draft("L" if image.mode in ("RGB", "L") else None, _draft_size(image, min_size))
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image too large: {exc}") from exc
    except Exception as exc:  # truncated data, corrupt chunks, decoder errors, ...
        raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc

    # Phone cameras store pixels sideways and say how to turn them in EXIF. In place: keeps
    # image.format, and skips a copy when there is nothing to turn. Corrupt EXIF: the pixels
    # themselves are fine, keep them as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _draft_size(image: Image.Image, work_size: int) -> tuple[int, int]:
    """The size to ask libjpeg for: 1/2, 1/4 or 1/8 scale while the longer side stays
    above half of ``work_size``, where normalisation's box reduce would bring it anyway."""
    width, height = image.size
    scale = 1
    while scale < 8 and max(width, height) / (2 * scale) > work_size / 2:
        scale *= 2
    return max(1, width // scale), max(1, height // scale)  # Pillow divides back: floors


# Pillow modes whose 8-bit PNG pixels libspng returns as they are, with the array's
# channels (pyspng 0.1.4 refuses gray + alpha: "invalid format").
_SPNG_CHANNELS = {"L": 0, "RGB": 3, "RGBA": 4}


def _plain_png(image: Image.Image) -> Image.Image | None:
    """An 8-bit, non-interlaced gray, RGB or RGBA PNG decoded by libspng, with Pillow's
    pixels and info; None for any other image (Pillow decodes it): palettes, other bit
    depths, transparency or EXIF chunks, or no libspng."""
    if pyspng is None or image.format != "PNG" or image.mode not in _SPNG_CHANNELS:
        return None
    if "transparency" in image.info or "exif" in image.info:
        return None
    data = image.fp.getvalue() if isinstance(image.fp, io.BytesIO) else None
    # IHDR, the first chunk (Pillow checked): bit depth at byte 24, interlacing at 28.
    if data is None or data[24] != 8 or data[28] != 0:
        return None
    try:
        pixels = pyspng.load(data)
    except Exception as exc:  # truncated data, bad CRCs, corrupt zlib streams
        raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc
    channels = _SPNG_CHANNELS[image.mode]
    expected = (image.height, image.width, channels) if channels else image.size[::-1]
    if pixels.dtype != np.uint8 or pixels.shape != expected:
        return None  # never seen: Pillow's reading of the header wins
    decoded = Image.fromarray(pixels)
    decoded.info, decoded.format = dict(image.info), image.format
    return decoded


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR first, as every PNG: 28x28, 8-bit gray (colour type 0), not interlaced.
_MNIST_IHDR = _PNG_SIGNATURE + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 28, 28, 8, 0, 0, 0, 0)
_IHDR_END = len(_MNIST_IHDR) + 4  # and its CRC


def is_mnist_png(data: bytes) -> bool:
    """Whether ``data`` is a 28x28 8-bit gray PNG without transparency or EXIF (how an
    MNIST digit is posted), from its chunk headers alone: ``decode_mnist_png`` then
    decodes it without Pillow, whose parsing of the chunks is over half its cost here."""
    if pyspng is None or not data.startswith(_MNIST_IHDR):
        return False
    pos, end = _IHDR_END, len(data)
    while pos + 8 <= end:  # the chunk types up to IEND
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in (b"tRNS", b"eXIf"):
            return False
        if kind == b"IEND":
            break
        pos += 12 + length
    return True


def decode_mnist_png(data: bytes) -> np.ndarray | None:
    """An ``is_mnist_png`` file's uint8 (28, 28) pixels, decoded by libspng; None if it
    refuses the file (truncated, bad CRCs, corrupt zlib): Pillow then says what is wrong."""
    try:
        pixels = pyspng.load(data)
    except Exception:
        return None
    return pixels if pixels.shape == (28, 28) and pixels.dtype == np.uint8 else None


def _unidentified(data: bytes) -> InvalidImage | UnsupportedMediaType:
    """Tell "a format we refuse" (415) from "not an image at all" (400)."""
    head = data[:64].lstrip()
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return UnsupportedMediaType(f"{name} is not a supported image format")
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return UnsupportedMediaType(
            "HEIC/HEIF/AVIF images are not supported: upload PNG or JPEG (most phones can "
            "export JPEG)"
        )
    try:
        # Header-only identification with every Pillow plugin, to name the format.
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:
        fmt = None
    if fmt:
        return UnsupportedMediaType(
            f"image format {fmt} is not supported; use one of {', '.join(sorted(ALLOWED_FORMATS))}"
        )
    return InvalidImage("cannot decode image: unknown or corrupt image format")


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__
