"""A crawl manifest's other columns (page_url, crawl_id, licence, ...) and a shard's sidecar
columns (key, url, caption, ...), carried to the score rows under their own names.

The driver reads each CSV or Parquet manifest's header (a CSV's first line, a Parquet footer)
and the footer of the first sidecar among the listed shards (or, where none has one, the
first sample's JSON member), so the score table's schema is fixed when the pipeline is
built. The values travel with each listed unit or sample through reading, decoding and
inference (``ImageMeta.carried``) to its score row; a value that does not fit its column's
type (another shard's sidecar with other types) is written as text in a text column and as
null in any other."""

from __future__ import annotations

import io
import itertools
import logging
import math

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.fetch import FetchError
from anchorscan.anchors.io.manifests import is_manifest
from anchorscan.anchors.io.shards import (
    GONE,
    open_shard,
    samples,
    sidecar_exists,
    sidecar_of,
)
from anchorscan.anchors.io.sources import ReadLimits
from anchorscan.anchors.io.storage import read_bytes
from anchorscan.anchors.io.uris import Location
from anchorscan.anchors.tables import CLASH_PREFIX, SCORE_SCHEMA, json_text
from anchorscan.transforms.listing import csv_columns, expand_input, indexed_inputs


def carries_columns(pattern: str) -> bool:
    return is_manifest(pattern) and pattern.lower().endswith((".csv", ".parquet"))


def _parquet_schema(path: str) -> list[pa.Field]:
    import pyarrow.parquet as pq

    if Location.parse(path).is_http:
        return list(pq.read_schema(io.BytesIO(read_bytes(path))))
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return list(pq.read_schema(handle))


def _header(manifest: str) -> list[pa.Field]:
    """The manifest's columns and types (a CSV's are strings), reading as little as the format
    allows."""
    if manifest.lower().endswith(".parquet"):
        return _parquet_schema(manifest)
    return [pa.field(name, pa.string()) for name in csv_columns(manifest)]


def _plain(field: pa.Field) -> pa.Field:
    # Parquet dictionary columns hold plain values once read into rows.
    return field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field


# Where an input lists many files, the driver looks among the first of them for a shard.
LOOK_FOR_SHARDS = 1000
# Shards without sidecars: how many of them the driver opens to find a first sample's JSON.
LOOK_FOR_JSON = 10
# What the driver reads of each such shard, at most (decompressed): a first sample larger, or a
# gzip'd shard that decompresses to gigabytes, gives no columns (its read reports it).
LOOK_FOR_JSON_BYTES = 64 * 2**20
LOOK_FOR_JSON_LIMITS = ReadLimits(
    max_bytes=LOOK_FOR_JSON_BYTES, max_shard_bytes=LOOK_FOR_JSON_BYTES, max_skip_bytes=LOOK_FOR_JSON_BYTES
)
JSON_TYPES = ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64()), (str, pa.string()))


def listed_shards(patterns: list[str]):
    """The tar shards the inputs name (a shard, a sample of one, or among the first
    LOOK_FOR_SHARDS files each input lists), in listing order, each once."""
    seen = set()
    for index, name in indexed_inputs(patterns):
        for kind, value in itertools.islice(expand_input(name, index), LOOK_FOR_SHARDS):
            if kind != "unit":
                continue
            location = Location.parse(value.uri)
            shard = location.shard or (value.uri if location.is_shard else None)
            if shard is not None and shard not in seen:
                seen.add(shard)
                yield shard


def _json_type(value) -> pa.DataType:
    # Nested values (objects, lists) and nulls, whose type is not known, are carried as text.
    return next((kind for python, kind in JSON_TYPES if type(value) is python), pa.string())


def _sidecar_columns(shard: str) -> list[pa.Field] | None:
    try:
        sidecar = sidecar_of(shard)
        return _parquet_schema(sidecar) if sidecar_exists(sidecar) else None
    except FetchError as error:
        if error.status_code in GONE:  # a web server's way of saying there is none
            return None
        logging.warning("cannot read the columns of %s: %s", sidecar_of(shard), error)
        return None
    except Exception as error:  # the read of that shard reports it
        logging.warning("cannot read the columns of %s: %s", sidecar_of(shard), error)
        return None


def _json_columns(shard: str) -> list[pa.Field] | None:
    try:
        with open_shard(shard) as stream:
            first = next(samples(stream, LOOK_FOR_JSON_LIMITS), None)
    except Exception:  # the read of that shard reports it
        return None
    metadata = first.metadata() if first else None
    return (
        None if metadata is None else [pa.field(name, _json_type(value)) for name, value in metadata.items()]
    )


