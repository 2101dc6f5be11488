"""Command-line flags. Each command builds its own parser from the groups below (only the flags
that really are shared live here); whatever a parser does not know passes to Beam, as in
Beam's own examples, and a flag that Beam does not know either is an error."""

from __future__ import annotations

import argparse
import functools
import os

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from anchorscan.anchors.anchor import CHANNELS, COMBINERS, STATISTICAL_MODES
from anchorscan.anchors.constraints import Interval
from anchorscan.anchors.images.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from anchorscan.anchors.images.perturbations import PERTURBATION_HELP
from anchorscan.anchors.io.fetch import HttpConfig
from anchorscan.anchors.io.sources import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MAX_SKIP_BYTES,
    DEFAULT_READ_TIMEOUT,
)
from anchorscan.anchors.models.backbones import (
    ATTENTION_MODES,
    BACKBONE_NAMES,
    DEFAULT_BACKBONE,
    RESIZE_MODES,
    check_attention,
)
from anchorscan.anchors.models.features import PRECISIONS, RUNTIMES, BackboneConfig
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.anchors.threads import CORES_MULTIPLE
from anchorscan.pipelines.flags import (
    add_bounded,
    bounded,
    checked_flags,
    choice_list,
    input_pattern,
    int_in,
    non_negative_int,
    pem_certificates,
    perturbation_value,
    positive_int,
    text,
)
from anchorscan.transforms.decode import DEFAULT_DECODE_TIMEOUT
from anchorscan.transforms.inference import DEFAULT_BATCH_SIZE, SOFTENED_IMAGES

# The default local runner would first try to download the Prism binary; offline that fails
# and it falls back, so runs would differ with the network. Pin the in-process runner.
DEFAULT_LOCAL_RUNNER = "FnApiRunner"
# Bounds no machine needs more of; a worker also caps processes and threads at CORES_MULTIPLE
# times its own cores (anchors/threads.py), with a warning.
MAX_RESOURCE = 1024
MAX_BATCH_SIZE = 4096
POSITIVE_INT = Interval(int, 1, None)
POSITIVE_SECONDS = Interval(float, 0.0, None, closed="neither")
# The chain's bounds (the runtime and decoding groups), each stated once: their flags' types and
# chain_steps' checks (pipelines/common.py).
CHAIN_BOUNDS = {
    "batch_size": Interval(int, 1, MAX_BATCH_SIZE),
    "torch_threads": Interval(int, 0, MAX_RESOURCE),
    "max_pixels": POSITIVE_INT,
    "max_bytes": POSITIVE_INT,
    "max_shard_bytes": POSITIVE_INT,
    "max_skip_bytes": POSITIVE_INT,
    "min_side": POSITIVE_INT,
    "decode_timeout": POSITIVE_SECONDS,
    "read_timeout": POSITIVE_SECONDS,
    "decode_processes": Interval(int, 0, MAX_RESOURCE),
    "decode_ahead": Interval(int, 0, MAX_BATCH_SIZE),
}
INPUT_HELP = (
    "a glob, a folder (its image files and tar shards, recursively), a tar shard or a brace "
    "pattern of shards ('shards/{00000..00099}.tar'), or a manifest (.txt one URI per "
    "line, .csv or .parquet with a 'uri' column), local or gs://; repeat for several"
)


def add_anchor_output_args(
    parser: argparse.ArgumentParser, anchor: str, images: str, output: str, tables: str = "the errors table"
) -> None:
    """--anchor, --input, --output and --errors of a command that makes an anchor from another
    and images (update, flag, calibrate); the arguments are their helps."""
    parser.add_argument("--anchor", type=text, required=True, help=anchor)
    parser.add_argument(
        "--input", type=input_pattern, action="append", required=True, help=f"{images}: {INPUT_HELP}"
    )
    parser.add_argument("--output", type=text, required=True, help=output)
    parser.add_argument(
        "--errors", type=text, default=None, help=f"prefix of {tables} (default: the output's path)"
    )


def add_score_choice_args(parser: argparse.ArgumentParser, whose: str = "", statistical: bool = True) -> None:
    """What a run changes of how the anchor scores (each by default as the anchor says); ``whose``:
    "the anchor's " where a head may score instead (evaluate)."""
    parser.add_argument(
        "--combine",
        default=None,
        choices=sorted(COMBINERS),
        help=f"how {whose or 'the '}p-values combine (default: the anchor's)",
    )
    if statistical:
        parser.add_argument(
            "--statistical",
            default=None,
            choices=sorted(STATISTICAL_MODES),
            help="statistical distance decoupled or raw (default: the anchor's)",
        )
    parser.add_argument(
        "--channels",
        type=choice_list(CHANNELS),
        default=None,
        help=f"comma-separated channels {whose or 'the '}score combines (default: the anchor's)",
    )


