"""A crawl manifest's other columns (page_url, crawl_id, licence, ...), carried to the score rows
under their own names.

The driver reads each CSV or Parquet manifest's header (a CSV's first line, a Parquet footer),
so the score table's schema is fixed when the pipeline is built. The values travel with each
listed unit through reading, decoding and inference (``ImageMeta.carried``) to its score row."""

from __future__ import annotations

import csv
import io
import logging

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.fetch import is_http
from anchorscan.anchors.io.manifests import is_manifest
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
                raise UsageError(
                    f"manifest columns {name!r} and {field.name!r}: {name!r} is a score "
                    f"column, and {field.name!r}, where it would go, is taken; rename one"
                )
            logging.warning("manifest column %r is also a score column: carried as %r", name, field.name)
        carried.append((name, field))
    return carried


def _as_type(value, field: pa.Field):
    if value is not None and pa.types.is_string(field.type) and not isinstance(value, str):
        return str(value)  # a column met with several types
    return value


def carried_row(values: dict, carried: list[tuple[str, pa.Field]]) -> dict:
    """The carried columns of one score row from the values its unit carried (null where it
    carried none: an image no manifest lists), each under its field's name and type."""
    return {field.name: _as_type(values.get(name), field) for name, field in carried}


def score_schema(carried: list[tuple[str, pa.Field]]) -> pa.Schema:
    return pa.schema([*SCORE_SCHEMA, *(field for _, field in carried)])
