"""The two outputs of a scan: one row per scored image, one per input that could not be scored.
Every input URI ends in exactly one of them. The columns are defined here once: the Arrow
schemas, the row builders and docs/REFERENCE.md's table (checked by a test) follow from them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa

from anchorscan.anchors import channels


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    meaning: str


_LEADING = (
    Column("uri", pa.string(), "the input"),
    Column("sha256", pa.string(), "of the file's bytes"),
    Column(
        "score",
        pa.float64(),
        "higher = more likely generated: the head's score with `--head`, else `anchor_score`",
    ),
    Column("is_suspect", pa.bool_(), "anchor: combined p-value below its `fpr`; head: `score > 0`"),
    Column("anchor_score", pa.float64(), "`-log10` of the combined p-value against real images"),
    Column("head", pa.string(), "the head's kind and digest (`lda:3f2a...`), empty without `--head`"),
)
_FLAGS = (
    Column(
        "p_flagged",
        pa.float64(),
        "smallest upper-tail p-value of the anchor's flagged generators (`anchorscan flag`); 1 without one",
    ),
    Column(
        "component",
        pa.string(),
        "what fired: the combined channel or `flag:GENERATOR` with the smallest p-value",
    ),
)
_TRAILING = (
    Column("width", pa.int32(), "decoded width, after EXIF orientation"),
    Column("height", pa.int32(), "decoded height, after EXIF orientation"),
    Column(
        "preprocess",
        pa.string(),
        "what was done, e.g. `center_crop`, `upscale+center_crop`, `exif_rotate+cmyk_to_rgb+center_crop`",
    ),
    Column(
        "pixels_resampled",
        pa.bool_(),
        "the input's metadata says the image was resized before it was stored (img2dataset's "
        "`width`/`height` against `original_width`/`original_height`): the fine pixels the "
        "forensic channel reads are gone, so fewer generated images are found among these",
    ),
    Column(
        "attention_positions",
        pa.float32(),
        "effective number of positions the spatial statistics weigh, `1 / sum a^2`",
    ),
    Column("anchor_id", pa.string(), "first 16 hex digits of the anchor's checksum"),
    Column(
        "provenance",
        pa.string(),
        "what the file declares of its origin: `ai_generated`, `ai_edited`, `edited`, `captured`, "
        "or empty (see *Declared provenance*)",
    ),
    Column(
        "provenance_source",
        pa.string(),
        "where it is declared: `c2pa`, `xmp`, `png:parameters`, `png:prompt`, `exif`, `sidecar:exif` ...; "
        "declaring nothing, the metadata reads refused (`refused:xmp_entities` ...)",
    ),
    Column(
        "provenance_signer",
        pa.string(),
        "a C2PA manifest's signer and its validation state, e.g. `OpenAI (untrusted)`",
    ),
)


def score_columns() -> tuple[Column, ...]:
    """The score table's columns: each registered channel's p-values and distances
    (anchors/channels.py) between the verdict's and the image's."""
    p_values = tuple(
        Column(f"p_{name}", pa.float64(), meaning)
        for channel in channels.REGISTRY
        for name, meaning in zip(channel.scored, channel.p_meanings, strict=True)
    )
    distances = tuple(
        Column(name, pa.type_for_alias(kind), meaning)
        for channel in channels.REGISTRY
        for name, kind, meaning in channel.score_columns
    )
    return (*_LEADING, *p_values, *_FLAGS, *distances, *_TRAILING)


SCORE_COLUMNS = score_columns()

# A carried column (a manifest's, a sidecar's) named like a score column is written under this prefix.
CLASH_PREFIX = "manifest_"

ERROR_COLUMNS = (
    Column("uri", pa.string(), "the input, or the `--input` pattern that matched nothing"),
    Column("stage", pa.string(), "`list`, `read`, `decode`, `embed` or `score`"),
    Column("error", pa.string(), "a sentence for a person"),
    Column(
        "error_type",
        pa.string(),
        "the exception behind it (`FileNotFoundError`, `TypeError`, `struct.error`), what "
        "stopped a decode (`TimeoutError`, `DecoderCrash`), the check that refused the input "
        "(`ReadError`, `DecodeError`), or empty where no exception was involved",
    ),
)

# `update`'s record of the images its poisoning guard refused (docs/METHOD.md §9.2).
REFUSED_COLUMNS = (
    Column("uri", pa.string(), "an image given as real that the guard refused"),
    Column("anchor_score", pa.float64(), "its score against the anchor being updated"),
    Column(
        "reason",
        pa.string(),
        "`flagged`: the current anchor flags it (below --admit); `round`: its round was refused "
        "as a whole (its admitted images do not look like real photos as a batch)",
    ),
)


def arrow_schema(columns: tuple[Column, ...]) -> pa.Schema:
    return pa.schema([(column.name, column.type) for column in columns])


SCORE_SCHEMA = arrow_schema(SCORE_COLUMNS)
ERROR_SCHEMA = arrow_schema(ERROR_COLUMNS)
# A carried column (a manifest's, a sidecar's) named like a score column is written under this prefix.
CLASH_PREFIX = "manifest_"


def clashing_columns(names) -> list[str]:
    """The score columns among ``names`` whose prefixed name (CLASH_PREFIX) is among them too:
    neither could be carried under its own name."""
    present = set(names)
    return sorted(name for name in present & set(SCORE_SCHEMA.names) if CLASH_PREFIX + name in present)


def json_text(value):
    """A nested value (an object, a list; a Parquet struct, list or map) as JSON text (values
    JSON has no type for, a timestamp, bytes, as their text); any other value as it is."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


REFUSED_SCHEMA = arrow_schema(REFUSED_COLUMNS)
# Score columns that come straight from the anchor's (and head's) batch of scores.
SCORED_FLOATS = tuple(column.name for column in SCORE_COLUMNS if column.type == pa.float64())
# Said by an input's metadata, not by its pixels: a reused row (--skip_scored) takes it from its
# new record, so earlier score tables need not hold it.
FROM_THE_RECORD = ("pixels_resampled",)
REUSED_COLUMNS = tuple(name for name in SCORE_SCHEMA.names if name not in FROM_THE_RECORD)


def score_row(
    image,
    scores: dict[str, np.ndarray],
    index: int,
    attention_positions: float,
    head: str,
    anchor_id: str,
    pixels_resampled: bool,
) -> dict:
    """Row ``index`` of a scored batch; ``image`` carries uri, sha256, width, height, preprocess."""
    return {
        "uri": image.uri,
        "sha256": image.sha256,
        **{name: float(scores[name][index]) for name in SCORED_FLOATS},
        "is_suspect": bool(scores["is_suspect"][index]),
        "head": head,
        "softness": str(scores["softness"][index]),
        "component": str(scores["component"][index]),
        "width": image.width,
        "height": image.height,
        "preprocess": image.preprocess,
        "pixels_resampled": pixels_resampled,
        "attention_positions": float(attention_positions),
        "anchor_id": anchor_id,
    }


def error_row(uri: str, stage: str, error: str, error_type: str = "") -> dict:
    return {"uri": uri, "stage": stage, "error": error, "error_type": error_type}


def markdown_table(columns: tuple[Column, ...]) -> str:
    """The reference's (docs/REFERENCE.md) table of ``columns``."""
    type_names = {
        pa.string(): "string",
        pa.float64(): "float64",
        pa.float32(): "float32",
        pa.int32(): "int32",
        pa.bool_(): "bool",
    }
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{column.name}` | {type_names[column.type]} | {column.meaning} |" for column in columns]
    return "\n".join(lines)
