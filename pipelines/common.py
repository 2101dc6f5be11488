"""The steps every pipeline shares: list inputs, decode, embed."""
from __future__ import annotations

import dataclasses
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions

from anchorscan.anchors.features import BackboneConfig, FeatureExtractor
from anchorscan.transforms.decode import DecodeImages
from anchorscan.transforms.inference import EmbedImages, FeatureModelHandler
from anchorscan.transforms.io import ListInputs, local_copy
from anchorscan.transforms.progress import ReportProgress


def build_driver_extractor(config: BackboneConfig) -> FeatureExtractor:
    """The extractor as workers will build it, for its spec and projection (on the CPU, in
    torch: the driver runs no images, so it skips the ONNX export)."""
    weights = config.weights and local_copy(config.weights)
    return dataclasses.replace(config, weights=weights, device="cpu", runtime="torch").build()


def _local_workers(options) -> int:
    direct = options.view_as(DirectOptions)
    return (direct.direct_num_workers or 1) if direct.direct_running_mode == "multi_processing" else 1


def torch_threads(options) -> int:
    """--torch_threads, or the cores shared out among local worker processes (each would
    otherwise start one thread per core, and they would fight over the cores)."""
    workers = _local_workers(options)
    if options.torch_threads or workers <= 1:
        return options.torch_threads
    return max(1, (os.cpu_count() or 1) // workers)


def decode_threads(options) -> int:
    """--decode_threads, or the cores of one local worker process."""
    return options.decode_threads or max(1, (os.cpu_count() or 1) // _local_workers(options))


class ReadAndEmbed(beam.PTransform):
    """Input patterns -> {"embedded": (ImageMeta, (vector, positions)), "errors": error rows,
    "reused": earlier score rows}; ``previous`` (sha256, score row) pairs are reused instead of
    scored again."""

    def __init__(self, patterns, options, config: BackboneConfig, extractor: FeatureExtractor,
                 previous=None):
        super().__init__()
        self.patterns, self.previous = patterns, previous
        self.decode_threads = decode_threads(options)
        self.decode_ahead = options.decode_ahead or options.batch_size
        self.preprocessing = extractor.backbone.preprocessing
        self.limits = {"max_pixels": options.max_pixels, "max_bytes": options.max_bytes,
                       "min_side": options.min_side, "decode_timeout": options.decode_timeout,
                       "perturbation": options.perturbation}
        # Fixed-size batches: memory is bounded from the first batch on, and an image's features
        # do not depend on how the runner happened to batch it.
        self.handler = FeatureModelHandler(config, extractor.spec.digest(),
                                           min_batch_size=options.batch_size,
                                           max_batch_size=options.batch_size,
                                           torch_threads=torch_threads(options),
                                           large_model=options.large_model)

    def expand(self, pipeline):
        uris, list_errors = pipeline | "List" >> ListInputs(self.patterns)
        total = beam.pvalue.AsSingleton(uris | "CountInputs" >> beam.combiners.Count.Globally())
        # Counted before decoding: the runner holds a side input's consumer back until the count
        # is done, and here that holds back URIs, not every image's features.
        uris = uris | "Progress" >> beam.ParDo(ReportProgress("progress"), total)
        images, decode_errors, reused = uris | "Decode" >> DecodeImages(
            self.preprocessing, self.limits, self.previous, threads=self.decode_threads,
            ahead=self.decode_ahead)
        embedded, embed_errors = images | "Embed" >> EmbedImages(self.handler)
        errors = (list_errors, decode_errors, embed_errors) | "Errors" >> beam.Flatten()
        return {"embedded": embedded, "errors": errors, "reused": reused}
