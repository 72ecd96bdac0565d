"""service.decoding and service.mnist_form, through the handler's preprocess step:
decoding every upload format, MNIST normalisation, error mapping.

The central promise: a 28x28 digit already in MNIST form goes through bit-exactly, so the
test set posted over HTTP scores like it does offline. Everything else (formats, photos,
canvas exports) must come out close to the digit it shows; any bytes a client can send end
in a 28x28 digit or an ApiError, never in a Pillow/numpy exception.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFile, PngImagePlugin

from service import decoding, handler, mnist_form, resampling
from service.config import Config
from service.decoding import ALLOWED_FORMATS, decode_image
from service.errors import ApiError, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.mnist_form import DIGIT_BOX, MNIST_SIZE, to_mnist
from store.manifest import normalize
from training.data import to_input

from . import images

MEAN, STD = 0.1307, 0.3081
NORM = {"mean": MEAN, "std": STD}
MAX_PIXELS = 40_000_000
FUZZ_MAX_PIXELS = 2_000_000  # mutated headers may declare big images: keep fuzzing cheap
DIGITS, LABELS = images.sample_digits(10)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def preprocess(data: bytes, *, mean: float, std: float, max_pixels: int) -> np.ndarray:
    """One upload through the handler's preprocess step: the model's (1, 28, 28) input."""
    config = Config(MAX_IMAGE_PIXELS=max_pixels)
    return handler.preprocess([data], {"mean": mean, "std": std}, config)[0]


def mnist(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return to_mnist(decode_image(data, max_pixels=max_pixels))


def aligned_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation allowing a 1-pixel shift: centring by mass rounds to whole pixels, so
    two faithful renderings of a digit can sit one pixel apart."""
    b = np.asarray(b, np.float64).ravel()
    return max(
        float(np.corrcoef(np.roll(a, (dy, dx), (0, 1)).ravel(), b)[0, 1])
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    mass = a.sum()
    return (
        float(a.sum(axis=1) @ np.arange(a.shape[0]) / mass),
        float(a.sum(axis=0) @ np.arange(a.shape[1]) / mass),
    )


def ink_box(a: np.ndarray, threshold: float = 0.0) -> tuple[int, int]:
    rows, cols = np.flatnonzero((a > threshold).any(1)), np.flatnonzero((a > threshold).any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def assert_mnist_shaped(out: np.ndarray) -> None:
    assert out.shape == (MNIST_SIZE, MNIST_SIZE)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


# --------------------------------------------------------------------------------------------
# MNIST pass-through


def assert_passes_through(digits: np.ndarray) -> None:
    expected = digits.astype(np.float32) / 255
    changed = []
    for i, digit in enumerate(digits):
        out = to_mnist(Image.fromarray(digit))
        if not np.array_equal(out, expected[i]):
            changed.append((i, float(np.abs(out - expected[i]).max())))
    assert not changed, f"{len(changed)} of {len(digits)} digits changed: {changed[:10]}"


def test_committed_mnist_sample_passes_through_unchanged():
    sample = images.mnist_sample()
    if sample is None:
        pytest.skip("no MNIST sample in tests/data/mnist-sample or ../shared/data/mnist")
    digits, _ = sample
    assert_passes_through(digits)
    # ...and through the bytes a client posts, in both polarities.
    for digit in digits[:50]:
        expected = normalize(digit.astype(np.float32)[None] / 255, NORM)
        for paper in (False, True):
            data = images.encode_bytes(digit, "PNG", paper=paper)
            got = preprocess(data, mean=MEAN, std=STD, max_pixels=MAX_PIXELS)
            np.testing.assert_allclose(got, expected, atol=1e-6)


def test_all_10k_mnist_test_digits_pass_through_unchanged(full_test):
    assert len(full_test) == 10_000
    assert_passes_through(full_test.images)


def general_path(image: Image.Image) -> np.ndarray | None:
    return mnist_form._ink(mnist_form._grayscale(image))


def test_the_mnist_form_fast_path_is_the_general_path_bit_for_bit(full_test):
    taken = 0
    for digit in full_test.images:
        image = Image.fromarray(digit)
        fast = mnist_form._mnist_form(image)
        if fast is not None:
            taken += 1
            np.testing.assert_array_equal(fast, general_path(image))
            np.testing.assert_array_equal(mnist_form._mnist_digit(image), mnist_form._frame(fast))
        else:
            assert mnist_form._mnist_digit(image) is None
            # what a posted 28x28 PNG takes: the fast path, or to_mnist of its image
            np.testing.assert_array_equal(mnist_form.gray_to_mnist(digit), to_mnist(image))
    assert taken >= 0.98 * len(full_test.images)  # measured: 98.7% of all 70k digits


@st.composite
def bordered_digits(draw: st.DrawFn) -> np.ndarray:
    """28x28 8-bit images with a black one-pixel border, from faint to saturated ink."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inner = rng.integers(0, 256, (26, 26)) * (rng.random((26, 26)) < draw(st.floats(0, 1)))
    peak = draw(st.integers(1, 255))
    digit = np.zeros((28, 28), np.uint8)
    digit[1:-1, 1:-1] = np.minimum(inner, peak)
    return digit


@FUZZ
@given(bordered_digits())
def test_the_fast_path_equals_the_general_path_whenever_it_is_taken(digit):
    image = Image.fromarray(digit)
    fast = mnist_form._mnist_form(image)
    if fast is not None:
        np.testing.assert_array_equal(fast, general_path(image))
        np.testing.assert_array_equal(to_mnist(image), mnist_form._frame(fast))
        np.testing.assert_array_equal(mnist_form._mnist_digit(image), mnist_form._frame(fast))


@FUZZ
@given(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=300),
    st.lists(st.floats(0, 100), min_size=1, max_size=3),
)
def test_percentiles_are_numpys_bit_for_bit(values, q):
    array = np.array(values, np.float32)
    np.testing.assert_array_equal(mnist_form._percentiles(array, tuple(q)), np.percentile(array, q))


# Drawings: an even backdrop (0 or 1) with strokes of a few levels, so ties and one-sided
# ranges, where the shortcuts apply, are common.
drawing_pixels = st.integers(8, 40).flatmap(
    lambda side: st.lists(
        st.sampled_from([0.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.99, 0.996]),
        min_size=side * side,
        max_size=side * side,
    ).map(lambda v: np.array(v, np.float32).reshape(side, side))
)


@FUZZ
@given(st.one_of(drawing_pixels, drawing_pixels.map(lambda a: 1 - a)))
def test_ink_darkness_shortcut_is_the_percentile_rule(gray):
    paper = float(np.median(mnist_form._ring(gray)))
    darkest, brightest = np.percentile(gray, (0.1, 99.9))
    if darkest == brightest:
        darkest, brightest = gray.min(), gray.max()
    assert mnist_form._darker_ink(gray, paper) == (paper - darkest > brightest - paper)


@FUZZ
@given(drawing_pixels)
def test_saturation_shortcut_never_skips_a_needed_stretch(ink):
    if mnist_form._saturated(ink):
        assert mnist_form._ink_level(ink) >= mnist_form._SATURATED


@FUZZ
@given(st.integers(64, 160), st.floats(0, 0.9), st.integers(0, 2**32 - 1))
def test_even_paper_background_equals_the_partitioned_one(side, ink_share, seed):
    rng = np.random.default_rng(seed)
    gray = np.where(rng.random((side, side)) < ink_share, rng.random((side, side)), 0)
    gray = gray.astype(np.float32)
    gray[0, :] = gray[-1, :] = gray[:, 0] = gray[:, -1] = 0
    np.testing.assert_array_equal(
        mnist_form._background(gray, 0.0), mnist_form._background(gray, None)
    )


@FUZZ
@given(
    st.tuples(st.integers(1, 120), st.integers(1, 120)),
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.sampled_from([resampling.BOX, resampling.BILINEAR]),
    st.integers(0, 2**32 - 1),
)
def test_resampling_is_pillows_resize_of_float_images(shape, size, resample, seed):
    values = np.random.default_rng(seed).random(shape, np.float32)
    pillow_filter = Image.BOX if resample == resampling.BOX else Image.BILINEAR
    expected = np.asarray(Image.fromarray(values, "F").resize(size, pillow_filter))
    got = resampling.resize(values, size, resample)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=1e-30)


def numpy_otsu(values: np.ndarray) -> float:
    """The threshold as first written, with np.histogram: _otsu must equal it."""
    high = float(values.max())
    if high <= 0:
        return 0.0
    hist, edges = np.histogram(values, bins=64, range=(0.0, high))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    m1 = m0[-1] - m0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


@FUZZ
@given(
    st.lists(st.floats(0, 1, width=32), min_size=1, max_size=400),
    st.sampled_from([np.float32, np.float64]),
)
def test_otsu_is_the_np_histogram_threshold_bit_for_bit(values, dtype):
    array = np.array(values, dtype)
    flat, high = array.ravel(), float(array.max())
    if high > 0:
        counts, edges = mnist_form._histogram(flat, high)
        expected_counts, expected_edges = np.histogram(array, bins=64, range=(0.0, high))
        np.testing.assert_array_equal(counts, expected_counts)
        np.testing.assert_array_equal(edges, expected_edges)
    assert mnist_form._otsu(array) == numpy_otsu(array)


def test_otsu_equals_np_histogram_on_real_ink(sample_test):
    rng = np.random.default_rng(0)
    for digit in sample_test.images[:40]:
        gray = mnist_form._grayscale(Image.open(io.BytesIO(images.canvas_png(digit))))
        ink = mnist_form._ink(gray)
        for values in (ink[ink > 0], rng.random(5000, np.float32) ** 3):
            assert mnist_form._otsu(values) == numpy_otsu(values)


@pytest.mark.slow
def test_all_70k_mnist_digits_pass_through_unchanged():
    folder = Path(os.environ.get("MNIST_DIR") or images.MNIST_DIRS[-1])
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"full MNIST not found in {folder}")
    for stem in ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"):
        assert_passes_through(images.read_idx(folder / stem))


def test_mnist_form_is_a_fixed_point_of_the_pipeline():
    out = to_mnist(Image.fromarray(DIGITS[0]))
    again = to_mnist(Image.fromarray(out, "F"))
    np.testing.assert_array_equal(again, out)


# --------------------------------------------------------------------------------------------
# Upload formats


@pytest.mark.parametrize(
    ("fmt", "paper"),
    [
        pytest.param(fmt, paper, id=f"{fmt}-{'ink-on-paper' if paper else 'ink-on-black'}")
        for fmt in images.FORMATS
        for paper in (False, True)
        if not (paper and fmt in images.ALPHA_FORMATS)  # those carry the ink in alpha
    ],
)
def test_every_format_round_trips(fmt, paper):
    for digit in DIGITS:
        data, mimetype = images.encode(digit, fmt, paper=paper)
        assert mimetype.startswith("image/")
        out = mnist(data)
        assert_mnist_shaped(out)
        if fmt in images.LOSSLESS:
            np.testing.assert_allclose(out, digit / 255, atol=1e-6, err_msg=fmt)
        else:
            assert aligned_corr(out, digit) > 0.98, fmt
            assert np.abs(out - digit / 255).mean() < 0.02, fmt


def test_decoded_formats_and_first_frame():
    digit = DIGITS[3]
    for fmt, expected in [
        ("PNG", "PNG"),
        ("JPEG", "JPEG"),
        ("MPO", "MPO"),
        ("GIF", "GIF"),
        ("BMP", "BMP"),
        ("WEBP", "WEBP"),
        ("TIFF", "TIFF"),
    ]:
        image = decode_image(images.encode_bytes(digit, fmt), max_pixels=MAX_PIXELS)
        assert image.format == expected and image.format in ALLOWED_FORMATS
    gif = Image.open(io.BytesIO(images.encode_bytes(digit, "GIF")))
    assert gif.n_frames == 2  # the second frame differs; only the first one is the digit
    np.testing.assert_allclose(mnist(images.encode_bytes(digit, "GIF")), digit / 255, atol=1e-6)


def test_exif_orientation_is_applied():
    digit = DIGITS[4]
    data = images.encode_bytes(digit, "JPEG_EXIF_ROTATED")
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32)
    assert aligned_corr(stored, digit) < 0.8  # the stored pixels are sideways
    upright = np.asarray(decode_image(data, max_pixels=MAX_PIXELS).convert("L"), np.float32)
    assert aligned_corr(upright, digit) > 0.99


def test_sixteen_bit_and_float_images_scale_by_their_bit_depth():
    digit = DIGITS[5]
    expected = digit / 255
    for array in (
        digit.astype(np.uint16) * 257,  # 16-bit full range ('I;16')
        digit.astype(np.int32) * 257,  # 'I'
        digit.astype(np.int32),  # 8-bit data kept in 'I'
        digit.astype(np.float32),  # 'F' with 0..255
        digit.astype(np.float32) / 255,  # 'F' with 0..1
    ):
        np.testing.assert_allclose(to_mnist(Image.fromarray(array)), expected, atol=1e-6)
    # 12-bit data in a 16-bit container: not 255ths (would saturate), not 65535ths (too dim).
    twelve_bit = Image.fromarray(np.round(digit * (4095 / 255)).astype(np.uint16))
    assert twelve_bit.mode == "I;16"
    np.testing.assert_allclose(to_mnist(twelve_bit), expected, atol=1 / 255)


def test_large_sixteen_bit_images_cost_about_what_eight_bit_ones_do():
    """Reduced strip by strip: no full-size float copy (62 MB here, ~1 GB at the pixel limit)."""
    digit = np.kron(DIGITS[3], np.ones((100, 100), np.uint8))  # 2800 x 2800
    eight = to_mnist(Image.fromarray(digit))
    sixteen = Image.fromarray(digit.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    tracemalloc.start()
    try:
        out = to_mnist(sixteen)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(out, eight, atol=1 / 255)
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB of numpy memory"


def test_cmyk_jpeg():
    digit = DIGITS[6]
    data = images.encode_bytes(digit, "JPEG_CMYK", paper=True)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert aligned_corr(mnist(data), digit) > 0.98


@pytest.mark.parametrize("white", [False, True], ids=["black-strokes", "white-strokes"])
def test_canvas_export_on_transparent_background(white):
    scores = []
    for digit in DIGITS:
        data = images.canvas_png(digit, white=white)
        image = decode_image(data, max_pixels=MAX_PIXELS)
        assert image.mode == "RGBA" and image.size == (280, 280)
        out = to_mnist(image)
        assert_mnist_shaped(out)
        assert max(ink_box(out)) == DIGIT_BOX
        scores.append(aligned_corr(out, digit))
    assert min(scores) > 0.85 and np.mean(scores) > 0.93, scores


def test_transparent_corners_of_an_opaque_picture_take_its_background_colour():
    digit = DIGITS[7]
    paper = Image.fromarray(255 - digit).resize((140, 140), Image.BILINEAR).convert("RGBA")
    alpha = Image.new("L", paper.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, 20, 20), fill=0)  # a transparent corner
    paper.putalpha(alpha)
    out = to_mnist(paper)
    assert aligned_corr(out, digit) > 0.9
    assert out[:3, :3].max() == 0


@FUZZ
@given(st.integers(0, 2**32 - 1), st.sampled_from([(0, 0), (255, 255), (0, 90), (165, 255)]))
def test_drawing_gray_is_pillows_premultiplied_rgba_reduce(seed, colours):
    """_grayscale reduces luminance * alpha and alpha apart: what Pillow's reduce of the RGBA
    image (premultiplied) gives, but for rounding, for dark or light strokes of any colours
    under any alpha (mid-gray ink could go on either backdrop)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(colours[0], colours[1] + 1, (280, 280, 4), dtype=np.uint8)
    pixels[..., 3] = rng.integers(0, 256, (280, 280)) * (rng.random((280, 280)) < 0.4)
    image = Image.fromarray(pixels, "RGBA")
    reduced = image.reduce(2)
    lum = np.asarray(reduced.convert("L"), np.float32) / 255
    alpha = np.asarray(reduced.getchannel("A"), np.float32) / 255
    expected = mnist_form._composite(lum * alpha, alpha)
    np.testing.assert_allclose(mnist_form._grayscale(image), expected, atol=3 / 255)


def test_fully_transparent_canvas_is_blank():
    blank = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    np.testing.assert_array_equal(to_mnist(blank), np.zeros((28, 28), np.float32))


# --------------------------------------------------------------------------------------------
# Photos and drawings


def test_phone_photos_give_a_centred_mnist_digit():
    rng = np.random.default_rng(7)
    scores = []
    for digit in DIGITS:
        data = images.phone_photo(digit, rng)
        assert 400 <= max(Image.open(io.BytesIO(data)).size) <= 1000
        out = preprocess(data, mean=0.0, std=1.0, max_pixels=MAX_PIXELS)[0]
        assert_mnist_shaped(out)
        assert max(ink_box(out)) == DIGIT_BOX
        cy, cx = centre_of_mass(out)
        assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1
        assert out.max() >= 0.98  # contrast stretched: the strokes are ink, not gray
        assert (out < 0.05).mean() > 0.6  # and the paper became background
        scores.append(aligned_corr(out, digit))
    assert min(scores) > 0.7 and np.mean(scores) > 0.85, scores


def test_large_photo_is_fast_and_correct():
    digit = DIGITS[2]
    data = images.phone_photo(digit, np.random.default_rng(3), long_side=4000)
    assert max(Image.open(io.BytesIO(data)).size) == 4000
    preprocess(data, mean=MEAN, std=STD, max_pixels=MAX_PIXELS)  # warm-up
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        out = preprocess(data, mean=0.0, std=1.0, max_pixels=MAX_PIXELS)[0]
        timings.append(time.perf_counter() - start)
    # ~25 ms on an idle core (mostly libjpeg's entropy decoding); generous for busy CI.
    assert min(timings) < 0.25, timings
    assert aligned_corr(out, digit) > 0.8


def test_small_images_are_fast():
    data = images.encode_bytes(DIGITS[1], "PNG")
    timings = []
    for _ in range(50):
        start = time.perf_counter()
        preprocess(data, mean=MEAN, std=STD, max_pixels=MAX_PIXELS)
        timings.append(time.perf_counter() - start)
    assert np.median(timings) < 0.02, np.median(timings)  # ~1 ms idle; generous for CI


def test_thin_pen_strokes_are_thickened_to_mnist_width():
    page = Image.new("RGB", (1500, 2000), (235, 232, 225))
    ImageDraw.Draw(page).line([(500, 600), (1000, 600), (650, 1400)], fill=(30, 30, 80), width=12)
    data = io.BytesIO()
    page.save(data, "JPEG", quality=90)
    out = mnist(data.getvalue())
    assert ink_box(out)[0] == DIGIT_BOX
    assert out.max() == 1.0
    # MNIST's ink mass: ~100 for a 7 (1.8 px strokes); bare hairlines would give ~30.
    assert 50 < out.sum() < 160, out.sum()
    assert aligned_corr(out, images.synthetic_digit(7)) > 0.6


def test_uneven_lighting_and_gray_paper_are_flattened():
    digit = DIGITS[8]
    size = 300
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR), np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size] / size
    paper = 0.35 + 0.45 * xx + 0.1 * yy  # dim gray on the left, bright on the right
    photo = paper * (1 - 0.8 * ink)
    out = to_mnist(Image.fromarray((photo * 255).astype(np.uint8)))
    assert aligned_corr(out, digit) > 0.9
    assert (out == 0).mean() > 0.5


