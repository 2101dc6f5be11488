"""The decoding DoFn on its own: decodes overlap, yet every URI comes out once, in order, and a
stuck decode costs only its own image."""
from __future__ import annotations

import io
import os
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from PIL import Image
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from anchorscan.transforms import decode as decode_module
from anchorscan.anchors import preprocess
from helpers import write_crops
from anchorscan.transforms.decode import ERRORS, DecodeImageFn


def run_bundle(dofn: DecodeImageFn, uris: list[str]) -> list[tuple[str | None, object]]:
    """(tag, value) of everything one bundle outputs, in output order."""
    dofn.setup()
    dofn.start_bundle()
    outputs = []
    for uri in uris:
        outputs += dofn.process(uri, timestamp=MIN_TIMESTAMP, window=GlobalWindow())
    outputs += dofn.finish_bundle()
    dofn.teardown()
    unwrapped = []
    for output in outputs:
        tag = output.tag if isinstance(output, beam.pvalue.TaggedOutput) else None
        value = output.value if tag else output
        unwrapped.append((tag, getattr(value, "value", value)))  # WindowedValue or plain
    return unwrapped


def uri_of(tag, value) -> str:
    return value["uri"] if tag == ERRORS else value[0].uri


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return [str(path) for path in write_crops(tmp_path_factory.mktemp("crops"), count_per_photo=2, seed=9)]


def test_decoding_ahead_on_threads_gives_what_one_at_a_time_gives(crops):
    missing = "/nonexistent/file.jpg"
    uris = crops[:3] + [missing] + crops[3:]
    serial = dict((uri_of(*output), output) for output in run_bundle(DecodeImageFn(224), uris))
    ahead = run_bundle(DecodeImageFn(224, threads=2, ahead=5), uris)
    assert sorted(uri_of(*output) for output in ahead) == sorted(serial) == sorted(uris)
    for tag, value in ahead:
        if tag == ERRORS:
            assert value == serial[missing][1] and "not found" in value["error"]
        else:
            assert value[0] == serial[value[0].uri][1][0]
            assert np.array_equal(value[1], serial[value[0].uri][1][1])


def test_decodes_run_at_the_same_time(crops, monkeypatch):
    running, most = set(), [0]
    lock = threading.Lock()
    real_decode = decode_module.decode_and_crop

    def counting_decode(data, *args):
        with lock:
            running.add(threading.get_ident())
            most[0] = max(most[0], len(running))
        time.sleep(0.05)
        try:
            return real_decode(data, *args)
        finally:
            with lock:
                running.discard(threading.get_ident())

    monkeypatch.setattr(decode_module, "decode_and_crop", counting_decode)
    run_bundle(DecodeImageFn(224, threads=3, ahead=6), crops)
    assert most[0] == 3


def test_a_stuck_decode_times_out_alone_while_queued_ones_finish(crops, monkeypatch):
    stuck = open(crops[0], "rb").read()
    release = threading.Event()
    real_decode = decode_module.decode_and_crop

    def hanging_decode(data, *args):
        if data == stuck:
            release.wait(30)
        return real_decode(data, *args)

    monkeypatch.setattr(decode_module, "decode_and_crop", hanging_decode)
    # One thread: the images queued behind the stuck one must move to a fresh thread, and the
    # time they spent waiting must not count against them.
    started = time.monotonic()
    outputs = run_bundle(DecodeImageFn(224, decode_timeout=1.0, threads=1, ahead=4), crops[:5])
    release.set()
    assert time.monotonic() - started < 10
    assert [uri_of(*output) for output in outputs] == crops[:5]
    assert outputs[0][0] == ERRORS and "--decode_timeout 1" in outputs[0][1]["error"]
    assert all(tag is None for tag, _ in outputs[1:])


