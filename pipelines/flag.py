"""Flag a generator: a few of its images become a labelled fake class of the anchor, whose
Fisher direction joins the score at once (docs/METHOD.md §9.3)."""
from __future__ import annotations

import time

import apache_beam as beam

from anchorscan.anchors.anchor_file import read_metadata, verified_contents
from anchorscan.anchors.spec import FeatureSpec
from anchorscan.pipelines.common import decode_step, driver_extractor, embed_step
from anchorscan.pipelines.options import (INPUT_HELP, add_decoding_args, add_runtime_args,
                                          backbone_config, command_parser, counter_totals,
                                          error_total, parse)
from anchorscan.transforms.io import ListInputs, read_bytes
from anchorscan.transforms.scoring import load_anchor
from anchorscan.transforms.sinks import WriteErrors
from anchorscan.transforms.updating import FlagGenerator


def parser():
    parser = command_parser("flag", "Add images known to come from one generator to the anchor "
                                    "as a flagged class (10-30 images suffice).")
    parser.add_argument("--anchor", required=True, help="the anchor (local or gs://)")
    parser.add_argument("--generator", required=True,
                        help="the generator's name (letters, digits, '_', '.', '-'); flagging "
                             "the same name again adds to its images")
    parser.add_argument("--input", action="append", required=True,
                        help=f"the generator's images: {INPUT_HELP}")
    parser.add_argument("--output", required=True, help="the anchor file to write")
    parser.add_argument("--errors", default=None, help="prefix of the errors table (default: the output's path)")
    add_runtime_args(parser)
    add_decoding_args(parser)
    return parser


def run(argv=None, test_pipeline=None) -> dict:
    args, options = parse(parser(), argv)
    tensors, metadata = verified_contents(read_bytes(args.anchor))
    spec = FeatureSpec.from_dict(metadata)
    backbone = backbone_config(args, spec)
    extractor = driver_extractor(backbone)
    spec.require_same(extractor.spec, f"anchor {args.anchor}")

    started = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    anchor = (pipeline | "AnchorUri" >> beam.Create([args.anchor])
              | "LoadAnchor" >> beam.Map(lambda uri: load_anchor(uri)[0]))
    uris, list_errors = pipeline | "List" >> ListInputs(args.input)
    images, decode_errors, _ = uris | "Decode" >> decode_step(args, options, extractor.backbone.preprocessing)
    embedded, embed_errors = images | "Embed" >> embed_step(args, options, backbone, extractor)
    _ = embedded | "Flag" >> FlagGenerator(anchor, args.output, spec, tensors.get("projection"),
                                           args.generator)
    _ = (list_errors, decode_errors, embed_errors) | WriteErrors(args.errors or args.output)
    result = pipeline.run()
    result.wait_until_finish()

    after = read_metadata(read_bytes(args.output))
    summary = {"anchor": args.output, "generator": args.generator,
               "images": after["flagged"][args.generator] - metadata.get("flagged", {}).get(args.generator, 0),
               "flagged": after["flagged"], "errors": error_total(counter_totals(result)),
               "seconds": time.time() - started}
    print(f"anchor      {summary['anchor']}\n"
          f"flagged     {summary['images']} images of {args.generator} "
          f"(now {after['flagged'][args.generator]}; all flagged: {after['flagged']})\n"
          f"errors      {summary['errors']}\n"
          f"time        {summary['seconds']:.1f} s")
    return summary