def errors_table(args, _=None) -> list[str]:
    """The errors table of a command whose --errors defaults to its --output."""
    return [f"{args.errors or args.output}-errors"]


PROVENANCE_CHOICES = ("use", "ignore")


def add_provenance_args(parser: argparse.ArgumentParser) -> None:
    """What a scan does with what files declare of their origin (see README, *Declared provenance*)."""
    group = parser.add_argument_group("declared provenance")
    group.add_argument(
        "--provenance",
        choices=PROVENANCE_CHOICES,
        default="use",
        help="use: a file whose C2PA, XMP or generator metadata declares it AI-made is suspect "
        "whatever the statistics say; ignore: only the statistics decide (the columns are still written)",
    )
    group.add_argument(
        "--c2pa_trust_anchors",
        type=pem_certificates,
        default=None,
        help="a PEM file of CA certificates (local or gs://): C2PA signers chaining to one read "
        "as trusted; without it every valid signer reads as untrusted",
    )


def add_softening_arg(group) -> None:
    """How many real images of a fit or an update the softness levels are simulated on."""
    group.add_argument(
        "--softened_images",
        type=positive_int,
        default=SOFTENED_IMAGES,
        help="simulate the forensic softness levels on a deterministic sample of about this many "
        "images (all of a smaller input): the levels' Gaussians need no more, and each costs nine "
        "softened copies",
    )


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """What the features are: chosen when fitting, read from the anchor or head when scoring."""
    group = parser.add_argument_group("features")
    group.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=BACKBONE_NAMES, help="frozen backbone")
    group.add_argument(
        "--attention",
        default=None,
        choices=ATTENTION_MODES,
        help="spatial weights of the token statistics (default: the backbone's)",
    )
    group.add_argument(
        "--resize",
        default=RESIZE_MODES[0],
        choices=RESIZE_MODES,
        help="none: centre crop at native resolution; shorter_side: scale first",
    )
    group.add_argument(
        "--statistical_budget",
        type=int_in(1, 65536),
        default=BackboneConfig.statistical_budget,
        help="largest size of the statistical part (seeded projection)",
    )
    group.add_argument(
        "--projection_seed",
        type=non_negative_int,
        default=BackboneConfig.projection_seed,
        help="seed of the statistical projection",
    )


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """How the backbone runs; never changes what the features are."""
    group = parser.add_argument_group("backbone runtime")
    group.add_argument(
        "--weights",
        default=None,
        type=text,
        help="backbone weights file, local or gs:// (CLIP backbones need it)",
    )
    group.add_argument(
        "--device", default=BackboneConfig.device, choices=("cpu", "cuda"), help="where the backbone runs"
    )
    group.add_argument(
        "--precision",
        default=BackboneConfig.precision,
        choices=PRECISIONS,
        help="autocast of the backbone on GPUs (CPUs run float32)",
    )
    group.add_argument(
        "--runtime",
        default=BackboneConfig.runtime,
        choices=RUNTIMES,
        help="auto: ONNX Runtime where measured faster (default backbone on CPUs)",
    )
    group.add_argument(
        "--batch_size",
        type=bounded(CHAIN_BOUNDS["batch_size"]),
        default=DEFAULT_BATCH_SIZE,
        help="inference batch size (try 64 or more on a GPU)",
    )
    group.add_argument(
        "--torch_threads",
        type=bounded(CHAIN_BOUNDS["torch_threads"]),
        default=0,
        help=f"torch threads per worker (0: the cores shared among local workers; at most "
        f"{CORES_MULTIPLE} x a worker's cores)",
    )
    group.add_argument(
        "--large_model", action="store_true", help="share one model copy between a worker's processes"
    )


def add_decoding_args(parser: argparse.ArgumentParser, perturbation: bool = True) -> None:
    group = parser.add_argument_group("decoding")
    decoding = (
        ("max_pixels", DEFAULT_MAX_PIXELS, "images with more pixels become error rows"),
        ("max_bytes", DEFAULT_MAX_BYTES, "files larger than this become error rows"),
        (
            "max_shard_bytes",
            DEFAULT_MAX_SHARD_BYTES,
            "bytes of a tar shard read, at most (decompressed, for .tar.gz); the rest is an error row",
        ),
        (
            "max_skip_bytes",
            DEFAULT_MAX_SKIP_BYTES,
            "bytes of a shard's member that is not read (over --max_bytes, a link) read past, at most; "
            "past it the rest of the shard is an error row",
        ),
        ("min_side", DEFAULT_MIN_SIDE, "images with a shorter side become error rows"),
        (
            "decode_timeout",
            DEFAULT_DECODE_TIMEOUT,
            "seconds one image may take to decode (its decoder is then stopped)",
        ),
        ("read_timeout", DEFAULT_READ_TIMEOUT, "seconds one file may take to read"),
        (
            "decode_processes",
            0,
            f"decoding processes per worker (0: one per core of a local worker; at most "
            f"{CORES_MULTIPLE} x a worker's cores)",
        ),
        ("decode_ahead", 0, "images decoding ahead of the forward pass (0: one batch)"),
    )
    add_bounded(group, CHAIN_BOUNDS, decoding)
    if not perturbation:  # the decoding settings of a command that offers none: no perturbation
        parser.set_defaults(perturbation=None)
    else:
        group.add_argument(
            "--perturbation",
            default=None,
            type=perturbation_value,
            help=f"applied to every image before cropping: {PERTURBATION_HELP}",
        )


