"""Fit an anchor on real images: read, decode, embed, merge moments, calibrate, write."""
from __future__ import annotations

import logging
import time
from importlib.metadata import version

import apache_beam as beam

from anchors.anchor import AnchorConfig
from anchors.backbones import DEFAULT_BACKBONE
from pipelines.options import AnchorOptions, counter_totals, pipeline_options, require
from transforms.decode import DecodeImages
from transforms.inference import EmbedImages, FeatureModelHandler
from transforms.io import ListInputs
from transforms.scoring import FitAnchor, load_anchor
from transforms.sinks import WriteErrors


def model_handler(options, backbone: str, attention: str, statistical_budget: int,
                  projection_seed: int) -> FeatureModelHandler:
    return FeatureModelHandler(
        backbone, options.weights, attention, statistical_budget, projection_seed,
        max_batch_size=options.batch_size, torch_threads=options.torch_threads)


def run(argv=None, test_pipeline=None):
    options = pipeline_options(argv, AnchorOptions)
    fit = options.view_as(AnchorOptions)
    require(fit, "input", "anchor")
    config = AnchorConfig(fit.explained_variance, fit.fpr, fit.combine or AnchorConfig.combine,
                          fit.statistical or AnchorConfig.statistical)
    handler = model_handler(fit, fit.backbone or DEFAULT_BACKBONE, fit.attention or "zscore",
                            fit.statistical_budget, fit.projection_seed)
    extractor = handler.build_extractor()  # the spec and projection the anchor records
    handler.expected_spec_digest = extractor.spec.digest()

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    uris, list_errors = pipeline | "List" >> ListInputs(fit.input)
    images, decode_errors = uris | "Decode" >> DecodeImages(extractor.backbone.crop_size,
                                                            fit.max_pixels)
    embedded, embed_errors = images | "Embed" >> EmbedImages(handler)
    _ = embedded | "Fit" >> FitAnchor(fit.anchor, extractor.spec, config, extractor.projection,
                                      fit.calibration_fraction, fit.calibration_group,
                                      version=version("anchorscan"))
    _ = (list_errors, decode_errors, embed_errors) | WriteErrors(fit.errors or fit.anchor)
    result = pipeline.run()
    result.wait_until_finish()
    _, metadata = load_anchor(fit.anchor)
    summary = {"anchor": fit.anchor, "n": metadata["n"], "n_calibration": metadata["n_calibration"],
               "d": metadata["d"], "k": metadata["k"], "shrinkage": metadata["shrinkage"],
               "errors": sum(v for k, v in counter_totals(result).items() if k.startswith("errors_")),
               "seconds": time.time() - started}
    print_fit_summary(summary)
    return summary


def print_fit_summary(summary: dict) -> None:
    images = summary["n"] + summary["n_calibration"]
    print(f"anchor      {summary['anchor']}\n"
          f"images      {images} real ({summary['n']} fitted, {summary['n_calibration']} "
          f"held out for calibration), {summary['errors']} errors\n"
          f"features    d={summary['d']}, k={summary['k']}, shrinkage={summary['shrinkage']:.3f}\n"
          f"time        {summary['seconds']:.1f} s ({images / max(summary['seconds'], 1e-9):.1f} images/s)")


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    run()
