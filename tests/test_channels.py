"""The channel registry (anchors/channels.py): a channel declared in one module and registered
with one line is fitted, merged, written and read in the anchor file and scored with its own
p-value column, with no other file changed."""

import numpy as np
import pytest
from toy_channel import TOY

from anchorscan.anchors import channels
from anchorscan.anchors.anchor import Anchor, AnchorConfig
from anchorscan.anchors.anchor_file import anchor_from_bytes, anchor_to_bytes
from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.statistics import HoldOut, StatisticsAccumulator, StatisticsLayout
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.tables import SCORE_COLUMNS, score_columns
from anchorscan.anchors.updating import merged_statistics
from helpers import LEVELS, leveled_rows, synthetic_spec

SPEC = synthetic_spec(4, 5)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(channels, "REGISTRY", [*channels.REGISTRY, TOY])


def accumulated(rows: np.ndarray, first: int = 0):
    layout = StatisticsLayout.for_anchor(SPEC, LEVELS, HoldOut(0.2, by_phash=False))
    accumulator = StatisticsAccumulator(layout)
    for index, row in enumerate(rows):
        accumulator.add(f"real/{first + index}.jpg", row)
    return accumulator


def real_rows(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(SPEC.dim, SPEC.dim))
    return leveled_rows(2.0 + rng.normal(size=(count, SPEC.dim)) @ mixing, SPEC, seed)


def test_a_registered_toy_channel_is_fitted_merged_stored_and_scored(registered):
    every = ("forensic", "semantic", "statistical", "toy")
    config = AnchorConfig(fpr=0.05, combine="tippett", channels=every)
    rows, unseen = np.split(real_rows(640, 0), [600])
    whole = accumulated(rows).result()
    fitted_rows = rows[[not HoldOut(0.2, by_phash=False).holds(f"real/{i}.jpg") for i in range(len(rows))]]
    toy_columns = slice(SPEC.d_backbone, SPEC.d_backbone + 2)
    # fitted: the layout accumulates the toy's two columns of the rows not held out
    expected = Moments.of(fitted_rows[:, toy_columns])
    assert whole.moments["toy"].n == expected.n
    # one pass against numpy's two-pass scatter: rounding only
    assert np.allclose(whole.moments["toy"].m2, expected.m2, rtol=1e-9)
    anchor = Anchor.from_statistics(SPEC, config, whole.moments, levels=LEVELS).calibrated_on(whole.held_out)
    assert anchor.statistics()["toy"] == whole.moments["toy"] and "toy" in anchor.calibration

    # merged: two halves' statistics add up to the whole's
    halves = [accumulated(rows[:300]).result(), accumulated(rows[300:], 300).result()]
    merged = anchor.with_statistics(merged_statistics(halves[0].moments, halves[1].moments), ())
    assert merged.added["toy"].n == expected.n
    assert np.allclose(merged.added["toy"].m2, expected.m2, rtol=1e-9)  # merge order: rounding

    # written and read: the same statistics, calibration and scores
    loaded, metadata = anchor_from_bytes(anchor_to_bytes(anchor))
    assert metadata["moments"]["toy"] == expected.n and loaded.added["toy"] == anchor.added["toy"]
    assert np.array_equal(loaded.calibration["toy"], anchor.calibration["toy"])
    probe = unseen[:, : SPEC.dim].copy()
    probe[:20, toy_columns] += 40.0  # far from real images in the toy's columns only
    scores, reread = anchor.assess(probe), loaded.assess(probe)
    assert all(np.array_equal(scores[key], reread[key]) for key in scores)

    # scored: its own p-value column, small where its columns moved, and a channel to combine
    assert (scores["p_toy"][:20] < 1e-6).all() and np.median(scores["p_toy"][20:]) > 0.05
    alone = anchor.assess(probe, channels=("toy",))
    assert (alone["component"] == "toy").all() and alone["is_suspect"][:20].all()
    # the score table has its columns, after the other channels' of their kind
    names = [column.name for column in score_columns()]
    assert names.index("p_toy") == names.index("p_forensic") + 1 and names.index("toy") > names.index(
        "softness"
    )
    assert {"p_toy", "toy"} <= set(scores)


def test_without_the_toy_channel_registered_nothing_of_it_appears():
    rows = real_rows(600, 0)
    whole = accumulated(rows).result()
    config = AnchorConfig(fpr=0.05, combine="tippett")
    anchor = Anchor.from_statistics(SPEC, config, whole.moments, levels=LEVELS).calibrated_on(whole.held_out)
    assert "toy" not in anchor.statistics() and "p_toy" not in anchor.assess(rows[:3, : SPEC.dim])
    assert score_columns() == SCORE_COLUMNS
    with pytest.raises(UsageError, match="among semantic, statistical, forensic, got toy"):
        AnchorConfig(channels=("toy",))
