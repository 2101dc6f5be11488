"""Fit an anchor on real images: read, decode, embed, merge moments, calibrate, write."""
from __future__ import annotations

import logging
import time
from importlib.metadata import version

import apache_beam as beam

from anchorscan.anchors.anchor import AnchorConfig
from anchorscan.anchors.backbones import DEFAULT_BACKBONE
from anchorscan.anchors.features import BackboneConfig
from anchorscan.pipelines.common import ReadAndEmbed, build_driver_extractor
from anchorscan.pipelines.options import AnchorOptions, counter_totals, pipeline_options, require
from anchorscan.anchors.anchor_file import read_metadata
from anchorscan.transforms.io import read_bytes
from anchorscan.transforms.scoring import FitAnchor
from anchorscan.transforms.sinks import WriteErrors


def run(argv=None, test_pipeline=None):
    options = pipeline_options(argv, AnchorOptions)
    fit = options.view_as(AnchorOptions)
    require(fit, "input", "anchor")
    config = AnchorConfig(fit.explained_variance, fit.fpr, fit.combine or AnchorConfig.combine,
                          fit.statistical or AnchorConfig.statistical)
    backbone = BackboneConfig(fit.backbone or DEFAULT_BACKBONE, fit.weights, fit.attention,
                              fit.resize or "none", fit.statistical_budget, fit.projection_seed,
                              fit.device, fit.precision, fit.runtime)
    extractor = build_driver_extractor(backbone)  # the spec and projection the anchor records

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    images = pipeline | "Read" >> ReadAndEmbed(fit.input, fit, backbone, extractor)
    _ = images["embedded"] | "Fit" >> FitAnchor(fit.anchor, extractor.spec, config, extractor.projection,
                                      fit.calibration_fraction, fit.calibration_group,
                                      version=version("anchorscan"))
    _ = images["errors"] | WriteErrors(fit.errors or fit.anchor)
    result = pipeline.run()
    result.wait_until_finish()
    metadata = read_metadata(read_bytes(fit.anchor))
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
