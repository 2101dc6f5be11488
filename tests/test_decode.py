"""The read and decode DoFns and the decoder's worker processes on their own: decodes overlap,
yet every URI comes out once, in order; a stuck decode, a crashed decoder or a stalled read
costs only its own image."""

from __future__ import annotations

import io
import os
import pathlib
import re
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from PIL import Image

from anchorscan.anchors.forensic import extra_tiles
from anchorscan.anchors.images import decode as preprocess
from anchorscan.anchors.images.decoder_pool import DecodeFailed, DecoderPool
from anchorscan.anchors.io import sources
from anchorscan.anchors.io.sources import ReadLimits, Unit
from anchorscan.transforms import read as read_module
from anchorscan.transforms.decode import ERRORS, DecodeImageFn, DecodeSettings
from anchorscan.transforms.read import ReadFn
from helpers import decode_that_sleeps, write_crops
from hostile import slow_jpeg


def unwrapped(output) -> tuple[str | None, object]:
    tag = output.tag if isinstance(output, beam.pvalue.TaggedOutput) else None
    value = output.value if tag else output
    return tag, getattr(value, "value", value)  # WindowedValue or plain


def records(uris: list[str], limits: ReadLimits | None = None) -> list:
    """What the read step makes of ``uris``: records and error rows (tagged), in order."""
    read = ReadFn(limits or ReadLimits())
    read.setup()
    return [output for uri in uris for output in read.process(Unit(uri))]


def run_bundle(dofn: DecodeImageFn, uris: list[str]) -> list[tuple[str | None, object]]:
    """(tag, value) of everything the read step and one bundle of ``dofn`` output, in order."""
    dofn.setup()
    dofn.start_bundle()
    outputs = []
    for item in records(uris):
        if isinstance(item, beam.pvalue.TaggedOutput):
            outputs.append(item)
        else:
            outputs += dofn.process(item, timestamp=MIN_TIMESTAMP, window=GlobalWindow())
    outputs += dofn.finish_bundle()
    dofn.teardown()
    return [unwrapped(output) for output in outputs]


def uri_of(tag, value) -> str:
    return value["uri"] if tag == ERRORS else value[0].uri


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return [str(path) for path in write_crops(tmp_path_factory.mktemp("crops"), count_per_photo=2, seed=9)]


def test_decoding_ahead_in_processes_gives_what_one_at_a_time_gives(crops):
    missing = "/nonexistent/file.jpg"
    uris = crops[:3] + [missing] + crops[3:]
    serial = dict(
        (uri_of(*output), output) for output in run_bundle(DecodeImageFn(DecodeSettings(224)), uris)
    )
    ahead = run_bundle(DecodeImageFn(DecodeSettings(224, processes=2, ahead=5)), uris)
    assert sorted(uri_of(*output) for output in ahead) == sorted(serial) == sorted(uris)
    for tag, value in ahead:
        if tag == ERRORS:
            assert value == serial[missing][1] and "not found" in value["error"]
            assert value["error_type"] == "FileNotFoundError"
        else:
            assert value[0] == serial[value[0].uri][1][0]
            assert np.array_equal(value[1], serial[value[0].uri][1][1])


def test_decodes_run_at_the_same_time_in_separate_processes():
    pool = DecoderPool(decode_that_sleeps, processes=3, timeout=30)
    try:
        jobs = [pool.submit(bytes([3])) for _ in range(6)]
        spans = [pool.result(job) for job in jobs]
    finally:
        pool.close()
    assert len({pid for pid, _, _ in spans}) == 3 and os.getpid() not in {pid for pid, _, _ in spans}
    most = max(sum(start <= moment < end for _, start, end in spans) for _, moment, _ in spans)
    assert most == 3


def test_a_decode_past_its_timeout_is_killed_and_its_process_replaced():
    pool = DecoderPool(decode_that_sleeps, processes=2, timeout=0.5)
    try:
        stuck = pool.submit(bytes([200]))  # 20 s
        quick = [pool.submit(bytes([1])) for _ in range(4)]
        [stuck_process] = [worker.process for worker in pool._workers if worker.job is stuck]
        started = time.monotonic()
        with pytest.raises(DecodeFailed, match=re.escape("longer than --decode_timeout 0.5 s")) as failed:
            pool.result(stuck)
        # The stuck decode would sleep 20 s; its timeout ends it at 0.5 s, plus the start of a
        # fresh decoder process (seconds on a loaded machine): 15 s is between the two.
        assert time.monotonic() - started < 15 and failed.value.error_type == "TimeoutError"
        assert stuck_process.poll() is not None  # killed, not left to run
        assert all(pool.result(job)[0] != stuck_process.pid for job in quick)
        assert len(pool._workers) == 2 and all(worker.process.poll() is None for worker in pool._workers)
    finally:
        pool.close()


