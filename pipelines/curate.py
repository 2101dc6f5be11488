"""Curate a scan: its score and errors tables -> what a training job reads: every sample's
decision (``PREFIX-kept.parquet``), DataComp's keep-list of the kept uids (``PREFIX-keys.npy``),
counts per value of --by columns (``PREFIX-by.parquet``) and, with --reshard, tar shards of the
kept samples in img2dataset's layout (``PREFIX-00000.tar`` with ``PREFIX-00000.parquet`` and
``PREFIX-00000_stats.json`` ...) and their wids index (``PREFIX-shardindex.json``). The
decisions run on the launcher a bucket of whole shards at a time, the tables streamed from their
files (``ScanRows``): its memory is one bucket and some 50 bytes a sample, not the tables (Beam's
local runners would hold every row between two steps); re-sharding is a pipeline, one task per
output shard."""

from __future__ import annotations

import functools
import tempfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.curation import (
    REASONS,
    KeepRule,
    ReshardError,
    RowGroupWriter,
    ScanRows,
    TableFile,
    Tally,
    decide_buckets,
    indexed_samples,
    npy_bytes,
    parquet_bytes,
    reshard_plan,
    wids_index_name,
)
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.sources import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT, ReadLimits
from anchorscan.anchors.io.storage import check_writable, read_bytes, write_atomically
from anchorscan.pipelines.flags import command_parser, float_in, non_negative_float, positive_int, text
from anchorscan.pipelines.options import PROVENANCE_CHOICES, add_http_args, http_config, parse
from anchorscan.transforms.listing import matching_files
from anchorscan.transforms.reshard import WriteOutputShards
from anchorscan.transforms.sinks import Outputs, PrefixLock

DEFAULT_SAMPLES_PER_SHARD = 10_000


def parser():
    parser = command_parser("curate")
    parser.add_argument(
        "--scores",
        action="append",
        required=True,
        type=text,
        help="the PREFIX given to `anchorscan score` (its scores and errors tables); repeat for more scans",
    )
    parser.add_argument(
        "--output",
        required=True,
        type=text,
        help="prefix of PREFIX-kept.parquet, PREFIX-keys.npy and PREFIX-NNNNN.tar",
    )
    parser.add_argument(
        "--follow_anchor",
        type=text,
        default=None,
        help="where the scans were made with different anchors: the anchor_id whose rows decide "
        "(the other anchors' samples dropped as other_anchor)",
    )
    parser.add_argument(
        "--by",
        action="append",
        default=[],
        type=text,
        help="count kept and dropped samples per value of this column (any carried column, e.g. "
        "status or a manifest's source); repeat for more",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--max_score",
        type=non_negative_float,
        default=None,
        help="keep samples scoring at most S (instead of --keep fpr)",
    )
    rule.add_argument(
        "--drop_top",
        type=float_in(0.0, 1.0, low_open=False, high_open=True),
        default=None,
        help="drop the fraction F of samples with the highest scores (instead of --keep fpr)",
    )
    rule.add_argument(
        "--keep",
        choices=("fpr",),
        default="fpr",
        help="fpr (default): drop the samples the detector calls suspect (the anchor's false-positive rate)",
    )
    parser.add_argument(
        "--reshard", action="store_true", help="also write tar shards holding the kept samples, all members"
    )
    parser.add_argument(
        "--samples_per_shard",
        type=positive_int,
        default=DEFAULT_SAMPLES_PER_SHARD,
        help="samples in each written shard (the last may hold fewer)",
    )
    parser.add_argument(
        "--max_bytes",
        type=positive_int,
        default=DEFAULT_MAX_BYTES,
        help="the largest member re-sharding reads",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs that --output already holds"
    )
    parser.add_argument(
        "--provenance",
        choices=PROVENANCE_CHOICES,
        default="use",
        help="use: drop the samples whose metadata declares an AI origin (reason declared_ai) "
        "whatever the rule; ignore: the rule alone decides",
    )
    add_http_args(parser)
    return parser


def table_files(prefixes: list[str]) -> list[TableFile]:
    """The score tables under the scan prefixes, then their errors tables (read later, a batch
    at a time)."""
    tables = [
        TableFile(
            path, kind == "scores", functools.partial(FileSystems.open, path, compression_type="uncompressed")
        )
        for kind in ("scores", "errors")
        for prefix in prefixes
        for path in matching_files(f"{prefix}-{kind}-*.parquet")
    ]
    if not tables:
        raise UsageError(
            f"--scores {prefixes[0]}: no PREFIX-scores-*.parquet or PREFIX-errors-*.parquet "
            "tables there; give the --output prefix of `anchorscan score`"
        )
    return tables


# The exact names curate writes after its --output prefix.
CURATION_NAMES = (
    r"-kept\.parquet",
    r"-keys\.npy",
    r"-by\.parquet",
    r"-shardindex\.json",
    r"-\d{5,}\.tar",
    r"-\d{5,}\.tar\.partial",
    r"-\d{5,}\.parquet",
    r"-\d{5,}_stats\.json",
)


