"""The statistics step: embedded rows -> every named statistic and the held-out rows, in one
CombineFn (a thin Beam wrapper over anchors/statistics.py, as tf.Transform wraps its analyzers;
tensorflow-data-validation likewise runs all its generators in one combiner). `fit`, `update`,
`flag`, `stream --learn_real` and the LDA head all accumulate through it."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import safetensors.numpy

from anchorscan.anchors.calibration import CalibrationRows
from anchorscan.anchors.statistics import Statistics, StatisticsAccumulator, StatisticsLayout
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.threads import limit_blas_threads


class StatisticsCoder(beam.coders.Coder):
    """Accumulator bytes as safetensors: per statistic its mean and M2, the held-out keys and
    rows (and their softened copies' where kept), the counts in the metadata (no pickle)."""

    def __init__(self, layout: StatisticsLayout, batch_size: int):
        self.layout, self.batch_size = layout, batch_size

    def encode(self, accumulator: StatisticsAccumulator) -> bytes:
        moments, held = accumulator.state()
        tensors = {"held.keys": held.keys, "held.rows": np.ascontiguousarray(held.features)}
        if held.softened is not None:
            tensors["held.softened_keys"] = held.softened.keys
            tensors["held.softened_rows"] = np.ascontiguousarray(held.softened.features)
        for name, value in moments.items():
            tensors[f"{name}.n"] = np.array([value.n], dtype=np.int64)
            tensors[f"{name}.mean"], tensors[f"{name}.m2"] = value.mean, value.m2
        return safetensors.numpy.save(tensors)

    def decode(self, encoded: bytes) -> StatisticsAccumulator:
        tensors = safetensors.numpy.load(encoded)
        moments = {
            name: Moments.from_arrays(
                int(tensors[f"{name}.n"][0]), tensors[f"{name}.mean"], tensors[f"{name}.m2"]
            )
            for name, _, _ in self.layout.slices
        }
        softened = (
            CalibrationRows(tensors["held.softened_keys"], tensors["held.softened_rows"])
            if "held.softened_keys" in tensors
            else None
        )
        held = CalibrationRows(tensors["held.keys"], tensors["held.rows"], softened)
        return StatisticsAccumulator.from_state(self.layout, moments, held, self.batch_size)

    def is_deterministic(self) -> bool:
        return True


class StatisticsCombineFn(beam.CombineFn):
    """Embedded rows (ImageMeta, (vector, positions)) -> ``Statistics`` of ``layout``."""

    def __init__(self, layout: StatisticsLayout, batch_size: int = 256):
        self.layout, self.batch_size = layout, batch_size

    def setup(self) -> None:
        limit_blas_threads()  # the merges' outer products run beside the backbone's threads

    def create_accumulator(self) -> StatisticsAccumulator:
        return StatisticsAccumulator(self.layout, self.batch_size)

    def add_input(self, accumulator: StatisticsAccumulator, row) -> StatisticsAccumulator:
        meta, (vector, _) = row
        return accumulator.add(meta.uri, vector, meta.phash)

    def merge_accumulators(self, accumulators) -> StatisticsAccumulator:
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def compact(self, accumulator: StatisticsAccumulator) -> StatisticsAccumulator:
        return accumulator.compact()

    def extract_output(self, accumulator: StatisticsAccumulator) -> Statistics:
        return accumulator.result()

    def get_accumulator_coder(self) -> StatisticsCoder:
        return StatisticsCoder(self.layout, self.batch_size)


class AccumulateStatistics(beam.PTransform):
    """Embedded rows -> one ``Statistics`` (per window, in a stream: ``without_defaults``
    leaves windows without rows out)."""

    def __init__(self, layout: StatisticsLayout, fanout: int = 4, without_defaults: bool = False):
        super().__init__()
        self.layout, self.fanout, self.without_defaults = layout, fanout, without_defaults

    def expand(self, embedded):
        combine = beam.CombineGlobally(StatisticsCombineFn(self.layout)).with_fanout(self.fanout)
        return embedded | (combine.without_defaults() if self.without_defaults else combine)


class AccumulateStatisticsPerKey(beam.PTransform):
    """(key, embedded row) pairs -> (key, ``Statistics``): a linear head's classes."""

    def __init__(self, layout: StatisticsLayout):
        super().__init__()
        self.layout = layout

    def expand(self, keyed):
        return keyed | beam.CombinePerKey(StatisticsCombineFn(self.layout))
