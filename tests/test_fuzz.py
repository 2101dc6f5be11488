"""The decoder under mutation fuzzing (tests/fuzz.py), through the same worker processes and
decode function as a scan: every mutant decodes or becomes an error, none escapes the decoder's
error handling, crashes its process or runs past its timeout. A bounded, seeded run in CI;
longer by hand (ANCHORSCAN_FUZZ_CASES, ANCHORSCAN_FUZZ_SEED). Every escape found is kept in
tests/data/decode_regressions/ and checked below."""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import pytest

from anchorscan.anchors.images.decode import DecodeError, decode_and_crop
from anchorscan.anchors.images.decoder_pool import DecodeFailed, DecoderPool
from fuzz import FUZZ_CROP, FUZZ_MAX_PIXELS, FUZZ_MIN_SIDE, cases

CASES = int(os.environ.get("ANCHORSCAN_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("ANCHORSCAN_FUZZ_SEED", "0"))
# Each case is a file of a few KB at most 4 MP: milliseconds when all is well.
CASE_TIMEOUT = 10.0
REGRESSIONS = pathlib.Path(__file__).parent / "data" / "decode_regressions"
DECODE = functools.partial(
    decode_and_crop, size=FUZZ_CROP, max_pixels=FUZZ_MAX_PIXELS, min_side=FUZZ_MIN_SIDE
)


def test_mutants_decode_or_become_error_rows(tmp_path):
    pool = DecoderPool(DECODE, processes=2, timeout=CASE_TIMEOUT)
    failures, decoded = {}, 0
    try:
        jobs = [(name, data, pool.submit(data)) for name, data in cases(CASES, SEED)]
        for name, data, job in jobs:
            try:
                crop = pool.result(job)
            except DecodeFailed as error:
                if error.escaped or error.error_type in ("TimeoutError", "DecoderCrash"):
                    failures[name] = (data, f"{error.error_type}: {error}")
                continue
            assert crop.pixels.shape == (FUZZ_CROP, FUZZ_CROP, 3) and crop.pixels.dtype == np.uint8
            decoded += 1
    finally:
        pool.close()
    keep = pathlib.Path(os.environ.get("ANCHORSCAN_FUZZ_ESCAPES", tmp_path))
    for name, (data, _) in failures.items():
        (keep / f"{name}.bin").write_bytes(data)
    assert not failures, (
        f"{len(failures)} of {CASES} mutants escaped (written to {keep}; keep "
        f"each as a regression file in {REGRESSIONS}): "
        + "; ".join(f"{name}: {why}" for name, (_, why) in failures.items())
    )
    assert 0 < decoded < CASES  # the mutations are neither all harmless nor all fatal


@pytest.mark.parametrize("path", sorted(REGRESSIONS.iterdir()), ids=lambda path: path.name)
def test_escapes_found_by_fuzzing_are_decoded_or_refused(path):
    """Files on which the decoder once raised past its error handling (the exception it raised
    is in the file's name)."""
    try:
        crop = DECODE(path.read_bytes())
    except DecodeError as error:
        assert str(error).startswith("cannot decode image")
    else:
        assert crop.pixels.shape == (FUZZ_CROP, FUZZ_CROP, 3)
