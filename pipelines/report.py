"""`anchorscan report`: one self-contained HTML page about a scan, for a person deciding whether
to trust a filter: score distributions against the anchor's real images, suspect rate per
folder, ROC curves when labels are known, and the most and least suspicious images."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import posixpath

import matplotlib
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from anchorscan.anchors.anchor_file import verified_contents
from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.datasets import manifest
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.registry import source_for
from anchorscan.anchors.io.shards import open_shard, samples
from anchorscan.anchors.io.sources import ReadError, ReadLimits, Record, Unit
from anchorscan.anchors.io.storage import check_writable, read_bytes, read_checked_file, write_atomically
from anchorscan.anchors.io.uris import Location
from anchorscan.pipelines.flags import command_parser, int_in, text
from anchorscan.transforms.listing import read_parquet_rows


def parser():
    parser = command_parser("report", beam=False)
    parser.add_argument("--scores", type=text, required=True, help="the PREFIX given to `anchorscan score`")
    parser.add_argument("--output", type=text, required=True, help="the HTML file to write (local or gs://)")
    parser.add_argument(
        "--anchor",
        type=text,
        default=None,
        help="the anchor file, to draw its real calibration images' distances",
    )
    parser.add_argument(
        "--labels",
        type=text,
        default=None,
        help="a manifest with uri,label,generator columns, for ROC curves",
    )
    parser.add_argument("--gallery", type=int_in(1, 1000), default=12, help="thumbnails at each end")
    return parser


def _figure_html(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def distributions_figure(rows: list[dict], calibration: dict | None) -> str:
    names = ("score", "forensic", "semantic", "statistical")
    figure, axes = plt.subplots(1, len(names), figsize=(16, 3.2))
    for axis, name in zip(axes, names):
        values = np.array([row[name] for row in rows])
        axis.hist(values, bins=40, density=True, alpha=0.6, label="this scan")
        if calibration is not None and name in calibration:
            axis.hist(
                calibration[name], bins=40, density=True, alpha=0.6, label="real images (anchor calibration)"
            )
        axis.set_title(name)
        axis.legend(fontsize=7)
    return _figure_html(figure, "score distributions")


def folders_figure(rows: list[dict], most: int = 20) -> str:
    folders: dict[str, list[bool]] = {}
    for row in rows:
        folders.setdefault(posixpath.dirname(row["uri"]), []).append(row["is_suspect"])
    busiest = sorted(folders, key=lambda f: -len(folders[f]))[:most]
    figure, axis = plt.subplots(figsize=(13, 0.35 * len(busiest) + 1))
    axis.barh(
        [f"{f[-60:]} ({len(folders[f])})" for f in busiest], [100 * np.mean(folders[f]) for f in busiest]
    )
    axis.invert_yaxis()
    axis.set_xlabel("suspect rate (%)")
    return _figure_html(figure, "suspect rate per folder")


def roc_figure(rows: list[dict], labels: dict[str, tuple[int, str]]) -> str:
    figure, axis = plt.subplots(figsize=(5, 5))
    known = [row for row in rows if row["uri"] in labels]
    reals = np.array([row["score"] for row in known if labels[row["uri"]][0] == 0])
    for generator in sorted({g for label, g in labels.values() if label == 1}):
        fakes = np.array([row["score"] for row in known if labels[row["uri"]] == (1, generator)])
        if not len(fakes) or not len(reals):
            continue
        scores = np.r_[reals, fakes]
        y = np.r_[np.zeros(len(reals)), np.ones(len(fakes))]
        fpr, tpr, _ = roc_curve(y, scores)
        axis.plot(fpr, tpr, label=f"{generator} (AUROC {roc_auc_score(y, scores):.2f})")
    axis.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axis.set_xlabel("false-positive rate (real images)")
    axis.set_ylabel("true-positive rate")
    if axis.get_legend_handles_labels()[0]:  # no curve when the labelled images were not scored
        axis.legend(fontsize=7)
    return _figure_html(figure, "ROC curves")


def image_bytes(uri: str) -> bytes:
    """The bytes a scan read for ``uri``, through the byte source that read them (a file, or a
    sample of a tar shard)."""
    for item in source_for(uri).read(Unit(uri), ReadLimits()):
        if isinstance(item, Record):
            return item.data
    raise ReadError(f"{uri}: no image")


def shard_images(shard: str, uris: set[str]) -> dict[str, bytes]:
    """The images of the samples ``uris`` of one tar shard, read in one pass over it (stopping
    once all are met); those it does not hold, or cannot give, left out."""
    images: dict[str, bytes] = {}
    wanted = set(uris)
    limits = ReadLimits()
    with contextlib.suppress(ReadError), open_shard(shard, limits.http) as stream:
        for sample in samples(stream, limits):
            uri = sample.uri(shard)
            if uri not in wanted:
                continue
            wanted.discard(uri)
            with contextlib.suppress(ReadError):
                images[uri] = sample.image().data
            if not wanted:
                break
    return images


def gallery_images(uris: list[str]) -> dict[str, bytes]:
    """The images of ``uris`` that can still be read: the samples of a tar shard in one pass
    over it however many of them are wanted, other images one read each."""
    images: dict[str, bytes] = {}
    by_shard: dict[str, set[str]] = {}
    for uri in dict.fromkeys(uris):
        split = Location.parse(uri).shard_and_key
        if split is not None:
            by_shard.setdefault(split[0], set()).add(uri)
            continue
        with contextlib.suppress(Exception):  # the gallery must not fail on a file that changed
            images[uri] = image_bytes(uri)
    for shard, wanted in by_shard.items():
        images.update(shard_images(shard, wanted))
    return images


MISSING = '<div class="missing">unreadable</div>'


def thumbnail(data: bytes | None, size: int = 160) -> str:
    if data is None:
        return MISSING
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.seek(0)
        image = image.convert("RGB")
        image.thumbnail((size, size))
    except Exception:  # the gallery must not fail on a file that changed since the scan
        return MISSING
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return (
        f'<img alt="thumbnail" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
    )


def gallery(rows: list[dict], title: str, images: dict[str, bytes]) -> str:
    cells = "".join(
        f'<div class="cell">{thumbnail(images.get(row["uri"]))}<div>{row["score"]:.3g}'
        f"{' suspect' if row['is_suspect'] else ''}</div>"
        f'<div class="uri">{html.escape("/".join(row["uri"].rsplit("/", 2)[-2:]))}</div></div>'
        for row in rows
    )
    return f'<h2>{html.escape(title)}</h2><div class="gallery">{cells}</div>'


STYLE = """body{font-family:sans-serif;margin:2em;color:#222}figure{margin:1em 0}
figure img{max-width:100%}.gallery{display:flex;flex-wrap:wrap;gap:8px}
.cell{width:170px;font-size:12px;text-align:center}.uri{color:#666;overflow-wrap:anywhere}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.missing{width:160px;height:160px;background:#eee}"""


def render(
    rows: list[dict],
    errors: list[dict],
    calibration: dict | None,
    labels: dict | None,
    gallery_size: int,
    title: str,
) -> str:
    suspect = sum(row["is_suspect"] for row in rows)
    stages: dict[str, int] = {}
    for row in errors:
        stages[row["stage"]] = stages.get(row["stage"], 0) + 1
    summary = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in (
            ("images scored", len(rows)),
            ("suspect", f"{suspect} ({100 * suspect / max(len(rows), 1):.1f} %){declared_ai_note(rows)}"),
            ("declared provenance", declared_share(rows)),
            ("not scored", ", ".join(f"{stage}: {n}" for stage, n in sorted(stages.items())) or "0"),
            ("anchor", ", ".join(sorted({row["anchor_id"] for row in rows}))),
            ("head", ", ".join(sorted({row["head"] for row in rows if row["head"]})) or "none"),
        )
    )
    ranked = sorted(rows, key=lambda row: -row["score"])
    parts = [
        f"<h1>{html.escape(title)}</h1><table>{summary}</table>",
        "<h2>Distributions</h2>",
        distributions_figure(rows, calibration),
        "<h2>Suspect rate per folder</h2>",
        folders_figure(rows),
    ]
    if labels:
        parts += ["<h2>Flagged per label</h2>", flagged_table(rows, labels)]
        parts += ["<h2>ROC curves</h2>", roc_figure(rows, labels)]
    most, least = ranked[:gallery_size], ranked[::-1][:gallery_size]
    images = gallery_images([row["uri"] for row in most + least])
    parts += [gallery(most, "Most suspicious", images), gallery(least, "Least suspicious", images)]
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


AI_KINDS = ("ai_generated", "ai_edited")


def declared_share(rows: list[dict]) -> str:
    """Each declared kind's count and the share of scored images declaring any ("none" where
    none does, or the scan predates the provenance columns)."""
    kinds: dict[str, int] = {}
    for row in rows:
        if row.get("provenance"):
            kinds[row["provenance"]] = kinds.get(row["provenance"], 0) + 1
    if not kinds:
        return "none"
    share = 100 * sum(kinds.values()) / max(len(rows), 1)
    return (
        ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items())) + f" ({share:.1f} % of scored)"
    )


