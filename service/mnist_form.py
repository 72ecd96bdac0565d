"""MNIST's own normalisation of a digit image (LeCun's MNIST page), for what users upload.

``to_mnist`` turns a decoded image of one digit into light ink on a dark background,
scaled to fit a 20x20 box keeping its aspect ratio (anti-aliased) and placed in a 28x28
field with its centre of mass at the centre. Before that it copes with 16-bit and float
images, palettes, transparency (canvas exports), CMYK, dark ink on paper, uneven lighting
and gray paper. A 28x28 image already in MNIST form passes through *unchanged* (no
resampling): the MNIST test set posted over HTTP scores as it does offline. An image
without ink (blank paper, a fully transparent canvas) becomes an all-zero digit.

The module is long (about 400 lines) because it is one pipeline whose steps share
thresholds; each step is a small function with a test of its own.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops

from service import resampling
from service.errors import UnsupportedMediaType

MNIST_SIZE = 28
DIGIT_BOX = 20
# Pixel processing happens on at most WORK_SIZE x WORK_SIZE pixels: 10x the output resolution
# keeps strokes well resolved while a 12-megapixel photo costs the same as a thumbnail.
WORK_SIZE = 10 * MNIST_SIZE
# Transparency means a digital drawing (a canvas or app export, never a photo): its strokes
# are brush-wide and anti-aliased, so half the resolution loses nothing and costs a quarter.
DRAWING_WORK_SIZE = WORK_SIZE // 2
# MNIST's centre of mass, as (row, col) index: it averages (13.99, 14.01) and all 70k digits
# lie within +-0.52 of 14.0 (MNIST shifted by whole pixels). A digit in a 28x28 field that
# close to it is not moved.
_CENTRE = 14.0
_CENTRE_TOLERANCE = 0.55
# Below this, an image is treated as blank: ink must differ from the paper by ~20/255.
_MIN_CONTRAST = 0.08
# Ink level above which no contrast stretch is applied.
_SATURATED = 0.98
_SATURATED_U8 = 252  # the least 8-bit level above 63/64 (see _mnist_form)
# Pixels this bright (ink = 1) seed the digit's bounding box; fainter ones only extend it.
_STRONG = 0.3
# Ink fainter than this does not extend the digit's box: it is noise, or an anti-aliased
# edge too faint to matter once scaled down.
_FAINT = 0.1
# Stroke width in output pixels (2 * area / perimeter of ink >= 0.5): MNIST's median is 1.8,
# its 5th percentile 1.2. Shrunk strokes thinner than _THIN are dilated to about _STROKE.
_THIN = 0.8
_STROKE = 1.8
# Ink spanning fewer pixels than this (at the working resolution) is a speck, not a digit.
_MIN_DIGIT_SIDE = 3
# Images at least this large get a spatially varying background (lighting gradients);
# smaller ones are drawings or already-processed digits: a single level is enough.
_FLATTEN_MIN = 64
_GRID = 8  # background blocks per side
# A run of rows/columns of strong ink lighter than this share of all strong ink, separated
# from the rest by more than a small gap, is a speck (dust, noise), not part of the digit.
_SPECK_MASS = 0.05

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any image of one digit -> float32 (28, 28) in [0, 1], light ink on dark, MNIST-normalised.

    An image with no ink returns all zeros.
    """
    digit = _mnist_digit(image)
    if digit is not None:
        return digit
    gray = _grayscale(image)
    ink = _ink(gray) if gray.size else None
    if ink is None:
        return np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    return _frame(ink)


def _mnist_form(image: Image.Image) -> np.ndarray | None:
    """The ink of an 8-bit 28x28 digit already in MNIST form (black border, saturated
    strokes): exactly what ``_grayscale`` and ``_ink`` return for it, at a fraction of
    their cost; None for any other image."""
    found = _mnist_ink(image)
    return None if found is None else found[0]


