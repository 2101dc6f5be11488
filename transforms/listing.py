"""Inputs and files through Beam's FileSystems, so local paths and gs:// behave the same."""

from __future__ import annotations

import csv
import os
import re

import apache_beam as beam
import braceexpand
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.errors import UsageError, exception_name
from anchorscan.anchors.io import gcs
from anchorscan.anchors.io.gcs import describe
from anchorscan.anchors.io.manifests import (
    is_manifest,
    names_local_file,
    read_manifest,
    refuse_repeated_columns,
)
from anchorscan.anchors.io.registry import listable
from anchorscan.anchors.io.sources import Unit
from anchorscan.anchors.io.storage import read_bytes
from anchorscan.anchors.io.uris import Location, glob_prefix, has_glob, too_many_names, uri_text
from anchorscan.anchors.tables import error_row
from anchorscan.transforms.progress import ReportProgress


def _tell_beam_anonymous() -> None:
    """Beam's GCS client would look for credentials again with four retries (~18 s) and then
    connect anonymously too: record the answer in its per-process cache instead."""
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        if not auth._Credentials._credentials_init:
            auth._Credentials._credentials, auth._Credentials._credentials_init = None, True


gcs.ANONYMOUS_HOOKS.append(_tell_beam_anonymous)


def matching_files(pattern: str) -> list[str]:
    """Sorted paths that ``pattern`` matches, local or gs:// (none when nothing matches). Beam
    lists the folder of a glob's fixed part, which for a bare relative glob (``s1-scores-*``)
    is '' and lists nothing: such a glob is matched in ``.``, its paths given back bare."""
    path = Location.parse(pattern).local_path
    bare = path is not None and has_glob(path) and not os.path.dirname(glob_prefix(path))
    found = FileSystems.match([f"./{pattern}" if bare else pattern])[0].metadata_list
    return sorted(metadata.path[2:] if bare else metadata.path for metadata in found)


def files_below(root: str) -> list[str]:
    """Every file below a folder or prefix, as '/'-separated paths relative to it."""
    root = root.rstrip("/")
    return [path[len(root) + 1 :].replace(os.sep, "/") for path in matching_files(root + "/**")]


def read_parquet_rows(pattern: str, columns: list[str] | None = None) -> list[dict]:
    """The rows of every Parquet file ``pattern`` matches, in file order."""
    import pyarrow.parquet as pq

    rows = []
    for path in matching_files(pattern):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            rows += pq.read_table(handle, columns=columns).to_pylist()
    return rows


def manifest_entries(manifest: str, index: int = 0, carried_names: tuple[str, ...] = ()):
    """('unit', Unit) for each entry of a manifest (with its ``carried_names`` columns);
    ('error', row) for each blank or null entry (its URI is ``MANIFEST#row=N``, N counting data
    rows from 1) and for a manifest that lists nothing at all."""
    rows = read_manifest(manifest, read_bytes(manifest))
    if not rows:
        yield (
            "error",
            error_row(
                uri_text(manifest), "list", "the manifest lists no images (it is empty or has a header only)"
            ),
        )
    csv_line = " (line {})" if manifest.lower().endswith(".csv") else ""
    for number, row in enumerate(rows, start=1):
        if row["uri"] and names_local_file(manifest, row["uri"]):
            yield (
                "error",
                error_row(
                    uri_text(row["uri"]),
                    "list",
                    f"row {number} of the remote manifest {manifest} names a local file; a manifest "
                    "fetched over http(s) or from gs:// may name only remote URIs: not read",
                ),
            )
        elif row["uri"]:
            carried = {name: row.get(name) for name in carried_names}
            yield "unit", Unit(uri_text(row["uri"]), (index, number), carried)
        else:
            where = csv_line.format(number + 1)
            yield (
                "error",
                error_row(
                    uri_text(f"{manifest}#row={number}"),
                    "list",
                    f"row {number} of the manifest{where} has no uri (blank or null)",
                ),
            )


