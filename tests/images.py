"""Real image files of digits, as a client would upload them (a helper, not a test module).

Everything here returns encoded files built from a 28x28 uint8 MNIST-style digit (light ink
on a dark background, 0..255):

* ``encode(digit, fmt, paper=...)`` -> (bytes, Content-Type) for every format in ``FORMATS``;
* ``phone_photo(digit, rng)``: a JPEG that looks like a phone photo of the digit on paper;
* ``canvas_png(digit)``: a browser-canvas export (strokes on a transparent background);
* hostile payloads: ``decompression_bomb``/``zero_png``, ``truncated``/``truncated_png``,
  ``random_bytes``,
  ``EMPTY``, ``pdf_bytes``, ``ico_bytes``, ``heic_header``.

``mnist_sample()`` reads the committed MNIST sample (tests/data/mnist-sample/) or the full
data set next to the checkout, and ``synthetic_digits()`` draws MNIST-form digits when
neither is available.
"""

from __future__ import annotations

import functools
import gzip
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIRS = (REPO_ROOT / "tests" / "data" / "mnist-sample", REPO_ROOT.parent / "shared/data/mnist")

# Formats whose decoded pixels equal the digit exactly; the others are lossy.
LOSSLESS = (
    "PNG",
    "PNG16",
    "PNG_PALETTE",
    "PNG_PALETTE_ALPHA",
    "PNG_RGBA",
    "PNG_RGBA_WHITE",
    "PNG_LA",
    "GIF",
    "BMP",
    "WEBP",
    "TIFF",
    "TIFF16",
    "TIFF_FLOAT",
)
LOSSY = ("JPEG", "JPEG_CMYK", "JPEG_EXIF_ROTATED", "MPO", "WEBP_LOSSY")
FORMATS = LOSSLESS + LOSSY
# Formats that carry the ink in the alpha channel (black/white strokes on transparency):
# ``paper`` does not apply to them.
ALPHA_FORMATS = ("PNG_PALETTE_ALPHA", "PNG_RGBA", "PNG_RGBA_WHITE", "PNG_LA")

EMPTY = b""


MIMETYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


def mimetype(fmt: str) -> str:
    """The Content-Type a client sends for an upload format of FORMATS."""
    return MIMETYPES[fmt.split("_")[0].rstrip("0123456789")]


def encode(digit: np.ndarray, fmt: str, *, paper: bool = False) -> tuple[bytes, str]:
    """Encode a 28x28 uint8 digit (light ink on dark) in an upload format of FORMATS.

    Returns (file bytes, Content-Type). ``paper=True`` stores it as dark ink on white, like a
    scan or a drawing app would (ignored by ALPHA_FORMATS, which carry the ink in alpha).
    """
    return encode_bytes(digit, fmt, paper=paper), mimetype(fmt)


def png(digit: np.ndarray) -> bytes:
    """A 28x28 uint8 digit as the PNG file a client posts."""
    return encode_bytes(digit, "PNG")


def encode_bytes(digit: np.ndarray, fmt: str, *, paper: bool = False) -> bytes:
    """Like ``encode``, only the bytes."""
    digit = np.asarray(digit, np.uint8)
    pixels = 255 - digit if paper else digit
    gray = Image.fromarray(pixels, "L")
    out = io.BytesIO()
    if fmt == "PNG":
        gray.save(out, "PNG")
    elif fmt == "PNG16":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(out, "PNG")  # full 16-bit range
    elif fmt == "PNG_PALETTE":
        # Indices are not gray levels: index i shows as 255 - i, so the palette must be applied.
        image = Image.fromarray(255 - pixels, "L").convert("P")
        image.putpalette(bytes(v for i in range(256) for v in (255 - i,) * 3))
        image.save(out, "PNG")
    elif fmt == "PNG_PALETTE_ALPHA":
        # Black ink whose coverage is the palette entry's alpha (tRNS), like a GIF-ish sticker.
        image = Image.fromarray(digit, "L").convert("P")
        image.putpalette(bytes(768))
        image.save(out, "PNG", transparency=bytes(range(256)))
    elif fmt in ("PNG_RGBA", "PNG_RGBA_WHITE"):
        _rgba(digit, 255 if fmt == "PNG_RGBA_WHITE" else 0).save(out, "PNG")
    elif fmt == "PNG_LA":
        Image.merge("LA", [Image.new("L", gray.size, 0), Image.fromarray(digit)]).save(out, "PNG")
    elif fmt == "JPEG":
        gray.convert("RGB").save(out, "JPEG", quality=95)
    elif fmt == "JPEG_CMYK":
        # Ink in the K plate: CMYK (0, 0, 0, k) is black for k = 255.
        key = Image.fromarray(255 - pixels, "L")
        zero = Image.new("L", gray.size, 0)
        Image.merge("CMYK", [zero, zero, zero, key]).save(out, "JPEG", quality=95)
    elif fmt == "JPEG_EXIF_ROTATED":
        # Pixels stored rotated 90 degrees counter-clockwise; Orientation 6 says "rotate 90
        # clockwise to display", which gives back the digit.
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = gray.convert("RGB").transpose(Image.Transpose.ROTATE_90)
        stored.save(out, "JPEG", quality=95, exif=exif)
    elif fmt == "MPO":
        first = gray.convert("RGB")
        second = Image.fromarray(255 - pixels, "L").convert("RGB")
        first.save(out, "MPO", save_all=True, append_images=[second], quality=95)
    elif fmt == "GIF":
        # Animated: the second frame is a different picture, only the first one counts.
        second = Image.fromarray(np.roll(255 - pixels, 7, axis=1), "L")
        gray.save(out, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    elif fmt == "BMP":
        gray.save(out, "BMP")
    elif fmt == "WEBP":
        gray.save(out, "WEBP", lossless=True)
    elif fmt == "WEBP_LOSSY":
        gray.save(out, "WEBP", quality=90)
    elif fmt == "TIFF":
        gray.save(out, "TIFF")
    elif fmt == "TIFF16":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(out, "TIFF")
    elif fmt == "TIFF_FLOAT":
        Image.fromarray(pixels.astype(np.float32) / 255, "F").save(out, "TIFF")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return out.getvalue()


def _rgba(digit: np.ndarray, ink: int, size: int | None = None) -> Image.Image:
    """Strokes of colour `ink` whose alpha is the digit's coverage; transparent elsewhere."""
    alpha = Image.fromarray(np.asarray(digit, np.uint8), "L")
    if size is not None:
        alpha = alpha.resize((size, size), Image.BILINEAR)
    colour = np.where(np.asarray(alpha) > 0, ink, 0).astype(np.uint8)  # transparent = (0,0,0,0)
    band = Image.fromarray(colour, "L")
    return Image.merge("RGBA", [band, band, band, alpha])


def canvas_png(digit: np.ndarray, *, white: bool = False, size: int = 280) -> bytes:
    """What a browser canvas exports: size x size RGBA, black (or white) strokes, the
    background fully transparent."""
    out = io.BytesIO()
    _rgba(digit, 255 if white else 0, size).save(out, "PNG")
    return out.getvalue()


def phone_photo(
    digit: np.ndarray,
    rng: np.random.Generator,
    *,
    long_side: int | None = None,
    quality: int = 85,
) -> bytes:
    """A JPEG resembling a phone photo of the digit written on paper.

    Dark blue ink on off-white paper, the digit upscaled to a few hundred pixels and slightly
    off-centre and rotated, a lighting gradient with vignetting, lens blur, sensor noise.
    """
    long_side = long_side or int(rng.integers(400, 1001))
    aspect = rng.uniform(0.7, 1.0)
    landscape = rng.random() < 0.5
    final_size = (long_side, round(long_side * aspect))
    # Rendered at <= 1000 px and upscaled: a 12-megapixel photo stays cheap to make.
    render = min(long_side, 1000)
    short_side = round(render * aspect)
    width, height = (render, short_side) if landscape else (short_side, render)
    if not landscape:
        final_size = final_size[::-1]

    # Ink coverage: the 28x28 field scaled so the digit spans ~40-60% of the short side.
    field = int(short_side * rng.uniform(0.55, 0.85))
    coverage = Image.fromarray(np.asarray(digit, np.uint8), "L").resize(
        (field, field), Image.BICUBIC
    )
    page = Image.new("L", (width, height), 0)
    offset = (
        (width - field) // 2 + int(rng.integers(-1, 2) * 0.05 * width),
        (height - field) // 2 + int(rng.integers(-1, 2) * 0.05 * height),
    )
    page.paste(coverage, offset)
    page = page.rotate(float(rng.uniform(-6, 6)), Image.BICUBIC)
    ink = np.asarray(page, np.float32)[..., None] / 255

    # Lighting: a linear gradient across the page plus vignetting.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height - 0.5, xx / width - 0.5
    gx, gy = rng.uniform(-0.35, 0.35, size=2)
    light = 0.85 + gx * xx + gy * yy - 0.35 * (xx**2 + yy**2)
    light = np.clip(light, 0.4, 1.0)[..., None]

    paper_rgb = np.array([236, 232, 220], np.float32) + rng.uniform(-10, 10, size=3)
    ink_rgb = np.array([28, 36, 92], np.float32) + rng.uniform(-10, 10, size=3)
    rgb = (paper_rgb * (1 - ink) + ink_rgb * ink) * light
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 4, size=(height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    if image.size != final_size:
        image = image.resize(final_size, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Hostile payloads


@functools.lru_cache(maxsize=4)
def zero_png(width: int = 20000, height: int = 20000) -> bytes:
    """An all-black 1-bit PNG, a few kB on disk: 20000x20000 is a decompression bomb.

    Written chunk by chunk so building it never holds the image in memory.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit gray
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed zero bits
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 20) // len(row))
    block = row * rows_per_block
    parts = []
    remaining = height
    while remaining:
        n = min(rows_per_block, remaining)
        parts.append(compressor.compress(block if n == rows_per_block else row * n))
        remaining -= n
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def decompression_bomb() -> bytes:
    """A ~50 kB PNG that would decode to 20000x20000 = 400 megapixels."""
    return zero_png(20000, 20000)


def jpeg_with_scans(extra: int, size: int = 600) -> bytes:
    """A progressive JPEG whose smallest scan is repeated ``extra`` more times before its
    end: each one is another full pass for the decoder (a CPU bomb in a small file)."""
    out = io.BytesIO()
    Image.new("L", (size, size), 255).save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()

    def scan_end(start: int) -> int:  # the next marker: 0xFF but not stuffing (00) or RSTn
        k = start + 2
        while True:
            k = data.index(b"\xff", k)
            if data[k + 1] != 0 and not 0xD0 <= data[k + 1] <= 0xD7:
                return k
            k += 2

    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    smallest = min((data[i : scan_end(i)] for i in starts), key=len)
    return data[:-2] + smallest * extra + data[-2:]  # before the end-of-image marker


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first `keep` share of an encoded image."""
    return data[: max(1, int(len(data) * keep))]


def truncated_png(digit: np.ndarray | None = None) -> bytes:
    """A PNG of the digit (a synthetic 3 by default) cut off in the middle of its pixels."""
    return truncated(encode_bytes(synthetic_digit(3) if digit is None else digit, "PNG"))


def random_bytes(rng: np.random.Generator, size: int = 1024) -> bytes:
    return rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()


def pdf_bytes(digit: np.ndarray) -> bytes:
    """A real one-page PDF showing the digit (Pillow writes PDFs but cannot read them)."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(digit, np.uint8), "L").save(out, "PDF")
    return out.getvalue()


def ico_bytes(digit: np.ndarray) -> bytes:
    """A Windows icon: Pillow decodes it, the service refuses it."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(digit, np.uint8), "L").save(out, "ICO", sizes=[(28, 28)])
    return out.getvalue()


def heic_header() -> bytes:
    """The start of an iPhone HEIC file (ISO-BMFF 'ftyp' box, brand heic): not decodable."""
    return struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64)


# --------------------------------------------------------------------------------------------
# Digits


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): uint8 images (n, rows, cols) or labels (n,)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_dir() -> Path | None:
    """tests/data/mnist-sample if committed, else the full data set next to the checkout."""
    for folder in MNIST_DIRS:
        if (folder / "t10k-images-idx3-ubyte.gz").is_file():
            return folder
    return None


def mnist_sample(limit: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(images uint8 (n, 28, 28), labels (n,)) from the MNIST test split, or None."""
    folder = mnist_dir()
    if folder is None:
        return None
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")[:limit]
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")[:limit]
    return images, labels


# Stroke paths in a 0..1 box, roughly how people write these digits.
_STROKES: dict[int, list[list[tuple[float, float]]]] = {
    0: [[(0.5, 0.0), (0.85, 0.2), (0.9, 0.7), (0.5, 1.0), (0.1, 0.7), (0.15, 0.2), (0.5, 0.0)]],
    1: [[(0.35, 0.2), (0.6, 0.0), (0.6, 1.0)]],
    2: [[(0.1, 0.2), (0.5, 0.0), (0.9, 0.25), (0.1, 1.0), (0.95, 1.0)]],
    3: [[(0.1, 0.1), (0.85, 0.1), (0.4, 0.45), (0.9, 0.7), (0.5, 1.0), (0.1, 0.85)]],
    4: [[(0.7, 1.0), (0.7, 0.0), (0.05, 0.7), (0.95, 0.7)]],
    5: [[(0.9, 0.0), (0.2, 0.0), (0.15, 0.45), (0.8, 0.5), (0.8, 0.9), (0.1, 0.95)]],
    6: [[(0.8, 0.0), (0.2, 0.5), (0.2, 0.95), (0.8, 0.95), (0.8, 0.55), (0.2, 0.55)]],
    7: [[(0.05, 0.0), (0.95, 0.0), (0.35, 1.0)]],
    8: [[(0.5, 0.5), (0.1, 0.2), (0.5, 0.0), (0.9, 0.2), (0.1, 0.8), (0.5, 1.0), (0.9, 0.8)]],
    9: [[(0.8, 0.45), (0.2, 0.45), (0.2, 0.0), (0.8, 0.0), (0.8, 0.45), (0.7, 1.0)]],
}


def synthetic_digit(label: int, *, stroke: float = 0.14) -> np.ndarray:
    """A hand-drawn-looking digit in MNIST form: uint8 28x28, light ink on black, scaled
    to fit 20x20 (area-averaged from 10x) and centred by mass."""
    big = 200
    canvas = Image.new("L", (big + 60, big + 60), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(stroke * big))
    for path in _STROKES[label]:
        points = [(30 + x * big * 0.7 + big * 0.15, 30 + y * big) for x, y in path]
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in points:  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    box = canvas.getbbox()
    crop = canvas.crop(box)
    scale = 20 / max(crop.size)
    small = crop.resize(
        (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BOX
    )
    patch = np.asarray(small, np.float64)
    cy = (patch.sum(axis=1) @ np.arange(patch.shape[0])) / patch.sum()
    cx = (patch.sum(axis=0) @ np.arange(patch.shape[1])) / patch.sum()
    top = min(max(round(14 - cy), 0), 28 - patch.shape[0])
    left = min(max(round(14 - cx), 0), 28 - patch.shape[1])
    out = np.zeros((28, 28), np.uint8)
    out[top : top + patch.shape[0], left : left + patch.shape[1]] = np.asarray(small)
    return out


def synthetic_digits() -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(10, dtype=np.uint8)
    return np.stack([synthetic_digit(int(label)) for label in labels]), labels


def sample_digits(limit: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST test digits if available, else the synthetic ones."""
    sample = mnist_sample(limit)
    return sample if sample is not None else synthetic_digits()
