"""Mergeable moments (docs/METHOD.md §3): numpy oracles, partitions, orders, pickling, coder."""

import collections
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorscan.anchors.calibration import MAX_CALIBRATION_ROWS, MAX_SOFTENED_ROWS, uri_key
from anchorscan.anchors.statistics import HoldOut, StatisticsLayout
from anchorscan.anchors.stats import BufferedMoments, Moments
from anchorscan.transforms.statistics import StatisticsCombineFn


def rows(n=200, d=7, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return offset + rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def assert_same_moments(actual, expected, rtol=1e-9):
    assert actual.n == expected.n
    scale = np.abs(expected.m2).max()
    np.testing.assert_allclose(actual.mean, expected.mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(actual.m2, expected.m2, rtol=0, atol=rtol * scale)


def two_pass_m2(data):
    centred = data - data.mean(axis=0)
    return centred.T @ centred


def test_covariance_and_mean_match_numpy():
    data = rows()
    moments = Moments.of(data)
    np.testing.assert_allclose(moments.covariance(), np.cov(data, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(moments.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(moments.covariance(ddof=0), np.cov(data, rowvar=False, ddof=0), rtol=1e-10)


def test_large_mean_offset_stays_accurate_across_batches():
    rng = np.random.default_rng(1)
    data = 1e6 + rng.normal(size=(3000, 5))
    moments = Moments(5)
    for batch in np.array_split(data, 37):  # many merges, each with a large mean
        moments.add_batch(batch)
    np.testing.assert_allclose(
        moments.m2, two_pass_m2(data), rtol=1e-9, atol=1e-9 * np.abs(two_pass_m2(data)).max()
    )
    # raw sums lose this: sum z z^T - n mean mean^T cancels ~12 digits at this offset
    raw = data.T @ data - len(data) * np.outer(data.mean(0), data.mean(0))
    assert np.abs(raw - two_pass_m2(data)).max() > 1e-6 * np.abs(two_pass_m2(data)).max()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 120), max_size=8), st.randoms(use_true_random=False), st.sampled_from([0.0, 1e6])
)
def test_any_partition_in_any_order_gives_same_moments(cuts, random, offset):
    data = rows(n=120, d=6, seed=2, offset=offset)
    parts = np.split(data, sorted(cuts))
    random.shuffle(parts)
    merged = Moments(6)
    for part in parts:
        merged.merge(Moments.of(part) if len(part) else Moments(6))
    assert_same_moments(merged, Moments.of(data))
    # the same parts added as batches into one accumulator
    added = Moments(6)
    for part in parts:
        added.add_batch(part)
    assert_same_moments(added, Moments.of(data))


def test_moments_pickle_round_trip():
    moments = Moments.of(rows())
    assert pickle.loads(pickle.dumps(moments)) == moments


def test_buffered_moments_pickle_keeps_buffered_rows():
    data = rows(n=50)
    buffered = BufferedMoments(data.shape[1], batch_size=32)
    for row in data:
        buffered.add(row)  # 32 flushed, 18 still in the buffer
    restored = pickle.loads(pickle.dumps(buffered))
    assert restored.batch_size == 32
    assert_same_moments(restored.flush(), Moments.of(data), rtol=1e-12)


def test_buffered_rows_stay_accurate_when_the_mean_drifts_far_from_the_first_buffer():
    # The scatter is kept about the first buffer's mean; a stream whose mean then moves by
    # hundreds of standard deviations (on top of a large offset) must not lose digits.
    rng = np.random.default_rng(11)
    data = 1e6 + rng.normal(size=(3000, 6)) + np.linspace(0, 500, 3000)[:, None]
    buffered = BufferedMoments(6, batch_size=64)
    for row in data:
        buffered.add(row)
    moments = buffered.flush()
    np.testing.assert_allclose(moments.mean, data.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.m2, two_pass_m2(data), rtol=1e-9)
    assert np.array_equal(moments.m2, moments.m2.T)


# --- the one statistics step (anchors/statistics.py, transforms/statistics.py) ---------------

Meta = collections.namedtuple("Meta", "uri phash", defaults=("",))
HOLD_OUT = HoldOut(0.3)
# Three named statistics over column slices, as an anchor's (backbone, two forensic levels).
LAYOUT = StatisticsLayout(
    (("backbone", 0, 4), ("forensic.sharp", 4, 6), ("forensic.soft", 6, 8)), HOLD_OUT, 6
)


def embedded(n=300, d=8, seed=3):
    """(meta, (vector, positions)) rows as the chain's embed step gives them."""
    return [(Meta(f"img/{seed}-{i}.png"), (row, 20.0)) for i, row in enumerate(rows(n, d, seed))]


def oracle(data, layout=LAYOUT):
    """What the statistics must be, computed directly: numpy moments of the rows the hold-out
    rule keeps, per slice, and the held-out rows sorted by URI key."""
    held = np.array([layout.hold_out.holds(meta.uri) for meta, _ in data])
    vectors = np.stack([vector for _, (vector, _) in data])
    moments = {name: Moments.of(vectors[~held][:, start:stop]) for name, start, stop in layout.slices}
    keys = np.array([uri_key(meta.uri) for (meta, _), h in zip(data, held) if h], dtype=np.uint64)
    order = np.argsort(keys)[:MAX_CALIBRATION_ROWS]
    return moments, keys[order], vectors[held][order][:, : layout.calibration_width]


def assert_same_statistics(actual, data, layout=LAYOUT):
    moments, keys, features = oracle(data, layout)
    assert set(actual.moments) == set(moments)
    for name, expected in moments.items():
        assert_same_moments(actual.moments[name], expected)
    assert np.array_equal(actual.held_out.keys, keys)
    np.testing.assert_array_equal(actual.held_out.features, features)


def combine(fn, data, splits, order):
    """Accumulators fed from generators, compacted, merged from a generator in ``order``."""
    accumulators = []
    for part in np.array_split(np.arange(len(data)), splits):
        accumulator = fn.create_accumulator()
        for index in (i for i in part):
            accumulator = fn.add_input(accumulator, data[index])
        accumulators.append(fn.compact(accumulator) if len(accumulators) % 2 else accumulator)
    merged = fn.merge_accumulators(accumulators[i] for i in order)
    return fn.extract_output(merged)


def fn_with_rows(fn, data):
    accumulator = fn.create_accumulator()
    for row in data:
        fn.add_input(accumulator, row)
    return accumulator


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
@pytest.mark.parametrize("pickled", [False, True])
def test_statistics_match_numpy_whatever_the_partition_and_merge_order(order, pickled):
    data = embedded()
    fn = StatisticsCombineFn(LAYOUT, batch_size=16)
    if pickled:
        fn = pickle.loads(pickle.dumps(fn))
    result = combine(fn, data, [40, 41, 200], order)
    assert_same_statistics(result, data)
    assert 0 < len(result.held_out) < len(data)  # the rule holds some out, not all


def test_held_out_rows_are_the_smallest_keys_however_many_there_are():
    # More held-out rows than an anchor keeps: the sample is the smallest keys of the union,
    # whichever accumulator saw them.
    layout = StatisticsLayout((("x", 0, 2),), HoldOut(0.9), 2)
    data = [(Meta(f"{i}.png"), (np.array([i, 2.0 * i]), 1.0)) for i in range(5200)]
    fn = StatisticsCombineFn(layout)
    result = combine(fn, data, [1000, 3000, 4000], (2, 3, 0, 1))
    assert len(result.held_out) == MAX_CALIBRATION_ROWS
    assert_same_statistics(result, data, layout)


def test_accumulators_survive_the_coder():
    data = embedded(n=100, seed=4)
    fn = StatisticsCombineFn(LAYOUT, batch_size=8)
    coder = fn.get_accumulator_coder()
    parts = [
        coder.decode(coder.encode(fn_with_rows(fn, part))) for part in (data[:33], data[33:70], data[70:])
    ]
    assert_same_statistics(fn.extract_output(fn.merge_accumulators(iter(parts))), data)
    assert coder.is_deterministic()


@pytest.mark.parametrize("empty_first", [True, False])
def test_merging_an_empty_accumulator_is_a_no_op(empty_first):
    data = embedded(n=40, seed=5)
    fn = StatisticsCombineFn(LAYOUT)
    full = fn_with_rows(fn, data)
    pair = [fn.create_accumulator(), full] if empty_first else [full, fn.create_accumulator()]
    merged = fn.extract_output(fn.merge_accumulators(iter(pair)))
    alone = fn.extract_output(fn_with_rows(fn, data))
    assert all(merged.moments[name] == alone.moments[name] for name in alone.moments)  # bit for bit
    assert_same_statistics(merged, data)


def test_rows_of_another_width_are_refused():
    fn = StatisticsCombineFn(StatisticsLayout((("x", 0, 5),)), batch_size=4)
    with pytest.raises(ValueError):
        fn.extract_output(fn_with_rows(fn, [(Meta("a"), (np.ones(3), 1.0))] * 3))
    with pytest.raises(ValueError):
        Moments(5).add_batch(rows(n=3, d=6))


def test_merging_leaves_every_accumulator_but_the_first_as_it_was():
    # Beam's contract: merge_accumulators may mutate only its first argument; the others may
    # be merged again elsewhere, pending rows and all.
    data = embedded(n=90, seed=12)
    fn = StatisticsCombineFn(LAYOUT, batch_size=16)
    first, second = fn_with_rows(fn, data[:30]), fn_with_rows(fn, data[30:])

    def state(accumulator):
        return pickle.dumps(
            [(m.moments, m._buffer, m._count, m._scatter) for m in accumulator.moments.values()]
            + [accumulator._keys, accumulator._rows]
        )

    before = state(second)
    merged = fn.extract_output(fn.merge_accumulators(iter([first, second])))
    assert state(second) == before
    assert_same_statistics(merged, data)
    assert_same_statistics(fn.extract_output(second), data[30:])


def test_an_optional_statistic_takes_only_the_rows_that_have_its_columns():
    # Fitting simulates softness levels on a sample of its images: the other rows carry NaN
    # there, and the level's statistic is the moments of the sampled rows alone.
    layout = StatisticsLayout((("backbone", 0, 2), ("forensic.soft", 2, 4)), optional=("forensic.soft",))
    data = rows(n=60, d=4, seed=8)
    sampled = np.arange(60) % 3 == 0
    data[~sampled, 2:] = np.nan
    fn = StatisticsCombineFn(layout, batch_size=8)
    result = fn.extract_output(fn_with_rows(fn, [(Meta(f"{i}"), (row, 1.0)) for i, row in enumerate(data)]))
    assert_same_moments(result.moments["backbone"], Moments.of(data[:, :2]))
    assert_same_moments(result.moments["forensic.soft"], Moments.of(data[sampled, 2:]))


# Fit's rows: a backbone of 4, two forensic levels of 2, then (held-out images in the softening
# sample only) the soft level's backbone copy of 4.
SOFTENED_LAYOUT = StatisticsLayout(
    (("backbone", 0, 4), ("forensic.sharp", 4, 6), ("forensic.soft", 6, 8)),
    HoldOut(0.6),
    6,
    ("forensic.soft",),
    (4, 2, 2),
)


def with_copies(n: int, seed: int):
    """Rows of which every other one carries its softened copy's backbone columns."""
    data = rows(n, 12, seed)
    return [
        (Meta(f"img/{seed}-{i}.png"), (row if i % 2 == 0 else row[:8], 20.0)) for i, row in enumerate(data)
    ]


def softened_oracle(data):
    """The held-out rows that carry copies, smallest keys first (at most MAX_SOFTENED_ROWS), as
    full rows of the soft level: [its backbone copy ; its forensic level]."""
    chosen = [
        (uri_key(meta.uri), np.r_[vector[8:12], vector[6:8]])
        for meta, (vector, _) in data
        if len(vector) == 12 and SOFTENED_LAYOUT.hold_out.holds(meta.uri)
    ]
    chosen.sort(key=lambda pair: pair[0])
    chosen = chosen[:MAX_SOFTENED_ROWS]
    return np.array([key for key, _ in chosen], dtype=np.uint64), np.stack([row for _, row in chosen])


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
@pytest.mark.parametrize("coded", [False, True])
@pytest.mark.parametrize("n", [120, 1400])  # 1,400: more held-out copies than an anchor keeps
def test_softened_copies_of_held_out_rows_are_the_smallest_keys_in_any_merge_order(order, coded, n):
    data = with_copies(n, seed=9)
    fn = StatisticsCombineFn(SOFTENED_LAYOUT, batch_size=16)
    coder = fn.get_accumulator_coder()
    parts = []
    for part in np.array_split(np.arange(n), [n // 7, n // 3, n // 2]):
        accumulator = fn_with_rows(fn, [data[i] for i in part])
        parts.append(coder.decode(coder.encode(accumulator)) if coded else accumulator)
    result = fn.extract_output(fn.merge_accumulators(parts[i] for i in order))
    keys, features = softened_oracle(data)
    assert np.array_equal(result.held_out.softened.keys, keys)
    np.testing.assert_array_equal(result.held_out.softened.features, features)
    assert (len(keys) == MAX_SOFTENED_ROWS) == (n > 1000)
    # the calibration rows and the moments are as without copies
    assert_same_statistics(result, [(meta, (vector[:8], p)) for meta, (vector, p) in data], SOFTENED_LAYOUT)
