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
import posixpath
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def carried_fields(scores: list[pa.Table]) -> list[pa.Field]:
    """The columns the scans carried (manifest and sidecar columns: every column of a score
    table that is neither a score column nor one of the curation table's own), in order of
    first appearance; a name met with two types is text."""
    fields: dict[str, pa.Field] = {}
    for table in scores:
        for field in table.schema:
            if field.name in SCORE_SCHEMA.names or field.name in CURATION_SCHEMA.names:
                continue
            known = fields.get(field.name)
            fields[field.name] = field.with_type(pa.string()) if known and known.type != field.type else field
    return list(fields.values())


def check_score_table(table: pa.Table, name: str) -> None:
    """Refuses a table that cannot say what the detector found for its rows."""
    missing = [column for column in REQUIRED_SCORE_COLUMNS if column not in table.column_names]
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


def _rows(scores: list[pa.Table], errors: list[pa.Table], follow_anchor: str | None) -> pa.Table:
    """Every table's rows with the columns a decision needs and the carried ones, in one table
    (score tables of several scans may carry different columns)."""
    carried = carried_fields(scores)
    parts = []
    for table, scored in [*((table, True) for table in scores), *((table, False) for table in errors)]:
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
        parts.append(pa.table(columns))
    if not parts:
        return _rows([], [pa.table({"uri": pa.array([], pa.string())})], follow_anchor)
    return pa.concat_tables(parts)


def _first_of_each(values: pa.ChunkedArray) -> np.ndarray:
    """Whether each value is the first of its kind in the array (hashed by Arrow: no Python
    object per value)."""
    first = np.zeros(len(values), dtype=bool)
    if len(values):
        table = pa.table({"value": values, "index": pa.array(np.arange(len(values)))})
        groups = table.group_by("value", use_threads=False).aggregate([("index", "min")])
        first[groups["index_min"].to_numpy()] = True
    return first


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
        batch_uids: list[str | None] = []
        batch_sources: list[str | None] = []
        for given, url, sha256, uri in zip(*(column.to_pylist() for column in batch.columns)):
            uid: str | None
            source: str | None
            if given is not None and re.fullmatch(UID_PATTERN, given):
                uid, source = given.lower(), "uid"
            elif url:
                uid, source = _derived_uid(url), "url"
            elif sha256 is not None and re.fullmatch(SHA256_PATTERN, sha256):
                uid, source = sha256[:32].lower(), "sha256"
            else:
                uid, source = (None, None) if uri is None else (_derived_uid(uri), "uri")
            batch_uids.append(uid)
            batch_sources.append(source)
        uids.append(pa.array(batch_uids, pa.string()))
        sources.append(pa.array(batch_sources, pa.string()))
    return pa.chunked_array(uids, pa.string()), pa.chunked_array(sources, pa.string())


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
    ones'. Scans made with different anchors are refused unless ``follow_anchor`` names one."""
    check_anchors(scores, follow_anchor)
    rows = _rows(scores, errors, follow_anchor).sort_by(
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
    score = rows["score"].to_numpy(zero_copy_only=False).astype(float)
    suspect = pc.fill_null(rows["is_suspect"], False).to_numpy(zero_copy_only=False)
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
    drop(DUPLICATE, among, ~_first_of_each(pc.take(rows["sha256"], among)))
    uids, sources = sample_uids(rows)
    among = still_kept()
    drop(DUPLICATE_UID, among, ~_first_of_each(pc.take(uids, among)))
    if rule.declared_ai:
        among = still_kept()
        provenance = rows["provenance"].to_numpy(zero_copy_only=False)[among]
        drop(DECLARED_AI, among, np.isin(provenance, DECLARED_AI_KINDS))
    among = still_kept()
    if rule.max_score is not None:
        drop(SCORE_ABOVE, among, score[among] > rule.max_score)
    elif rule.drop_top is not None:
        # ceil of F n, rounded first so that 0.1 x 30 drops 3, not the 4 its float product says
        dropping = math.ceil(round(rule.drop_top * len(among), 9))
        highest = np.argsort(-score[among], kind="stable")[:dropping]
        marked = np.zeros(len(among), dtype=bool)
        marked[highest] = True
        drop(TOP_FRACTION, among, marked)
    else:
        drop(SUSPECT, among, suspect[among])
    carried = [name for name in rows.column_names if name not in CURATION_SCHEMA.names]
    carried.remove("scored")
    carried.remove("followed")
    carried.remove("provenance")
    decided = rows.set_column(rows.schema.get_field_index("uid"), "uid", uids)
    decided = decided.append_column("uid_from", sources)
    decided = decided.append_column("keep", pa.array(dropped == "")).append_column(
        "dropped", pa.array(dropped.tolist(), pa.string())
    )
    schema = pa.schema([*CURATION_SCHEMA, *(rows.schema.field(name) for name in carried)])
    return decided.select(schema.names).cast(schema)


def _reason_counts(dropped: pa.ChunkedArray | pa.Array) -> Counter:
    return Counter({row["values"]: row["counts"] for row in pc.value_counts(dropped).to_pylist()})


def summary(decided: pa.Table) -> dict:
    """Counts for the one-screen summary: samples, shards, kept (in shards, and images outside
    shards, which are listed but not re-sharded), and dropped by reason."""
    reasons = _reason_counts(decided["dropped"])
    return {
        "samples": len(decided),
        "shards": len(pc.unique(decided["shard"].drop_null())),
        "kept": reasons[""],
        "kept_in_shards": len(_kept_in_shards(decided)),
        "dropped": {reason: reasons[reason] for reason in REASONS if reasons[reason]},
    }


def breakdown(decided: pa.Table, columns: list[str]) -> pa.Table:
    """Per value of each of ``columns`` (as text; null where a sample has none): samples, kept,
    dropped, and the dropped by each reason, the values sorted."""
    rows = []
    for column in columns:
        pairs = pa.table({"value": pc.cast(decided[column], pa.string()), "dropped": decided["dropped"]})
        counts: dict = {}
        for group in pairs.group_by(["value", "dropped"]).aggregate([([], "count_all")]).to_pylist():
            counts.setdefault(group["value"], Counter())[group["dropped"]] += group["count_all"]
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


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes, the same bytes for the same table."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    # Small row groups: a re-sharding task reads only those of the shards it takes samples from.
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


# Each hex digit's ASCII code -> its value (uids are lower case by now).
_HEX_VALUES = np.zeros(256, dtype=np.uint64)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)