def test_a_decoder_that_crashes_costs_its_own_image_only():
    pool = DecoderPool(decode_that_sleeps, processes=1, timeout=30)
    try:
        crash, after = pool.submit(b"crash"), pool.submit(bytes([1]))
        with pytest.raises(DecodeFailed, match=r"the decoder crashed \(signal SIGSEGV\)") as failed:
            pool.result(crash)
        assert failed.value.error_type == "DecoderCrash"
        assert pool.result(after)[0] != os.getpid()
    finally:
        pool.close()


def test_a_stuck_decode_times_out_alone_while_queued_ones_finish(crops, tmp_path):
    stuck = tmp_path / "40000-empty-scans.jpg"
    stuck.write_bytes(slow_jpeg())
    uris = [str(stuck)] + crops[:4]
    # One process: the images queued behind the stuck one must go to a fresh process, and the
    # time they spent waiting must not count against them.
    started = time.monotonic()
    settings = DecodeSettings(224, decode_timeout=1.0, processes=1, ahead=4)
    outputs = run_bundle(DecodeImageFn(settings), uris)
    # The hostile JPEG decodes for minutes; the 1 s timeout and a fresh decoder process end it in
    # seconds, whatever the load: 60 s of margin, still far below minutes.
    assert time.monotonic() - started < 60
    assert [uri_of(*output) for output in outputs] == uris
    assert outputs[0][0] == ERRORS and "--decode_timeout 1 s" in outputs[0][1]["error"]
    assert all(tag is None for tag, _ in outputs[1:])


def test_a_retried_bundle_drops_what_the_failed_attempt_left_in_flight(crops):
    dofn = DecodeImageFn(DecodeSettings(224, processes=2, ahead=8))
    dofn.setup()
    dofn.start_bundle()
    for record in records(crops[:3]):
        assert list(dofn.process(record, timestamp=MIN_TIMESTAMP, window=GlobalWindow())) == []
    dofn.start_bundle()  # the runner retries the bundle on this instance
    for record in records(crops[3:5]):
        list(dofn.process(record, timestamp=MIN_TIMESTAMP, window=GlobalWindow()))
    flushed = list(dofn.finish_bundle())
    dofn.teardown()
    assert [output.value[0].uri for output in flushed] == crops[3:5]


def test_a_fifo_is_an_error_row_found_before_any_open(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    [(tag, row)] = [unwrapped(output) for output in records([str(fifo)], ReadLimits(read_timeout=5))]
    assert tag == ERRORS and row["stage"] == "read" and row["error_type"] == "ReadError"
    assert row["error"] == "a named pipe (FIFO), not a file: not opened (reading it could wait forever)"


def test_a_read_past_its_timeout_is_an_error_row_and_stuck_reads_are_capped(crops, monkeypatch):
    release = threading.Event()
    real_read = sources.read_limited

    def stalled_read(uri, max_bytes, http):
        if uri.startswith("/stalled/"):
            release.wait(60)
        return real_read(uri, max_bytes, http)

    monkeypatch.setattr(sources, "read_limited", stalled_read)
    cap = read_module.MAX_STUCK_READS
    read = ReadFn(ReadLimits(read_timeout=0.2))
    read.setup()
    started = time.monotonic()
    errors = [
        output.value["error"] for i in range(cap + 2) for output in read.process(Unit(f"/stalled/{i}.jpg"))
    ]
    # Past the cap, reads are refused at once: no wait of 0.2 s each (the 2 s margin absorbs a
    # loaded machine's scheduling; a read that waited would take 0.2 s more each).
    assert time.monotonic() - started < 0.2 * cap + 2
    timed_out = "reading took longer than --read_timeout 0.2 s (a stalled disk or network?)"
    refused = (
        f"not read: {cap} earlier reads on this worker are stuck past --read_timeout "
        "(the storage is not answering)"
    )
    assert errors == [timed_out] * cap + [refused] * 2
    release.set()  # the storage answers again: once the stuck reads end, reads go on
    deadline = time.monotonic() + 30
    while not all(done.is_set() for done in read._stuck) and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = list(read.process(Unit(crops[0])))
    assert record.uri == crops[0] and record.data == pathlib.Path(crops[0]).read_bytes()


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
    "4:2:0": {"subsampling": 2},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "progressive": {"progressive": True},
    "optimized, quality 60": {"optimize": True, "quality": 60},
    "restart markers": {"restart_marker_rows": 1},
}


