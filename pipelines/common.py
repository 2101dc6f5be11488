"""The steps every pipeline builds the same way from its flags: the chain's settings
(list, read, decode, embed), the driver's extractor and the anchor a command starts from."""

from __future__ import annotations

import dataclasses

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.anchor_file import anchor_id, verified_contents
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.sources import ReadLimits
from anchorscan.anchors.io.storage import check_writable, local_copy, read_checked_file
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.softness import softened
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.pipelines.flags import checked_flags
from anchorscan.pipelines.options import (
    CHAIN_BOUNDS,
    backbone_config,
    decode_processes,
    http_config,
    runs_locally,
    torch_threads,
)
from anchorscan.transforms.chain import Steps
from anchorscan.transforms.decode import DecodeSettings
from anchorscan.transforms.fitting import anchor_layout
from anchorscan.transforms.inference import FeatureModelHandler
from anchorscan.transforms.streaming import Learning


def driver_extractor(config: BackboneConfig) -> FeatureExtractor:
    """The extractor as workers will build it, for its spec and projection (on the CPU, in
    torch: the driver runs no images, so it skips the ONNX export)."""
    weights = config.weights and local_copy(config.weights)
    return dataclasses.replace(config, weights=weights, device="cpu", runtime="torch").build()


def chain_steps(
    args, options, config: BackboneConfig, extractor: FeatureExtractor, c2pa_trust_anchors: str | None = None
) -> Steps:
    """How the chain's steps run, from a command's flags (see pipelines/options.py); the trust
    anchors of C2PA signers from a command with the provenance flags."""
    checked_flags(CHAIN_BOUNDS, args)
    preprocessing = extractor.backbone.preprocessing
    limits = ReadLimits(
        args.max_bytes, args.read_timeout, http_config(args), args.max_shard_bytes, args.max_skip_bytes
    )
    decoding = DecodeSettings(
        preprocessing["crop"],
        preprocessing["resize"],
        args.max_pixels,
        args.min_side,
        args.decode_timeout,
        args.perturbation,
        decode_processes(args, options),
        args.decode_ahead or args.batch_size,
        c2pa_trust_anchors=c2pa_trust_anchors or "",
    )
    # Fixed-size batches: memory is bounded from the first batch on, and an image's features
    # do not depend on how the runner happened to batch it.
    handler = FeatureModelHandler(
        config,
        extractor.spec.digest(),
        min_batch_size=args.batch_size,
        max_batch_size=args.batch_size,
        torch_threads=torch_threads(args, options),
        large_model=args.large_model,
    )
    return Steps(limits, decoding, handler, spread_samples=not runs_locally(options))


@dataclasses.dataclass(frozen=True)
class StartingAnchor:
    """The anchor a command starts from, read and checked, and the extractor that makes its
    features again."""

    tensors: dict
    metadata: dict
    spec: FeatureSpec
    backbone: BackboneConfig
    extractor: FeatureExtractor


def anchor_and_extractor(args, options=None) -> StartingAnchor:
    """The anchor that --anchor names, for a command that reads --input and writes an anchor to
    --output (a runner's pre-flight): paths, output and anchor refused before any work (an
    anchor this anchorscan would make other features for)."""
    check_paths([*args.input, args.anchor, args.output, args.errors, args.weights])
    check_writable(args.output, "--output")
    if args.errors:
        check_writable(f"{args.errors}-errors", "--errors")
    tensors, metadata = verified_contents(read_checked_file(args.anchor), args.anchor)
    spec = FeatureSpec.from_dict(metadata)
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")
    return StartingAnchor(tensors, metadata, spec, backbone, extractor)


@dataclasses.dataclass(frozen=True)
class StreamStart:
    """What a stream scores and learns with, read from the anchor it starts from."""

    anchor_id: str
    steps: Steps
    learning: Learning


def stream_start(args, options, path: str) -> StreamStart:
    """From the anchor file at ``path`` (--anchor, or the local stream's kept copy of it),
    refused where this anchorscan would make other features than it was fitted on."""
    tensors, metadata = verified_contents(read_checked_file(path), args.anchor)
    spec, config = FeatureSpec.from_dict(metadata), AnchorConfig.from_dict(metadata["config"])
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")
    steps = chain_steps(args, options, backbone, extractor)
    learning = Learning(
        steps.for_fitting(softened(config.forensic_levels)),
        args.anchor,
        anchor_layout(spec, config),
        tensors.get("projection"),
    )
    return StreamStart(anchor_id(metadata), steps, learning)
