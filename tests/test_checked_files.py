"""Anchor and head files are refused, with a message that says why, when damaged, truncated,
foreign or from another format version; neither reader takes the other's file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import anchorscan.anchors.anchor_file as anchor_file
import anchorscan.anchors.heads as heads
from anchorscan.anchors import checked_file
from helpers import D_FORENSIC, fit_synthetic_anchor, synthetic_spec

DS, DM = 6, 9


@dataclasses.dataclass
class FileKind:
    module: object  # holds FORMAT_VERSION
    write: object  # () -> bytes
    read: object  # bytes -> object
    error: type


def _features(n, seed=0):
    rng = np.random.default_rng(seed)
    width = DS + DM + D_FORENSIC
    return 5.0 + rng.normal(size=(n, width)) @ rng.normal(size=(width, width))


def _anchor_bytes():
    return anchor_file.anchor_to_bytes(fit_synthetic_anchor(synthetic_spec(DS, DM), _features(400), 300))


def _head_bytes():
    data = _features(200)
    labels = np.r_[np.zeros(100, dtype=int), np.ones(100, dtype=int)]
    return heads.NearestNeighbourHead.fit(synthetic_spec(DS, DM), data, labels, k=3).to_bytes()


KINDS = {
    "anchor": FileKind(
        anchor_file, _anchor_bytes, anchor_file.anchor_from_bytes, anchor_file.AnchorFileError
    ),
    "head": FileKind(heads, _head_bytes, heads.head_from_bytes, heads.HeadFileError),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return request.param, KINDS[request.param]


def test_a_tampered_tensor_is_refused_by_checksum(kind):
    _, file_kind = kind
    tampered = bytearray(file_kind.write())
    tampered[-3] ^= 0x01  # inside the last tensor's bytes
    with pytest.raises(file_kind.error, match="checksum"):
        file_kind.read(bytes(tampered))


@pytest.mark.parametrize("cut", [0.5, 0.001])
def test_a_truncated_file_is_refused(kind, cut):
    _, file_kind = kind
    data = file_kind.write()
    with pytest.raises(file_kind.error):
        file_kind.read(data[: int(len(data) * cut)])


@pytest.mark.parametrize("junk", [b"", np.random.default_rng(2).bytes(4096), b"\x08" + b"\0" * 7 + b"{}"])
def test_foreign_bytes_are_refused(kind, junk):
    name, file_kind = kind
    with pytest.raises(file_kind.error, match=f"not an anchorscan {name}"):
        file_kind.read(junk)


def test_another_format_version_is_refused_naming_it(kind, monkeypatch):
    _, file_kind = kind
    future_version = file_kind.module.FORMAT_VERSION + 1
    monkeypatch.setattr(file_kind.module, "FORMAT_VERSION", future_version)
    future = file_kind.write()
    monkeypatch.undo()
    with pytest.raises(file_kind.error, match=f"version {future_version}"):
        file_kind.read(future)


def test_neither_reader_takes_the_other_kind(kind):
    name, file_kind = kind
    other = KINDS["head" if name == "anchor" else "anchor"]
    with pytest.raises(file_kind.error, match=f"not an anchorscan {name}"):
        file_kind.read(other.write())


def test_every_file_starts_with_the_same_header(kind):
    name, file_kind = kind
    metadata = checked_file.read_metadata(
        file_kind.write(),
        file_kind.module.METADATA_KEY,
        file_kind.module.FORMAT_VERSION,
        name,
        file_kind.error,
    )
    assert metadata["format_version"] == file_kind.module.FORMAT_VERSION
    assert {"anchorscan_version", "created", "checksum"} <= set(metadata)


def test_an_anchor_of_the_previous_format_is_read_and_scores_the_same():
    """Format 5 only added optional tensors (softened calibration copies): a version-4 anchor,
    which has none, is read as it was written and scores exactly as the same numbers in 5."""
    data = _anchor_bytes()
    tensors, metadata = checked_file.unpack(
        data, anchor_file.METADATA_KEY, anchor_file.FORMAT_VERSION, "anchor", anchor_file.AnchorFileError
    )
    assert not any("softened" in name for name in tensors)
    config = {key: value for key, value in metadata["config"].items() if key != "alarm_calibration"}
    written = ("format_version", "anchorscan_version", "created", "checksum")  # pack writes these
    old = {key: value for key, value in metadata.items() if key not in written}
    old = {**old, "config": config}
    old_data = checked_file.pack(tensors, old, anchor_file.METADATA_KEY, 4)
    assert anchor_file.read_metadata(old_data)["format_version"] == 4
    features = _features(50, seed=3)
    now, _ = anchor_file.anchor_from_bytes(data)
    before, _ = anchor_file.anchor_from_bytes(old_data)
    assert np.array_equal(now.assess(features)["score"], before.assess(features)["score"])
