"""Files that cross a trust boundary, attacked (issue #20): Hypothesis mutates a delta's and an
anchor's values, counts, shapes and metadata, recomputes the checksum as a forger would (it is
unkeyed), and runs the public command line on the result. Every outcome must be a refusal -
exit status 2, one line - or an exact merge of what the file says, whose anchor loads and
scores every image with finite numbers. Signatures are what tell a forger from a site."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_updating import CONFIG, SPEC, D, fake, real, unit

from anchorscan.anchors import checked_file
from anchorscan.anchors.anchor_file import METADATA_KEY as ANCHOR_KEY
from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.calibration import CalibrationRows
from anchorscan.anchors.federation import METADATA_KEY as DELTA_KEY
from anchorscan.anchors.federation import delta_from_bytes, delta_to_bytes, export_delta, merge
from anchorscan.pipelines.cli import main
from helpers import fit_by_hash, update_by_hash

EXAMPLES = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base anchor and one site's delta against it, as files."""
    folder = tmp_path_factory.mktemp("federation")
    base = with_softened_copies(fit_by_hash(SPEC, *real(500, 1, "coordinator"), CONFIG))
    site = update_by_hash(base, *real(300, 10, "site"))
    (folder / "base.safetensors").write_bytes(anchor_to_bytes(base))
    (folder / "site.delta").write_bytes(delta_to_bytes(export_delta(site, base)))
    probe = np.vstack([real(30, 99, "probe")[1], fake(30, 98, unit(2), 3.0)])[:, :D]
    return folder, probe


def with_softened_copies(anchor):
    """The anchor as `fit --alarm_calibration per_level` makes it: its held-out rows' softened
    copies kept (here each level's copy is the photo's own row), so a forger can change them too."""
    rows = anchor.calibration_rows
    levels = len(anchor.forensic.level_names) - 1
    copies = CalibrationRows(rows.keys, np.tile(rows.features, levels))
    config = dataclasses.replace(anchor.config, alarm_calibration="per_level")
    per_level = dataclasses.replace(anchor, config=config, calibration_rows=None)
    return per_level.calibrated_on(CalibrationRows(rows.keys, rows.features, copies))


def unpacked(data: bytes, key: str) -> tuple[dict, dict]:
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][key])
    return dict(safetensors.numpy.load(data)), metadata


def forged(tensors: dict, metadata: dict, key: str) -> bytes:
    """The file a forger writes: any numbers, and the checksum recomputed over them."""
    metadata = {k: v for k, v in metadata.items() if k not in checked_file.UNCHECKED}
    metadata["checksum"] = checked_file.checksum(metadata, tensors)
    return safetensors.numpy.save(tensors, metadata={key: json.dumps(metadata)})


# --- mutations ----------------------------------------------------------------------------------

ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300, -1e300, 1e-300, 2.0**60])
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)


@st.composite
def mutation(draw, tensors: dict, metadata: dict):
    """One change to a file's tensors or metadata, as (description, tensors, metadata)."""
    tensors, metadata = dict(tensors), json.loads(json.dumps(metadata))
    kind = draw(st.sampled_from(["value", "scale", "count", "shape", "drop", "add", "metadata", "layout"]))
    name = draw(st.sampled_from(sorted(tensors)))
    array = np.array(tensors[name])
    if kind == "value" and array.size and array.dtype.kind == "f":
        flat = array.reshape(-1).copy()
        flat[draw(st.integers(0, flat.size - 1))] = draw(ODD_FLOATS)
        tensors[name] = flat.reshape(array.shape)
    elif kind == "scale" and array.dtype.kind == "f":
        tensors[name] = array * draw(st.sampled_from([0.0, -1.0, 1e-300, 1e300, 3.0]))
    elif kind == "count":
        counts_key = "counts" if "counts" in metadata else "moments"
        counted = draw(st.sampled_from(sorted(metadata[counts_key])))
        metadata[counts_key][counted] = draw(
            st.one_of(ODD_VALUES, st.sampled_from([0, 1, 10**9, 1e308, "12", 12.5, -64]))
        )
    elif kind == "shape" and array.ndim:
        tensors[name] = array[: max(0, array.shape[0] - draw(st.integers(1, 2)))]
    elif kind == "drop":
        del tensors[name]
    elif kind == "add":
        tensors[draw(st.sampled_from(["delta.extra.mean", "moments.extra.mean", name + "x"]))] = np.zeros(3)
    elif kind == "metadata":
        field = draw(st.sampled_from(sorted(k for k in metadata if k not in checked_file.UNCHECKED)))
        metadata[field] = draw(ODD_VALUES)
    elif kind == "layout":
        field = draw(st.sampled_from(["d_semantic", "d_statistical", "d_forensic"]))
        metadata["layout"][field] = draw(st.one_of(st.integers(-2, 40), ODD_VALUES))
    return f"{kind} {name}", tensors, metadata