def expand_input(pattern: str, index: int = 0, carried_names: tuple[str, ...] = ()):
    """Yields ('unit', Unit) for each input an --input names (the ``index``-th), or ('error',
    row) where it names none or where its listing met a problem (a link loop, a folder that
    cannot be read).

    A manifest lists its entries, with the ``carried_names`` columns of each; a directory
    stands for the files below it that a byte source reads (images by extension, ...); anything
    else is a glob and matches exactly what it says. Local folders linked from inside are
    followed, as a shell's glob follows them.
    """
    location = Location.parse(pattern)
    if location.is_http and not is_manifest(pattern):  # a web server lists nothing: one input
        yield "unit", Unit(pattern, (index, 0))
        return
    reported = False  # a unit, or a row about this input
    try:
        if is_manifest(pattern):
            for kind, value in manifest_entries(pattern, index, carried_names):
                reported = True
                yield kind, value
            return
        path = location.local_path
        if path is None:
            listing = _list_remote(pattern)
        else:  # relative paths listed absolute: the tables name files found from any folder later
            listing = _list_local(path if os.path.isabs(path) else os.path.abspath(path))
        for kind, value in listing:
            reported = reported or kind == "uri"
            yield (kind, value) if kind == "error" else ("unit", Unit(value, (index, 0)))
    except Exception as error:  # a bad pattern or manifest must not stop the other inputs
        reported = True
        if location.is_gcs:
            error = describe(pattern, error, is_listing=not is_manifest(pattern))
        yield (
            "error",
            error_row(uri_text(pattern), "list", f"cannot list input: {error}", exception_name(error)),
        )
    if not reported:
        yield "error", error_row(uri_text(pattern), "list", "no files match this input")


def _list_remote(pattern: str):
    directory = pattern.rstrip("/")
    if not has_glob(pattern) and FileSystems.match([directory + "/*"], limits=[1])[0].metadata_list:
        # Object stores have no directories: a prefix with objects below it counts as one.
        matches = [
            m.path for m in FileSystems.match([directory + "/**"])[0].metadata_list if listable(m.path)
        ]
    else:
        matches = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    for path in sorted(matches):
        yield "uri", path


def _list_local(path: str):
    if not has_glob(path):
        folder = path.rstrip("/") or "/"
        if os.path.isdir(folder):
            yield from _walk(folder, None, listable)
        elif os.path.lexists(path):  # a file, or a broken or looping link: its read says which
            yield "uri", uri_text(path)
        return
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if has_glob(part))
    below = parts[fixed:]
    depth = None if any("**" in part for part in below) else len(below)
    pattern = re.compile(FileSystem.translate_pattern(path))
    yield from _walk("/".join(parts[:fixed]), depth, lambda name: pattern.fullmatch(name))


def _walk(root: str, depth: int | None, wanted):
    """('uri', path) for the files below ``root`` (``depth`` levels down, or all) that ``wanted``
    accepts; links to folders are followed. A walk without a depth visits each folder once along
    a path: a link back to a folder above it is a loop, reported as an error row, not followed."""

    def visit(folder: str, level: int, ancestors: frozenset):
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda entry: entry.name)
        except OSError as error:
            yield (
                "error",
                error_row(
                    uri_text(folder),
                    "list",
                    f"cannot list folder: {error.strerror or error}",
                    exception_name(error),
                ),
            )
            return
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                is_folder = entry.is_dir()  # follows links
            except OSError:
                is_folder = False
            if not is_folder:
                if (depth is None or level == depth) and wanted(path):
                    yield "uri", uri_text(path)
                continue
            if depth is not None and level >= depth:
                continue
            try:
                status = os.stat(path)
            except OSError:  # gone since the folder was listed
                continue
            key = (status.st_dev, status.st_ino)
            if depth is None and key in ancestors:  # a bounded walk ends, loop or not
                yield (
                    "error",
                    error_row(
                        uri_text(path),
                        "list",
                        f"a symbolic link loop: {path} leads back to "
                        f"{os.path.realpath(path)}, a folder above it; not followed",
                    ),
                )
                continue
            yield from visit(path, level + 1, ancestors | {key})

    status = os.stat(root or ".")
    yield from visit(root, 1, frozenset({(status.st_dev, status.st_ino)}))


def braces(pattern: str) -> list[str]:
    """A brace pattern's names, as img2dataset and webdataset write shard sets
    (``shards/{00000..01999}.tar``), in order; any other pattern as it is. UsageError, before
    any name is made, where the pattern names more than MAX_BRACE_NAMES (the --input flag
    refuses it first; this guards the other ways in, a template's parameters)."""
    if "{" not in pattern:
        return [pattern]
    too_many = too_many_names(pattern)
    if too_many:
        raise UsageError(f"--input {too_many}")
    try:
        return list(braceexpand.braceexpand(pattern))
    except ValueError:  # braceexpand's UnbalancedBracesError: a name with a brace in it
        return [pattern]


