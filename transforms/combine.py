"""The CombineFn that merges real images' feature moments across workers: a thin Beam wrapper
over anchors.stats, as tf.Transform wraps its analyzers."""

from __future__ import annotations

import struct

import apache_beam as beam
import numpy as np

from anchorscan.anchors.stats import BufferedMoments, Moments


class MomentsCoder(beam.coders.Coder):
    """Accumulator bytes: n, d and the buffer size as three int64, then mean and M2 as float64
    (no pickle)."""

    def encode(self, accumulator: BufferedMoments) -> bytes:
        moments = accumulator.flush()
        return (
            struct.pack("<qqq", moments.n, moments.dim, accumulator.batch_size)
            + moments.mean.tobytes()
            + moments.m2.tobytes()
        )

    def decode(self, encoded: bytes) -> BufferedMoments:
        n, dim, batch_size = struct.unpack_from("<qqq", encoded)
        values = np.frombuffer(encoded, dtype=np.float64, offset=24)
        accumulator = BufferedMoments(dim, batch_size)
        accumulator.moments = Moments.from_arrays(n, values[:dim], values[dim:].reshape(dim, dim))
        return accumulator

    def is_deterministic(self) -> bool:
        return True


class MomentsCombineFn(beam.CombineFn):
    """Feature vectors -> Moments(n, mean, M2), rows buffered and added in batches."""

    def __init__(self, dim: int, batch_size: int = 256):
        self.dim, self.batch_size = dim, batch_size

    def create_accumulator(self) -> BufferedMoments:
        return BufferedMoments(self.dim, self.batch_size)

    def add_input(self, accumulator: BufferedMoments, vector) -> BufferedMoments:
        return accumulator.add(vector)

    def merge_accumulators(self, accumulators) -> BufferedMoments:
        accumulators = iter(accumulators)
        merged = next(accumulators)
        merged.flush()
        for accumulator in accumulators:
            merged.moments.merge(accumulator.value())
        return merged

    def compact(self, accumulator: BufferedMoments) -> BufferedMoments:
        accumulator.flush()
        return accumulator

    def extract_output(self, accumulator: BufferedMoments) -> Moments:
        return accumulator.flush()

    def get_accumulator_coder(self) -> MomentsCoder:
        return MomentsCoder()