def test_specks_far_from_the_digit_are_ignored():
    digit = DIGITS[9]
    big = np.asarray(Image.fromarray(digit).resize((112, 112), Image.BILINEAR))
    page = np.zeros((200, 200), np.uint8)
    page[40:152, 40:152] = big
    clean = to_mnist(Image.fromarray(page))
    for y, x in [(5, 5), (190, 30), (100, 192), (3, 120)]:
        page[y : y + 2, x : x + 2] = 255
    np.testing.assert_allclose(to_mnist(Image.fromarray(page)), clean, atol=1e-6)
    assert aligned_corr(clean, digit) > 0.95


def test_small_off_centre_digit_is_scaled_and_centred():
    digit = DIGITS[0]
    small = np.asarray(Image.fromarray(digit).resize((14, 14), Image.BOX))
    field = np.zeros((28, 28), np.uint8)
    field[:14, 14:] = small  # top-right corner, half size
    out = to_mnist(Image.fromarray(field))
    assert max(ink_box(out)) == DIGIT_BOX
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 0.55 and abs(cx - 14) <= 0.55
    assert aligned_corr(out, digit) > 0.85  # upscaled from 14 px: blurrier than the original


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (28, 28), 0),
        Image.new("L", (28, 28), 255),
        Image.new("RGB", (640, 480), (200, 190, 170)),
        Image.new("L", (1, 1), 128),
        Image.new("I;16", (40, 30), 30000),
        Image.new("L", (0, 0)),
    ],
    ids=["black", "white", "paper", "1x1", "16-bit-flat", "empty"],
)
def test_blank_images_give_an_all_zero_digit(image):
    np.testing.assert_array_equal(to_mnist(image), np.zeros((28, 28), np.float32))