# The http group's bounds, each stated once: its flags' types and http_config's checks.
HTTP_BOUNDS = {
    "http_timeout": Interval(float, 0.0, None, closed="neither"),
    "http_retries": Interval(int, 0, 20),
    "http_max_per_host": Interval(int, 1, 64),
    "http_max_time": Interval(float, 0.0, None, closed="neither"),
}


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """How http(s):// inputs (crawled manifests) are fetched; --max_bytes caps them too."""
    group = parser.add_argument_group("http(s) inputs")
    http = (
        (
            "http_timeout",
            HttpConfig.timeout,
            "seconds to connect, and to wait for the next bytes of a response",
        ),
        (
            "http_retries",
            HttpConfig.retries,
            "retries on 5xx, timeouts and broken connections (never on 4xx)",
        ),
        (
            "http_max_per_host",
            HttpConfig.max_per_host,
            "requests in flight to one host from one worker process",
        ),
        (
            "http_max_time",
            HttpConfig.max_time,
            "seconds one URI may take, all attempts and redirects together",
        ),
    )
    add_bounded(group, HTTP_BOUNDS, http)


def image_flag_groups(perturbation: bool = True) -> tuple:
    """The flag groups of a command that reads images: how the backbone runs, how images are
    decoded (with --perturbation or without), how http(s) inputs are fetched."""
    return (add_runtime_args, functools.partial(add_decoding_args, perturbation=perturbation), add_http_args)


def http_config(args) -> HttpConfig:
    """The http group's settings, each bound checked as its flag's type checks it."""
    checked_flags(HTTP_BOUNDS, args)
    return HttpConfig(args.http_timeout, args.http_retries, args.http_max_per_host, args.http_max_time)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """(our flags, Beam's options); Beam's runner defaults to the in-process one."""
    args, rest = parser.parse_known_args(argv)
    options = PipelineOptions(rest)
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join('--' + name for name in sorted(unknown))}")
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = DEFAULT_LOCAL_RUNNER
    return args, options


def backbone_config(args, spec: FeatureSpec | None = None) -> BackboneConfig:
    """The extractor that ``args`` ask for, or, given the ``spec`` an anchor or head was fitted
    on, the one that makes those features again (runtime flags from ``args``)."""
    runtime = {
        "weights": args.weights,
        "device": args.device,
        "precision": args.precision,
        "runtime": args.runtime,
    }
    if spec is not None:
        return BackboneConfig.from_spec(spec, **runtime)
    check_attention(args.backbone, args.attention)
    return BackboneConfig(
        args.backbone,
        attention=args.attention,
        resize=args.resize,
        statistical_budget=args.statistical_budget,
        projection_seed=args.projection_seed,
        **runtime,
    )


def _local_workers(options: PipelineOptions) -> int:
    direct = options.view_as(DirectOptions)
    return (direct.direct_num_workers or 1) if direct.direct_running_mode == "multi_processing" else 1


def torch_threads(args, options: PipelineOptions) -> int:
    """--torch_threads, or the cores shared out among local worker processes (each would
    otherwise start one thread per core, and they would fight over the cores)."""
    workers = _local_workers(options)
    if args.torch_threads or workers <= 1:
        return args.torch_threads
    return max(1, (os.cpu_count() or 1) // workers)


# Runners that run the pipeline's workers on this machine, as _local_workers counts them.
LOCAL_RUNNERS = {DEFAULT_LOCAL_RUNNER, "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}


def runs_locally(options: PipelineOptions) -> bool:
    return str(options.view_as(StandardOptions).runner) in LOCAL_RUNNERS


def decode_processes(args, options: PipelineOptions) -> int:
    """--decode_processes, or the cores of one local worker process; 1 on other runners, whose
    machines run an SDK process per core (Dataflow's default for Python), each with its own."""
    if args.decode_processes:
        return args.decode_processes
    if not runs_locally(options):
        return 1
    return max(1, (os.cpu_count() or 1) // _local_workers(options))


def counter_totals(result) -> dict[str, int]:
    """anchorscan's Beam counters after a run, by name."""
    totals: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("anchorscan"))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


def error_total(counters: dict[str, int]) -> int:
    return sum(value for name, value in counters.items() if name.startswith("errors_"))
