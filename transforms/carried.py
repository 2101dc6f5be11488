"""A crawl manifest's other columns (page_url, crawl_id, licence, ...), carried to the score rows
under their own names.

The driver reads each CSV or Parquet manifest's header (a CSV's first line, a Parquet footer),
so the score table's schema is fixed when the pipeline is built. The values join the score rows
by URI at the end, one shuffle keyed by URI, so listing and decoding carry nothing but URIs."""

from __future__ import annotations

import csv
import io
import logging

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.io.fetch import is_http
from anchorscan.anchors.io.manifests import is_manifest, read_manifest
from anchorscan.anchors.io.storage import read_bytes
from anchorscan.anchors.tables import SCORE_SCHEMA

# A carried column named like a score column is written under this prefix.
CLASH_PREFIX = "manifest_"


def carries_columns(pattern: str) -> bool:
    return is_manifest(pattern) and pattern.lower().endswith((".csv", ".parquet"))


def _header(manifest: str) -> list[pa.Field]:
    """The manifest's columns and types (a CSV's are strings), reading as little as the format
    allows."""
    if manifest.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        if is_http(manifest):
            return list(pq.read_schema(io.BytesIO(read_bytes(manifest))))
        with FileSystems.open(manifest, compression_type="uncompressed") as handle:
            return list(pq.read_schema(handle))
    if is_http(manifest):
        first = read_bytes(manifest).split(b"\n", 1)[0]
    else:
        with FileSystems.open(manifest, compression_type="uncompressed") as handle:
            first = handle.readline()
    names = next(csv.reader([first.decode("utf-8-sig")]), [])
    return [pa.field(name, pa.string()) for name in names]


def _plain(field: pa.Field) -> pa.Field:
    # Parquet dictionary columns hold plain values once read into rows.
    return field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field


def carried_columns(patterns: list[str]) -> list[tuple[str, pa.Field]]:
    """(column in the manifests, field in the score table) for every column of the CSV and
    Parquet manifests among ``patterns`` but ``uri``, in order of first appearance. A name met
    with two types becomes a string column; a name taken by a score column gets CLASH_PREFIX.
    A manifest that cannot be read adds nothing (the listing reports it as an error row)."""
    fields: dict[str, pa.Field] = {}
    for pattern in patterns:
        if not carries_columns(pattern):
            continue
        try:
            header = _header(pattern)
        except Exception:  # reported by the listing, with the same cause
            continue
        for field in map(_plain, header):
            if field.name == "uri" or not field.name:
                continue
            known = fields.get(field.name)
            if known is not None and known.type != field.type:
                field = field.with_type(pa.string())
            fields[field.name] = field
    carried = []
    for name, field in fields.items():
        if name in SCORE_SCHEMA.names:
            field = field.with_name(CLASH_PREFIX + name)
            if field.name in fields:
                raise ValueError(
                    f"manifest columns {name!r} and {field.name!r}: {name!r} is a score "
                    f"column, and {field.name!r}, where it would go, is taken; rename one"
                )
            logging.warning("manifest column %r is also a score column: carried as %r", name, field.name)
        carried.append((name, field))
    return carried


def _manifest_values(indexed_pattern, carried: list[tuple[str, pa.Field]]):
    """(uri, (input index, row index, values)) for each row of one manifest."""
    index, manifest = indexed_pattern
    try:
        rows = read_manifest(manifest, read_bytes(manifest))
    except Exception:  # the listing reports it
        return
    for number, row in enumerate(rows):
        if row["uri"]:
            yield row["uri"], (index, number, {name: row.get(name) for name, _ in carried})


def _as_type(value, field: pa.Field):
    if value is not None and pa.types.is_string(field.type) and not isinstance(value, str):
        return str(value)  # a column met with several types
    return value


def _joined(uri_and_groups, carried: list[tuple[str, pa.Field]]):
    _, groups = uri_and_groups
    values = min(groups["values"], key=lambda value: value[:2])[2] if groups["values"] else {}
    for row in groups["rows"]:
        yield {**row, **{field.name: _as_type(values.get(name), field) for name, field in carried}}


class CarryManifestColumns(beam.PTransform):
    """Score rows -> the same rows with the carried columns, from the first manifest (in
    --input order) that lists their URI; empty (null) for a URI that no manifest lists."""

    def __init__(self, patterns: list[str], carried: list[tuple[str, pa.Field]]):
        super().__init__()
        self.patterns, self.carried = list(patterns), carried

    def expand(self, rows):
        if not self.carried:
            return rows
        manifests = [(i, pattern) for i, pattern in enumerate(self.patterns) if carries_columns(pattern)]
        values = (
            rows.pipeline
            | "Manifests" >> beam.Create(manifests)
            | "Reshuffle" >> beam.Reshuffle()  # one manifest per worker
            | "ManifestValues" >> beam.FlatMap(_manifest_values, self.carried)
        )
        keyed = rows | "ByUri" >> beam.Map(lambda row: (row["uri"], row))
        return (
            {"rows": keyed, "values": values}
            | "JoinByUri" >> beam.CoGroupByKey()
            | "WithColumns" >> beam.FlatMap(_joined, self.carried)
        )


def score_schema(carried: list[tuple[str, pa.Field]]) -> pa.Schema:
    return pa.schema([*SCORE_SCHEMA, *(field for _, field in carried)])