def shard_fields(patterns: list[str]) -> list[pa.Field]:
    """``key`` and ``shard`` where the inputs name shards, then the columns of the first sidecar
    among the listed shards (its footer), or, where none of them has one, the fields of the
    first JSON member among their first samples, typed by their JSON values."""
    shards = list(listed_shards(patterns))
    if not shards:
        return []
    columns = next(filter(None, map(_sidecar_columns, shards)), None)
    if columns is None:
        columns = next(filter(None, map(_json_columns, shards[:LOOK_FOR_JSON])), [])
    fields = [pa.field("key", pa.string()), pa.field("shard", pa.string())]
    return fields + [field for field in columns if field.name not in ("key", "shard")]


def carried_columns(patterns: list[str]) -> list[tuple[str, pa.Field]]:
    """(column in the manifests or sidecars, field in the score table) for every column of the
    CSV and Parquet manifests among ``patterns`` but ``uri``, then the shards' columns
    (``shard_fields``), in order of first appearance. A name met with two types becomes a
    string column, and so does a nested one (a struct, a list: carried as JSON text); a name
    taken by a score column gets CLASH_PREFIX. Where that name is taken too, a manifest is
    refused (UsageError); a sidecar's score-named column is not carried (the read refuses a
    shard whose sidecar has both). A manifest that cannot be read adds nothing (the listing
    reports it as an error row)."""
    headers = []
    for pattern in patterns:
        if not carries_columns(pattern):
            continue
        try:
            headers.append(_header(pattern))
        except Exception:  # reported by the listing, with the same cause
            continue
    manifest_names = {field.name for header in headers for field in header}
    headers.append(shard_fields(patterns))
    fields: dict[str, pa.Field] = {}
    for header in headers:
        for field in map(_plain, header):
            if field.name == "uri" or not field.name:
                continue
            if pa.types.is_nested(field.type):
                field = field.with_type(pa.string())
            known = fields.get(field.name)
            if known is not None and known.type != field.type:
                field = field.with_type(pa.string())
            fields[field.name] = field
    carried = []
    for name, field in fields.items():
        if name in SCORE_SCHEMA.names:
            field = field.with_name(CLASH_PREFIX + name)
            if field.name in fields and name in manifest_names:
                raise UsageError(
                    f"manifest columns {name!r} and {field.name!r}: {name!r} is a score "
                    f"column, and {field.name!r}, where it would go, is taken; rename one"
                )
            if field.name in fields:
                logging.warning(
                    "column %r of a shard's sidecar or JSON is a score column and %r is taken: not carried",
                    name,
                    field.name,
                )
                continue
            logging.warning(
                "column %r of a manifest or sidecar is also a score column: carried as %r", name, field.name
            )
        carried.append((name, field))
    return carried


def _as_type(value, field: pa.Field):
    """``value`` as the column's type: text in a text column (a column met with several
    types), null where it does not convert (a sidecar whose types differ from the first's)."""
    if value is None:
        return None
    if pa.types.is_string(field.type):
        if isinstance(value, str):
            return value
        text = json_text(value)
        return text if isinstance(text, str) else str(value)
    try:
        if isinstance(value, str):  # text that may spell the value: Arrow's cast parses it
            return pa.array([value], pa.string()).cast(field.type)[0].as_py()
        return pa.scalar(value, type=field.type).as_py()
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def carried_row(values: dict, carried: list[tuple[str, pa.Field]]) -> dict:
    """The carried columns of one score row from the values its unit carried (null where it
    carried none: an image no manifest lists), each under its field's name and type."""
    return {field.name: _as_type(values.get(name), field) for name, field in carried}


def score_schema(carried: list[tuple[str, pa.Field]]) -> pa.Schema:
    return pa.schema([*SCORE_SCHEMA, *(field for _, field in carried)])


# img2dataset's record of a resize before storage: the stored image's size beside the
# downloaded one's (sidecar row, JSON member, or a manifest's columns of the same names).
STORED_SIZE = ("width", "height")
ORIGINAL_SIZE = ("original_width", "original_height")


def _side(value) -> float | None:
    """A side length as the metadata spells it (3, 3.0, "3"), or None where it says none."""
    if isinstance(value, bool):
        return None
    try:
        side = float(value)
    except (TypeError, ValueError):
        return None
    return side if math.isfinite(side) and side > 0 else None


def pixels_resampled(values: dict) -> bool:
    """Whether the values an image carried say it was resized before it was stored: a stored
    side that differs from the downloaded one; False where they do not say (no such columns,
    nulls, text that is not a number)."""
    for stored, original in zip(STORED_SIZE, ORIGINAL_SIZE):
        sides = _side(values.get(stored)), _side(values.get(original))
        if None not in sides and sides[0] != sides[1]:
            return True
    return False