def specks() -> list[Image.Image]:
    dark_dot = Image.new("L", (500, 500), 255)
    dark_dot.putpixel((250, 250), 0)
    bright_dot = Image.new("L", (28, 28), 0)
    bright_dot.putpixel((10, 12), 255)
    two_by_two = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(two_by_two).rectangle((30, 30, 31, 31), fill=0)
    return [dark_dot, bright_dot, two_by_two]


@pytest.mark.parametrize("image", specks(), ids=["dark-dot", "bright-dot", "2x2-dot"])
def test_a_speck_of_ink_is_no_digit(image):
    np.testing.assert_array_equal(to_mnist(image), np.zeros((28, 28), np.float32))


def test_the_smallest_real_strokes_are_still_digits():
    bar = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(bar).line((14, 12, 14, 14), fill=255)  # a 3-pixel stroke
    assert to_mnist(bar).any()


def test_photo_of_blank_paper_is_blank():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640] / 640
    paper = 200 + 40 * xx - 30 * yy + rng.normal(0, 3, (480, 640))
    out = to_mnist(Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)))
    np.testing.assert_array_equal(out, np.zeros((28, 28), np.float32))


# --------------------------------------------------------------------------------------------
# Hostile and broken input


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = images.decompression_bomb()
    assert len(bomb) < 100_000
    start = time.perf_counter()
    with pytest.raises(PayloadTooLarge):  # over Pillow's own limit too
        decode_image(bomb, max_pixels=MAX_PIXELS)
    with pytest.raises(PayloadTooLarge, match="3000x3000"):  # over ours only
        decode_image(images.zero_png(3000, 3000), max_pixels=1_000_000)
    with pytest.raises(PayloadTooLarge):
        preprocess(bomb, mean=MEAN, std=STD, max_pixels=MAX_PIXELS)
    # Within the pixel limit, but a strip of single-pixel rows decodes slowly: refused too.
    with pytest.raises(PayloadTooLarge, match="no side may exceed"):
        decode_image(images.zero_png(1, 30_001), max_pixels=MAX_PIXELS)
    assert time.perf_counter() - start < 1.0


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(monkeypatch):
    """Each scan of a progressive JPEG is a full decoding pass: 20,000 took 72 s."""
    assert decode_image(images.jpeg_with_scans(90), max_pixels=MAX_PIXELS).size == (600, 600)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(PayloadTooLarge, match="the JPEG has 20006 scans; at most 100"):
        decode_image(images.jpeg_with_scans(20_000), max_pixels=MAX_PIXELS)


