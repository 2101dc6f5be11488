"""Poisoning of `anchorscan update`, measured from the command line as docs/QUALITY.md
(*Poisoning*) fixes it: an anchor fitted on real photos, three update rounds of real crops it
never saw mixed with 0 %, 30 % or 60 % fakes of the families it detects (neural
super-resolution), and after each round the SR mean AUROC and the real false-positive rate on
the report fold, whose photos no round uses.

    python benchmarks/poisoning.py --bench /work/shared/bench/dev --output out/poisoning
    make poisoning BENCH=/work/shared/bench/dev

Data (the bench is not in the repository; its README and docs/QUALITY.md define the folds):
- fit: the tune fold's real crops and the extra real photos (demo/data/fit/extra) whose photo
  hashes to the first half; held out for calibration by photo (25 %), as the README's recipe;
- rounds: the other half of the extra photos' crops (by photo: never fitted, never held out),
  split by photo into three rounds, and the tune fold's SR fakes (no round's fake is another's);
- evaluation: the report fold's real crops and SR fakes (every photo unseen by fit and rounds).

``--update_flags`` are the update's own (default: none, the default guard; ``--trusted`` for no
guard); ``--anchorscan`` another installation's command (e.g. an older release, to measure its
guard the same way). ``--quick`` runs one round of each condition on the bundled demo data
(tests/test_benchmarks.py keeps the script running). Prints a Markdown table and writes
``OUTPUT/poisoning.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = ("realesrgan", "realcugan", "waifu2x")
FRACTIONS = (0.0, 0.3, 0.6)
GROUP = r"([^/]+)__x"  # crops of one photo
RUNNER = ["--runner", "FnApiRunner"]


def photo_hash(photo: str) -> str:
    return hashlib.sha256(photo.encode()).hexdigest()


def photo_of(path: str) -> str:
    return re.search(GROUP, path).group(1)


def bench_folds(bench: str) -> dict[str, dict[str, list[str]]]:
    """{'tune'|'report': {class: [paths]}} by the bench manifest's source photos (first hex
    digit of sha256(source_photo) below 8: tune)."""
    folds = {"tune": {}, "report": {}}
    with open(os.path.join(bench, "manifest.csv"), newline="") as handle:
        for row in csv.DictReader(handle):
            fold = "tune" if photo_hash(row["source_photo"])[0] < "8" else "report"
            folds[fold].setdefault(row["class"], []).append(os.path.join(bench, row["path"]))
    return {fold: {cls: sorted(paths) for cls, paths in classes.items()} for fold, classes in folds.items()}


def demo_folds() -> dict[str, dict[str, list[str]]]:
    """The bundled demo data in the bench's shape (--quick): fit/real as the tune fold's reals
    and the scan folder's classes, split by photo, as the tune fold's fakes and the report fold."""
    scan = os.path.join(ROOT, "demo", "data", "scan")
    folds = {"tune": {"real": _files(os.path.join(ROOT, "demo", "data", "fit", "real"))}, "report": {}}
    for cls in ("real", *SR):
        for path in _files(os.path.join(scan, cls)):
            # SCAN photos are the first by their hash's leading digits (demo/data/SOURCES.md)
            fold = "tune" if photo_hash(photo_of(path))[3] < "8" else "report"
            if fold == "report" or cls != "real":
                folds[fold].setdefault(cls, []).append(path)
    return folds


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".png"))


def extra_halves() -> tuple[list[str], list[str]]:
    """demo/data/fit/extra by photo: (fit half, rounds half)."""
    extra = _files(os.path.join(ROOT, "demo", "data", "fit", "extra"))
    fit = [path for path in extra if photo_hash(photo_of(path))[1] < "8"]
    return fit, [path for path in extra if path not in fit]


def rounds_of(reals: list[str], fakes: list[str], fraction: float, count: int) -> list[list[str]]:
    """``count`` rounds: the reals split by photo (each photo, in hash order, to the smallest
    round so far), each joined by fakes making ``fraction`` of the round; fakes are drawn in a
    fixed shuffled order, none twice."""
    photos: dict[str, list[str]] = {}
    for path in reals:
        photos.setdefault(photo_of(path), []).append(path)
    by_round = [[] for _ in range(count)]
    for photo in sorted(photos, key=photo_hash):
        min(by_round, key=len).extend(photos[photo])
    shuffled = sorted(fakes, key=lambda path: hashlib.sha256(path.encode()).hexdigest())
    rounds, used = [], 0
    for real in by_round:
        wanted = round(fraction / (1 - fraction) * len(real)) if fraction else 0
        if used + wanted > len(shuffled):
            raise SystemExit(f"not enough fakes for {fraction:.0%}: {len(shuffled)} in all")
        rounds.append(sorted(real) + shuffled[used : used + wanted])
        used += wanted
    return rounds


def write_list(path: str, uris: list[str]) -> str:
    with open(path, "w") as handle:
        handle.write("\n".join(uris) + "\n")
    return path


def write_labels(path: str, report: dict[str, list[str]]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "label", "generator"])
        writer.writerows([uri, "real", ""] for uri in report["real"])
        writer.writerows([uri, "fake", cls] for cls in SR for uri in report[cls])
    return path


def run(command: list[str], log: str) -> subprocess.CompletedProcess:
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n# exit {result.returncode}, {time.time() - started:.0f} s\n")
        handle.write(result.stdout + result.stderr + "\n")
    return result


def evaluate(anchorscan: str, anchor: str, labels: str, folder: str, log: str) -> dict:
    """SR mean AUROC and the real false-positive rate at the anchor's threshold."""
    result = run([anchorscan, "evaluate", labels, "--dataset", "manifest", "--anchor", anchor,
                  "--output", folder, *RUNNER], log)  # fmt: skip
    if result.returncode:
        raise SystemExit(f"evaluate failed (see {log})")
    with open(os.path.join(folder, "metrics.csv"), newline="") as handle:
        rows = {row["generator"]: row for row in csv.DictReader(handle)}
    return {
        "auroc": sum(float(rows[cls]["auroc"]) for cls in SR) / len(SR),
        "real_fpr": 1.0 - float(rows[SR[0]]["real_acc"]),
    }


