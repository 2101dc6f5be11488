"""One runner for the commands that run a Beam pipeline. A command is a declaration
(``BeamCommand``): its flag groups, what it checks and reads before any work, the outputs it
guards, the tables its sinks write, the graph it adds to the pipeline and its summary. The runner
parses the flags, runs the pre-flight, takes the lock and makes room (--overwrite) where outputs
are guarded, builds and runs the pipeline, removes what a failed run wrote, reads the counters
and prints the summary (docs/DEVELOPING.md, *Declaring a command*)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from anchorscan.pipelines.flags import command_parser
from anchorscan.pipelines.options import counter_totals, parse, runs_locally
from anchorscan.transforms.sinks import Outputs, PrefixLock, cleaned_on_failure

FlagGroup = Callable[[argparse.ArgumentParser], None]


@dataclasses.dataclass(frozen=True)
class Guarded:
    """Outputs that one run at a time writes (the lock beside their prefix) and that exist only
    as this run's: those of an earlier run are refused, or deleted with ``overwrite``, never
    where they are among the run's ``inputs``."""

    outputs: Outputs
    overwrite: bool
    inputs: list[str]
    kind: str


@dataclasses.dataclass(frozen=True)
class BeamCommand:
    """A command that runs one Beam pipeline. Each function takes the parsed flags (``args``);
    ``prepared`` is what ``prepare`` returned.

    - ``flag_groups``: functions that add flags to the command's parser, in order.
    - ``prepare(args, options)``: the pre-flight: every refusal that needs no pipeline, and what
      the graph needs (an anchor read and checked, a driver extractor).
    - ``tables(args, prepared)``: the table prefixes (``PREFIX-errors``) its sinks write: where
      the run fails, what it wrote under them is removed again.
    - ``graph(pipeline, args, options, prepared)``: adds the command's transforms.
    - ``summary(args, prepared, counters)``: the summary's fields (the runner adds ``seconds``);
      ``printed(summary)`` prints it.
    - ``guarded(args, prepared)``: outputs under the lock and --overwrite (None: none).
    - ``submitted(args, prepared)``: what a run that does not wait returns (a Flex template's
      launcher); a command without it always waits.
    - ``verdict(args, prepared, summary)``: after the summary is printed, raises where the run's
      outcome is a refusal (exit status 2).
    - ``local(args, options, prepared)``: on a local runner, runs the command some other way
      than as one pipeline and returns its summary (None: as one pipeline after all)."""

    name: str
    flag_groups: tuple[FlagGroup, ...]
    prepare: Callable[[Any, PipelineOptions], Any]
    tables: Callable[[Any, Any], list[str]]
    graph: Callable[[beam.Pipeline, Any, PipelineOptions, Any], None]
    summary: Callable[[Any, Any, dict[str, int]], dict]
    printed: Callable[[dict], None]
    guarded: Callable[[Any, Any], Guarded] | None = None
    submitted: Callable[[Any, Any], dict] | None = None
    verdict: Callable[[Any, Any, dict], None] | None = None
    local: Callable[[Any, PipelineOptions, Any], dict | None] | None = None

    def parser(self) -> argparse.ArgumentParser:
        parser = command_parser(self.name)
        for add in self.flag_groups:
            add(parser)
        return parser

    def run(self, argv: list[str] | None = None, test_pipeline=None, wait: bool = True) -> dict:
        args, options = parse(self.parser(), argv)
        return self.execute(args, options, test_pipeline, wait)

    def execute(self, args, options: PipelineOptions, test_pipeline=None, wait: bool = True) -> dict:
        """The run that ``args`` (this command's flags) describe; ``wait=False`` returns once the
        job is submitted, where the command declares ``submitted``."""
        prepared = self.prepare(args, options)
        if self.local is not None and test_pipeline is None and runs_locally(options):
            summary = self.local(args, options, prepared)
            if summary is not None:
                return summary
        with contextlib.ExitStack() as held:
            if self.guarded is not None:
                guarded = self.guarded(args, prepared)
                held.enter_context(PrefixLock(guarded.outputs.prefix))
                guarded.outputs.make_room(guarded.overwrite, guarded.inputs, guarded.kind)
            started = time.time()
            held.enter_context(cleaned_on_failure(self.tables(args, prepared)))
            pipeline = test_pipeline or beam.Pipeline(options=options)
            self.graph(pipeline, args, options, prepared)
            result = pipeline.run()
            if not wait and self.submitted is not None:
                return self.submitted(args, prepared)
            result.wait_until_finish()
        summary = {**self.summary(args, prepared, counter_totals(result)), "seconds": time.time() - started}
        self.printed(summary)
        if self.verdict is not None:
            self.verdict(args, prepared, summary)
        return summary