def test_image_at_the_pixel_limit_is_decoded():
    data = images.zero_png(1000, 1000)
    assert decode_image(data, max_pixels=1_000_000).size == (1000, 1000)
    with pytest.raises(PayloadTooLarge):
        decode_image(data, max_pixels=999_999)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param(images.EMPTY, InvalidImage, id="empty"),
        pytest.param(images.random_bytes(np.random.default_rng(1)), InvalidImage, id="random"),
        pytest.param(b"hello, world\n", InvalidImage, id="text"),
        pytest.param(b"\x89PNG\r\n\x1a\n garbage", InvalidImage, id="png-signature-garbage"),
        pytest.param(images.truncated_png(), InvalidImage, id="truncated-png"),
        pytest.param(
            images.truncated(images.encode_bytes(DIGITS[0], "JPEG"), 0.5),
            InvalidImage,
            id="truncated-jpeg",
        ),
        pytest.param(
            images.truncated(images.encode_bytes(DIGITS[0], "GIF"), 0.3),
            InvalidImage,
            id="truncated-gif",
        ),
        pytest.param(
            images.truncated(images.encode_bytes(DIGITS[0], "TIFF"), 0.5),
            InvalidImage,
            id="truncated-tiff",
        ),
        pytest.param(images.pdf_bytes(DIGITS[0]), UnsupportedMediaType, id="pdf"),
        pytest.param(images.ico_bytes(DIGITS[0]), UnsupportedMediaType, id="ico"),
        pytest.param(images.heic_header(), UnsupportedMediaType, id="heic"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", UnsupportedMediaType, id="svg"),
    ],
)
def test_bad_payloads_map_to_api_errors(payload, error):
    with pytest.raises(error) as caught:
        preprocess(payload, mean=MEAN, std=STD, max_pixels=MAX_PIXELS)
    assert caught.value.message


