"""Manifests: files that list images, one reader for every command. A manifest is a ``.txt``
(one URI per line, ``#`` comments), a ``.csv`` or a ``.parquet`` with a ``uri`` column; entries
are absolute, scheme-qualified (``gs://``), or relative to the manifest's own folder."""

from __future__ import annotations

import csv
import io
import os
import posixpath

from anchorscan.anchors.errors import UserError
from anchorscan.anchors.io.uris import Location, has_glob

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")


class ManifestError(UserError, ValueError):
    """A manifest that cannot be read as one."""


def is_manifest(pattern: str) -> bool:
    return pattern.lower().endswith(MANIFEST_EXTENSIONS) and not has_glob(pattern)


def names_local_file(manifest: str, uri: str) -> bool:
    """Whether a manifest fetched from a web server or Cloud Storage names a local file: such a
    manifest may name only remote URIs (whoever wrote it must not make the scan read this
    machine's files)."""
    return Location.parse(manifest).is_remote and not Location.parse(uri).is_remote


def refuse_repeated_columns(manifest: str, names: list[str]) -> None:
    """A CSV reader keeps the last of two columns with one name: the first's values (a second
    ``uri`` column hides the first's URIs) would be lost without a word."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(
            f"manifest {manifest} names the column(s) {', '.join(map(repr, repeated))} more than once "
            "in its header: rename or remove the repeated column(s)"
        )


def resolve(manifest: str, entry: str) -> str:
    """An entry's URI: as written when absolute or scheme-qualified, else beside the manifest."""
    if Location.parse(entry).is_absolute:
        return entry
    if Location.parse(manifest).is_remote:
        return posixpath.join(posixpath.dirname(manifest), entry)
    return os.path.join(os.path.dirname(os.path.abspath(manifest)), entry)


def read_manifest(manifest: str, data: bytes, columns: tuple[str, ...] = ("uri",)) -> list[dict]:
    """The manifest's rows, every column, in order (row i is line i + 2 of a CSV); ``uri``
    resolved, or "" where it is blank or null. ``columns`` must all be present (a ``.txt``
    has only ``uri``; its blank lines and comments are not rows). Bytes of a text manifest that
    are not UTF-8 (a file name in another encoding) are kept as surrogate escapes, as Python
    keeps them in file names."""
    if manifest.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        names = list(rows[0]) if rows else pq.read_schema(io.BytesIO(data)).names
    elif manifest.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig", "surrogateescape")))
        rows, names = list(reader), list(reader.fieldnames or [])
        refuse_repeated_columns(manifest, names)
    else:
        lines = (line.strip() for line in data.decode("utf-8-sig", "surrogateescape").splitlines())
        rows, names = [{"uri": line} for line in lines if line and not line.startswith("#")], ["uri"]
    missing = [column for column in columns if column not in names]
    if missing:
        raise ManifestError(
            f"manifest {manifest} lacks the column(s) {', '.join(missing)} "
            f"(its columns: {', '.join(names) or 'none'})"
        )
    return [
        {**row, "uri": resolve(manifest, uri) if uri else ""}
        for row, uri in ((row, (row.get("uri") or "").strip()) for row in rows)
    ]
