"""Re-sharding as a pipeline: one task per output shard, spread over the workers; each reads the
input shards it takes kept samples from (streamed, as the scan read them) and writes its tar."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from anchorscan.anchors.io.curation import OutputShard, kept_by_shard, write_output_shard
from anchorscan.anchors.io.sources import ReadLimits


class WriteOutputShardFn(beam.DoFn):
    """OutputShard -> its tar, written beside its name and renamed into place once whole (on
    Cloud Storage an object appears whole anyway); yields (name, samples written)."""

    def __init__(self, curation_table: str, limits: ReadLimits):
        self.curation_table, self.limits = curation_table, limits
        self.written = Metrics.counter("anchorscan", "samples_resharded")

    def process(self, output: OutputShard):
        shards = [piece.shard for piece in output.pieces]
        with FileSystems.open(self.curation_table, compression_type="uncompressed") as handle:
            kept = kept_by_shard(handle, shards)
        partial = f"{output.name}.partial"
        with FileSystems.create(partial, compression_type="uncompressed") as handle:
            written = write_output_shard(output, kept, handle, self.limits)
        FileSystems.rename([partial], [output.name])
        self.written.inc(written)
        yield output.name, written


class WriteOutputShards(beam.PTransform):
    """The plan's output shards (``anchors/io/curation.reshard_plan``), written in parallel."""

    def __init__(self, plan: list[OutputShard], curation_table: str, limits: ReadLimits):
        super().__init__()
        self.plan, self.curation_table, self.limits = plan, curation_table, limits

    def expand(self, pipeline):
        return (
            pipeline
            | "OutputShards" >> beam.Create(self.plan)
            | "Spread" >> beam.Reshuffle()
            | "Write" >> beam.ParDo(WriteOutputShardFn(self.curation_table, self.limits))
        )