def test_a_retried_bundle_drops_what_the_failed_attempt_left_in_flight(crops):
    dofn = DecodeImageFn(224, threads=2, ahead=8)
    dofn.setup()
    dofn.start_bundle()
    for uri in crops[:3]:
        assert list(dofn.process(uri, timestamp=MIN_TIMESTAMP, window=GlobalWindow())) == []
    dofn.start_bundle()  # the runner retries the bundle on this instance
    for uri in crops[3:5]:
        list(dofn.process(uri, timestamp=MIN_TIMESTAMP, window=GlobalWindow()))
    flushed = list(dofn.finish_bundle())
    dofn.teardown()
    assert [output.value[0].uri for output in flushed] == crops[3:5]


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


@pytest.fixture
def turbo_required():
    if preprocess._turbojpeg() is None:
        message = "libturbojpeg is not installed (.ci/run installs libturbojpeg0)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


JPEG_VARIANTS = {
    "4:2:0": {"subsampling": 2}, "4:2:2": {"subsampling": 1}, "4:4:4": {"subsampling": 0},
    "progressive": {"progressive": True}, "optimized, quality 60": {"optimize": True, "quality": 60},
    "restart markers": {"restart_marker_rows": 1},
}


@pytest.mark.parametrize("variant", JPEG_VARIANTS)
@pytest.mark.parametrize("shape", [(3000, 4000), (257, 231), (224, 225), (1201, 225)])
def test_jpeg_region_decode_gives_the_full_decodes_pixels(turbo_required, monkeypatch, variant, shape):
    rng = np.random.default_rng(sum(shape))
    smooth = np.kron(rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3)), np.ones((8, 8, 1)))
    pixels = np.clip(smooth[:shape[0], :shape[1]] + rng.normal(0, 12, (*shape, 3)), 0, 255).astype(np.uint8)
    data = _jpeg(pixels, **JPEG_VARIANTS[variant])
    region = preprocess._jpeg_center_crop(data, shape[1], shape[0], 224)
    assert region is not None  # the fast path is taken, so the comparison below means something
    fast = preprocess.decode_and_crop(data, 224)
    monkeypatch.setattr(preprocess, "_jpeg_center_crop", lambda *args: None)
    whole = preprocess.decode_and_crop(data, 224)
    assert np.array_equal(fast.pixels, whole.pixels) and np.array_equal(region, whole.pixels)
    assert (fast.width, fast.height, fast.preprocess) == (whole.width, whole.height, whole.preprocess)


def test_jpegs_the_region_decode_leaves_to_pil(turbo_required):
    pixels = np.random.default_rng(0).integers(0, 256, (300, 320, 3), dtype=np.uint8)
    data = _jpeg(pixels)
    assert preprocess._jpeg_center_crop(data[:-2000], 320, 300, 224) is None  # truncated
    with pytest.raises(preprocess.DecodeError, match="truncated"):
        preprocess.decode_and_crop(data[:-2000], 224)
    gray = _jpeg(pixels[..., 0])
    assert preprocess._jpeg_center_crop(gray, 320, 300, 224) is None
    assert preprocess.decode_and_crop(gray, 224).preprocess == "gray_to_rgb+center_crop"
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, format="JPEG")
    assert preprocess._jpeg_center_crop(cmyk.getvalue(), 320, 300, 224) is None
    assert preprocess.decode_and_crop(cmyk.getvalue(), 224).preprocess == "cmyk_to_rgb+center_crop"


def test_without_libturbojpeg_jpegs_decode_whole(monkeypatch):
    import turbojpeg

    def missing_library(*args):
        raise RuntimeError("Unable to locate turbojpeg library automatically")

    monkeypatch.setattr(turbojpeg, "TurboJPEG", missing_library)
    preprocess._turbojpeg.cache_clear()
    try:
        assert preprocess._turbojpeg() is None
        pixels = np.random.default_rng(1).integers(0, 256, (300, 320, 3), dtype=np.uint8)
        crop = preprocess.decode_and_crop(_jpeg(pixels), 224)
        assert crop.pixels.shape == (224, 224, 3) and crop.preprocess == "center_crop"
    finally:
        preprocess._turbojpeg.cache_clear()  # later tests find the real library again