def update(anchorscan: str, anchor: str, round_list: str, output: str, flags: list[str], log: str) -> dict:
    """One round: the update's exit status and what it admitted and refused (its summary)."""
    result = run([anchorscan, "update", "--anchor", anchor, "--input", round_list, "--output", output,
                  *flags, *RUNNER], log)  # fmt: skip
    numbers = {
        key: int(match.group(1))
        for key, pattern in (("admitted", r"admitted\s+(\d+)"), ("refused", r"refused\s+(\d+)"))
        if (match := re.search(pattern, result.stdout))
    }
    refused_round = result.returncode == 2
    if result.returncode not in (0, 2):
        raise SystemExit(f"update exited {result.returncode} (see {log})")
    return {"exit": result.returncode, "round_refused": refused_round, **numbers,
            "message": result.stderr.strip().splitlines()[-1] if refused_round else ""}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", help="the development bench's folder (bench/dev)")
    parser.add_argument("--output", required=True, help="a folder for the runs' files")
    parser.add_argument("--anchorscan", default=os.path.join(os.path.dirname(sys.executable), "anchorscan"))
    parser.add_argument("--update_flags", default="", help="flags for every update, e.g. --trusted")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="demo data, one round per condition")
    parser.add_argument(
        "--swap_folds",
        action="store_true",
        help="development runs: fit and poison from the report fold, evaluate on the tune fold "
        "(the guard's parameters are chosen so, the report fold scored once)",
    )
    args = parser.parse_args(argv)
    if not args.quick and not args.bench:
        parser.error("--bench is required (or --quick for the demo data)")
    os.makedirs(args.output, exist_ok=True)
    log = os.path.join(args.output, "commands.log")
    folds = demo_folds() if args.quick else bench_folds(args.bench)
    if args.swap_folds:
        folds = {"tune": folds["report"], "report": folds["tune"]}
    fit_extra, round_reals = extra_halves()
    rounds = 1 if args.quick else args.rounds
    if args.quick:  # a small round: a few photos' crops
        round_reals = [path for path in round_reals if photo_hash(photo_of(path))[2] < "3"]
    fakes = [path for cls in SR for path in folds["tune"].get(cls, [])]
    labels = write_labels(os.path.join(args.output, "report.csv"), folds["report"])

    anchor = os.path.join(args.output, "anchor.safetensors")
    fit_list = write_list(os.path.join(args.output, "fit.txt"), folds["tune"]["real"] + fit_extra)
    fitted = run([args.anchorscan, "fit", "--input", fit_list, "--anchor", anchor, "--calibration_fraction",
                  "0.25", "--calibration_group", GROUP, *RUNNER], log)  # fmt: skip
    if fitted.returncode:
        raise SystemExit(f"fit failed (see {log})")
    before = evaluate(args.anchorscan, anchor, labels, os.path.join(args.output, "eval-0"), log)
    results = {
        "before": before,
        "update_flags": args.update_flags,
        "swap_folds": args.swap_folds,
        "conditions": {},
    }
    flags = args.update_flags.split()
    for fraction in FRACTIONS:
        current, history = anchor, []
        for number, images in enumerate(rounds_of(round_reals, fakes, fraction, rounds), start=1):
            name = f"f{round(fraction * 100)}-r{number}"
            round_list = write_list(os.path.join(args.output, f"{name}.txt"), images)
            output = os.path.join(args.output, f"{name}.safetensors")
            outcome = update(args.anchorscan, current, round_list, output, flags, log)
            if not outcome["round_refused"]:
                current = output
            n_fake = sum(1 for path in images if path in fakes)
            history.append({
                "round": number, "images": len(images), "fakes": n_fake, **outcome,
                **evaluate(args.anchorscan, current, labels, os.path.join(args.output, f"eval-{name}"), log),
            })  # fmt: skip
        results["conditions"][f"{fraction:.0%}"] = history
    with open(os.path.join(args.output, "poisoning.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    print(table(results))
    return results


def table(results: dict) -> str:
    before = results["before"]
    lines = [
        f"update flags: {results['update_flags'] or '(default guard)'}; before any round: SR mean AUROC "
        f"{before['auroc']:.3f}, real FPR {before['real_fpr']:.1%}",
        "",
        "| fakes | round | images (fakes) | outcome | SR mean AUROC | real FPR |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for condition, history in results["conditions"].items():
        for row in history:
            outcome = (
                "round refused"
                if row["round_refused"]
                else f"{row.get('admitted', '?')} admitted, {row.get('refused', '?')} refused"
            )
            lines.append(
                f"| {condition} | {row['round']} | {row['images']} ({row['fakes']}) | {outcome} | "
                f"{row['auroc']:.3f} | {row['real_fpr']:.1%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
