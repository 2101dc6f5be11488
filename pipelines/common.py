"""The steps every pipeline builds the same way from its flags: decode and embed."""
from __future__ import annotations

import dataclasses

from anchorscan.anchors.features import BackboneConfig, FeatureExtractor
from anchorscan.pipelines.options import decode_limits, decode_processes, http_config, torch_threads
from anchorscan.transforms.fetch import HttpConfig
from anchorscan.transforms.decode import DecodeImages
from anchorscan.transforms.inference import EmbedImages, FeatureModelHandler
from anchorscan.transforms.io import local_copy


def driver_extractor(config: BackboneConfig) -> FeatureExtractor:
    """The extractor as workers will build it, for its spec and projection (on the CPU, in
    torch: the driver runs no images, so it skips the ONNX export)."""
    weights = config.weights and local_copy(config.weights)
    return dataclasses.replace(config, weights=weights, device="cpu", runtime="torch").build()


def decode_step(args, options, preprocessing: dict, previous=None) -> DecodeImages:
    return DecodeImages(preprocessing, decode_limits(args), previous,
                        processes=decode_processes(args, options),
                        ahead=args.decode_ahead or args.batch_size,
                        # stream watches storage, not web servers: it has no http flags
                        http=http_config(args) if hasattr(args, "http_timeout") else HttpConfig())


def embed_step(args, options, config: BackboneConfig, extractor: FeatureExtractor,
               softened: tuple = ()) -> EmbedImages:
    # Fixed-size batches: memory is bounded from the first batch on, and an image's features
    # do not depend on how the runner happened to batch it.
    return EmbedImages(FeatureModelHandler(
        config, extractor.spec.digest(), min_batch_size=args.batch_size,
        max_batch_size=args.batch_size, torch_threads=torch_threads(args, options),
        large_model=args.large_model, softened=softened))
