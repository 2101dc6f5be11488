"""Curation: a scan's tables -> what a training job reads. One decision per sample, identified
by shard and key (kept, or dropped with a reason), the kept samples' 128-bit uids as a sorted
``u8,u8`` array (DataComp's keep-list), and re-sharded WebDataset tars in img2dataset's layout
that hold only the kept samples with all their members, under their uids.

Everything here is a function of the tables and the shards alone, in a fixed order, so that the
same inputs give byte-identical outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from anchorscan.anchors.errors import UsageError, UserError
from anchorscan.anchors.io.shards import SHARD_EXTENSIONS, open_shard, samples
from anchorscan.anchors.io.sources import ReadError, ReadLimits
from anchorscan.anchors.tables import CLASH_PREFIX, SCORE_SCHEMA

# Why a sample was dropped, in the order the rules apply (a sample gets the first that fits).
UNREADABLE = "unreadable"  # in the errors table: no image to judge
INVALID_SCORE = "invalid_score"  # its score row has a NaN or null score, or a null is_suspect
OTHER_ANCHOR = "other_anchor"  # --follow_anchor: scored by another anchor only
DUPLICATE = "duplicate"  # the same bytes as an earlier sample (the first by shard and key is kept)
DUPLICATE_UID = "duplicate_uid"  # its uid was kept for an earlier sample (a keep-list names a uid once)
DECLARED_AI = "declared_ai"  # its own metadata declares it AI-generated or AI-edited (score's provenance)
SUSPECT = "suspect"  # --keep fpr: the detector calls it suspect (the anchor: p below its fpr)
SCORE_ABOVE = "score_above"  # --max_score S: score above S
TOP_FRACTION = "top_fraction"  # --drop_top F: among the fraction F with the highest scores
REASONS = (
    UNREADABLE,
    INVALID_SCORE,
    OTHER_ANCHOR,
    DUPLICATE,
    DUPLICATE_UID,
    DECLARED_AI,
    SUSPECT,
    SCORE_ABOVE,
    TOP_FRACTION,
)
DECLARED_AI_KINDS = ("ai_generated", "ai_edited")

# The columns every curation table has, in this order; the scan's carried columns follow.
CURATION_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("keep", pa.bool_()),
        ("dropped", pa.string()),
        ("score", pa.float64()),
        ("p_value", pa.float64()),
        ("is_suspect", pa.bool_()),
        ("softness", pa.string()),
        ("sha256", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("uid", pa.string()),
        ("uid_from", pa.string()),
        ("anchor_id", pa.string()),
        ("error", pa.string()),
    ]
)
# What a score table must hold to be curated: a table without one of them is not a scan's.
REQUIRED_SCORE_COLUMNS = ("uri", "sha256", "score", "is_suspect", "anchor_id")
_EXTENSIONS = "|".join(extension.lstrip(".").replace(".", r"\.") for extension in SHARD_EXTENSIONS)
# (?s): a key may hold a newline; it is still that shard's key.
SAMPLE_PATTERN = rf"(?s)^(?P<shard>.*?\.(?i:{_EXTENSIONS}))#(?P<key>.*)$"
SHARD_PATTERN = rf"(?s)^.*\.(?i:{_EXTENSIONS})$"
UID_PATTERN = r"^[0-9a-fA-F]{32}$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
ROW_GROUP_ROWS = 65_536
UID_DTYPE = np.dtype("u8,u8")


@dataclasses.dataclass(frozen=True)
class KeepRule:
    """Which scored samples are kept: without a threshold, those the detector does not call
    suspect (the anchor's false-positive rate); ``max_score``: those scoring at most S;
    ``drop_top``: all but the fraction F with the highest scores."""

    max_score: float | None = None
    drop_top: float | None = None
    declared_ai: bool = True  # --provenance use: samples declaring an AI origin dropped first

    def describe(self) -> str:
        if self.max_score is not None:
            return f"--max_score {self.max_score:g}: samples scoring above it dropped"
        if self.drop_top is not None:
            return f"--drop_top {self.drop_top:g}: the {self.drop_top:.1%} highest scores dropped"
        return "--keep fpr: samples the detector calls suspect dropped (the anchor's false-positive rate)"


def _column(table: pa.Table, name: str, kind: pa.DataType) -> pa.ChunkedArray:
    """A column as ``kind``, or nulls where the table has none (a scan without sidecars)."""
    if name in table.column_names:
        return pc.cast(table[name], kind)
    return pa.chunked_array([pa.nulls(len(table), kind)], kind)


def _located(table: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(shard, key) of each row: the ``shard`` and ``key`` the scan carried for a sample of a
    shard (the reader's own, whatever the URI spells), else split from the URI ``SHARD#KEY``;
    an image outside shards has no shard, and its URI as key."""
    uris = _column(table, "uri", pa.string())
    parts = pc.extract_regex(uris, SAMPLE_PATTERN)
    shard, key = pc.struct_field(parts, "shard"), pc.struct_field(parts, "key")
    key = pc.if_else(pc.is_null(key), uris, key)
    carried_shard, carried_key = _column(table, "shard", pa.string()), _column(table, "key", pa.string())
    carried = pc.and_(
        pc.fill_null(pc.match_substring_regex(carried_shard, SHARD_PATTERN), False),
        pc.is_valid(carried_key),
    )
    return pc.if_else(carried, carried_shard, shard), pc.if_else(carried, carried_key, key)


def carried_fields(schemas: list[pa.Schema]) -> list[pa.Field]:
    """The columns the scans carried (manifest and sidecar columns: every column of a score
    table that is neither a score column nor one of the curation table's own), in order of
    first appearance; a name met with two types is text."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            if field.name in SCORE_SCHEMA.names or field.name in CURATION_SCHEMA.names:
                continue
            known = fields.get(field.name)
            fields[field.name] = field.with_type(pa.string()) if known and known.type != field.type else field
    return list(fields.values())


def check_score_table(columns: list[str], name: str) -> None:
    """Refuses a table (its ``columns``) that cannot say what the detector found for its rows."""
    missing = [column for column in REQUIRED_SCORE_COLUMNS if column not in columns]
    if missing:
        raise UsageError(
            f"{name}: no {', '.join(missing)} column: not a scores table of `anchorscan score`; "
            "give --scores the --output prefix of a scan"
        )


def check_anchors(scores: list[pa.Table], follow_anchor: str | None) -> None:
    """Refuses scans made with different anchors (their scores and suspect calls do not
    compare), unless ``follow_anchor`` names the one whose decisions count; and the rows that
    decide scored with different heads (a head's score is on another scale)."""
    anchors = sorted(
        {value or "none" for table in scores for value in pc.unique(table["anchor_id"]).to_pylist()}
    )
    if follow_anchor is not None and follow_anchor not in anchors:
        raise UsageError(
            f"--follow_anchor {follow_anchor}: no scores table was made with it; "
            f"the scans' anchors: {', '.join(anchors) or 'none'}"
        )
    if follow_anchor is None and len(anchors) > 1:
        raise UsageError(
            f"--scores: the scans were made with different anchors ({', '.join(anchors)}: the "
            "anchor_id column), whose scores do not compare; curate each scan alone, or pass "
            f"--follow_anchor {anchors[0]} to decide by that anchor's rows"
        )
    heads = set()
    for table in scores:
        deciding = table
        if follow_anchor is not None:
            deciding = table.filter(pc.equal(pc.fill_null(table["anchor_id"], "none"), follow_anchor))
        heads |= set(pc.unique(_column(deciding, "head", pa.string())).to_pylist())
    if len(heads) > 1:
        names = ", ".join(sorted(head or "no head" for head in heads))
        raise UsageError(
            f"--scores: the scans' scores come from different heads ({names}: the head column), "
            "whose scores do not compare; curate each scan alone"
        )


def _part(table: pa.Table, scored: bool, follow_anchor: str | None, carried: list[pa.Field]) -> pa.Table:
    """A table's rows (or a batch of them) with the columns a decision needs and the
    ``carried`` ones (score tables of several scans may carry different columns)."""
    shard, key = _located(table)
    anchor_score = _column(table, "anchor_score", pa.float64())
    anchor_id = _column(table, "anchor_id", pa.string())
    followed = (
        pc.equal(pc.fill_null(anchor_id, "none"), follow_anchor)
        if follow_anchor is not None and scored
        else pa.chunked_array([pa.array(np.full(len(table), True))])
    )
    columns = {
        "uri": _column(table, "uri", pa.string()),
        "shard": shard,
        "key": key,
        "scored": pa.chunked_array([pa.array(np.full(len(table), scored))]),
        "followed": followed,
        "score": _column(table, "score", pa.float64()),
        "p_value": pc.power(10.0, pc.negate(anchor_score)),
        "is_suspect": _column(table, "is_suspect", pa.bool_()),
        "softness": _column(table, "softness", pa.string()),
        "sha256": _column(table, "sha256", pa.string()),
        "url": _column(table, "url", pa.string()),
        "caption": _column(table, "caption", pa.string()),
        "uid": _column(table, "uid", pa.string()),
        "anchor_id": anchor_id,
        "error": _column(table, "error", pa.string()),
        "provenance": _column(table, "provenance", pa.string()),
        **{field.name: _column(table, field.name, field.type) for field in carried},
    }
    return pa.table(columns)


def _rows(scores: list[pa.Table], errors: list[pa.Table], follow_anchor: str | None) -> pa.Table:
    """Every table's rows (``_part``) in one table."""
    carried = carried_fields([table.schema for table in scores])
    parts = [_part(table, True, follow_anchor, carried) for table in scores]
    parts += [_part(table, False, follow_anchor, carried) for table in errors]
    if not parts:
        return _rows([], [pa.table({"uri": pa.array([], pa.string())})], follow_anchor)
    return pa.concat_tables(parts)


# Samples decided at a time: the launcher holds the rows of one bucket (whole shards), and for
# what spans buckets 16 bytes a sample for each of the image hashes and uids met, 16 per kept
# uid (the keep-list) and, with --drop_top, 8 per score.
BUCKET_ROWS = 131_072


@dataclasses.dataclass(frozen=True)
class TableFile:
    """One of a scan's Parquet tables: its name, whether it is a scores table (else errors),
    and how to open it (a seekable binary file)."""

    name: str
    scored: bool
    open: Callable[[], BinaryIO]


def _batches(table: TableFile, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A table's rows, ROW_GROUP_ROWS at a time; ``columns``: only those of them it has."""
    with table.open() as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        wanted = [name for name in columns if name in names] if columns is not None else names
        for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS, columns=wanted or names):
            yield pa.Table.from_batches([batch])


class ScanRows:
    """The rows of a scan's tables (scores tables first, then errors, as ``decide`` takes them)
    read from their files a batch at a time: checked (``check_score_table``, ``check_anchors``)
    and counted per shard when made, then (``buckets``) written to local files, one per bucket
    of whole shards, and handed back a bucket at a time in shard order, for ``decide_buckets``.
    Images outside shards are one bucket, the last."""

    def __init__(self, tables: list[TableFile], follow_anchor: str | None) -> None:
        self.tables, self.follow_anchor = tables, follow_anchor
        schemas = []
        for table in tables:
            if table.scored:
                with table.open() as handle:
                    schemas.append(pq.read_schema(handle))
                check_score_table(schemas[-1].names, table.name)
        self.carried = carried_fields(schemas)
        self.schema = pa.schema([*CURATION_SCHEMA, *self.carried])
        per_shard: Counter = Counter()
        anchors = []
        for table in tables:
            for batch in _batches(table, ["uri", "shard", "key", "anchor_id", "head"]):
                shard, _ = _located(batch)
                per_shard.update(
                    {row["values"]: row["counts"] for row in pc.value_counts(shard.drop_null()).to_pylist()}
                )
                if table.scored:
                    pair = {name: _column(batch, name, pa.string()) for name in ("anchor_id", "head")}
                    anchors.append(pa.table(pair).group_by(["anchor_id", "head"]).aggregate([]))
        check_anchors(anchors, follow_anchor)
        self.shards = sorted(per_shard)
        bucket, filled, numbers = 0, 0, []
        for shard in self.shards:
            if filled and filled + per_shard[shard] > BUCKET_ROWS:
                bucket, filled = bucket + 1, 0
            numbers.append(bucket)
            filled += per_shard[shard]
        # Each shard's bucket, then that of the images outside shards.
        self.bucket_of = np.array([*numbers, bucket + 1 if numbers else 0], dtype=np.int64)

    def buckets(self) -> Iterator[pa.Table]:
        with tempfile.TemporaryDirectory(prefix="anchorscan-curate-") as folder:
            paths = [os.path.join(folder, f"{number}.arrow") for number in range(len(self.bucket_of))]
            # Arrow's own file format, LZ4-compressed: written and read back at memory speed.
            options = pa.ipc.IpcWriteOptions(compression="lz4")
            writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
            shards = pa.array(self.shards, pa.string())
            for table in self.tables:
                for batch in _batches(table):
                    part = _part(batch, table.scored, self.follow_anchor, self.carried)
                    position = pc.fill_null(pc.index_in(part["shard"], value_set=shards), len(self.shards))
                    numbers = self.bucket_of[position.to_numpy()]
                    order = np.argsort(numbers, kind="stable")
                    part, numbers = part.take(order), numbers[order]
                    starts = np.flatnonzero(np.diff(numbers, prepend=-1))  # where each bucket's rows begin
                    for start, end in zip(starts, [*starts[1:], len(numbers)]):
                        number = int(numbers[start])
                        if number not in writers:
                            writers[number] = pa.ipc.new_file(paths[number], part.schema, options=options)
                        writers[number].write_table(part.slice(start, end - start))
            for writer in writers.values():
                writer.close()
            for number in sorted(writers):
                with pa.OSFile(paths[number]) as spilled:
                    yield pa.ipc.open_file(spilled).read_all()
            if not writers:  # no rows: one empty bucket, for the table's schema
                yield _part(pa.table({"uri": pa.array([], pa.string())}), False, None, self.carried)


def digest_halves(values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Each value's 128-bit BLAKE2b digest (of its UTF-8; nulls get zeros) as its high and low
    64 bits."""
    digests = b"".join(
        bytes(16) if value is None else hashlib.blake2b(value.encode("utf-8"), digest_size=16).digest()
        for value in values.to_pylist()
    )
    halves = np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return halves[:, 0].copy(), halves[:, 1].copy()


class Seen:
    """The values met so far, in the order samples are decided, as 128-bit numbers (16 bytes a
    value however long it is: a uid, or ``digest_halves`` of a hash), sorted by their high
    half: which of the next values are the first of their kind. A null is a value of its own,
    as Arrow groups it."""

    def __init__(self) -> None:
        self.high, self.low = np.empty(0, np.uint64), np.empty(0, np.uint64)
        self.null = False

    def first(self, high: np.ndarray, low: np.ndarray, null: np.ndarray) -> np.ndarray:
        """Whether each of these values (``high``, ``low`` halves; ``null``: which are null) is
        the first of its kind, here or before."""
        # In sorted order (stable: equal values stay in their order), where a search is fast.
        order = np.lexsort((low, high))
        high, low, null = high[order], low[order], null[order]
        first = np.r_[True, (high[1:] != high[:-1]) | (low[1:] != low[:-1])][: len(order)] & ~null
        # Met before: the same high half (searched), then the same low half (compared).
        left, right = np.searchsorted(self.high, high, "left"), np.searchsorted(self.high, high, "right")
        for index in np.flatnonzero((right > left) & first):
            if (self.low[left[index] : right[index]] == low[index]).any():
                first[index] = False
        # A sorted run after a sorted run: a stable sort (timsort) merges them in linear time.
        merged = np.argsort(np.concatenate([self.high, high[first]]), kind="stable")
        self.high = np.concatenate([self.high, high[first]])[merged]
        self.low = np.concatenate([self.low, low[first]])[merged]
        # Nulls: one value, not a number; the first of them the first null ever met, if it is.
        nulls = np.flatnonzero(null)
        if len(nulls) and not self.null:
            first[nulls[0]] = self.null = True
        in_order = np.empty(len(order), dtype=bool)
        in_order[order] = first
        return in_order


def _first_of_each_sample(rows: pa.Table) -> np.ndarray:
    """Whether each row (sorted by shard and key) is the first of its (shard, key)."""
    first = np.ones(len(rows), dtype=bool)
    if len(rows) > 1:
        shards, keys = pc.fill_null(rows["shard"], ""), rows["key"]
        later, earlier = slice(1, None), slice(0, len(rows) - 1)
        differs = pc.or_(
            pc.not_equal(shards[later], shards[earlier]), pc.not_equal(keys[later], keys[earlier])
        )
        first[1:] = differs.to_numpy(zero_copy_only=False)
    return first


def _derived_uid(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def sample_uids(rows: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(uid, where it came from) of each row: the crawl's own ``uid`` where it is 128 bits (32
    hex digits, as DataComp's pools have), else the first 32 hex digits of the SHA-256 of the
    sample's URL (UTF-8), else the first 32 of its image's SHA-256, else (a hand-made table
    without either) of the SHA-256 of its URI."""
    uids, sources = [], []
    # In batches: a table's worth of Python strings at once would be most of curate's memory.
    for batch in rows.select(["uid", "url", "sha256", "uri"]).to_batches(max_chunksize=ROW_GROUP_ROWS):
        given, url, sha256, uri = batch.columns
        # Which rule gives each row its uid, the first that can: as masks, one per source.
        left = np.ones(len(batch), dtype=bool)
        rules = (
            ("uid", pc.match_substring_regex(given, UID_PATTERN), given, pc.utf8_lower),
            ("url", pc.greater(pc.binary_length(url), 0), url, _derived_uids),
            (
                "sha256",
                pc.match_substring_regex(sha256, SHA256_PATTERN),
                sha256,
                lambda kept: pc.utf8_lower(pc.utf8_slice_codeunits(kept, 0, 32)),
            ),
            ("uri", pc.is_valid(uri), uri, _derived_uids),
        )
        batch_uids = np.full(len(batch), None, dtype=object)
        batch_sources = np.full(len(batch), None, dtype=object)
        for source, usable, values, derive in rules:
            taken = left & pc.fill_null(usable, False).to_numpy(zero_copy_only=False)
            batch_uids[taken] = derive(values.filter(pa.array(taken))).to_pylist()
            batch_sources[taken] = source
            left &= ~taken
        uids.append(pa.array(batch_uids, pa.string()))
        sources.append(pa.array(batch_sources, pa.string()))
    return pa.chunked_array(uids, pa.string()), pa.chunked_array(sources, pa.string())


def _derived_uids(texts: pa.Array) -> pa.Array:
    return pa.array([_derived_uid(text) for text in texts.to_pylist()], pa.string())


def decide(
    scores: list[pa.Table],
    errors: list[pa.Table],
    rule: KeepRule = KeepRule(),
    follow_anchor: str | None = None,
) -> pa.Table:
    """One row per sample of the scans, identified by shard and key (CURATION_SCHEMA, then the
    carried columns), sorted by shard and key: kept, or dropped with the first reason of REASONS
    that fits. A sample in several tables (a shard in two scans) is one sample: its score row
    wins over an error row, the followed anchor's over another's, the first table's over later
    ones'. Scans made with different anchors are refused unless ``follow_anchor`` names one.
    The tables in memory, decided as one bucket (``ScanRows`` streams them from files)."""
    check_anchors(scores, follow_anchor)
    return pa.concat_tables(decide_buckets([_rows(scores, errors, follow_anchor)], rule))


def decide_buckets(buckets: Iterable[pa.Table], rule: KeepRule) -> Iterator[pa.Table]:
    """``decide`` over buckets of rows (``_part``), each holding whole shards, the buckets in
    shard order: the decided samples of each, in order. What spans buckets is carried from one
    to the next: the image hashes and uids met (``Seen``), and for --drop_top the scores still
    kept (8 bytes a sample), the buckets waiting on disk until the highest are known."""
    images, uids = Seen(), Seen()
    decided = (_decided_bucket(rows, images, uids, rule.declared_ai) for rows in buckets)
    if rule.drop_top is None:
        for table in decided:
            yield _by_rule(table, rule, None)
        return
    with tempfile.TemporaryDirectory(prefix="anchorscan-curate-") as folder:
        paths, scores = [], []
        for number, table in enumerate(decided):
            paths.append(os.path.join(folder, f"{number}.parquet"))
            pq.write_table(table, paths[-1])
            scores.append(table.filter(table["keep"])["score"].to_numpy(zero_copy_only=False))
        score = np.concatenate(scores) if scores else np.empty(0)
        # ceil of F n, rounded first so that 0.1 x 30 drops 3, not the 4 its float product says
        dropping = math.ceil(round(rule.drop_top * len(score), 9))
        marked = np.zeros(len(score), dtype=bool)
        marked[np.argsort(-score, kind="stable")[:dropping]] = True
        offset = 0
        for path in paths:
            table = pq.read_table(path)
            kept = pc.sum(table["keep"]).as_py() or 0
            yield _by_rule(table, rule, marked[offset : offset + kept])
            offset += kept


def _decided_bucket(rows: pa.Table, images: Seen, uids_met: Seen, declared_ai: bool) -> pa.Table:
    """A bucket's samples (CURATION_SCHEMA, then the carried columns), sorted by shard and key,
    dropped for every reason up to the keep rule's (``_by_rule`` applies it)."""
    rows = rows.sort_by(
        [
            ("shard", "ascending"),
            ("key", "ascending"),
            ("scored", "descending"),
            ("followed", "descending"),
            ("uri", "ascending"),
        ]
    )
    rows = rows.filter(pa.array(_first_of_each_sample(rows)))
    count = len(rows)
    dropped = np.full(count, "", dtype=object)
    scored = rows["scored"].to_numpy(zero_copy_only=False).astype(bool)
    dropped[~scored] = UNREADABLE
    invalid = pc.or_(pc.fill_null(pc.is_nan(rows["score"]), True), pc.is_null(rows["is_suspect"])).to_numpy(
        zero_copy_only=False
    )

    def drop(reason: str, among: np.ndarray, which: np.ndarray) -> None:
        """Among the still-kept rows ``among`` (indices), drops those ``which`` marks."""
        dropped[among[which]] = reason

    def still_kept() -> np.ndarray:
        return np.flatnonzero(dropped == "")

    drop(INVALID_SCORE, still_kept(), invalid[still_kept()])
    among = still_kept()
    drop(OTHER_ANCHOR, among, ~rows["followed"].to_numpy(zero_copy_only=False).astype(bool)[among])
    among = still_kept()
    hashes = pc.take(rows["sha256"], among)
    drop(DUPLICATE, among, ~images.first(*digest_halves(hashes), pc.is_null(hashes).to_numpy(False)))
    uids, sources = sample_uids(rows)
    among = still_kept()
    kept_uids = pc.take(uids, among)
    null = pc.is_null(kept_uids).to_numpy(zero_copy_only=False)
    drop(DUPLICATE_UID, among, ~uids_met.first(*_uid_halves(kept_uids), null))
    if declared_ai:
        among = still_kept()
        provenance = rows["provenance"].to_numpy(zero_copy_only=False)[among]
        drop(DECLARED_AI, among, np.isin(provenance, DECLARED_AI_KINDS))
    carried = [name for name in rows.column_names if name not in CURATION_SCHEMA.names]
    carried.remove("scored")
    carried.remove("followed")
    carried.remove("provenance")
    decided = rows.set_column(rows.schema.get_field_index("uid"), "uid", uids)
    decided = decided.append_column("uid_from", sources)
    decided = _with_decisions(decided.append_column("keep", pa.nulls(count, pa.bool_())), dropped)
    schema = pa.schema([*CURATION_SCHEMA, *(rows.schema.field(name) for name in carried)])
    return decided.select(schema.names).cast(schema)


def _with_decisions(decided: pa.Table, dropped: np.ndarray) -> pa.Table:
    """``decided`` with its keep and dropped columns set from ``dropped`` ("" where kept)."""
    keep = pa.array(dropped == "")
    decided = decided.set_column(decided.schema.get_field_index("keep"), "keep", keep)
    reasons = pa.array(dropped.tolist(), pa.string())
    if "dropped" in decided.column_names:
        return decided.set_column(decided.schema.get_field_index("dropped"), "dropped", reasons)
    return decided.append_column("dropped", reasons)


def _by_rule(decided: pa.Table, rule: KeepRule, top: np.ndarray | None) -> pa.Table:
    """A bucket's samples with the keep rule applied to those still kept; ``top``: for
    --drop_top, which of them are among the highest scores of all buckets."""
    dropped = np.array(decided["dropped"].to_pylist(), dtype=object)
    among = np.flatnonzero(dropped == "")
    if rule.max_score is not None:
        score = decided["score"].to_numpy(zero_copy_only=False).astype(float)
        dropped[among[score[among] > rule.max_score]] = SCORE_ABOVE
    elif top is not None:
        dropped[among[top]] = TOP_FRACTION
    else:
        suspect = pc.fill_null(decided["is_suspect"], False).to_numpy(zero_copy_only=False)
        dropped[among[suspect[among]]] = SUSPECT
    return _with_decisions(decided, dropped)


def _value_counts(values: pa.ChunkedArray | pa.Array) -> Counter:
    return Counter({row["values"]: row["counts"] for row in pc.value_counts(values).to_pylist()})


class Tally:
    """What curate reports of its decisions, added up as they are made (``add``, a bucket of
    decided samples at a time): the summary's counts, the kept samples per shard (re-sharding's
    plan), the --by counts (``by``: column names) and the kept uids (16 bytes each)."""

    def __init__(self, by: list[str]) -> None:
        self.by = by
        self.samples = 0
        self.shards: set[str] = set()
        self.reasons: Counter = Counter()
        self.kept_per_shard: Counter = Counter()
        self.values: dict[str, Counter] = {column: Counter() for column in by}
        self.uids: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.uint64), np.empty(0, np.uint64))]

    def add(self, decided: pa.Table) -> None:
        self.samples += len(decided)
        self.shards.update(pc.unique(decided["shard"].drop_null()).to_pylist())
        self.reasons.update(_value_counts(decided["dropped"]))
        self.kept_per_shard.update(
            {
                count["values"]: count["counts"]
                for count in pc.value_counts(_kept_in_shards(decided)["shard"]).to_pylist()
            }
        )
        for column in self.by:
            pairs = pa.table({"value": pc.cast(decided[column], pa.string()), "dropped": decided["dropped"]})
            for group in pairs.group_by(["value", "dropped"]).aggregate([([], "count_all")]).to_pylist():
                self.values[column][group["value"], group["dropped"]] += group["count_all"]
        self.uids.append(_uid_halves(decided.filter(decided["keep"])["uid"]))

    def summary(self) -> dict:
        """Counts for the one-screen summary: samples, shards, kept (in shards, and images
        outside shards, which are listed but not re-sharded), and dropped by reason."""
        return {
            "samples": self.samples,
            "shards": len(self.shards),
            "kept": self.reasons[""],
            "kept_in_shards": sum(self.kept_per_shard.values()),
            "dropped": {reason: self.reasons[reason] for reason in REASONS if self.reasons[reason]},
        }

    def breakdown(self) -> pa.Table:
        """Per value of each --by column (as text; null where a sample has none): samples,
        kept, dropped, and the dropped by each reason, the values sorted."""
        rows = []
        for column in self.by:
            counts: dict = {}
            for (value, reason), count in self.values[column].items():
                counts.setdefault(value, Counter())[reason] += count
            for value in sorted(counts, key=lambda v: (v is None, v or "")):
                tally = counts[value]
                total = sum(tally.values())
                rows.append(
                    {
                        "column": column,
                        "value": value,
                        "samples": total,
                        "kept": tally[""],
                        "dropped": total - tally[""],
                        **{reason: tally[reason] for reason in REASONS},
                    }
                )
        fields = [("column", pa.string()), ("value", pa.string())]
        fields += [(name, pa.int64()) for name in ("samples", "kept", "dropped", *REASONS)]
        return pa.Table.from_pylist(rows, schema=pa.schema(fields))

    def keys(self) -> np.ndarray:
        """DataComp's keep-list of the kept samples (``key_array``)."""
        halves = (
            [np.concatenate(half) for half in zip(*self.uids)] if self.uids else [np.empty(0, np.uint64)] * 2
        )
        return _keep_list(*halves)


