"""Batched feature extraction with RunInference: the backbone is loaded once per worker."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from anchorscan.anchors.calibration import uri_key
from anchorscan.anchors.io.storage import local_copy
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.spec import IncompatibleAnchorError
from anchorscan.anchors.tables import error_row
from anchorscan.anchors.threads import capped_to_cores, limit_blas_threads

DEFAULT_BATCH_SIZE = 16  # suits CPUs; GPUs want 64 or more


class FeatureModelHandler(ModelHandler[np.ndarray, tuple, FeatureExtractor]):
    """uint8 crops of an image in (its centre crop and the forensic channel's other tiles,
    (1 + k, size, size, 3)), (feature vector, effective attention positions) out. ``softened``:
    the softness levels whose forensic features follow (fitting; see ``FeatureExtractor``)."""

    def __init__(
        self,
        config: BackboneConfig,
        expected_spec_digest: str | None = None,
        min_batch_size: int = 1,
        max_batch_size: int = 32,
        torch_threads: int = 0,
        large_model: bool = False,
        softened: tuple = (),
    ):
        super().__init__()
        self.config, self.expected_spec_digest = config, expected_spec_digest
        self.min_batch_size, self.max_batch_size = min_batch_size, max_batch_size
        self.torch_threads, self.large_model = torch_threads, large_model
        self.softened = tuple(softened)

    def with_softened(self, softened: tuple) -> FeatureModelHandler:
        """This handler with the forensic features of ``softened`` levels after the crop's own
        (and, for the images marked SOFTEN_AND_EMBED, the softened copies' backbone features
        after them)."""
        return FeatureModelHandler(
            self.config,
            self.expected_spec_digest,
            self.min_batch_size,
            self.max_batch_size,
            self.torch_threads,
            self.large_model,
            softened,
        )

    def load_model(self) -> FeatureExtractor:
        if self.torch_threads:
            torch.set_num_threads(capped_to_cores(self.torch_threads, "--torch_threads"))
        limit_blas_threads()
        weights = self.config.weights and local_copy(self.config.weights)
        extractor = dataclasses.replace(self.config, weights=weights).build()
        # A worker with other weights than the driver checked must not write wrong scores.
        if self.expected_spec_digest and extractor.spec.digest() != self.expected_spec_digest:
            raise IncompatibleAnchorError(
                f"the backbone on this worker ({extractor.spec.backbone}, weights "
                f"{extractor.spec.weights_sha256[:12]}) does not match the anchor's features"
            )
        logging.info(
            "loaded backbone %s (weights sha256 %s) on %s",
            extractor.spec.backbone,
            extractor.spec.weights_sha256[:12],
            extractor.device,
        )
        return extractor

    def share_model_across_processes(self) -> bool:
        return self.large_model

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: FeatureExtractor,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[tuple]:
        embed_rows = None
        if self.softened:  # (crops, how far to simulate its softness levels), see EmbedImages
            stacks, marks = [crops for crops, _ in batch], np.array([mark for _, mark in batch], int)
            soften_rows, embed_rows = marks >= SOFTEN, marks == SOFTEN_AND_EMBED
        else:
            stacks, soften_rows = list(batch), None
        owners = np.repeat(np.arange(len(stacks)), [len(crops) for crops in stacks])
        features = model(
            torch.from_numpy(np.concatenate(stacks)), self.softened, soften_rows, owners, embed_rows
        )
        vectors = list(features.vectors)
        if features.softened_backbone is not None and embed_rows is not None:  # their copies' last
            for index, copies in zip(np.flatnonzero(embed_rows), features.softened_backbone):
                vectors[index] = np.concatenate([vectors[index], copies])
        return list(zip(vectors, features.attention_positions.tolist()))

    def get_num_bytes(self, batch: Sequence) -> int:
        return sum((example[0] if self.softened else example).nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return "anchorscan"

    def batch_elements_kwargs(self):
        return {"min_batch_size": self.min_batch_size, "max_batch_size": self.max_batch_size}


def _failed_batch_rows(failure):
    batch, (kind, message, _) = failure
    for meta, _ in batch:
        yield error_row(meta.uri, "embed", f"feature extraction failed: {message}", kind.__name__)


# Images whose softness levels fitting simulates by default (`--softened_images`): the levels
# are 10-dimensional Gaussians, which this many images estimate well; beyond it, simulating
# more costs fit most of its time (nine softened copies per image) and changes nothing
# (docs/METHOD.md §8.3).
SOFTENED_IMAGES = 1000


# How far fitting simulates an image's softness levels: not at all, the forensic features of
# its softened copies, or (a held-out image: docs/METHOD.md §5.4) their backbone features too.
SOFTEN, SOFTEN_AND_EMBED = 1, 2


def softening_chosen(meta, total: int | None, sample: int = SOFTENED_IMAGES) -> bool:
    """A deterministic sample of about ``sample`` of ``total`` images (all of them when there
    are fewer, or when the total is not known: a stream's window)."""
    if not total or total <= sample:
        return True
    return uri_key(meta.uri) < sample / total * 2**64


def _with_softening(row, total, sample, hold_out):
    meta, crop = row
    if not softening_chosen(meta, total, sample):
        return meta, (crop, 0)
    held = hold_out is not None and hold_out.holds(meta.uri, meta.phash)
    return meta, (crop, SOFTEN_AND_EMBED if held else SOFTEN)


class EmbedImages(beam.PTransform):
    """(ImageMeta, crop) -> (ImageMeta, (vector, attention_positions)), and error rows for
    batches whose forward pass failed. Fitting (a handler with softened levels) simulates them
    on a sample of about ``softened_images`` of the ``count`` images listed (NaN in their
    columns elsewhere); those of them that ``hold_out`` sends to calibration also get their
    softened copies' backbone features, after the rest of the row."""

    def __init__(
        self,
        handler: FeatureModelHandler,
        count=None,
        softened_images: int = SOFTENED_IMAGES,
        hold_out=None,
    ):
        super().__init__()
        self.handler, self.count, self.softened_images = handler, count, softened_images
        self.hold_out = hold_out

    def expand(self, images):
        if self.handler.softened:
            total = beam.pvalue.AsSingleton(self.count) if self.count is not None else None
            images = images | "ChooseSoftened" >> beam.Map(
                _with_softening, total, self.softened_images, self.hold_out
            )
        embedded, failed = images | RunInference(KeyedModelHandler(self.handler)).with_exception_handling()
        errors = failed.failed_inferences | "FailedBatchRows" >> beam.FlatMap(_failed_batch_rows)
        return embedded, errors
