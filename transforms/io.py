"""Inputs and files through Beam's FileSystems, so local paths and gs:// behave the same."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
import posixpath
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from anchorscan.transforms.schema import error_row

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
GLOB_CHARACTERS = "*?["


def read_bytes(uri: str) -> bytes:
    with FileSystems.open(uri, compression_type="uncompressed") as handle:
        return handle.read()


def local_copy(uri: str) -> str:
    """A local path with the contents of ``uri`` (copied once per process for remote files)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    target = os.path.join(tempfile.gettempdir(), "anchorscan-" + hashlib.sha256(uri.encode()).hexdigest()[:16]
                          + "-" + posixpath.basename(uri))
    if not os.path.exists(target):
        partial = f"{target}.{uuid.uuid4().hex}"
        with FileSystems.open(uri, compression_type="uncompressed") as source, open(partial, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 24), b""):
                out.write(chunk)
        os.replace(partial, target)
    return target


def write_atomically(uri: str, data: bytes) -> None:
    """Writes to a temporary name beside ``uri`` and renames, so readers never see half a file."""
    temporary = f"{uri}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temporary) as handle:
        handle.write(data)
    if FileSystems.exists(uri):
        FileSystems.delete([uri])
    FileSystems.rename([temporary], [uri])


def _resolve(base: str, entry: str) -> str:
    """Manifest entries are absolute, scheme-qualified, or relative to the manifest's folder."""
    if "://" in entry or entry.startswith("/"):
        return entry
    directory = posixpath.dirname(base) if "://" in base else os.path.dirname(os.path.abspath(base))
    return FileSystems.join(directory, entry)


def manifest_uris(manifest: str) -> list[str]:
    """URIs in a text (one per line), CSV or Parquet (``uri`` column) manifest."""
    data = read_bytes(manifest)
    if manifest.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(io.BytesIO(data), columns=["uri"])
        entries = table.column("uri").to_pylist()
    elif manifest.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        if "uri" not in (reader.fieldnames or []):
            raise ValueError(f"manifest {manifest} has no 'uri' column (columns: {reader.fieldnames})")
        entries = [row["uri"] for row in reader]
    else:
        entries = [line.strip() for line in data.decode("utf-8-sig").splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    return [_resolve(manifest, entry.strip()) for entry in entries if entry and entry.strip()]


def is_manifest(pattern: str) -> bool:
    return pattern.lower().endswith(MANIFEST_EXTENSIONS) and not any(
        c in pattern for c in GLOB_CHARACTERS)


def expand_input(pattern: str):
    """Yields ('uri', uri) for each image an --input names, or ('error', row) when it names none.

    A manifest lists its images; a directory stands for the image files below it (by extension);
    anything else is a glob and matches exactly what it says.
    """
    try:
        if is_manifest(pattern):
            for uri in manifest_uris(pattern):
                yield "uri", uri
            return
        directory = pattern.rstrip("/")
        if not any(c in pattern for c in GLOB_CHARACTERS) and _is_directory(directory):
            matches = [m.path for m in FileSystems.match([directory + "/**"])[0].metadata_list
                       if m.path.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            matches = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception as error:  # a bad pattern or manifest must not stop the other inputs
        yield "error", error_row(pattern, "list", f"cannot list input: {error}")
        return
    if not matches:
        yield "error", error_row(pattern, "list", "no files match this input")
    for path in sorted(matches):
        yield "uri", path


def _is_directory(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        # Object stores have no directories: a prefix with objects below it counts as one.
        return bool(FileSystems.match([path + "/*"], limits=[1])[0].metadata_list)
    return os.path.isdir(path)


class ListInputs(beam.PTransform):
    """Input patterns -> distinct image URIs, with a 'list' error row for an input that names none."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        if not patterns:
            raise ValueError("no --input given")
        self.patterns = list(patterns)

    def expand(self, pipeline):
        listed = (pipeline
                  | "Patterns" >> beam.Create(self.patterns)
                  | "Expand" >> beam.FlatMap(expand_input)
                  | "Split" >> beam.Partition(lambda kind_value, _: int(kind_value[0] == "error"), 2))
        uris = (listed[0]
                | "Uri" >> beam.Map(lambda kind_value: kind_value[1])
                | "Distinct" >> beam.Distinct()
                | "Spread" >> beam.Reshuffle())
        errors = listed[1] | "Row" >> beam.Map(lambda kind_value: kind_value[1])
        return uris, errors
