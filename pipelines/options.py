"""Pipeline options of anchorscan; Beam's own options (--runner, --direct_num_workers, ...)
pass through unchanged."""
from __future__ import annotations

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from anchorscan.anchors.backbones import ATTENTION_MODES, BACKBONE_NAMES, DEFAULT_BACKBONE, RESIZE_MODES
from anchorscan.anchors.anchor import AnchorConfig, STATISTICAL_MODES
from anchorscan.anchors.calibration import COMBINERS
from anchorscan.anchors.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from anchorscan.transforms.decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_BYTES

# The default local runner would first try to download the Prism binary; offline that fails
# and it falls back, so runs would differ with the network. Pin the in-process runner.
DEFAULT_LOCAL_RUNNER = "FnApiRunner"


def pipeline_options(argv: list[str] | None, options_class):
    options = options_class(argv or [])
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = DEFAULT_LOCAL_RUNNER
    return options


class AnchorOptions(PipelineOptions):
    """Options of fitting and scoring: where images come from, how they become features, and
    the anchor. Beam parses every options class on every run, so each
    flag is declared once and required flags are checked by the pipeline, not by argparse."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input", action="append", default=None,
            help="Images: a glob, a directory (its image files, recursively) or a manifest "
                 "(.txt one URI per line, .csv or .parquet with a 'uri' column). Local or gs://. "
                 "Repeat for several.")
        parser.add_argument("--backbone", default=None, choices=BACKBONE_NAMES,
                            help=f"Frozen backbone (default: {DEFAULT_BACKBONE}; when scoring, "
                                 "the anchor's).")
        parser.add_argument("--weights", default=None,
                            help="Backbone weights file, local or gs:// (default: the backbone's "
                                 "bundled weights; CLIP backbones need this).")
        parser.add_argument("--attention", default=None, choices=ATTENTION_MODES,
                            help="Spatial weights of the moments: zscore (CNN), cls (ViT) or "
                                 "uniform (default: the backbone's; when scoring, the anchor's).")
        parser.add_argument("--resize", default=None, choices=RESIZE_MODES,
                            help="none: centre crop at native resolution (default); shorter_side: "
                                 "scale the shorter side to the crop first (when scoring, the "
                                 "anchor's).")
        parser.add_argument("--device", default="cpu", help="cpu or cuda.")
        parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                            help="Autocast of the backbone on GPUs (CPUs run float32).")
        parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnxruntime"),
                            help="auto: ONNX Runtime for backbones measured faster with it on CPUs "
                                 "(the default backbone), torch elsewhere.")
        parser.add_argument("--large_model", action="store_true",
                            help="Share one model copy between a worker's processes.")
        parser.add_argument("--batch_size", type=int, default=16,
                            help="Inference batch size (16 suits CPUs; try 64 or more on a GPU).")
        parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            help="Images with more pixels become error rows.")
        parser.add_argument("--max_bytes", type=int, default=DEFAULT_MAX_BYTES,
                            help="Files larger than this become error rows.")
        parser.add_argument("--min_side", type=int, default=DEFAULT_MIN_SIDE,
                            help="Images whose shorter side is smaller become error rows.")
        parser.add_argument("--decode_timeout", type=float, default=DEFAULT_DECODE_TIMEOUT,
                            help="Seconds one image may take to decode before it becomes an error row.")
        parser.add_argument("--perturbation", default=None,
                            help="Applied to every image before cropping, real and fake alike "
                                 "(evaluation bias controls): jpeg:QUALITY, png, blur:SIGMA, scale:FACTOR.")
        parser.add_argument("--skip_scored", default=None,
                            help="score: PREFIX or glob of earlier scores; inputs whose content "
                                 "was scored with the same anchor reuse that row instead of being "
                                 "scored again.")
        parser.add_argument("--torch_threads", type=int, default=0,
                            help="torch threads per worker (0: torch's default).")
        parser.add_argument("--decode_threads", type=int, default=0,
                            help="Threads decoding images beside the forward pass, per worker "
                                 "(0: one per core of a local worker).")
        parser.add_argument("--decode_ahead", type=int, default=0,
                            help="Images in flight in decoding, per worker (0: one inference batch, "
                                 "decoded during the previous batch's forward pass; 1: one at a time).")
        parser.add_argument("--anchor", default=None,
                            help="Anchor file: written by fit, read by score (local or gs://).")
        parser.add_argument("--output", default=None,
                            help="score: output prefix of PREFIX-scores-*.parquet and "
                                 "PREFIX-errors-*.parquet; fit-head: the head file.")
        parser.add_argument("--errors", default=None,
                            help="fit: prefix of the errors table (default: the anchor path).")
        parser.add_argument("--combine", default=None, choices=sorted(COMBINERS),
                            help=f"How p-values combine into the score (fit default: "
                                 f"{AnchorConfig.combine}; score default: the anchor's).")
        parser.add_argument("--statistical", default=None, choices=sorted(STATISTICAL_MODES),
                            help=f"Statistical distance, decoupled from content or raw (fit "
                                 f"default: {AnchorConfig.statistical}; score default: the anchor's).")
        parser.add_argument("--calibration_fraction", type=float, default=0.1,
                            help="fit: share of real images held out (by URI hash) to calibrate "
                                 "p-values.")
        parser.add_argument("--calibration_group", default=None,
                            help="fit: regular expression; URIs with the same match (its first "
                                 "group if any) are held out together, e.g. crops of one photo.")
        parser.add_argument("--fpr", type=float, default=AnchorConfig.fpr,
                            help="fit: false-positive rate on real images at which is_suspect is set.")
        parser.add_argument("--explained_variance", type=float,
                            default=AnchorConfig.explained_variance,
                            help="fit: variance kept by the statistical part's leading eigenpairs.")
        parser.add_argument("--statistical_budget", type=int, default=768,
                            help="fit: largest size of the statistical part (seeded projection).")
        parser.add_argument("--projection_seed", type=int, default=0, help="fit: seed of R.")
        parser.add_argument("--kind", default=None,
                            help="fit-head: nn (nearest neighbour), lda (closed-form linear probe) "
                                 "or logistic (the UnivFD paper's probe).")
        parser.add_argument("--real", action="append", default=None,
                            help="fit-head: real images (pattern or manifest); repeat for several.")
        parser.add_argument("--fake", action="append", default=None,
                            help="fit-head: generated images (pattern or manifest); repeat.")
        parser.add_argument("--k", type=int, default=1, help="fit-head nn: neighbours per class.")
        parser.add_argument("--max_per_class", type=int, default=10000,
                            help="fit-head nn/logistic: bank size per class (a uniform sample).")
        parser.add_argument("--head", default=None,
                            help="score: a head file from fit-head; its score becomes `score`.")
        parser.add_argument("--with_anchor", action="store_true",
                            help="score with an lda or logistic --head: add the anchor's evidence "
                                 "(its p-value's largest Bayes factor) to the head's log-odds.")


def require(options, *names: str) -> None:
    missing = [f"--{name}" for name in names if not getattr(options, name)]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(missing)}")


def counter_totals(result) -> dict[str, int]:
    """anchorscan's Beam counters after a run, by name."""
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("anchorscan"))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals
