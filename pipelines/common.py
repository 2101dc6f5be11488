"""The steps every pipeline builds the same way from its flags: the anchor, decode and embed."""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from anchorscan.anchors.anchor_file import verified_contents
from anchorscan.anchors.io.fetch import HttpConfig
from anchorscan.anchors.io.gcs import check_paths
from anchorscan.anchors.io.storage import check_writable, local_copy, read_bytes
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.pipelines.options import (
    backbone_config,
    decode_limits,
    decode_processes,
    http_config,
    torch_threads,
)
from anchorscan.transforms.decode import DecodeImages
from anchorscan.transforms.inference import EmbedImages, FeatureModelHandler
from anchorscan.transforms.listing import ListInputs
from anchorscan.transforms.scoring import load_anchor


def driver_extractor(config: BackboneConfig) -> FeatureExtractor:
    """The extractor as workers will build it, for its spec and projection (on the CPU, in
    torch: the driver runs no images, so it skips the ONNX export)."""
    weights = config.weights and local_copy(config.weights)
    return dataclasses.replace(config, weights=weights, device="cpu", runtime="torch").build()


def decode_step(args, options, preprocessing: dict, previous=None) -> DecodeImages:
    return DecodeImages(
        preprocessing,
        decode_limits(args),
        previous,
        processes=decode_processes(args, options),
        ahead=args.decode_ahead or args.batch_size,
        # stream watches storage, not web servers: it has no http flags
        http=http_config(args) if hasattr(args, "http_timeout") else HttpConfig(),
    )


def embed_step(
    args, options, config: BackboneConfig, extractor: FeatureExtractor, softened: tuple = ()
) -> EmbedImages:
    # Fixed-size batches: memory is bounded from the first batch on, and an image's features
    # do not depend on how the runner happened to batch it.
    return EmbedImages(
        FeatureModelHandler(
            config,
            extractor.spec.digest(),
            min_batch_size=args.batch_size,
            max_batch_size=args.batch_size,
            torch_threads=torch_threads(args, options),
            large_model=args.large_model,
            softened=softened,
        )
    )


def anchor_and_extractor(args):
    """(tensors, metadata, spec, backbone config, driver extractor) of the anchor that --anchor
    names, for a command that reads --input and writes an anchor to --output: paths, output and
    anchor refused before any work (an anchor this anchorscan would make other features for)."""
    check_paths([*args.input, args.anchor, args.output, args.errors, args.weights])
    check_writable(args.output, "--output")
    tensors, metadata = verified_contents(read_bytes(args.anchor))
    spec = FeatureSpec.from_dict(metadata)
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")
    return tensors, metadata, spec, backbone, extractor


def anchor_model(pipeline, uri: str):
    """The anchor file's model as a one-element PCollection, read where the pipeline runs."""
    return (
        pipeline
        | "AnchorUri" >> beam.Create([uri])
        | "LoadAnchor" >> beam.Map(lambda anchor_uri: load_anchor(anchor_uri)[0])
    )


def list_and_embed(
    pipeline, args, options, backbone: BackboneConfig, extractor: FeatureExtractor, softened: tuple = ()
):
    """--input's images listed, decoded and embedded: (embedded rows, their error rows)."""
    uris, list_errors = pipeline | "List" >> ListInputs(args.input)
    images, decode_errors, _ = uris | "Decode" >> decode_step(args, options, extractor.backbone.preprocessing)
    embedded, embed_errors = images | "Embed" >> embed_step(args, options, backbone, extractor, softened)
    return embedded, (list_errors, decode_errors, embed_errors)
