"""Inputs and files through Beam's FileSystems, so local paths and gs:// behave the same."""
from __future__ import annotations

import hashlib
import os
import tempfile
import posixpath
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.errors import UnreadableFileError, UnwritableOutputError
from anchorscan.anchors.manifests import GLOB_CHARACTERS, is_manifest, read_manifest
from anchorscan.anchors.preprocess import is_image_path
from anchorscan.transforms.progress import ReportProgress
from anchorscan.transforms.schema import error_row



def read_bytes(uri: str) -> bytes:
    """The whole file: an anchor, a head, a manifest. A file that cannot be read is the user's
    to fix (a wrong path, a missing permission), so the error says which file and why."""
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UnreadableFileError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{uri}: is a folder, not a file") from None
    except OSError as error:
        raise UnreadableFileError(f"cannot read {uri}: {error.strerror or error}") from None


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


def check_writable(uri: str, flag: str) -> None:
    """Fails now, not after the work, where a local output cannot be written (a file where a
    folder should be, no permission): writes and deletes an empty file beside it. Object stores
    are left to their first write."""
    if "://" in uri and not uri.startswith("file://"):
        return
    path = uri.removeprefix("file://")
    probe = os.path.join(os.path.dirname(os.path.abspath(path)), f".anchorscan-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except FileExistsError:  # makedirs: a file stands where the folder should be
        raise UnwritableOutputError(f"cannot write {flag} {uri}: {os.path.dirname(probe)} or a "
                                    "folder above it is a file, not a folder") from None
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise UnwritableOutputError(f"cannot write {flag} {uri}: {error.strerror or error}{where}") from None


def matching_files(pattern: str) -> list[str]:
    """Sorted paths that ``pattern`` matches, local or gs:// (none when nothing matches)."""
    return sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)


def files_below(root: str) -> list[str]:
    """Every file below a folder or prefix, as '/'-separated paths relative to it."""
    root = root.rstrip("/")
    return [path[len(root) + 1:].replace(os.sep, "/") for path in matching_files(root + "/**")]


def read_parquet_rows(pattern: str, columns: list[str] | None = None) -> list[dict]:
    """The rows of every Parquet file ``pattern`` matches, in file order."""
    import pyarrow.parquet as pq

    rows = []
    for path in matching_files(pattern):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            rows += pq.read_table(handle, columns=columns).to_pylist()
    return rows


def manifest_uris(manifest: str) -> list[str]:
    return [row["uri"] for row in read_manifest(manifest, read_bytes(manifest)) if row["uri"]]


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
                       if is_image_path(m.path)]
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
    """Input patterns -> distinct image URIs, with a 'list' error row for an input that names
    none; long local runs print progress as the URIs are consumed."""

    def __init__(self, patterns: list[str], progress_label: str = "progress"):
        super().__init__()
        if not patterns:
            raise ValueError("no --input given")
        self.patterns, self.progress_label = list(patterns), progress_label

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
        total = beam.pvalue.AsSingleton(uris | "CountInputs" >> beam.combiners.Count.Globally())
        # Counted before decoding: the runner holds a side input's consumer back until the count
        # is done, and here that holds back URIs, not every image's features.
        uris = uris | "Progress" >> beam.ParDo(ReportProgress(self.progress_label), total)
        return uris, errors