def test_refused_formats_are_named():
    for data in (images.ico_bytes(DIGITS[0]), _encode_other(DIGITS[0], "PPM")):
        with pytest.raises(UnsupportedMediaType, match="not supported"):
            decode_image(data, max_pixels=MAX_PIXELS)


def _encode_other(digit: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(digit).save(out, fmt)
    return out.getvalue()


def check_valid_or_api_error(data: bytes) -> None:
    try:
        out = preprocess(data, mean=MEAN, std=STD, max_pixels=FUZZ_MAX_PIXELS)
    except ApiError:
        return
    assert out.shape == (1, MNIST_SIZE, MNIST_SIZE) and out.dtype == np.float32
    assert np.isfinite(out).all()


ENCODED = {
    (fmt, paper): images.encode_bytes(DIGITS[2], fmt, paper=paper)
    for fmt in images.FORMATS
    for paper in (False, True)
}


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_anything_but_api_errors(data):
    check_valid_or_api_error(data)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(sorted(ENCODED.items())))[1])
    for _ in range(draw(st.integers(1, 4))):
        # Headers hold sizes, modes and offsets: aim half of the damage there.
        pos = draw(st.integers(0, min(63, len(data) - 1)) | st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[max(pos, 1) :]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 16))]
        if not data:
            break
    return bytes(data)