def declared_ai_note(rows: list[dict]) -> str:
    """How many suspects are so because their file declares an AI origin, counted apart."""
    declared = sum(bool(row["is_suspect"] and row.get("provenance") in AI_KINDS) for row in rows)
    return f", {declared} of them declared AI by their metadata" if declared else ""


def flagged_table(rows: list[dict], labels: dict[str, tuple[int, str]]) -> str:
    """Per labelled group, the share the scan flags (its own decision, ``is_suspect``) and the
    share a looser curator would drop (anchor p < 0.05): the rates a curator acts on."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["uri"] in labels:
            label, generator = labels[row["uri"]]
            name = (
                generator if label else (f"real ({generator})" if generator not in ("", "real") else "real")
            )
            groups.setdefault(name, []).append(row)
    loose = -math.log10(0.05)
    lines = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{len(members)}</td>"
        f"<td>{100 * np.mean([r['is_suspect'] for r in members]):.1f} %</td>"
        f"<td>{100 * np.mean([r['anchor_score'] > loose for r in members]):.1f} %</td></tr>"
        for name, members in sorted(groups.items())
    )
    return (
        "<table><tr><th>labelled as</th><th>images</th><th>flagged</th><th>anchor p &lt; 0.05</th></tr>"
        f"{lines}</table>"
    )


def read_labels(path: str) -> dict[str, tuple[int, str]]:
    return {image.uri: (image.label, image.generator) for image in manifest(path, read_bytes(path))}


def run(argv=None) -> str:
    args = parser().parse_args(argv)
    check_paths([args.scores, args.output, args.anchor, args.labels])
    check_writable(args.output, "--output")
    rows = read_parquet_rows(f"{args.scores}-scores-*.parquet")
    if not rows:
        raise UsageError(f"--scores {args.scores}: no score rows match {args.scores}-scores-*.parquet")
    errors = read_parquet_rows(f"{args.scores}-errors-*.parquet")
    calibration = None
    if args.anchor:
        tensors, _ = verified_contents(read_checked_file(args.anchor), args.anchor)
        calibration = {
            name.removeprefix("calibration."): values
            for name, values in tensors.items()
            if name.startswith("calibration.")
        }
    labels = read_labels(args.labels) if args.labels else None
    page = render(
        rows,
        errors,
        calibration,
        labels,
        args.gallery,
        f"anchorscan report: {posixpath.basename(args.scores)}",
    )
    write_atomically(args.output, page.encode())
    print(f"report      {args.output} ({len(rows)} images, {len(page) // 1024} KiB)")
    return args.output