def summary(decided: pa.Table) -> dict:
    """``Tally.summary`` of a table of decided samples."""
    tally = Tally([])
    tally.add(decided)
    return tally.summary()


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes, the same bytes for the same table."""
    buffer = io.BytesIO()
    # Small row groups: a re-sharding task reads only those of the shards it takes samples from.
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


class RowGroupWriter:
    """A table written to ``sink`` (a binary file) as its parts come (``write``), in row groups
    of ROW_GROUP_ROWS: once closed, the bytes ``parquet_bytes`` gives for the whole table,
    without the whole table in memory."""

    def __init__(self, sink: BinaryIO, schema: pa.Schema) -> None:
        self.writer = pq.ParquetWriter(sink, schema, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = self.written = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += len(table)
        while self.pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        pending = pa.concat_tables(self.pending)
        # One chunk a column, as the whole table has: a chunk boundary moves the page boundaries.
        self.writer.write_table(pending.slice(0, rows).combine_chunks(), row_group_size=ROW_GROUP_ROWS)
        self.pending, self.pending_rows = [pending.slice(rows)], len(pending) - rows
        self.written += rows

    def close(self) -> None:
        if self.pending_rows or not self.written:  # an empty table is one empty row group
            self._flush(self.pending_rows)
        self.writer.close()


# Each hex digit's ASCII code -> its value (uids are lower case by now).
_HEX_VALUES = np.zeros(256, dtype=np.uint64)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)


def _uid_halves(uids: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The 128-bit uids (32 hex digits) as their high and low 64 bits."""
    text = pa.chunked_array(pc.fill_null(uids, "0" * 32).chunks, pa.string()).combine_chunks()
    if not len(text):
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    if pc.any(pc.not_equal(pc.binary_length(text), 32)).as_py():
        raise ValueError("uids are 32 hex digits")
    # Their 32 ASCII digits each, end to end in the array's data buffer (a null's: zeros).
    offsets = np.frombuffer(text.buffers()[1], np.int32)[text.offset : text.offset + len(text) + 1]
    data = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    digits = _HEX_VALUES[data.reshape(-1, 32)]
    halves = [np.zeros(len(digits), dtype=np.uint64) for _ in range(2)]
    for half, first in zip(halves, (0, 16)):
        for position in range(16):  # big-endian hex: shift in one digit at a time
            half[:] = (half << np.uint64(4)) | digits[:, first + position]
    return halves[0], halves[1]


