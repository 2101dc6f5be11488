"""The chain every command that turns inputs into features builds: List -> Read -> Decode ->
Embed, each a named step defined in its own module. ``ImageFeatures`` applies the four to
--input patterns; `stream` feeds its watcher's units to the last three."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import apache_beam as beam

from anchorscan.anchors.io.sources import ReadLimits
from anchorscan.anchors.statistics import HoldOut
from anchorscan.transforms.decode import DecodeImages, DecodeSettings
from anchorscan.transforms.inference import SOFTENED_IMAGES, EmbedImages, FeatureModelHandler
from anchorscan.transforms.listing import ListInputs
from anchorscan.transforms.read import ReadInputs


@dataclasses.dataclass(frozen=True)
class Steps:
    """How each step runs, as the command's flags say; ``spread_samples``: a shard's samples
    redistributed after its read (distributed runners, see ``transforms/read.py``);
    ``softened_images``: about how many images fitting simulates the softness levels on."""

    limits: ReadLimits
    decoding: DecodeSettings
    handler: FeatureModelHandler
    spread_samples: bool = False
    softened_images: int = SOFTENED_IMAGES
    hold_out: HoldOut | None = None

    def for_fitting(
        self, softened: tuple, softened_images: int = SOFTENED_IMAGES, hold_out: HoldOut | None = None
    ) -> Steps:
        """The same steps as fitting needs them: the forensic features of these softness levels
        too (on a sample of about ``softened_images``; the backbone's of those that ``hold_out``
        sends to calibration), and each picture's perceptual hash (the hold-out groups
        near-duplicates)."""
        return dataclasses.replace(
            self,
            decoding=dataclasses.replace(self.decoding, perceptual_hash=True),
            handler=self.handler.with_softened(softened),
            softened_images=softened_images,
            hold_out=hold_out,
        )


class Features(NamedTuple):
    """What the chain gives: embedded images, every stage's error rows, and (record, earlier
    row) pairs of content scored before."""

    embedded: beam.PCollection
    errors: tuple
    reused: beam.PCollection


class EmbedUnits(beam.PTransform):
    """Listed units -> Read -> Decode -> Embed; ``count``: how many units were listed (fitting
    simulates the softness levels on a sample of that size, see ``EmbedImages``)."""

    def __init__(self, steps: Steps, previous=None, count=None):
        super().__init__()
        self.steps, self.previous, self.count = steps, previous, count

    def expand(self, units) -> Features:
        records, read_errors = units | "Read" >> ReadInputs(self.steps.limits, self.steps.spread_samples)
        images, decode_errors, reused = records | "Decode" >> DecodeImages(self.steps.decoding, self.previous)
        embedded, embed_errors = images | "Embed" >> EmbedImages(
            self.steps.handler, self.count, self.steps.softened_images, self.steps.hold_out
        )
        return Features(embedded, (read_errors, decode_errors, embed_errors), reused)


class ImageFeatures(beam.PTransform):
    """--input patterns -> List -> Read -> Decode -> Embed; a manifest's ``carried_names``
    columns travel with its images; ``previous``: (sha256, row) of content scored before."""

    def __init__(
        self,
        patterns: list[str],
        steps: Steps,
        carried_names: tuple[str, ...] = (),
        previous=None,
        progress_label: str = "progress",
    ):
        super().__init__()
        self.patterns, self.steps, self.previous = patterns, steps, previous
        self.carried_names, self.progress_label = carried_names, progress_label

    def expand(self, pipeline) -> Features:
        units, list_errors, count = pipeline | "List" >> ListInputs(
            self.patterns, self.carried_names, self.progress_label
        )
        features = units | "Features" >> EmbedUnits(self.steps, self.previous, count)
        return features._replace(errors=(list_errors, *features.errors))
