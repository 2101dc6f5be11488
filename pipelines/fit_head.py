"""Fit a UnivFD head (nearest neighbour, LDA probe, logistic probe) on labelled images."""
from __future__ import annotations

import logging
import time
from importlib.metadata import version

import apache_beam as beam
import numpy as np

from anchorscan.anchors.backbones import DEFAULT_BACKBONE
from anchorscan.anchors.features import BackboneConfig
from anchorscan.anchors.heads import FAKE, REAL, LinearProbeHead, LogisticHead, NearestNeighbourHead, head_from_bytes
from anchorscan.pipelines.common import ReadAndEmbed, build_driver_extractor
from anchorscan.pipelines.options import AnchorOptions, counter_totals, pipeline_options, require
from anchorscan.transforms.combine import MomentsCombineFn
from anchorscan.transforms.io import read_bytes, write_atomically
from anchorscan.transforms.sinks import WriteErrors

HEAD_KINDS = ("nn", "lda", "logistic")


def _fit_from_banks(_, banks: dict, kind: str, spec, k: int):
    for label, name in ((REAL, "real"), (FAKE, "fake")):
        if not banks.get(label):
            raise ValueError(f"no {name} image could be embedded: a head needs both classes")
    features = np.concatenate([np.stack(banks[REAL]), np.stack(banks[FAKE])])
    labels = np.r_[np.full(len(banks[REAL]), REAL), np.full(len(banks[FAKE]), FAKE)]
    if kind == "nn":
        return NearestNeighbourHead.fit(spec, features, labels, k=min(k, len(banks[REAL]), len(banks[FAKE])))
    return LogisticHead.fit(spec, features, labels)


def _fit_lda(_, moments: dict, spec):
    if REAL not in moments or FAKE not in moments:
        raise ValueError("a head needs both real and fake images that can be embedded")
    return LinearProbeHead.fit(spec, moments[REAL], moments[FAKE])


def run(argv=None, test_pipeline=None):
    options = pipeline_options(argv, AnchorOptions)
    opts = options.view_as(AnchorOptions)
    require(opts, "kind", "real", "fake", "output")
    if opts.kind not in HEAD_KINDS:
        raise ValueError(f"--kind must be one of {', '.join(HEAD_KINDS)}, not {opts.kind!r}")
    backbone = BackboneConfig(opts.backbone or DEFAULT_BACKBONE, opts.weights, opts.attention,
                              opts.resize or "none", opts.statistical_budget, opts.projection_seed,
                              opts.device, opts.precision, opts.runtime)
    extractor = build_driver_extractor(backbone)
    spec = extractor.spec

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    vectors, errors = [], []
    for label, name, patterns in ((REAL, "Real", opts.real), (FAKE, "Fake", opts.fake)):
        images = pipeline | name >> ReadAndEmbed(patterns, opts, backbone, extractor)
        vectors.append(images["embedded"] | f"{name}Vectors" >> beam.Map(
            lambda row, label=label: (label, row[1][0])))
        errors.append(images["errors"])
    labelled = tuple(vectors) | "Labelled" >> beam.Flatten()
    anchor = pipeline | "Once" >> beam.Create([None])
    if opts.kind == "lda":
        moments = (labelled | "ClassMoments" >> beam.CombinePerKey(MomentsCombineFn(spec.dim))
                   | "MomentsByClass" >> beam.combiners.ToDict())
        head = anchor | "FitHead" >> beam.Map(_fit_lda, beam.pvalue.AsSingleton(moments), spec)
    else:
        banks = (labelled | "Banks" >> beam.combiners.Sample.FixedSizePerKey(opts.max_per_class)
                 | "BanksByClass" >> beam.combiners.ToDict())
        head = anchor | "FitHead" >> beam.Map(_fit_from_banks, beam.pvalue.AsSingleton(banks),
                                              opts.kind, spec, opts.k)
    _ = head | "WriteHead" >> beam.Map(lambda h: write_atomically(opts.output, h.to_bytes(version("anchorscan"))))
    _ = tuple(errors) | WriteErrors(opts.errors or opts.output)
    result = pipeline.run()
    result.wait_until_finish()

    fitted = head_from_bytes(read_bytes(opts.output))
    errors_total = sum(v for k, v in counter_totals(result).items() if k.startswith("errors_"))
    print(f"head        {opts.output} ({opts.kind})\n"
          f"images      {fitted.counts['real']} real, {fitted.counts['fake']} fake, {errors_total} errors\n"
          f"time        {time.time() - started:.1f} s")
    return fitted


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    run()