def key_array(kept: pa.Table) -> np.ndarray:
    """DataComp's keep-list of the kept samples: their 128-bit uids (``sample_uids``) as a
    structured array of two little-endian uint64 fields (``np.dtype("u8,u8")``: the uid's high
    and low halves), sorted, as DataComp's resharder reads it."""
    digits = _HEX_VALUES[np.array(kept["uid"].to_pylist(), dtype="S32").view(np.uint8).reshape(-1, 32)]
    halves = [np.zeros(len(digits), dtype=np.uint64) for _ in range(2)]
    for half, first in zip(halves, (0, 16)):
        for position in range(16):  # big-endian hex: shift in one digit at a time
            half[:] = (half << np.uint64(4)) | digits[:, first + position]
    high, low = halves
    order = np.lexsort((low, high))
    array = np.empty(len(digits), dtype=UID_DTYPE)
    array["f0"], array["f1"] = high[order], low[order]
    return array


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


def reshard_plan(decided: pa.Table, prefix: str, samples_per_shard: int) -> list[OutputShard]:
    """The output shards: the kept samples of the input shards (sorted by URI), each shard's in
    its own order, cut into shards of ``samples_per_shard``; every output shard a task of its
    own that reads the one or few input shards it takes samples from (the kept keys each task
    looks for come from the curation table, ``kept_by_shard``, not from the plan)."""
    counts = pc.value_counts(_kept_in_shards(decided)["shard"]).to_pylist()
    by_shard = {count["values"]: count["counts"] for count in counts}
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
    import pyarrow.parquet as pq

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