def cli(argv) -> tuple[int, str]:
    error = io.StringIO()
    with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, error.getvalue()


def assert_refused_or_exact(
    description: str, code: int, message: str, base_bytes: bytes, delta_bytes: bytes, output: Path, probe
):
    assert code in (0, 2), f"{description}: {message}"
    if code == 2:
        lines = [line for line in message.splitlines() if not line.startswith("WARNING")]
        assert len(lines) == 1 and "Traceback" not in message, f"{description}: {message}"
        assert not output.exists()
        return
    merged, _ = anchor_from_bytes(output.read_bytes())
    base, _ = anchor_from_bytes(base_bytes)
    expected = merge(base, [delta_from_bytes(delta_bytes)])
    for name, moments in expected.statistics().items():
        got = merged.statistics()[name]
        # the same merge of the same numbers, through the file: float64 written as it is
        assert (
            got.n == moments.n
            and np.array_equal(got.mean, moments.mean)
            and np.array_equal(got.m2, moments.m2)
        )
    scores = merged.assess(probe)
    assert all(
        np.isfinite(scores[column]).all() for column in ("score", "semantic", "statistical", "forensic")
    )


@EXAMPLES
@given(data=st.data())
def test_a_forged_delta_is_refused_or_merged_exactly(files, data):
    folder, probe = files
    base_bytes = (folder / "base.safetensors").read_bytes()
    tensors, metadata = unpacked((folder / "site.delta").read_bytes(), DELTA_KEY)
    description, tensors, metadata = data.draw(mutation(tensors, metadata), label="mutation")
    delta_bytes = forged(tensors, metadata, DELTA_KEY)
    with tempfile.TemporaryDirectory() as scratch:
        delta, output = Path(scratch) / "forged.delta", Path(scratch) / "merged.safetensors"
        delta.write_bytes(delta_bytes)
        code, message = cli(["merge", str(folder / "base.safetensors"), str(delta), "--output", str(output)])
        assert_refused_or_exact(description, code, message, base_bytes, delta_bytes, output, probe)


@EXAMPLES
@given(data=st.data())
def test_a_forged_anchor_is_refused_or_merged_exactly(files, data):
    folder, probe = files
    delta_bytes = (folder / "site.delta").read_bytes()
    tensors, metadata = unpacked((folder / "base.safetensors").read_bytes(), ANCHOR_KEY)
    description, tensors, metadata = data.draw(mutation(tensors, metadata), label="mutation")
    base_bytes = forged(tensors, metadata, ANCHOR_KEY)
    with tempfile.TemporaryDirectory() as scratch:
        base, output = Path(scratch) / "forged.safetensors", Path(scratch) / "merged.safetensors"
        base.write_bytes(base_bytes)
        code, message = cli(["info", str(base)])
        assert code in (0, 2), f"{description}: {message}"
        code, message = cli(["merge", str(base), str(folder / "site.delta"), "--output", str(output)])
        assert_refused_or_exact(description, code, message, base_bytes, delta_bytes, output, probe)
