"""The steps fit and score share: list inputs, decode, embed."""
from __future__ import annotations

import dataclasses

from anchors.features import BackboneConfig, FeatureExtractor
from transforms.decode import DecodeImages
from transforms.inference import EmbedImages, FeatureModelHandler
from transforms.io import ListInputs, local_copy


def build_driver_extractor(config: BackboneConfig) -> FeatureExtractor:
    """The extractor as workers will build it, for its spec and projection (on the CPU)."""
    weights = config.weights and local_copy(config.weights)
    return dataclasses.replace(config, weights=weights, device="cpu").build()


def read_and_embed(pipeline, options, config: BackboneConfig, extractor: FeatureExtractor,
                   previous=None):
    """Returns (embedded images, [error PCollections], reused rows) for the images the options
    name; ``previous`` (sha256, score row) pairs are reused instead of scored again."""
    handler = FeatureModelHandler(config, extractor.spec.digest(),
                                  max_batch_size=options.batch_size,
                                  torch_threads=options.torch_threads,
                                  large_model=options.large_model)
    uris, list_errors = pipeline | "List" >> ListInputs(options.input)
    limits = {"max_pixels": options.max_pixels, "max_bytes": options.max_bytes,
              "min_side": options.min_side, "decode_timeout": options.decode_timeout}
    images, decode_errors, reused = uris | "Decode" >> DecodeImages(
        extractor.backbone.preprocessing, limits, previous)
    embedded, embed_errors = images | "Embed" >> EmbedImages(handler)
    return embedded, [list_errors, decode_errors, embed_errors], reused