def _keep_list(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    order = np.lexsort((low, high))
    array = np.empty(len(high), dtype=UID_DTYPE)
    array["f0"], array["f1"] = high[order], low[order]
    return array


def key_array(kept: pa.Table) -> np.ndarray:
    """DataComp's keep-list of the kept samples: their 128-bit uids (``sample_uids``) as a
    structured array of two little-endian uint64 fields (``np.dtype("u8,u8")``: the uid's high
    and low halves), sorted, as DataComp's resharder reads it."""
    return _keep_list(*_uid_halves(kept["uid"]))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# --- re-sharding ----------------------------------------------------------------------------


class ReshardError(UserError):
    """A shard no longer holds what was scored (changed or gone since the scan)."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of one input shard that goes into an output shard: of its kept samples, in the
    shard's order, ``take`` after the first ``skip``."""

    shard: str
    skip: int
    take: int


@dataclasses.dataclass(frozen=True)
class OutputShard:
    name: str
    pieces: tuple[Piece, ...]


def output_names(prefix: str, count: int) -> list[str]:
    width = max(5, len(str(count - 1)))
    return [f"{prefix}-{index:0{width}d}.tar" for index in range(count)]


def _kept_in_shards(decided: pa.Table) -> pa.Table:
    return decided.filter(pc.and_(decided["keep"], pc.is_valid(decided["shard"])))


def reshard_plan(by_shard: dict[str, int], prefix: str, samples_per_shard: int) -> list[OutputShard]:
    """The output shards: the kept samples of the input shards (sorted by URI), each shard's in
    its own order, cut into shards of ``samples_per_shard``; every output shard a task of its
    own that reads the one or few input shards it takes samples from (the kept keys each task
    looks for come from the curation table, ``kept_by_shard``, not from the plan). ``by_shard``:
    the kept samples of each input shard (``Tally.kept_per_shard``)."""
    names = output_names(prefix, math.ceil(sum(by_shard.values()) / samples_per_shard))
    plan: list[list[Piece]] = [[] for _ in names]
    offset = 0
    for shard in sorted(by_shard):
        first, last = offset, offset + by_shard[shard]  # this shard's kept samples, numbered globally
        for index in range(first // samples_per_shard, (last - 1) // samples_per_shard + 1):
            start, end = max(first, index * samples_per_shard), min(last, (index + 1) * samples_per_shard)
            plan[index].append(Piece(shard, start - first, end - start))
        offset = last
    return [OutputShard(name, tuple(pieces)) for name, pieces in zip(names, plan)]


# What an output shard's sidecar holds beside the carried columns: the sample's key in the
# output (its uid, as DataComp's resharder names samples), its uid, and where it came from.
SIDECAR_OWN = (("uid", "key"), ("uid", "uid"), ("url", "url"), ("caption", "caption"), ("uri", "source"))


def sidecar_columns(curation: pa.Schema) -> list[tuple[str, str]]:
    """(column of the curation table, column of an output shard's sidecar): SIDECAR_OWN, then
    every carried column, under the name the crawl gave it (``manifest_width`` -> ``width``:
    the scan renamed it only because a score column has that name)."""
    columns = list(SIDECAR_OWN)
    taken = {name for _, name in columns}
    for name in curation.names[len(CURATION_SCHEMA) :]:
        plain = name[len(CLASH_PREFIX) :] if name.startswith(CLASH_PREFIX) else name
        sidecar = plain if plain in SCORE_SCHEMA.names and plain not in taken else name
        if sidecar not in taken:
            columns.append((name, sidecar))
            taken.add(sidecar)
    return columns


def kept_by_shard(curation_table, shards: list[str]) -> tuple[dict[str, dict[str, dict]], pa.Schema]:
    """(shard -> {kept key: its curation row}, the curation table's schema), for ``shards``,
    from a curation table (a path or a file object; rows sorted by shard, so only the row groups
    of these shards are read)."""
    table = pq.read_table(curation_table, filters=[("shard", "in", list(shards)), ("keep", "==", True)])
    kept: dict[str, dict[str, dict]] = {shard: {} for shard in shards}
    for row in table.to_pylist():
        kept[row["shard"]][row["key"]] = row
    return kept, table.schema


def _kept_samples(piece: Piece, kept: dict[str, dict], limits: ReadLimits):
    """The samples of ``piece``, read from its shard, each checked against what was scored."""
    ordinal, taken = 0, 0
    with contextlib.ExitStack() as opened:
        try:
            stream = opened.enter_context(open_shard(piece.shard, limits.http))
        except ReadError as error:  # gone or unreadable since the scan
            raise ReshardError(
                f"{piece.shard}: the scan read this shard, which cannot be read now ({error}): put "
                "it back where the scan found it, or score it where it is now, then curate"
            ) from None
        for sample in samples(stream, limits):
            if sample.key not in kept or sample.problem:
                continue
            ordinal += 1
            if ordinal <= piece.skip:
                continue
            try:
                image = sample.image()
            except ReadError as error:
                raise ReshardError(
                    f"{piece.shard}: sample {sample.key!r}: {error} (changed since the scan?)"
                ) from None
            if hashlib.sha256(image.data).hexdigest() != kept[sample.key]["sha256"]:
                raise ReshardError(
                    f"{piece.shard}: the image of sample {sample.key!r} is not the one that was "
                    "scored (the shard changed since the scan): score it again, then curate"
                )
            yield sample
            taken += 1
            if taken == piece.take:
                return
    raise ReshardError(
        f"{piece.shard}: holds {ordinal} of the {piece.skip + piece.take} kept samples the scan "
        "read from it (the shard changed since the scan): score it again, then curate"
    )


def _with_uid(metadata: bytes | None, uid: str) -> bytes:
    """A sample's JSON member with its output key and uid set (DataComp's resharder finds a
    sample's uid there); one holding only them where it had none, or no JSON object."""
    try:
        fields = json.loads(metadata) if metadata is not None else {}
    except ValueError:
        fields = {}
    fields = fields if isinstance(fields, dict) else {}
    return json.dumps({**fields, "key": uid, "uid": uid}, ensure_ascii=False).encode("utf-8")


def _output_members(sample, uid: str):
    """(name, bytes) of a kept sample's members in its output shard: renamed to its uid (keys
    of two crawls may be the same), the JSON member given the uid."""
    members = [(uid + member.name[len(sample.key) :], member) for member in sample.members]
    if not any(member.extension == "json" for _, member in members):
        yield f"{uid}.json", _with_uid(None, uid)
    for name, member in members:
        yield name, _with_uid(member.data, uid) if member.extension == "json" else member.data


def write_output_shard(
    output: OutputShard, kept: dict[str, dict[str, dict]], handle, limits: ReadLimits
) -> list[dict]:
    """Writes one output shard to the writable ``handle``: every member of each kept sample
    (``kept``: as ``kept_by_shard`` gives), in order, under its uid (``_output_members``), with
    fixed owners, modes and times, so the bytes depend on the samples alone. Returns the
    curation rows of the samples written, in order."""
    written = []
    with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for piece in output.pieces:
            for sample in _kept_samples(piece, kept[piece.shard], limits):
                row = kept[piece.shard][sample.key]
                for name, data in _output_members(sample, row["uid"]):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    archive.addfile(info, io.BytesIO(data))
                written.append(row)
    return written


def sidecar_bytes(rows: list[dict], curation: pa.Schema) -> bytes:
    """An output shard's sidecar (img2dataset's ``NNNNN.parquet``): one row per sample written,
    in the shard's order, ``sidecar_columns``."""
    columns = sidecar_columns(curation)
    schema = pa.schema([curation.field(source).with_name(name) for source, name in columns])
    table = pa.Table.from_pylist(
        [{name: row[source] for source, name in columns} for row in rows], schema=schema
    )
    return parquet_bytes(table)


def stats_bytes(count: int) -> bytes:
    """An output shard's ``NNNNN_stats.json``, img2dataset's counts (DataComp's resharder reads
    ``successes``); no times, so the bytes depend on the samples alone."""
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "status_dict": {"success": count} if count else {},
    }
    return json.dumps(stats, indent=2, sort_keys=True).encode()


def stats_name(shard: str) -> str:
    return shard[: -len(".tar")] + "_stats.json"


def sidecar_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".parquet"


def wids_index_name(prefix: str) -> str:
    return f"{prefix}-shardindex.json"


def wids_index_bytes(prefix: str, shards: list[tuple[str, int, int]]) -> bytes:
    """The output's wids shard index (``wids-shard-index-v1``): (shard, samples, bytes) each,
    sorted, with shard names relative to the index, which lies beside them."""
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": posixpath.basename(prefix),
        "shardlist": [
            {"url": posixpath.basename(name), "nsamples": count, "filesize": size}
            for name, count, size in sorted(shards)
        ],
    }
    return json.dumps(index, indent=2).encode()


def indexed_samples(index: bytes) -> int:
    """The samples a wids shard index counts in its shards."""
    return sum(int(shard["nsamples"]) for shard in json.loads(index)["shardlist"])
