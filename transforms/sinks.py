"""Parquet outputs with explicit schemas; the earlier score tables a scan reuses; the lock and the
refusal that keep two scans, or an old and a new one, from mixing their tables under one prefix;
``Outputs``, the exact names a command writes under a prefix, which alone --overwrite deletes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import posixpath
import re
import socket
import time

import apache_beam as beam
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from anchorscan.anchors.errors import (
    ENVIRONMENT_ERRNOS,
    EnvironmentFailure,
    UnwritableOutputError,
    UsageError,
    UserError,
)
from anchorscan.anchors.io.registry import listable
from anchorscan.anchors.io.storage import files_named, resolved
from anchorscan.anchors.io.uris import Location, has_glob
from anchorscan.anchors.tables import ERROR_SCHEMA, REUSED_COLUMNS, SCORE_SCHEMA
from anchorscan.transforms.listing import braces, matching_files


class OutputExistsError(UserError):
    """The output already holds tables and replacing them was not asked for."""


class OutputLockedError(UserError):
    """Another scan holds the output's lock."""


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
        return (
            errors
            | "CountErrors" >> beam.ParDo(_CountErrors())
            | "WriteErrors"
            >> beam.io.WriteToParquet(f"{self.prefix}-errors", ERROR_SCHEMA, file_name_suffix=".parquet")
        )


class WriteScores(beam.PTransform):
    """Score rows -> ``PREFIX-scores-*.parquet``; ``schema``: the score columns and any carried
    from manifests."""

    def __init__(self, prefix: str, schema=SCORE_SCHEMA):
        super().__init__()
        self.prefix, self.schema = prefix, schema

    def expand(self, rows):
        return rows | "WriteScores" >> beam.io.WriteToParquet(
            f"{self.prefix}-scores", self.schema, file_name_suffix=".parquet"
        )


def previous_scores_pattern(prefix_or_glob: str) -> str:
    if has_glob(prefix_or_glob) or prefix_or_glob.endswith(".parquet"):
        return prefix_or_glob
    return f"{prefix_or_glob}-scores-*.parquet"