@pytest.mark.parametrize("variant", JPEG_VARIANTS)
@pytest.mark.parametrize("shape", [(3000, 4000), (257, 231), (224, 225), (1201, 225)])
def test_jpeg_region_decode_gives_the_full_decodes_pixels(turbo_required, monkeypatch, variant, shape):
    rng = np.random.default_rng(sum(shape))
    smooth = np.kron(rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3)), np.ones((8, 8, 1)))
    pixels = np.clip(smooth[: shape[0], : shape[1]] + rng.normal(0, 12, (*shape, 3)), 0, 255).astype(np.uint8)
    data = _jpeg(pixels, **JPEG_VARIANTS[variant])
    region = preprocess._jpeg_crops(data, shape[1], shape[0], 224, _corners(shape[1], shape[0]))
    assert region is not None  # the fast path is taken, so the comparison below means something
    fast = preprocess.decode_and_crop(data, 224)
    monkeypatch.setattr(preprocess, "_jpeg_crops", lambda *args: None)
    whole = preprocess.decode_and_crop(data, 224)
    # the forensic channel's tiles too (5 on 4000 x 3000, 3 on 225 x 1201)
    assert np.array_equal(fast.stack(), whole.stack()) and np.array_equal(np.stack(region), whole.stack())
    assert (fast.width, fast.height, fast.preprocess) == (whole.width, whole.height, whole.preprocess)


@pytest.mark.parametrize(
    ("width", "height", "count"),
    [(256, 256, 0), (447, 1000, 2), (448, 448, 4), (640, 427, 2), (768, 512, 4), (4000, 3000, 4)],
)
def test_the_forensic_tiles_are_bounded_aligned_and_near_the_centre(width, height, count):
    left, top = (width - 224) // 2, (height - 224) // 2
    tiles = extra_tiles(width, height, 224)
    assert len(tiles) == count and len(set(tiles)) == count and (left, top) not in tiles
    for x, y in tiles:
        assert 0 <= x <= width - 224 and 0 <= y <= height - 224
        assert (x - left) % 4 == 0 and (y - top) % 4 == 0  # the spreads' pixel classes line up
        assert abs(x - left) <= 227 and abs(y - top) <= 227  # in the 3 x 3 crops around the centre
    assert extra_tiles(width, height, 224) == tiles  # deterministic


def test_a_large_image_decodes_to_its_centre_crop_and_tiles(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    crop = preprocess.decode_and_crop(buffer.getvalue(), 224)
    corners = _corners(768, 512)
    assert crop.stack().shape == (5, 224, 224, 3) and crop.preprocess == "center_crop"
    for tile, (left, top) in zip(crop.stack(), corners):
        np.testing.assert_array_equal(tile, pixels[top : top + 224, left : left + 224])
    # resized images have one crop: no native pixels to tile
    assert preprocess.decode_and_crop(buffer.getvalue(), 224, resize="shorter_side").stack().shape[0] == 1
    small = io.BytesIO()
    Image.fromarray(pixels[:200, :300]).save(small, "PNG")
    assert preprocess.decode_and_crop(small.getvalue(), 224).stack().shape == (1, 224, 224, 3)
    # perturbed (evaluate --perturbation): the perturbed image's tiles
    blurred = preprocess.decode_and_crop(buffer.getvalue(), 224, perturbation="blur:1")
    assert blurred.stack().shape == (5, 224, 224, 3)


def _corners(width: int, height: int) -> list[tuple[int, int]]:
    return [((width - 224) // 2, (height - 224) // 2), *extra_tiles(width, height, 224)]


def test_jpegs_the_region_decode_leaves_to_pil(turbo_required):
    pixels = np.random.default_rng(0).integers(0, 256, (300, 320, 3), dtype=np.uint8)
    data = _jpeg(pixels)
    assert preprocess._jpeg_crops(data[:-2000], 320, 300, 224, _corners(320, 300)) is None  # truncated
    with pytest.raises(preprocess.DecodeError, match="truncated"):
        preprocess.decode_and_crop(data[:-2000], 224)
    gray = _jpeg(pixels[..., 0])
    assert preprocess._jpeg_crops(gray, 320, 300, 224, _corners(320, 300)) is None
    assert preprocess.decode_and_crop(gray, 224).preprocess == "gray_to_rgb+center_crop"
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, format="JPEG")
    assert preprocess._jpeg_crops(cmyk.getvalue(), 320, 300, 224, _corners(320, 300)) is None
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