@FUZZ
@given(mutated_images())
def test_damaged_images_never_raise_anything_but_api_errors(data):
    check_valid_or_api_error(data)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"]
MODES += ["I;16", "I;16B", "I", "F"]


@st.composite
def random_images(draw: st.DrawFn) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 90)), draw(st.integers(1, 90)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "flat", "shapes"]))
    if kind == "noise":  # raw bytes: NaN/inf floats, negative ints, random palettes
        nbytes = len(Image.new(mode, size).tobytes())
        image = Image.frombytes(mode, size, rng.integers(0, 256, nbytes, np.uint8).tobytes())
    elif kind == "flat":
        image = _convert(Image.new("L", size, int(rng.integers(0, 256))), mode)
    else:
        gray = Image.new("L", size, int(rng.integers(0, 256)))
        draw_ = ImageDraw.Draw(gray)
        for _ in range(int(rng.integers(1, 5))):
            x0, x1 = sorted(rng.integers(0, size[0], 2))
            y0, y1 = sorted(rng.integers(0, size[1], 2))
            draw_.ellipse((x0, y0, x1, y1), outline=int(rng.integers(0, 256)), width=3)
        image = _convert(gray, mode)
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
        if rng.random() < 0.5:
            image.info["transparency"] = int(rng.integers(0, 256))
    return image


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if mode in ("La", "RGBa"):  # premultiplied modes convert only from their straight form
        image = image.convert(mode.upper())
    return image.convert(mode)