def _is_score_table(path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            names = set(pq.read_schema(handle).names)
    except Exception:  # not Parquet at all (a lock, a report): not a score table either
        return False
    return set(REUSED_COLUMNS) <= names


def score_tables(prefix_or_glob: str) -> list[str]:
    """The score tables among the files that a --skip_scored value matches: a glob may also
    match errors tables and other files, which are left out (with a warning)."""
    pattern = previous_scores_pattern(prefix_or_glob)
    files = matching_files(pattern)
    tables = [path for path in files if _is_score_table(path)]
    if len(tables) < len(files):
        logging.warning(
            "--skip_scored: %d of the %d files that %s matches are not score tables "
            "(errors tables, other files) and are not read",
            len(files) - len(tables),
            len(files),
            pattern,
        )
    if not tables:
        logging.warning("--skip_scored: no earlier scores match %s; scoring everything", pattern)
    return tables


class ReadPreviousScores(beam.PTransform):
    """Earlier score rows made with the same anchor and head, as (sha256, row) pairs, from the
    score tables ``files`` (see ``score_tables``)."""

    def __init__(self, files: list[str], anchor_id: str, head: str = ""):
        super().__init__()
        self.files, self.anchor_id, self.head = list(files), anchor_id, head

    def expand(self, pipeline):
        if not self.files:
            return pipeline | "NoPreviousScores" >> beam.Create([])
        anchor_id, head = self.anchor_id, self.head
        return (
            pipeline
            | "ScoreTables" >> beam.Create(self.files)
            | "ReadPreviousScores" >> beam.io.ReadAllFromParquet(columns=list(REUSED_COLUMNS))
            | "SameDetector" >> beam.Filter(lambda row: row["anchor_id"] == anchor_id and row["head"] == head)
            | "BySha256" >> beam.Map(lambda row: (row["sha256"], row))
        )


# The exact names of a scan's tables after its --output prefix (Beam's shard names).
TABLE_NAMES = (r"-scores-\d+-of-\d+\.parquet", r"-errors-\d+-of-\d+\.parquet")


def _read_among(paths: list[str], inputs: list[str]) -> tuple[str, str] | None:
    """(path, input) for the first of ``paths`` that one of ``inputs`` names: the file itself, a
    folder above it (whose walk reads it, see ``listable``) or a glob that matches it. The
    inputs are resolved once: a curation reads thousands of shards."""
    named: dict[str, str] = {}
    globs = []
    for given in inputs:
        for name in braces(given):
            if not has_glob(name):
                named.setdefault(resolved(name), given)
            else:  # matched as the listing matches it: links not resolved
                location = Location.parse(name)
                pattern = name if location.is_remote else os.path.abspath(location.local_file())
                globs.append((re.compile(FileSystem.translate_pattern(pattern)), given))
    for path in paths:
        found = resolved(path)
        folders = [found]
        if listable(found):
            while (parent := posixpath.dirname(folders[-1])) not in (folders[-1], "gs:"):
                folders.append(parent)
        location = Location.parse(path)
        typed = path if location.is_remote else os.path.abspath(location.local_file())
        source = next((named[folder] for folder in folders if folder in named), None) or next(
            (given for pattern, given in globs if pattern.fullmatch(typed)), None
        )
        if source is not None:
            return path, source
    return None


class Outputs:
    """What a command writes under an output prefix, declared exactly: ``names`` are regular
    expressions of what follows the prefix in each file's name. --overwrite deletes the files
    that match one of them, never a file that merely begins with the prefix, never an input."""

    def __init__(self, prefix: str, names: tuple[str, ...], flag: str = "--output"):
        if has_glob(prefix):
            raise UsageError(
                f"{flag} {prefix}: an output prefix may not hold glob characters (*, ?, [): "
                "name the prefix itself"
            )
        self.prefix, self.names, self.flag = prefix, names, flag

    def existing(self) -> list[str]:
        return files_named(self.prefix, self.names)

    def make_room(self, overwrite: bool, inputs: list[str], kind: str) -> None:
        """Refuses where outputs of ours are there already, unless ``overwrite``, which deletes
        them before the run writes (so that a run's files are never mixed with an earlier
        run's, whose count may differ); refuses, deleting nothing, where one of them is among
        the run's ``inputs`` (files, folders or globs it reads)."""
        existing = self.existing()
        if not existing:
            return
        if not overwrite:
            raise OutputExistsError(
                f"{self.flag} {self.prefix} already holds {len(existing)} {kind} (e.g. {existing[0]}): "
                f"choose another {self.flag}, or pass --overwrite to replace them"
            )
        read = _read_among(existing, inputs)
        if read is not None:
            raise UsageError(
                f"{read[0]} is an input of this run ({read[1]}), which --overwrite would delete: "
                f"write to another {self.flag}"
            )
        FileSystems.delete(existing)

    @contextlib.contextmanager
    def writing(self, overwrite: bool, inputs: list[str], kind: str):
        """``make_room``, then the block that writes the outputs: where it fails (or is
        interrupted), every output file is removed again (none was there when it began), so
        nothing half-written stays and a rerun is not refused."""
        self.make_room(overwrite, inputs, kind)
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # the failure, not the cleaning, is what to report
                left = self.existing()
                if left:
                    FileSystems.delete(left)
                    logging.info(
                        "removed %d files the failed run had begun to write (e.g. %s)", len(left), left[0]
                    )
            raise


def _written(prefixes: list[str]) -> set[str]:
    """What Beam's file sinks write for tables ``PREFIX-TABLE`` (e.g. ``out/scan-scores``): the
    files in their ``beam-temp-*`` folders and the finished tables."""
    patterns = []
    for prefix in prefixes:
        folder, name = FileSystems.split(prefix)
        patterns += [FileSystems.join(folder, f"beam-temp-{name}-*", "*"), f"{prefix}-*.parquet"]
    return {path for pattern in patterns for path in matching_files(pattern)}


def _temporary_folders(prefixes: list[str]) -> set[str]:
    """The local ``beam-temp-*`` folders of tables ``PREFIX-TABLE``."""
    folders = set()
    for prefix in prefixes:
        if not Location.parse(prefix).is_remote:
            folder, name = os.path.split(os.path.abspath(prefix))
            folders |= {
                path
                for path in glob.glob(os.path.join(glob.escape(folder), f"beam-temp-{glob.escape(name)}-*"))
                if os.path.isdir(path)
            }
    return folders


@contextlib.contextmanager
def cleaned_on_failure(prefixes: list[str]):
    """Where the block fails (or is interrupted), removes what its Beam sinks left under the
    table prefixes ``prefixes``: their temporary folders and any table that was not there
    before, so that nothing half-written stays and a rerun starts clean."""
    before = _written(prefixes)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the failure, not the cleaning, is what to report
            left = sorted(_written(prefixes) - before)
            if left:
                FileSystems.delete(left)
                logging.info(
                    "removed %d files the failed run had begun to write (e.g. %s)", len(left), left[0]
                )
            # the temporary folders too, emptied now or left empty by the failure (locally: an
            # object store has no folders)
            for folder in _temporary_folders(prefixes):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise


class PrefixLock:
    """``PREFIX.lock``, held while a scan writes ``PREFIX-*``: a second scan of the same prefix
    refuses instead of deleting the first one's rows. Locally an flock, which the system drops
    when the process dies, so a killed scan leaves no stale lock; on object stores a file that
    the scan deletes when it ends (there, a scan killed hard leaves it behind, and the message
    says to delete it)."""

    def __init__(self, prefix: str):
        self.path = f"{prefix}.lock"
        self.local = not Location.parse(prefix).is_remote
        self._fd: int | None = None

    def __enter__(self):
        holder = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        ).encode()
        try:
            if self.local:
                self._lock_local(holder)
            else:
                self._lock_remote(holder)
        except OSError as error:
            where = f" ({error.filename})" if error.filename else ""
            message = f"cannot write {self.path}, the lock beside --output: {error.strerror or error}{where}"
            if error.errno in ENVIRONMENT_ERRNOS:
                raise EnvironmentFailure(f"{message}: {ENVIRONMENT_ERRNOS[error.errno]}") from None
            raise UnwritableOutputError(message) from None
        return self

    def _refuse(self, holder: bytes, hint: str = ""):
        try:
            other = json.loads(holder)
            who = f"pid {other['pid']} on {other['host']}, started {other['started']}"
        except (ValueError, KeyError, TypeError):
            who = "holder unknown"
        raise OutputLockedError(
            f"another scan ({who}) is writing this --output ({self.path} is "
            f"locked): wait for it to finish or choose another --output{hint}"
        )

    def _lock_local(self, holder: bytes) -> None:
        path = self.path.removeprefix("file://")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError:  # a file stands where the folder should be
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", folder) from None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with os.fdopen(fd, "rb") as handle:
                    self._refuse(handle.read())
            # The holder before us may have deleted the file between our open and our lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, holder)
        self._fd = fd

    def _lock_remote(self, holder: bytes) -> None:
        if FileSystems.exists(self.path):
            with FileSystems.open(self.path, compression_type="uncompressed") as handle:
                self._refuse(handle.read(), " (if no scan is running, delete the lock)")
        with FileSystems.create(self.path) as handle:
            handle.write(holder)

    def __exit__(self, *exc_info):
        if self.local:
            os.unlink(self.path.removeprefix("file://"))
            assert self._fd is not None  # set by __enter__
            os.close(self._fd)
        else:
            FileSystems.delete([self.path])