def _mnist_ink(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``_mnist_form``'s ink with its row and column maxima (0 where a line is empty)."""
    if image.mode != "L" or image.size != (MNIST_SIZE, MNIST_SIZE) or "transparency" in image.info:
        return None
    return _pixels_ink(np.frombuffer(image.tobytes(), np.uint8).reshape(MNIST_SIZE, MNIST_SIZE))


def _pixels_ink(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    # The ufuncs themselves: ndarray.max/flatnonzero/astype's Python wrappers add 7% here.
    rows, cols = np.maximum.reduce(pixels, axis=1), np.maximum.reduce(pixels, axis=0)
    if rows[0] or rows[-1] or cols[0] or cols[-1]:
        return None  # _ink's one-pixel ring is not all paper: its steps are not the identity
    # _ink_level is the k-th brightest stroke pixel, k <= 1 + drawn // 100, and Otsu's
    # threshold is below 63/64 of the maximum: this many pixels >= 252/255 keep it >= 0.98.
    if np.count_nonzero(pixels >= _SATURATED_U8) < 1 + np.count_nonzero(pixels) // 100:
        return None
    return np.divide(pixels, np.float32(255), dtype=np.float32), rows, cols


def _mnist_digit(image: Image.Image) -> np.ndarray | None:
    """``_frame(_mnist_form(image))`` bit for bit (None where that is None), in a third of
    the numpy calls: the request path for digits already in MNIST form."""
    found = _mnist_ink(image)
    return None if found is None else _placed(*found)


def gray_to_mnist(pixels: np.ndarray) -> np.ndarray:
    """``to_mnist`` of the 8-bit gray image with these uint8 (28, 28) pixels, without a
    Pillow image for one already in MNIST form."""
    found = _pixels_ink(pixels)
    return to_mnist(Image.fromarray(pixels)) if found is None else _placed(*found)


_INDEX = np.arange(MNIST_SIZE)  # row/column numbers, for centres of mass


def _placed(ink: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    on_rows, on_cols = rows.nonzero()[0], cols.nonzero()[0]
    top, bottom, left, right = int(on_rows[0]), int(on_rows[-1]), int(on_cols[0]), int(on_cols[-1])
    if not DIGIT_BOX - 1 <= max(bottom - top, right - left) + 1 <= DIGIT_BOX:
        return _frame(ink)
    # _frame's steps for a digit at MNIST scale in a 28x28 field (kept, not resampled).
    patch = ink[top : bottom + 1, left : right + 1]
    height, width = patch.shape
    mass = float(patch.sum())
    y = _CENTRE - float(np.add.reduce(patch, axis=1) @ _INDEX[:height]) / mass
    x = _CENTRE - float(np.add.reduce(patch, axis=0) @ _INDEX[:width]) / mass
    y = top if abs(y - top) <= _CENTRE_TOLERANCE else round(y)
    x = left if abs(x - left) <= _CENTRE_TOLERANCE else round(x)
    y = min(max(y, 0), MNIST_SIZE - height)
    x = min(max(x, 0), MNIST_SIZE - width)
    if (y, x) == (top, left):
        return ink  # already in place: nothing else is inked
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    out[y : y + height, x : x + width] = patch
    return out


def _percentiles(values: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, q) for finite values (numpy's 'linear' method, bit for bit),
    with one partition of a copy instead of numpy's NaN checks and extra passes."""
    flat = values.ravel()
    n = flat.size
    virtual = (n - 1) * (np.asarray(q, np.float64) / 100)
    below = np.floor(virtual).astype(np.intp)
    above = np.minimum(below + 1, n - 1)
    gamma = virtual - below
    part = np.partition(flat, np.unique(np.concatenate([below, above])))
    low, high = part[below], part[above]
    diff = np.subtract(high, low)
    result = np.add(low, diff * gamma)
    np.subtract(high, diff * (1 - gamma), out=result, where=gamma >= 0.5)
    return result


def _reduction(image: Image.Image, work_size: int) -> int:
    """The integer factor that brings the longer side to at most ~``work_size``."""
    return math.ceil(max(image.size) / work_size) if max(image.size) > work_size else 1


def _grayscale(image: Image.Image) -> np.ndarray:
    """Float32 luminance in [0, 1], transparency composited, at most ~WORK_SIZE per side
    (~DRAWING_WORK_SIZE for a drawing with transparency)."""
    factor = _reduction(image, WORK_SIZE)
    mode = image.mode

    if mode in _HIGH_BIT_MODES:
        return _high_bit(image, factor)

    if mode in _ALPHA_MODES or "transparency" in image.info:
        try:
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        except (ValueError, OSError):
            rgba = None
        if rgba is not None:
            factor = _reduction(image, DRAWING_WORK_SIZE)
            alpha = rgba.getchannel("A")
            # Luminance premultiplied by alpha, each reduced alone: what reducing RGBA
            # (premultiplied by Pillow) gives, in a sixth of the time.
            inked = ImageChops.multiply(rgba.convert("L"), alpha)
            if factor > 1:
                inked, alpha = inked.reduce(factor), alpha.reduce(factor)
            lum_alpha = np.asarray(inked, np.float32) / 255
            return _composite(lum_alpha, np.asarray(alpha, np.float32) / 255)

    gray_image = _to_l(image)
    if factor > 1:
        gray_image = gray_image.reduce(factor)
    return np.asarray(gray_image, np.float32) / 255


def _to_l(image: Image.Image) -> Image.Image:
    if image.mode == "L":
        return image
    for path in (("L",), ("RGB", "L")):
        try:
            converted = image
            for mode in path:
                converted = converted.convert(mode)
            return converted
        except (ValueError, OSError):
            continue
    try:  # exotic modes (LAB, La, ...): the first band is lightness or close to it
        return image.getchannel(0).convert("L")
    except (ValueError, OSError) as exc:
        raise UnsupportedMediaType(f"unsupported pixel mode {image.mode}") from exc


def _high_bit(image: Image.Image, factor: int) -> np.ndarray:
    """16-bit, 32-bit int or float pixels -> [0, 1] by their real bit depth, not by 255,
    reduced by ``factor`` (box average) on the way.

    Strip by strip, ``factor`` rows at a time: a whole-image float64 copy of a small,
    well-compressed 16-bit PNG would cost ~25x the memory of an 8-bit one of as many pixels.
    """
    width, height = image.size
    if not width or not height:
        return np.zeros((height, width), np.float32)
    rows: list[np.ndarray] = []
    low, high = math.inf, -math.inf
    for top in range(0, height, factor):
        strip = np.array(image.crop((0, top, width, min(top + factor, height))))
        if strip.dtype.kind == "f":
            np.nan_to_num(strip, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = min(low, float(strip.min())), max(high, float(strip.max()))
        # float64 sums: float32 data may span +-3e38, whose sums overflow float32.
        sums = np.add.reduceat(strip.sum(axis=0, dtype=np.float64), range(0, width, factor))
        counts = np.diff([*range(0, width, factor), width]) * strip.shape[0]
        rows.append(sums / counts)
    values = np.stack(rows)
    if low >= 0 and high <= 1 and image.mode == "F":
        pass  # float data already in [0, 1]
    elif low >= 0 and high < 2**32:
        # The container (16/32-bit) does not say how many bits are used: a 12-bit sensor or
        # scan stored in 16 bits peaks at 4095. Use the bits the data needs, at least 8,
        # so 16-bit full-range data and 8-bit data kept in 'I' both scale exactly.
        values /= 2 ** max(8, int(high).bit_length()) - 1
    elif high > low:
        values = (values - low) / (high - low)
    else:
        values = np.zeros_like(values)
    return values.astype(np.float32)


def _composite(lum_alpha: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten transparency (luminance premultiplied by alpha) onto a backdrop that
    contrasts with the ink.

    A canvas export is strokes on a fully transparent background; the strokes' colour
    (black or white) decides whether the backdrop is white or black. A mostly opaque
    image has its own background: its transparent bits take that colour.
    """
    if alpha.size == 0 or float(alpha.min()) >= 1.0:
        return lum_alpha
    opaque = alpha > 0.5
    if opaque.mean() > 0.5:
        backdrop = float(np.median(lum_alpha[opaque] / alpha[opaque]))
    else:
        weight = float(alpha.sum())
        if weight == 0:
            return np.zeros_like(lum_alpha)  # fully transparent: nothing drawn
        ink = float(lum_alpha.sum()) / weight
        backdrop = 1.0 if ink < 0.5 else 0.0
    return lum_alpha + np.float32(backdrop) * (1 - alpha)


def _ink(gray: np.ndarray) -> np.ndarray | None:
    """Grayscale -> ink intensity (0 = background, ~1 = stroke core); None if blank.

    Each step is the identity on a clean MNIST digit (black border, ink peaking at 1).
    """
    ring = _ring(gray)
    low, high = float(ring.min()), float(ring.max())
    even = low == high  # a drawing's backdrop, or blank paper
    paper = low if even else float(np.median(ring))
    if _darker_ink(gray, paper):
        gray = 1 - gray

    if min(gray.shape) >= _FLATTEN_MIN:
        # lighting gradients, shadows, gray paper
        ink = gray - _background(gray, float(gray[0, 0]) if even else None)
    else:
        ink = gray - np.float32(np.median(_ring(gray)))

    # Noise floor from the border, which is paper: JPEG artefacts, sensor noise.
    ring = _ring(ink)
    low, high = float(ring.min()), float(ring.max())
    if low == high:  # even paper (drawings): median and spread need no sorting
        floor = low
    else:
        level = float(np.median(ring))
        # The 90th percentile of deviations, as ~1.64 sigma of Gaussian noise: the MAD would
        # be 0 for JPEG noise on a mostly-zero border; MNIST's digits cover at most 5.6% of it.
        spread = float(_percentiles(np.abs(ring - level), (90,))[0]) / 1.645
        floor = level + 3 * spread
    if floor > 0:
        ink = ink - np.float32(floor)
    ink = np.maximum(ink, 0, dtype=np.float32)

    if float(ink.max()) < _MIN_CONTRAST:
        return None
    if _saturated(ink):
        return np.minimum(ink, 1, dtype=np.float32)
    level = _ink_level(ink)
    if level < _MIN_CONTRAST:
        return None
    if level < _SATURATED:
        ink = ink / np.float32(level)
    return np.minimum(ink, 1, dtype=np.float32)


def _darker_ink(gray: np.ndarray, paper: float) -> bool:
    """Whether the ink is darker than the paper: the extremes that differ most from it."""
    low, high = float(gray.min()), float(gray.max())
    # Paper at one end of the range (a drawing's backdrop): the percentiles below would
    # only confirm that the ink lies at the other.
    if paper == high:
        return low < paper
    if paper == low:
        return False
    darkest, brightest = _percentiles(gray, (0.1, 99.9))
    if darkest == brightest:  # tiny digit: fewer ink pixels than the percentile
        darkest, brightest = low, high
    return paper - darkest > brightest - paper


def _saturated(ink: np.ndarray) -> bool:
    """Whether ``_ink_level(ink) >= _SATURATED`` is certain from two counts, for ink in
    [0, 1]: its k-th brightest stroke pixel, k <= 1 + drawn // 100, and Otsu's threshold
    is below 63/64 of the maximum, so this many pixels >= 252/255 keep it >= 0.98."""
    strong = np.count_nonzero(ink >= np.float32(_SATURATED_U8 / 255))
    return strong >= 1 + np.count_nonzero(ink > 0) // 100


def _ink_level(ink: np.ndarray) -> float:
    """The brightest 1% of the ink class (not the max: a hot pixel is no stroke).

    Contrast is stretched so that this is 1, unless it already is >= _SATURATED: that
    holds for every MNIST digit (>= 0.988 over all 70k), which stay untouched.
    """
    # Over the non-zero pixels only, so the answer does not depend on how much empty
    # background surrounds the digit (that makes to_mnist idempotent).
    drawn = ink[ink > 0]
    if drawn.size == 0:
        return 0.0
    strokes = drawn[drawn > _otsu(drawn)]
    if strokes.size == 0:
        return float(drawn.max())
    k = 1 + strokes.size // 100
    return float(np.partition(strokes, -k)[-k])


def _ring(a: np.ndarray) -> np.ndarray:
    """The outer ~3% of the image (at least one pixel): assumed to be background."""
    width = max(1, round(0.03 * min(a.shape)))
    return np.concatenate(
        [
            a[:width].ravel(),
            a[-width:].ravel(),
            a[width:-width, :width].ravel(),
            a[width:-width, -width:].ravel(),
        ]
    )


def _background(gray: np.ndarray, paper: float | None = None) -> np.ndarray | np.float32:
    """Smooth estimate of the background (ink is bright here) to subtract; ``paper``: the
    level of an even border, if it is.

    A low percentile per block of an 8x8 grid ignores strokes crossing a block; a grey
    opening over the grid removes blocks that are mostly ink; bilinear upsampling makes it
    a smooth field that follows lighting gradients.
    """
    height, width = gray.shape
    bh, bw = height // _GRID, width // _GRID
    cropped = gray[: bh * _GRID, : bw * _GRID]
    k = (bh * bw) // 4
    blocks = cropped.reshape(_GRID, bh, _GRID, bw).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(_GRID, _GRID, bh * bw)
    busy = None if paper is None else _busy_blocks(cropped, (bh, bw), k, paper)
    if busy is None:
        grid = np.partition(blocks, k, axis=-1)[..., k]
    else:  # only the blocks where ink may reach the k-th level need partitioning
        grid = np.full((_GRID, _GRID), paper, blocks.dtype)
        if busy.any():
            grid[busy] = np.partition(blocks[busy], k, axis=-1)[:, k]
    if grid.min() != grid.max():  # else: even paper, which the opening leaves as it is
        grid = _grid_filter(_grid_filter(grid, np.minimum), np.maximum)
    if grid.min() == grid.max():  # even paper (a canvas export): the field is that level
        return np.float32(grid.flat[0])
    return resampling.resize(grid.astype(np.float32), (width, height), resampling.BILINEAR)


def _busy_blocks(
    cropped: np.ndarray, block: tuple[int, int], k: int, paper: float
) -> np.ndarray | None:
    """With ``paper`` the lowest level (an even backdrop), the blocks whose k-th smallest
    value may not be ``paper``: those with k or fewer paper pixels. None if it is not."""
    if float(cropped.min()) != paper:
        return None
    bh, bw = block
    on_paper = (cropped == np.float32(paper)).reshape(_GRID, bh, _GRID, bw).sum(axis=(1, 3))
    return on_paper <= k


_EDGE_PADDED = np.ix_(*[np.clip(np.arange(-1, _GRID + 1), 0, _GRID - 1)] * 2)


def _grid_filter(grid: np.ndarray, op: np.ufunc) -> np.ndarray:
    """3x3 min or max filter with edge replication (separable: rows, then columns)."""
    padded = grid[_EDGE_PADDED]  # np.pad(grid, 1, mode="edge") in a tenth of the time
    rows = op(op(padded[:-2], padded[1:-1]), padded[2:])
    return op(op(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


_OTSU_BINS = 64
_EDGE_STEPS = np.arange(_OTSU_BINS + 1, dtype=np.float64)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold between background and ink levels (non-negative floats)."""
    high = float(values.max())
    if high <= 0:
        return 0.0
    hist, edges = _histogram(values.ravel(), high)
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    m1 = m0[-1] - m0
    # Where a class is empty the variance is 0/0: never the threshold (-1).
    both = (w0 > 0) & (w1 > 0)
    safe0, safe1 = np.where(both, w0, 1.0), np.where(both, w1, 1.0)
    between = np.where(both, w0 * w1 * (m0 / safe0 - m1 / safe1) ** 2, -1.0)
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _histogram(flat: np.ndarray, high: float) -> tuple[np.ndarray, np.ndarray]:
    """np.histogram(flat, _OTSU_BINS, (0, high)) for values in [0, high], bit for bit
    (numpy's edges, index and edge corrections) without its checks: a third of the time."""
    edges = (_EDGE_STEPS * (high / _OTSU_BINS)).astype(flat.dtype)  # np.linspace's steps
    edges[-1] = high
    index = (flat * (_OTSU_BINS / high)).astype(np.intp)
    index[index == _OTSU_BINS] -= 1
    index[flat < edges[index]] -= 1
    index[(flat >= edges[index + 1]) & (index != _OTSU_BINS - 1)] += 1
    return np.bincount(index, minlength=_OTSU_BINS), edges


def _frame(ink: np.ndarray) -> np.ndarray:
    """Crop to the digit, fit it in the 20x20 box, centre it by mass in a 28x28 field."""
    # ink >= 0: a line's maximum says whether it is inked, faster than any() on floats
    rows, cols = np.flatnonzero(ink.max(axis=1)), np.flatnonzero(ink.max(axis=0))
    if DIGIT_BOX - 1 <= max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= DIGIT_BOX:
        # Already at MNIST scale: keep all of it, specks included, as MNIST's own box does.
        top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    else:
        top, bottom, left, right = _digit_box(ink)
        if max(bottom - top, right - left) + 1 < _MIN_DIGIT_SIDE:
            return np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)  # a speck: blank
    patch = ink[top : bottom + 1, left : right + 1]
    height, width = patch.shape
    side = max(height, width)
    # A digit already 19-20 px is kept as is: that is every MNIST digit, and resampling would
    # blur it for a sub-pixel size change.
    resampled = not DIGIT_BOX - 1 <= side <= DIGIT_BOX
    if resampled:
        if side > DIGIT_BOX:
            patch = _thicken(patch, DIGIT_BOX / side)
            height, width = patch.shape
            side = max(height, width)
        scale = DIGIT_BOX / side
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # Area averaging is MNIST's anti-aliasing when shrinking; bilinear when enlarging.
        resample = resampling.BOX if scale < 1 else resampling.BILINEAR
        patch = resampling.resize(patch, size, resample)
        patch = np.minimum(np.maximum(patch, 0), 1)  # np.clip, in a fifth of the time
        if float(patch.max()) <= 0:
            return np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
        level = 1.0 if _saturated(patch) else _ink_level(patch)
        if 0 < level < _SATURATED:  # shrinking thin strokes dims them: restore the ink level
            patch = np.minimum(patch / np.float32(level), 1)
        height, width = patch.shape

    mass = float(patch.sum())
    cy = float(patch.sum(axis=1) @ np.arange(height)) / mass
    cx = float(patch.sum(axis=0) @ np.arange(width)) / mass
    # Ideal (fractional) position of the patch, rounded to whole pixels like MNIST did...
    y, x = _CENTRE - cy, _CENTRE - cx
    if resampled or ink.shape != (MNIST_SIZE, MNIST_SIZE):
        y, x = round(y), round(x)
    else:  # ...but a digit already placed within MNIST's leeway stays put.
        y = int(top) if abs(y - top) <= _CENTRE_TOLERANCE else round(y)
        x = int(left) if abs(x - left) <= _CENTRE_TOLERANCE else round(x)
    y = min(max(y, 0), MNIST_SIZE - height)
    x = min(max(x, 0), MNIST_SIZE - width)
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    out[y : y + height, x : x + width] = patch
    return out


def _thicken(patch: np.ndarray, scale: float) -> np.ndarray:
    """Dilate strokes that would end up much thinner than MNIST's once shrunk by `scale`.

    A pen on paper, photographed, gives strokes ~1% of the digit's height: shrunk to 20 px
    they would be faint hairlines, unlike anything the model was trained on.
    """
    width = _stroke_width(patch >= 0.5)
    if width * scale >= _THIN:
        return patch
    size = 1 + round(_STROKE / scale - width)  # a max filter of size n widens strokes by n - 1
    if size < 2:
        return patch
    # Square max filter, separable; the patch grows by size - 1 so no stroke is clipped.
    pad = size - 1
    padded = np.zeros((patch.shape[0] + 2 * pad, patch.shape[1] + 2 * pad), patch.dtype)
    padded[pad:-pad, pad:-pad] = patch  # np.pad's result, without its generality's cost
    rows = padded.shape[0] - size + 1
    out = padded[:rows].copy()
    for shift in range(1, size):
        np.maximum(out, padded[shift : shift + rows], out=out)
    cols = out.shape[1] - size + 1
    result = out[:, :cols].copy()
    for shift in range(1, size):
        np.maximum(result, out[:, shift : shift + cols], out=result)
    return result


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels: 2 * area / boundary length (long thin strokes)."""
    area = np.count_nonzero(mask)
    boundary = np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    boundary += np.count_nonzero(mask[1:] != mask[:-1])
    boundary += np.count_nonzero(mask[:, [0, -1]]) + np.count_nonzero(mask[[0, -1]])
    return 2 * area / boundary if boundary else 0.0


def _digit_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive: strong ink minus specks, grown over faint edges."""
    strong = ink >= _STRONG
    counts = strong.view(np.uint8)  # summed as bytes into int32: half bool's sum's time
    top, bottom = _extent(counts.sum(axis=1, dtype=np.int32))
    left, right = _extent(counts.sum(axis=0, dtype=np.int32))
    # Grow over adjacent non-zero pixels: anti-aliased edges and faint stroke ends belong to
    # the digit; isolated noise beyond a gap does not.
    nz = ink > _FAINT
    rows, cols = nz.shape
    grown = True
    while grown:
        grown = False
        lo, hi = max(left - 1, 0), min(right + 2, cols)
        if top > 0 and nz[top - 1, lo:hi].any():
            top, grown = top - 1, True
        if bottom < rows - 1 and nz[bottom + 1, lo:hi].any():
            bottom, grown = bottom + 1, True
        lo, hi = max(top - 1, 0), min(bottom + 2, rows)
        if left > 0 and nz[lo:hi, left - 1].any():
            left, grown = left - 1, True
        if right < cols - 1 and nz[lo:hi, right + 1].any():
            right, grown = right + 1, True
    return top, bottom, left, right


def _extent(profile: np.ndarray) -> tuple[int, int]:
    """First and last index of the profile's substantial runs (specks dropped)."""
    on = np.flatnonzero(profile)
    if on.size == 0:  # cannot happen for a non-blank image; keep everything
        return 0, len(profile) - 1
    gap = max(2, round(0.04 * len(profile)))
    # Split the non-zero indices into runs separated by more than `gap` empty entries.
    breaks = np.flatnonzero(np.diff(on) > gap + 1)
    if breaks.size == 0:  # one run: nothing to drop
        return int(on[0]), int(on[-1])
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [on.size - 1]])
    cumulative = np.concatenate([[0], np.cumsum(profile[on])])
    masses = cumulative[ends + 1] - cumulative[starts]
    keep = (masses >= _SPECK_MASS * cumulative[-1]) | (masses == masses.max())
    kept = np.flatnonzero(keep)
    return int(on[starts[kept[0]]]), int(on[ends[kept[-1]]])