@FUZZ
@given(random_images())
def test_any_image_gives_a_valid_digit(image):
    assert_mnist_shaped(to_mnist(image))


@pytest.mark.skipif(decoding.pyspng is None, reason="no libspng wheel for this platform")
@FUZZ
@given(random_images())
def test_libspng_decodes_a_png_to_pillows_pixels(image):
    out = io.BytesIO()
    try:
        image.save(out, "PNG")
    except (OSError, KeyError, ValueError):  # CMYK, LAB, premultiplied...: no PNG of those
        return
    data = out.getvalue()
    by_pillow = Image.open(io.BytesIO(data))
    by_pillow.load()
    fast = decoding._plain_png(decoding.open_image(data, max_pixels=10**7))
    plain = by_pillow.mode in ("L", "RGB", "RGBA") and "transparency" not in by_pillow.info
    assert (fast is not None) == plain, by_pillow.mode
    if fast is not None:
        assert (fast.mode, fast.size, fast.format) == (by_pillow.mode, by_pillow.size, "PNG")
        assert fast.tobytes() == by_pillow.tobytes()


@st.composite
def small_pngs(draw: st.DrawFn) -> bytes:
    """PNGs of MNIST's size and others, gray or not, with the chunks encoders add."""
    digit = DIGITS[draw(st.integers(0, len(DIGITS) - 1))]
    kind = draw(st.sampled_from(["digit", "inverted", "noise", "shifted", "flat"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels = {
        "digit": digit,
        "inverted": 255 - digit,
        "noise": rng.integers(0, 256, (28, 28), np.uint8),
        "shifted": np.roll(digit, int(rng.integers(-8, 9)), axis=int(rng.integers(0, 2))),
        "flat": np.full((28, 28), int(rng.integers(0, 256)), np.uint8),
    }[kind]
    image = Image.fromarray(pixels)
    mode = draw(st.sampled_from(["L", "L", "RGB", "P", "I;16"]))
    image = image.convert(mode) if mode != "I;16" else image.convert("I").convert("I;16")
    if draw(st.booleans()):
        image = image.resize((28, 29) if draw(st.booleans()) else (56, 56))
    options: dict = {}
    extra = draw(st.sampled_from(["none", "text", "transparency", "dpi", "interlace"]))
    if extra == "text":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", "a phone app")
        options["pnginfo"] = info
    elif extra == "transparency":
        options["transparency"] = int(rng.integers(0, 256)) if mode in ("L", "P") else None
    elif extra == "dpi":
        options["dpi"] = (72, 72)
    elif extra == "interlace":
        options["optimize"] = True  # Pillow writes no Adam7; another encoder's file is below
    options = {k: v for k, v in options.items() if v is not None}
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


@pytest.mark.skipif(decoding.pyspng is None, reason="no libspng wheel for this platform")
@FUZZ
@given(small_pngs())
def test_a_28x28_gray_png_skips_pillow_with_pillows_pixels_and_digit(data):
    by_pillow = Image.open(io.BytesIO(data))
    by_pillow.load()
    plain = (
        by_pillow.mode == "L"
        and by_pillow.size == (28, 28)
        and "transparency" not in by_pillow.info
        and not by_pillow.info.get("interlace")
    )
    assert decoding.is_mnist_png(data) == plain, (by_pillow.mode, by_pillow.size, by_pillow.info)
    if plain:
        pixels = decoding.decode_mnist_png(data)
        assert pixels is not None and pixels.tobytes() == by_pillow.tobytes()
        general = to_mnist(decode_image(data, max_pixels=10**7))
        np.testing.assert_array_equal(mnist_form.gray_to_mnist(pixels), general)


def test_a_28x28_png_that_libspng_refuses_is_worded_by_pillow():
    data = images.png(DIGITS[0])
    assert decoding.is_mnist_png(data)
    truncated = data[: len(data) // 2]
    assert decoding.is_mnist_png(truncated) and decoding.decode_mnist_png(truncated) is None
    with pytest.raises(InvalidImage, match="cannot decode image"):
        handler.preprocess([truncated], {"mean": 0.1, "std": 0.3}, Config())
    adam7 = data[:28] + b"\x01" + data[29:]  # IHDR says interlaced: not taken
    assert not decoding.is_mnist_png(adam7)


def test_every_upload_format_decodes_the_same_without_libspng(monkeypatch):
    decoded = {key: decode_image(data, max_pixels=10**7) for key, data in ENCODED.items()}
    monkeypatch.setattr(decoding, "pyspng", None)
    for key, data in ENCODED.items():
        by_pillow = decode_image(data, max_pixels=10**7)
        assert (decoded[key].mode, decoded[key].size) == (by_pillow.mode, by_pillow.size), key
        assert decoded[key].tobytes() == by_pillow.tobytes(), key


@st.composite
def digit_scenes(draw: st.DrawFn) -> Image.Image:
    """MNIST digits at another scale and position, either polarity, in a bigger picture."""
    digit = DIGITS[draw(st.integers(0, len(DIGITS) - 1))]
    side = draw(st.integers(8, 150))
    width, height = draw(st.integers(side, side + 80)), draw(st.integers(side, side + 80))
    scaled = Image.fromarray(digit).resize((side, side), Image.BILINEAR)
    scene = Image.new("L", (width, height), 0)
    scene.paste(scaled, (draw(st.integers(0, width - side)), draw(st.integers(0, height - side))))
    if draw(st.booleans()):
        scene = scene.point(lambda v: 255 - v)
    return scene


@settings(max_examples=60, deadline=None)
@given(digit_scenes())
def test_output_is_in_mnist_form_and_a_fixed_point(scene):
    out = to_mnist(scene)
    assert_mnist_shaped(out)
    assert max(ink_box(out)) in (DIGIT_BOX - 1, DIGIT_BOX)
    cy, cx = centre_of_mass(out)
    # Centred by mass, unless the digit's box had to be kept inside the 28x28 field.
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert abs(cy - 14) <= 0.55 or rows[0] == 0 or rows[-1] == MNIST_SIZE - 1
    assert abs(cx - 14) <= 0.55 or cols[0] == 0 or cols[-1] == MNIST_SIZE - 1
    np.testing.assert_allclose(to_mnist(Image.fromarray(out, "F")), out, atol=1e-6)


# --------------------------------------------------------------------------------------------
# normalize / preprocess


def test_normalize_gives_the_model_input_as_training_does():
    digit = DIGITS[1].astype(np.float32)[None] / 255
    out = normalize(digit, NORM)
    assert out.shape == (1, MNIST_SIZE, MNIST_SIZE) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], (digit[0] - MEAN) / STD, rtol=1e-6)
    # Training's input is the same function, bit for bit (a std of 0 never gets here:
    # the store refuses such a manifest, tests/test_store.py).
    np.testing.assert_array_equal(to_input(DIGITS[1:2], MEAN, STD)[0], out)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "PNG_RGBA", "TIFF16"])
