"""Curation: a scan's tables -> what a training job reads. One decision per sample (kept, or
dropped with a reason), the kept keys as a sorted ``.npy`` array (DataComp's form), and
re-sharded WebDataset tars that hold only the kept samples with all their members.

Everything here is a function of the tables and the shards alone, in a fixed order, so that the
same inputs give byte-identical outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anchorscan.anchors.errors import UserError
from anchorscan.anchors.io.shards import SHARD_EXTENSIONS, open_shard, samples
from anchorscan.anchors.io.sources import ReadError, ReadLimits

# Why a sample was dropped, in the order the rules apply (a sample gets the first that fits).
UNREADABLE = "unreadable"  # in the errors table: no image to judge
DUPLICATE_KEY = "duplicate_key"  # its key was kept from an earlier shard
DUPLICATE = "duplicate"  # the same bytes as an earlier sample (the first key is kept)
SUSPECT = "suspect"  # --keep fpr: the detector calls it suspect (the anchor: p below its fpr)
SCORE_ABOVE = "score_above"  # --max_score S: score above S
TOP_FRACTION = "top_fraction"  # --drop_top F: among the fraction F with the highest scores
REASONS = (UNREADABLE, DUPLICATE_KEY, DUPLICATE, SUSPECT, SCORE_ABOVE, TOP_FRACTION)

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
        ("error", pa.string()),
    ]
)
_EXTENSIONS = "|".join(extension.lstrip(".").replace(".", r"\.") for extension in SHARD_EXTENSIONS)
SAMPLE_PATTERN = rf"^(?P<shard>.*?\.(?i:{_EXTENSIONS}))#(?P<key>.*)$"
UID_PATTERN = r"^[0-9a-fA-F]{32}$"
ROW_GROUP_ROWS = 65_536
# Where the DataComp form is not possible, each key a fixed-width string of at least this width.
MIN_KEY_WIDTH = 1


@dataclasses.dataclass(frozen=True)
class KeepRule:
    """Which scored samples are kept: without a threshold, those the detector does not call
    suspect (the anchor's false-positive rate); ``max_score``: those scoring at most S;
    ``drop_top``: all but the fraction F with the highest scores."""

    max_score: float | None = None
    drop_top: float | None = None

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
    return pa.chunked_array([pa.nulls(len(table), kind)])


def _located(uris: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(shard, key) of sample URIs; an image outside shards has no shard, and its URI as key."""
    parts = pc.extract_regex(uris, SAMPLE_PATTERN)
    shard, key = pc.struct_field(parts, "shard"), pc.struct_field(parts, "key")
    return shard, pc.if_else(pc.is_null(key), uris, key)


def _rows(scores: list[pa.Table], errors: list[pa.Table]) -> pa.Table:
    """Every table's rows with the columns a decision needs, in one table (score tables of
    several scans may carry different columns)."""
    parts = []
    for table, scored in [*((table, True) for table in scores), *((table, False) for table in errors)]:
        shard, key = _located(_column(table, "uri", pa.string()))
        anchor_score = _column(table, "anchor_score", pa.float64())
        columns = {
            "uri": _column(table, "uri", pa.string()),
            "shard": shard,
            "key": key,
            "scored": pa.chunked_array([pa.array(np.full(len(table), scored))]),
            "score": _column(table, "score", pa.float64()),
            "p_value": pc.power(10.0, pc.negate(anchor_score)),
            "is_suspect": _column(table, "is_suspect", pa.bool_()),
            "softness": _column(table, "softness", pa.string()),
            "sha256": _column(table, "sha256", pa.string()),
            "url": _column(table, "url", pa.string()),
            "caption": _column(table, "caption", pa.string()),
            "uid": _column(table, "uid", pa.string()),
            "error": _column(table, "error", pa.string()),
        }
        parts.append(pa.table(columns))
    return pa.concat_tables(parts) if parts else _rows([pa.table({"uri": pa.array([], pa.string())})], [])


def _first_of_each(values: np.ndarray) -> np.ndarray:
    """Whether each value is the first of its kind in the array."""
    first = np.zeros(len(values), dtype=bool)
    if len(values):
        first[np.unique(values, return_index=True)[1]] = True
    return first


def decide(scores: list[pa.Table], errors: list[pa.Table], rule: KeepRule = KeepRule()) -> pa.Table:
    """One row per sample of the scan (CURATION_SCHEMA), sorted by shard and key: kept, or
    dropped with the first reason of REASONS that fits. A URI in several tables (two scans) is
    one sample: its score row wins over an error row, the first table's over later ones'."""
    rows = _rows(scores, errors).sort_by(
        [("shard", "ascending"), ("key", "ascending"), ("scored", "descending"), ("uri", "ascending")]
    )
    rows = rows.filter(pa.array(_first_of_each(rows["uri"].to_numpy(zero_copy_only=False))))
    count = len(rows)
    dropped = np.full(count, "", dtype=object)
    dropped[~rows["scored"].to_numpy(zero_copy_only=False).astype(bool)] = UNREADABLE

    def drop(reason: str, among: np.ndarray, which: np.ndarray) -> None:
        """Among the still-kept rows ``among`` (indices), drops those ``which`` marks."""
        dropped[among[which]] = reason

    def still_kept() -> np.ndarray:
        return np.flatnonzero(dropped == "")

    among = still_kept()
    drop(DUPLICATE_KEY, among, ~_first_of_each(rows["key"].to_numpy(zero_copy_only=False)[among]))
    among = still_kept()
    drop(DUPLICATE, among, ~_first_of_each(rows["sha256"].to_numpy(zero_copy_only=False)[among]))
    among = still_kept()
    score = rows["score"].to_numpy(zero_copy_only=False).astype(float)
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
        drop(SUSPECT, among, rows["is_suspect"].to_numpy(zero_copy_only=False).astype(bool)[among])
    decided = rows.drop_columns(["scored"])
    decided = decided.append_column("keep", pa.array(dropped == "")).append_column(
        "dropped", pa.array(dropped.tolist(), pa.string())
    )
    return decided.select(CURATION_SCHEMA.names).cast(CURATION_SCHEMA)


def summary(decided: pa.Table) -> dict:
    """Counts for the one-screen summary: samples, shards, kept, and dropped by reason."""
    reasons = decided["dropped"].to_pylist()
    return {
        "samples": len(decided),
        "shards": len(pc.unique(decided["shard"].drop_null())),
        "kept": reasons.count(""),
        "dropped": {reason: reasons.count(reason) for reason in REASONS if reason in reasons},
    }


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes, the same bytes for the same table."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    # Small row groups: a re-sharding task reads only those of the shards it takes samples from.
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


def key_array(kept: pa.Table) -> np.ndarray:
    """The kept samples' ids, sorted, as a training job filters by them. Where every kept sample
    carries a 128-bit ``uid`` (32 hex digits, as DataComp's pools do), DataComp's own form: a
    structured array of two little-endian uint64 fields (``np.dtype("u8,u8")``: the uid's high
    and low halves), sorted, which DataComp's resharder reads. Otherwise the keys themselves, as
    fixed-width unicode strings (``<U{longest}``), sorted: img2dataset keys are not 128-bit."""
    uids = kept["uid"]
    if len(kept) and uids.null_count == 0 and pc.all(pc.match_substring_regex(uids, UID_PATTERN)).as_py():
        pairs = [(int(uid[:16], 16), int(uid[16:], 16)) for uid in uids.to_pylist()]
        array = np.array(pairs, dtype=np.dtype("u8,u8"))
        array.sort()
        return array
    keys = sorted(kept["key"].to_pylist())
    return np.array(keys, dtype=f"<U{max([MIN_KEY_WIDTH, *map(len, keys)])}")


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


def kept_by_shard(curation_table, shards: list[str]) -> dict[str, dict[str, str]]:
    """shard -> {kept key: sha256 of its image}, for ``shards``, from a curation table (a path or
    a file object; rows sorted by shard, so only the row groups of these shards are read)."""
    import pyarrow.parquet as pq

    table = pq.read_table(
        curation_table,
        columns=["shard", "key", "sha256"],
        filters=[("shard", "in", list(shards)), ("keep", "==", True)],
    )
    kept: dict[str, dict[str, str]] = {shard: {} for shard in shards}
    for shard, key, sha256 in zip(*(table[name].to_pylist() for name in ("shard", "key", "sha256"))):
        kept[shard][key] = sha256
    return kept


def _kept_samples(piece: Piece, kept: dict[str, str], limits: ReadLimits):
    """The samples of ``piece``, read from its shard, each checked against what was scored."""
    ordinal, taken = 0, 0
    with open_shard(piece.shard, limits.http) as stream:
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
                    f"{piece.shard}: sample {sample.key}: {error} (changed since the scan?)"
                ) from None
            if hashlib.sha256(image.data).hexdigest() != kept[sample.key]:
                raise ReshardError(
                    f"{piece.shard}: the image of sample {sample.key} is not the one that was "
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


def write_output_shard(
    output: OutputShard, kept: dict[str, dict[str, str]], handle, limits: ReadLimits
) -> int:
    """Writes one output shard to the writable ``handle``: every member of each kept sample
    (``kept``: as ``kept_by_shard`` gives), in order, under its name in the input shard, with
    fixed owners, modes and times, so the bytes depend on the samples alone. Returns the
    samples written."""
    written = 0
    with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for piece in output.pieces:
            for sample in _kept_samples(piece, kept[piece.shard], limits):
                for member in sample.members:
                    info = tarfile.TarInfo(member.name)
                    info.size, info.mtime, info.mode = len(member.data), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    archive.addfile(info, io.BytesIO(member.data))
                written += 1
    return written
