"""Parquet outputs with explicit schemas."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.schema import ERROR_SCHEMA, SCORE_SCHEMA


class _CountErrors(beam.DoFn):
    def process(self, row):
        Metrics.counter("anchorscan", f"errors_{row['stage']}").inc()
        yield row


class WriteErrors(beam.PTransform):
    """Error rows from every stage -> ``PREFIX-errors-*.parquet`` (counted per stage)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def expand(self, error_pcollections):
        return (error_pcollections
                | "FlattenErrors" >> beam.Flatten()
                | "CountErrors" >> beam.ParDo(_CountErrors())
                | "WriteErrors" >> beam.io.WriteToParquet(
                    f"{self.prefix}-errors", ERROR_SCHEMA, file_name_suffix=".parquet"))


class WriteScores(beam.PTransform):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def expand(self, rows):
        return rows | "WriteScores" >> beam.io.WriteToParquet(
            f"{self.prefix}-scores", SCORE_SCHEMA, file_name_suffix=".parquet")
