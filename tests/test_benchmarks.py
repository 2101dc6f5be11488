"""`make bench` keeps working: the throughput script runs end to end at tiny counts and prints
every NAME=VALUE line the issue names (the values themselves are recorded in docs/BENCHMARKS.md,
never asserted: timings are not tests)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = (
    "score_over_forward",
    "fit_over_forward",
    "score_over_dataloader_12mp",
    "stats_share_of_forward",
    "rss_growth_10k_over_1k",
    "forward_gflops_share_of_matmul_peak",
    "score_steady_state_over_forward_mix",
    "score_over_dataloader_12mp_steady_state",
    "region_decode_max_pixel_difference",
    "forensic_share_of_forward",
    "forensic_wall_share_of_forward",
    "provenance_share_of_forward",
    "score_over_bound",
    "score_steady_state_over_bound",
)


pytestmark = pytest.mark.slow  # runs the throughput script end to end (about 2 minutes)


def benchmark_values(script_name: str, *args: str, timeout: int = 600) -> tuple[dict[str, str], str]:
    """Runs benchmarks/SCRIPT with ``args`` in a fresh process: its NAME=VALUE lines, its output."""
    script = Path(__file__).parents[1] / "benchmarks" / script_name
    result = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(
        line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line
    )
    return values, result.stdout


def test_throughput_benchmark_prints_every_required_value(tmp_path):
    values, output = benchmark_values("throughput.py", "--quick", "--workdir", str(tmp_path))
    for name in REQUIRED:
        value = float(values[name])
        # Steady states are differences of two run sizes: at --quick's tiny counts they can be
        # below the noise, which the script reports as nan rather than as a rate.
        assert value >= 0 or ("steady_state" in name and math.isnan(value)), (name, value)
    assert int(values["region_decode_max_pixel_difference"]) == 0  # the scores cannot change
    targets = output.split("\ntargets\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(targets) == 6 and all(" met " in line or " not met " in line for line in targets)


def test_online_update_benchmark_prints_its_values():
    values, _ = benchmark_values(
        "online_update.py", "--dims", "64", "--ks", "1,4", "--updates", "4", timeout=300
    )
    for name in ("online_speedup_d64_k1", "online_speedup_d64_k4", "delta_mb_d64", "delta_rank64_mb_d64"):
        assert math.isfinite(float(values[name])) and float(values[name]) > 0, name


# `make bench`'s other scripts on small inputs (seconds each), so one that no longer runs fails
# here: the values each must print, and the arguments that make it short.
QUICK = {
    "forward_backends.py": (("--batch", "2", "--seconds", "0.2"), ("eager_images_per_s",)),
    "backbones.py": (
        # the default backbone alone: tests/test_clip.py runs the ViTs end to end
        ("--backbones", "efficientnet-lite0", "--batch", "2", "--seconds", "0.2"),
        ("matmul_peak_gflops",),
    ),
}


@pytest.mark.parametrize("script", sorted(QUICK))
def test_every_benchmark_runs_on_a_small_input(script):
    args, names = QUICK[script]
    values, _ = benchmark_values(script, *args, timeout=900)
    for name in names:
        assert name in values, (script, name, sorted(values))
        assert not math.isinf(float(values[name])), (script, name)


def test_every_script_of_make_bench_has_a_short_run_here():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    bench = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    scripts = {
        line.split("benchmarks/", 1)[1].split()[0] for line in bench.splitlines() if "benchmarks/" in line
    }
    covered = {*QUICK, "throughput.py", "online_update.py", "shards.py", "fit_speed.py"}
    assert scripts and scripts <= covered, scripts - covered


def test_the_poisoning_measurement_runs_on_the_demo_data(tmp_path):
    """benchmarks/poisoning.py --quick: fit, one update round per condition and an evaluation
    after each, through the command line, on the bundled demo data (the bench run is
    docs/QUALITY.md's)."""
    import json

    _, output = benchmark_values("poisoning.py", "--quick", "--output", str(tmp_path), timeout=1200)
    results = json.loads((tmp_path / "poisoning.json").read_text())
    assert list(results["conditions"]) == ["0%", "30%", "60%"]
    for condition, history in results["conditions"].items():
        [row] = history
        assert (row["fakes"] > 0) == (condition != "0%")
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["real_fpr"] <= 1.0
        assert row["round_refused"] or row["admitted"] + row["refused"] == row["images"]
    assert "| 60% | 1 |" in output


def test_shards_benchmark_prints_its_values(tmp_path):
    values, _ = benchmark_values("shards.py", "--quick", "--workdir", str(tmp_path))
    for name in (
        "shard_over_folder",
        "shard_over_folder_read",
        "rss_large_shard_mb",
        "rss_small_shard_mb",
        "rss_large_over_small",
    ):
        assert float(values[name]) > 0, name


def test_fit_speed_benchmark_prints_its_values(tmp_path):
    # 45 images with a softening sample of 15: the anchor's levels are sampled, and score, which
    # reads it, must run (issue 29: nothing in CI crossed the sample before)
    values, output = benchmark_values(
        "fit_speed.py", "--quick", "--images", "45", "--softened_images", "15", "--workdir", str(tmp_path)
    )
    for name in ("fit_steady_state_over_score", "forward_ms_per_image", "blur_convolution_over_matrix"):
        value = float(values[name])
        assert value > 0 or ("steady_state" in name and math.isnan(value)), (name, value)
    for name in ("sampled_flagged_share", "sampled_vs_unsampled_p_forensic_max_abs_difference"):
        assert math.isfinite(float(values[name])), name
    assert re.search(r"^target: .*\((met|not met)\)$", output, re.MULTILINE), output


def test_curation_benchmark_prints_its_ratios(tmp_path):
    values, output = benchmark_values("curation.py", "--quick", "--workdir", str(tmp_path))
    for name in ("curate_rss_ratio", "curate_time_ratio", "curate_rss_large_mb", "curate_time_large_s"):
        assert float(values[name]) > 0, name
    targets = output.split("targets\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(targets) == 2 and all(line.endswith((": met", ": not met")) for line in targets)