def distinct_patterns(patterns: list[str]) -> list[str]:
    """Each --input once, in order (a folder with or without its trailing '/' is one input),
    as text that Beam's coders accept (see anchors/uris.py)."""
    return list(dict.fromkeys(uri_text(pattern.rstrip("/") or pattern) for pattern in patterns))


def csv_columns(manifest: str) -> list[str]:
    """A CSV manifest's column names: its first line's."""
    if Location.parse(manifest).is_http:
        first = read_bytes(manifest).split(b"\n", 1)[0]
    else:
        with FileSystems.open(manifest, compression_type="uncompressed") as handle:
            first = handle.readline()
    return next(csv.reader([first.decode("utf-8-sig")]), [])


def _refuse_repeated_columns(pattern: str) -> None:
    """A local or gs:// CSV manifest whose header names a column twice is refused before the
    scan (ManifestError); one over http(s) is refused by its listing, as an error row."""
    if not (is_manifest(pattern) and pattern.lower().endswith(".csv")) or Location.parse(pattern).is_http:
        return
    try:
        names = csv_columns(pattern)
    except Exception:  # a manifest that cannot be read: its listing reports it
        return
    refuse_repeated_columns(pattern, names)


def indexed_inputs(patterns: list[str]) -> list[tuple[int, str]]:
    """(--input index, name) for each input, brace patterns expanded: each name is listed on
    its own (so 2,000 shards spread over the workers) and a missing one is its own row. A CSV
    manifest that names a column twice is refused (ManifestError)."""
    inputs = distinct_patterns(patterns)
    for pattern in inputs:
        _refuse_repeated_columns(pattern)
    return [(index, name) for index, pattern in enumerate(inputs) for name in braces(pattern)]


def _first_row(rows):
    return min(rows, key=lambda row: (row["stage"], row["error"]))


def _expand_indexed(indexed_pattern: tuple[int, str], carried_names: tuple[str, ...]):
    index, pattern = indexed_pattern
    return expand_input(pattern, index, carried_names)


class _ErrorsApart(beam.PartitionFn):
    """Listed ('unit', ...) items to partition 0, ('error', row) items to 1."""

    def partition_for(self, element, num_partitions, *args, **kwargs) -> int:
        return int(element[0] == "error")


def _first_listed(units):
    """A URI listed twice is read once, with the columns of the --input that lists it first."""
    return min(units, key=lambda unit: unit.order)


class ListInputs(beam.PTransform):
    """Input patterns -> (distinct units to read (``anchors/io/sources.py``), 'list' error rows
    (one per URI) for inputs that name none and problems met while listing, the units' count);
    a manifest's ``carried_names`` columns travel with its units. Long local runs print
    progress as the units are consumed."""

    def __init__(
        self, patterns: list[str], carried_names: tuple[str, ...] = (), progress_label: str = "progress"
    ):
        super().__init__()
        self.patterns, self.progress_label = distinct_patterns(patterns), progress_label
        self.carried_names = tuple(carried_names)

    def expand(self, pipeline):
        listed = (
            pipeline
            | "Patterns" >> beam.Create(indexed_inputs(self.patterns))
            | "Expand" >> beam.FlatMap(_expand_indexed, self.carried_names)
            | "Split" >> beam.Partition(_ErrorsApart(), 2)
        )
        uris = (
            listed[0]
            | "ByListedUri" >> beam.Map(lambda kind_value: (kind_value[1].uri, kind_value[1]))
            | "Distinct" >> beam.CombinePerKey(_first_listed)
            | "Unit" >> beam.Values()
            | "Spread" >> beam.Reshuffle()
        )
        # Two inputs can meet the same problem (a loop below both): one row for it.
        errors = (
            listed[1]
            | "ByUri" >> beam.Map(lambda kind_value: (kind_value[1]["uri"], kind_value[1]))
            | "OnePerUri" >> beam.CombinePerKey(_first_row)
            | "Row" >> beam.Values()
        )
        count = uris | "CountInputs" >> beam.combiners.Count.Globally()
        # Counted before decoding: the runner holds a side input's consumer back until the count
        # is done, and here that holds back URIs, not every image's features.
        uris = uris | "Progress" >> beam.ParDo(
            ReportProgress(self.progress_label), beam.pvalue.AsSingleton(count)
        )
        return uris, errors, count
