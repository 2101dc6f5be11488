"""The anchor file (docs/METHOD.md §5): exact round trip, refusal of damaged or foreign files,
and refusal to score features made by another backbone."""

import numpy as np
import pytest

import anchorscan.anchors.anchor_file as anchor_file
from anchorscan.anchors.anchor import COMPONENTS, AnchorConfig
from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes, read_metadata
from anchorscan.anchors.spec import FeatureSpec, IncompatibleAnchorError
from helpers import D_FORENSIC, fit_synthetic_anchor, synthetic_spec

DS, DM = 6, 9


def spec(**changes):
    return synthetic_spec(DS, DM, **changes)


@pytest.fixture(scope="module")
def anchor():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(DS + DM + D_FORENSIC, DS + DM + D_FORENSIC))
    data = 5.0 + rng.normal(size=(700, DS + DM + D_FORENSIC)) @ mixing
    return fit_synthetic_anchor(spec(), data, 500, AnchorConfig(fpr=0.05, combine="tippett"))


@pytest.fixture(scope="module")
def data(anchor):
    return anchor_to_bytes(anchor, projection=np.eye(4))


def test_round_trip_reproduces_statistics_calibration_and_scores(anchor, data):
    loaded, metadata = anchor_from_bytes(data)
    assert loaded.moments == anchor.moments
    for name in COMPONENTS:
        assert np.array_equal(loaded.calibration[name], anchor.calibration[name])
    assert loaded.n_calibration == anchor.n_calibration and loaded.config == anchor.config
    assert loaded.spec == anchor.spec
    loaded.spec.require_same(spec())
    assert np.array_equal(metadata["projection"], np.eye(4))
    features = np.random.default_rng(1).normal(size=(20, DS + DM + D_FORENSIC)) * 3
    expected, actual = anchor.assess(features), loaded.assess(features)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert np.array_equal(actual[key], expected[key]), key


def test_read_metadata_reports_the_facts(anchor, data):
    metadata = read_metadata(data)
    assert metadata["format_version"] == anchor_file.FORMAT_VERSION
    summary = anchor.summary
    for key in ("backbone", "weights_sha256", "n", "d", "shrinkage", "k"):
        assert metadata[key] == summary[key], key
    assert (metadata["n"], metadata["d"], metadata["config"]["fpr"]) == (500, DS + DM + D_FORENSIC, 0.05)
    # the configuration is recorded once, under "config"
    assert not set(metadata) & {"fpr", "combine", "statistical", "explained_variance"}


@pytest.mark.parametrize("field, value", [("backbone", "clip-vit-l14"), ("weights_sha256", "f" * 64)])
def test_different_spec_is_refused_naming_the_field(field, value):
    with pytest.raises(IncompatibleAnchorError) as error:
        spec().require_same(spec(**{field: value}))
    message = str(error.value)
    assert f"{field}:" in message and repr(value) in message
    assert "fit a new anchor" in message and "backbone synthetic" in message
    other = {"backbone", "weights_sha256", "preprocessing", "layout"} - {field}
    assert not any(f"{name}:" in message for name in other)


def test_identical_specs_pass():
    assert spec().require_same(FeatureSpec.from_dict(spec().to_dict())) is None
