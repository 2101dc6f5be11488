"""Parquet outputs with explicit schemas."""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from anchorscan.transforms.schema import ERROR_SCHEMA, SCORE_SCHEMA


class _CountErrors(beam.DoFn):
    def process(self, row):
        Metrics.counter("anchorscan", f"errors_{row['stage']}").inc()
        yield row


class WriteErrors(beam.PTransform):
    """Error rows from every stage -> ``PREFIX-errors-*.parquet`` (counted per stage)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def expand(self, errors):
        if isinstance(errors, tuple):
            errors = errors | "FlattenErrors" >> beam.Flatten()
        return (errors
                | "CountErrors" >> beam.ParDo(_CountErrors())
                | "WriteErrors" >> beam.io.WriteToParquet(
                    f"{self.prefix}-errors", ERROR_SCHEMA, file_name_suffix=".parquet"))


class WriteScores(beam.PTransform):
    """Score rows -> ``PREFIX-scores-*.parquet``; ``schema``: the score columns and any carried
    from manifests."""

    def __init__(self, prefix: str, schema=SCORE_SCHEMA):
        super().__init__()
        self.prefix, self.schema = prefix, schema

    def expand(self, rows):
        return rows | "WriteScores" >> beam.io.WriteToParquet(
            f"{self.prefix}-scores", self.schema, file_name_suffix=".parquet")


def previous_scores_pattern(prefix_or_glob: str) -> str:
    if any(c in prefix_or_glob for c in "*?[") or prefix_or_glob.endswith(".parquet"):
        return prefix_or_glob
    return f"{prefix_or_glob}-scores-*.parquet"


class ReadPreviousScores(beam.PTransform):
    """Earlier score rows made with the same anchor and head, as (sha256, row) pairs. Nothing
    when the pattern matches no file yet (the first night)."""

    def __init__(self, prefix_or_glob: str, anchor_id: str, head: str = ""):
        super().__init__()
        self.pattern, self.anchor_id, self.head = previous_scores_pattern(prefix_or_glob), anchor_id, head

    def expand(self, pipeline):
        if not FileSystems.match([self.pattern])[0].metadata_list:
            logging.warning("--skip_scored: no earlier scores match %s; scoring everything", self.pattern)
            return pipeline | "NoPreviousScores" >> beam.Create([])
        anchor_id, head = self.anchor_id, self.head
        return (pipeline
                | "ReadPreviousScores" >> beam.io.ReadFromParquet(self.pattern, columns=SCORE_SCHEMA.names)
                | "SameDetector" >> beam.Filter(
                    lambda row: row["anchor_id"] == anchor_id and row["head"] == head)
                | "BySha256" >> beam.Map(lambda row: (row["sha256"], row)))