def test_preprocess_is_decode_then_to_mnist_then_normalize(fmt):
    data = images.encode_bytes(DIGITS[3], fmt)
    expected = normalize(mnist(data)[None], NORM)
    np.testing.assert_allclose(
        preprocess(data, mean=MEAN, std=STD, max_pixels=MAX_PIXELS), expected, atol=1e-6
    )


@given(st.integers(1, 12_000), st.integers(1, 12_000))
def test_a_jpeg_is_drafted_to_the_scale_normalisation_would_reduce_it_to(width, height):
    class Header:  # only its size is read
        size = (width, height)

    w, h = decoding._draft_size(Header(), mnist_form.WORK_SIZE)  # type: ignore[arg-type]
    divided = min(width // w, height // h)  # what Pillow's draft computes
    scale = max(s for s in (1, 2, 4, 8) if s <= divided)  # and the scale it asks libjpeg for
    longer, half = max(width, height), mnist_form.WORK_SIZE / 2
    assert scale == 1 or longer / scale > half  # never below what the box reduce would give
    if min(width, height) >= 8:  # a thinner side cannot be divided as far
        assert scale == 8 or longer / (2 * scale) <= half  # and no larger than needed


def test_a_phone_photo_is_decoded_at_a_quarter_of_its_size():
    photo = Image.fromarray(np.full((980, 1100), 200, np.uint8)).convert("RGB")
    out = io.BytesIO()
    photo.save(out, "JPEG")
    decoded = decode_image(out.getvalue(), max_pixels=10**7, min_size=mnist_form.WORK_SIZE)
    assert decoded.size == (275, 245) and decoded.mode == "L"
