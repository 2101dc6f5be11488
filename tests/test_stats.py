"""Mergeable moments (docs/METHOD.md §3): numpy oracles, partitions, orders, pickling, coder."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorscan.anchors.stats import BufferedMoments, Moments
from anchorscan.transforms.combine import MomentsCoder, MomentsCombineFn


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


def test_coder_round_trip_is_exact():
    data = rows(n=45)
    accumulator = BufferedMoments(data.shape[1], batch_size=16)
    for row in data:
        accumulator.add(row)
    coder = MomentsCoder()
    decoded = coder.decode(coder.encode(accumulator))
    assert decoded.flush() == accumulator.flush()
    assert decoded.batch_size == 16
    assert coder.is_deterministic()


def combine(fn, data, splits, order):
    """Accumulators fed from generators, compacted, merged from a generator in ``order``."""
    accumulators = []
    for part in np.split(data, splits):
        accumulator = fn.create_accumulator()
        for row in (r for r in part):
            accumulator = fn.add_input(accumulator, row)
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
def test_combine_fn_matches_moments_of_all_rows(order, pickled):
    data = rows(n=300, d=6, seed=3)
    fn = MomentsCombineFn(dim=6, batch_size=16)
    if pickled:
        fn = pickle.loads(pickle.dumps(fn))
    assert_same_moments(combine(fn, data, [40, 41, 200], order), Moments.of(data))


def test_combine_fn_accumulators_survive_the_coder():
    data = rows(n=100, d=5, seed=4)
    fn = MomentsCombineFn(dim=5, batch_size=8)
    coder = fn.get_accumulator_coder()
    parts = [coder.decode(coder.encode(fn_with_rows(fn, part))) for part in np.array_split(data, 3)]
    assert_same_moments(fn.extract_output(fn.merge_accumulators(iter(parts))), Moments.of(data))


@pytest.mark.parametrize("empty_first", [True, False])
def test_merging_an_empty_accumulator_is_a_no_op(empty_first):
    data = rows(n=40, d=5, seed=5)
    fn = MomentsCombineFn(dim=5)
    full = fn_with_rows(fn, data)
    pair = [fn.create_accumulator(), full] if empty_first else [full, fn.create_accumulator()]
    merged = fn.extract_output(fn.merge_accumulators(iter(pair)))
    assert merged == fn.extract_output(fn_with_rows(fn, data))  # bit for bit
    assert_same_moments(merged, Moments.of(data), rtol=1e-12)


def test_dimension_mismatch_raises_value_error():
    fn = MomentsCombineFn(dim=5, batch_size=4)
    with pytest.raises(ValueError):
        fn.merge_accumulators(
            iter(
                [MomentsCombineFn(5).create_accumulator(), fn_with_rows(MomentsCombineFn(6), rows(n=3, d=6))]
            )
        )
    with pytest.raises(ValueError):
        fn.extract_output(fn_with_rows(fn, rows(n=3, d=6)))
    with pytest.raises(ValueError):
        Moments(5).add_batch(rows(n=3, d=6))


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


def test_merging_leaves_every_accumulator_but_the_first_as_it_was():
    # Beam's contract: merge_accumulators may mutate only its first argument; the others may
    # be merged again elsewhere, pending rows and all.
    data = rows(n=90, d=5, seed=12)
    fn = MomentsCombineFn(dim=5, batch_size=16)
    first, second = fn_with_rows(fn, data[:30]), fn_with_rows(fn, data[30:])  # 60: 3 buffers + 12 rows
    state_before = pickle.dumps((second.moments, second._buffer, second._count, second._scatter))
    merged = fn.extract_output(fn.merge_accumulators(iter([first, second])))
    assert pickle.dumps((second.moments, second._buffer, second._count, second._scatter)) == state_before
    assert_same_moments(merged, Moments.of(data))
    assert_same_moments(fn.extract_output(second), Moments.of(data[30:]))
