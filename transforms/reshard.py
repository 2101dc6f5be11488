"""Re-sharding as a pipeline: one task per output shard, spread over the workers; each reads the
input shards it takes kept samples from (streamed, as the scan read them) and writes its tar with
img2dataset's sidecar Parquet and stats JSON beside it; a last step writes the wids index."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from anchorscan.anchors.io.curation import (
    OutputShard,
    kept_by_shard,
    sidecar_bytes,
    sidecar_name,
    stats_bytes,
    stats_name,
    wids_index_bytes,
    wids_index_name,
    write_output_shard,
)
from anchorscan.anchors.io.sources import ReadLimits
from anchorscan.anchors.io.storage import write_atomically


class WriteOutputShardFn(beam.DoFn):
    """OutputShard -> its tar, written beside its name and renamed into place once whole (on
    Cloud Storage an object appears whole anyway), then its sidecar and stats; yields (name,
    samples written, bytes)."""

    def __init__(self, curation_table: str, limits: ReadLimits):
        self.curation_table, self.limits = curation_table, limits
        self.written = Metrics.counter("anchorscan", "samples_resharded")

    def process(self, output: OutputShard):
        shards = [piece.shard for piece in output.pieces]
        with FileSystems.open(self.curation_table, compression_type="uncompressed") as handle:
            kept, schema = kept_by_shard(handle, shards)
        partial = f"{output.name}.partial"
        with FileSystems.create(partial, compression_type="uncompressed") as handle:
            rows = write_output_shard(output, kept, handle, self.limits)
        FileSystems.rename([partial], [output.name])
        write_atomically(sidecar_name(output.name), sidecar_bytes(rows, schema))
        write_atomically(stats_name(output.name), stats_bytes(len(rows)))
        self.written.inc(len(rows))
        size = FileSystems.match([output.name])[0].metadata_list[0].size_in_bytes
        yield output.name, len(rows), size


class WriteOutputShards(beam.PTransform):
    """The plan's output shards (``anchors/io/curation.reshard_plan``), written in parallel, then
    the wids index of them all (``index``)."""

    def __init__(self, plan: list[OutputShard], curation_table: str, limits: ReadLimits, prefix: str):
        super().__init__()
        self.plan, self.curation_table, self.limits, self.prefix = plan, curation_table, limits, prefix

    def expand(self, pipeline):
        return (
            pipeline
            | "OutputShards" >> beam.Create(self.plan)
            | "Spread" >> beam.Reshuffle()
            | "Write" >> beam.ParDo(WriteOutputShardFn(self.curation_table, self.limits))
            | "All" >> beam.combiners.ToList()
            | "Index" >> beam.Map(write_wids_index, self.prefix)
        )


def write_wids_index(shards: list[tuple[str, int, int]], prefix: str) -> None:
    write_atomically(wids_index_name(prefix), wids_index_bytes(prefix, shards))
