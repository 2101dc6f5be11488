"""The steps every pipeline builds the same way from its flags: the chain's settings
(list, read, decode, embed), the driver's extractor and the anchor a command starts from."""

from __future__ import annotations

import dataclasses

from apache_beam.options.pipeline_options import StandardOptions

from anchorscan.anchors.anchor_file import verified_contents
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.sources import ReadLimits
from anchorscan.anchors.io.storage import check_writable, local_copy, read_checked_file
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.pipelines.options import (
    LOCAL_RUNNERS,
    backbone_config,
    decode_processes,
    http_config,
    torch_threads,
)
from anchorscan.transforms.chain import Steps
from anchorscan.transforms.decode import DecodeSettings
from anchorscan.transforms.inference import FeatureModelHandler


def driver_extractor(config: BackboneConfig) -> FeatureExtractor:
    """The extractor as workers will build it, for its spec and projection (on the CPU, in
    torch: the driver runs no images, so it skips the ONNX export)."""
    weights = config.weights and local_copy(config.weights)
    return dataclasses.replace(config, weights=weights, device="cpu", runtime="torch").build()


def chain_steps(args, options, config: BackboneConfig, extractor: FeatureExtractor) -> Steps:
    """How the chain's steps run, from a command's flags (see pipelines/options.py)."""
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
        getattr(args, "perturbation", None),
        decode_processes(args, options),
        args.decode_ahead or args.batch_size,
        c2pa_trust_anchors=getattr(args, "c2pa_trust_anchors", None) or "",
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
    distributed = str(options.view_as(StandardOptions).runner) not in LOCAL_RUNNERS
    return Steps(limits, decoding, handler, spread_samples=distributed)


def anchor_and_extractor(args):
    """(tensors, metadata, spec, backbone config, driver extractor) of the anchor that --anchor
    names, for a command that reads --input and writes an anchor to --output: paths, output and
    anchor refused before any work (an anchor this anchorscan would make other features for)."""
    check_paths([*args.input, args.anchor, args.output, args.errors, args.weights])
    check_writable(args.output, "--output")
    if args.errors:
        check_writable(f"{args.errors}-errors", "--errors")
    tensors, metadata = verified_contents(read_checked_file(args.anchor), args.anchor)
    spec = FeatureSpec.from_dict(metadata)
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")
    return tensors, metadata, spec, backbone, extractor
