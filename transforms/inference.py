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

from anchorscan.anchors.io.storage import local_copy
from anchorscan.anchors.models.features import BackboneConfig, FeatureExtractor
from anchorscan.anchors.spec import IncompatibleAnchorError
from anchorscan.anchors.tables import error_row
from anchorscan.anchors.threads import capped_to_cores, limit_blas_threads

DEFAULT_BATCH_SIZE = 16  # suits CPUs; GPUs want 64 or more


class FeatureModelHandler(ModelHandler[np.ndarray, tuple, FeatureExtractor]):
    """uint8 crops in, (feature vector, effective attention positions) out. ``softened``: the
    softness levels whose forensic features follow (fitting; see ``FeatureExtractor``)."""

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
        """This handler with the forensic features of ``softened`` levels after the crop's own."""
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
        features = model(torch.from_numpy(np.stack(batch)), self.softened)
        return list(zip(features.vectors, features.attention_positions.tolist()))

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(example.nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return "anchorscan"

    def batch_elements_kwargs(self):
        return {"min_batch_size": self.min_batch_size, "max_batch_size": self.max_batch_size}


def _failed_batch_rows(failure):
    batch, (kind, message, _) = failure
    for meta, _ in batch:
        yield error_row(meta.uri, "embed", f"feature extraction failed: {message}", kind.__name__)


class EmbedImages(beam.PTransform):
    """(ImageMeta, crop) -> (ImageMeta, (vector, attention_positions)), and error rows for
    batches whose forward pass failed."""

    def __init__(self, handler: FeatureModelHandler):
        super().__init__()
        self.handler = handler

    def expand(self, images):
        embedded, failed = images | RunInference(KeyedModelHandler(self.handler)).with_exception_handling()
        errors = failed.failed_inferences | "FailedBatchRows" >> beam.FlatMap(_failed_batch_rows)
        return embedded, errors