def run(argv=None, test_pipeline=None) -> dict:
    args, options = parse(parser(), argv)
    check_paths([*args.scores, args.output])
    outputs = Outputs(args.output, CURATION_NAMES)
    check_writable(f"{args.output}-kept.parquet", "--output")
    rule = KeepRule(args.max_score, args.drop_top, declared_ai=args.provenance == "use")
    tables = table_files(args.scores)
    scan = ScanRows(tables, args.follow_anchor)
    check_columns(args.by, scan.schema.names)
    table_uri, keys_uri = f"{args.output}-kept.parquet", f"{args.output}-keys.npy"
    by_uri = f"{args.output}-by.parquet" if args.by else None
    # What the run reads: the tables, and the shards that re-sharding reads again.
    inputs = [f"{prefix}-{kind}-*.parquet" for prefix in args.scores for kind in ("scores", "errors")]
    inputs += scan.shards
    with PrefixLock(args.output), outputs.writing(args.overwrite, inputs, "curation files"):
        # Decided a bucket of shards at a time, each written (to local disk) and counted as it
        # comes; the table first: re-sharding tasks read their kept keys from it.
        tally = Tally(args.by)
        with tempfile.TemporaryFile(prefix="anchorscan-curate-") as spool:
            kept_table = RowGroupWriter(spool, scan.schema)
            for decided in decide_buckets(scan.buckets(), rule):
                kept_table.write(decided)
                tally.add(decided)
            kept_table.close()
            spool.seek(0)
            write_atomically(table_uri, spool)
        counts, by_table = tally.summary(), tally.breakdown()
        write_atomically(keys_uri, npy_bytes(tally.keys()))
        if by_uri:
            write_atomically(by_uri, parquet_bytes(by_table))
        plan = reshard_plan(tally.kept_per_shard, args.output, args.samples_per_shard) if args.reshard else []
        resharded = 0
        if plan:
            limits = ReadLimits(args.max_bytes, DEFAULT_READ_TIMEOUT, http_config(args))
            pipeline = test_pipeline or beam.Pipeline(options=options)
            _ = pipeline | "Reshard" >> WriteOutputShards(plan, table_uri, limits, args.output)
            try:
                result = pipeline.run()
                result.wait_until_finish()
            except ReshardError:
                raise
            except Exception as error:  # a remote runner reports the task's error as text
                if ReshardError.__name__ in str(error):
                    raise ReshardError(
                        str(error).split(f"{ReshardError.__name__}: ")[-1].splitlines()[0]
                    ) from None
                raise
            # What the shards hold, from the index written after them all (a runner's counters
            # may count a retried task twice, or not at all).
            resharded = indexed_samples(read_bytes(wids_index_name(args.output)))
            # Every kept sample of a shard is written, or the run fails: none is lost quietly.
            if resharded != counts["kept_in_shards"]:
                raise RuntimeError(
                    f"re-sharding wrote {resharded:,} samples of the "
                    f"{counts['kept_in_shards']:,} kept in shards"
                )
    outcome = {
        **counts,
        "tables": len(tables),
        "rule": rule.describe(),
        "kept_table": table_uri,
        "keys": keys_uri,
        "by_table": by_uri,
        "by": by_table.to_pylist(),
        "shards_written": [shard.name for shard in plan],
        "wids_index": wids_index_name(args.output) if plan else None,
        "resharded": resharded,
        "reshard": args.reshard,
    }
    print_summary(outcome)
    return outcome


def check_columns(columns: list[str], names: list[str]) -> None:
    for column in columns:
        if column not in names:
            raise UsageError(
                f"--by {column}: the scans have no such column; their columns: {', '.join(names)}"
            )


# The summary lists at most this many values of a --by column (the table has them all).
BY_VALUES_SHOWN = 20


def print_summary(outcome: dict) -> None:
    samples, kept = outcome["samples"], outcome["kept"]
    dropped = outcome["dropped"]
    by_reason = ", ".join(f"{reason} {dropped[reason]:,}" for reason in REASONS if reason in dropped)
    written = outcome["shards_written"]
    lines = [
        f"samples     {samples:,} in {outcome['shards']:,} shards (from {outcome['tables']} tables)",
        f"kept        {kept:,} ({kept / max(samples, 1):.1%})",
        f"dropped     {samples - kept:,}{f': {by_reason}' if by_reason else ''}",
        f"rule        {outcome['rule']}",
        f"output      {outcome['kept_table']} (every sample: keep, dropped, carried columns)",
        f"            {outcome['keys']} ({kept:,} uids, sorted u8,u8: DataComp's keep-list)",
    ]
    if outcome["by_table"]:
        lines.append(f"            {outcome['by_table']} (kept and dropped per value of --by)")
    if written:
        span = written[0] if len(written) == 1 else f"{written[0]} ... {written[-1]}"
        shards = f"{len(written)} shard{'s' if len(written) > 1 else ''}"
        samples_written = f"{outcome['resharded']:,} samples"
        lines.append(f"            {span} ({shards}, {samples_written}, with sidecars and stats)")
        lines.append(f"            {outcome['wids_index']} (wids shard index)")
    outside = kept - outcome["kept_in_shards"]
    if outcome["reshard"] and outside:
        lines.append(f"            {outside:,} kept images outside shards: listed, not re-sharded")
    lines += by_lines(outcome["by"])
    print("\n".join(lines))


def by_lines(rows: list[dict]) -> list[str]:
    """Per --by column, a line per value: kept of samples, dropped by reason."""
    lines: list[str] = []
    for column in dict.fromkeys(row["column"] for row in rows):
        values = [row for row in rows if row["column"] == column]
        lines.append(f"by {column}")
        for row in values[:BY_VALUES_SHOWN]:
            reasons = ", ".join(f"{reason} {row[reason]:,}" for reason in REASONS if row[reason])
            value = "(none)" if row["value"] is None else repr(row["value"])
            lines.append(
                f"  {value:<18} kept {row['kept']:,} of {row['samples']:,}"
                + (f", dropped {reasons}" if reasons else "")
            )
        if len(values) > BY_VALUES_SHOWN:
            lines.append(f"  ... {len(values) - BY_VALUES_SHOWN:,} more values in the --by table")
    return lines
