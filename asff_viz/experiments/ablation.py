"""The paper's ablation in one command: the fusion methods trained alike, then evaluated and analysed side by side.

    python -m asff_viz.experiments.ablation --out runs/ablation [--preset cpu|gpu] [--device cuda] [--jobs 2]

Protocol. The same synthetic data (generated once, seeded), the same recipe (`python -m asff_viz.train` with
one argument list), the same sizes and seeds for every fusion mode; only `--fusion` differs:

* `baseline`: no fusion, each level's head sees its own level (YOLOv3);
* `sum` and `concat`: the plain fusions the paper compares against;
* `weighted`: BiFPN's fast normalized fusion, one learned scalar per source and target level (EfficientDet),
  which separates "learned per level" from ASFF's "learned per pixel";
* `asff`: the learned per-pixel softmax.

Then, on the same validation images, every model gets COCO AP/AP50/AP75/APs/APm/APl, parameters, GFLOP and CPU
latency at 416 (timed interleaved, in one run), and the modes with fusion paths the gradient-flow statistics of
the training loss (conflict rate at positives and at background, with 95 % image-bootstrap intervals; the
weights are the constant 1 for sum, the learned scalars for weighted, the maps for asff; baseline and concat have
no per-source weight and are n/a), and `analyze scale-stats` for the modes with weights. The asff run's rate is
also set against the conflict metric's controls (`ablation_conflict_controls.csv` and a table in ablation.md:
shuffled, rolled, uniform, random directions; paired over images), since a lower rate than sum's does not show
filtering on its own. Outputs in --out:
`ablation.csv`/`.md`, `ablation_ap`, `ablation_conflict` (PDF + PNG + CSV), `run.json`, `models/MODE_sSEED/`
(each run's folder, `train.log`), `scale-stats/MODE_sSEED/`, `data/` and `cache/`.

Resumable: a finished model is not retrained, an interrupted one resumes from its `last.pt`; evaluations and
per-image gradient summaries are cached by checkpoint hash, so a re-run (or `--replot`) redraws without running
any model again.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..analyze.gradflow import CONTROL_PREFIX
from ..utils.argtypes import describe_os_error, output_folder, positive_int
from ..utils.fileio import atomic_write_text
from .report import (
    add_paired_ap,
    conflict_intervals,
    markdown_table,
    run_name,
    skipped_steps_markdown,
    table_rows,
    write_figures,
)

logger = logging.getLogger(__name__)

MODES = ("baseline", "sum", "concat", "weighted", "asff")
FLOW_MODES = ("sum", "weighted", "asff")  # modes whose fusion is a weighted sum of the resized sources
WEIGHTED_MODES = ("weighted", "asff")  # modes with learned fusion weights (scale-stats)
CONTROLLED_MODES = ("asff",)  # per-pixel weights: their conflict rate is compared with the metric's controls
LATENCY_SIZE = 416


@dataclass(frozen=True)
class Preset:
    """Data, model and schedule of one protocol; the recipe is the embedded default's, scaled down."""

    train_images: int
    val_images: int
    image_size: int
    width: float
    depth: float
    epochs: int
    batch_size: int
    min_size: int
    max_size: int
    eval_size: int
    lr: float
    seeds: tuple[int, ...]
    analysis_images: int
    workers: int


PRESETS = {
    # Sized for the 2-core CPU machine: five modes, one seed, about an hour of training in all with --jobs 2.
    "cpu": Preset(train_images=2000, val_images=200, image_size=256, width=0.25, depth=0.33, epochs=6,
                  batch_size=8, min_size=192, max_size=256, eval_size=256, lr=1e-3, seeds=(0,),
                  analysis_images=40, workers=1),
    # The same protocol, larger: for a GPU machine (minutes per model).
    "gpu": Preset(train_images=8000, val_images=500, image_size=320, width=0.5, depth=0.33, epochs=24,
                  batch_size=32, min_size=256, max_size=320, eval_size=320, lr=2e-3, seeds=(0, 1, 2),
                  analysis_images=200, workers=6),
}


def train_arguments(preset: Preset, data: Path, out: Path, mode: str, seed: int, device: str | None) -> list[str]:
    """The one recipe: only --fusion, --seed and --out differ between the runs. The learning rate warms up for an
    epoch, stays flat to half-way, then decays by a cosine to the last epoch (a shorter schedule for tiny runs)."""
    final = 1 if preset.epochs >= 3 else 0
    flat = max(0, min(preset.epochs // 2, preset.epochs - final - 1))
    args = ["--synthetic", str(data), "--out", str(out), "--fusion", mode, "--seed", str(seed),
            "--width", str(preset.width), "--depth", str(preset.depth), "--epochs", str(preset.epochs),
            "--batch-size", str(preset.batch_size), "--size", str(preset.eval_size),
            "--min-size", str(preset.min_size), "--max-size", str(preset.max_size), "--fixed-size-epochs", "1",
            "--optimizer", "adamw", "--lr", str(preset.lr), "--burn-in", str(min(1, flat + 1)),
            "--flat-until", str(flat), "--final-epochs", str(final), "--objectness-prior", "0.01",
            "--clip-grad-norm", "10", "--no-mixup", "--min-box-size", "4", "--ema", "--ema-decay", "0.999",
            "--eval-interval", "0", "--checkpoint-interval", "1", "--workers", str(preset.workers),
            "--channels-last", "--no-progress"]
    if device:
        args += ["--device", device]
    return args


def training_record(checkpoint: Path) -> dict:
    """{"epochs", "skipped_steps"} of a run's last.pt: epochs done, and optimizer steps left out because their loss
    or gradients were not finite (both 0 when there is no file or it cannot be read)."""
    from ..checkpoint import CheckpointError, read_checkpoint

    training = {}
    if checkpoint.is_file():
        try:
            training = read_checkpoint(checkpoint).get("training") or {}
        except CheckpointError:
            pass
    return {"epochs": int(training.get("epoch", 0)), "skipped_steps": int(training.get("skipped_steps", 0))}


def trained_epochs(checkpoint: Path) -> int:
    """Epochs a run's last.pt holds (0 when there is none or it cannot be read)."""
    return training_record(checkpoint)["epochs"]


def _train_one(command: list[str], log_path: Path, threads: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def train_all(preset: Preset, out: Path, modes: Sequence[str], seeds: Sequence[int], data: Path,
              device: str | None, jobs: int, max_iterations: int | None = None
              ) -> tuple[dict[str, Path], dict[str, str]]:
    """Train every (mode, seed) that is not finished, `jobs` at a time. Returns ({run name: last.pt} of the
    finished runs, {run name: why it did not finish}): a run that stops (e.g. on non-finite gradients) is a
    result of the ablation, reported in the table, not a reason to drop the others."""
    from tqdm import tqdm

    runs, pending = {}, []
    for mode in modes:
        for seed in seeds:
            name = run_name(mode, seed)
            folder = out / "models" / name
            checkpoint = folder / "last.pt"
            runs[name] = checkpoint
            done = trained_epochs(checkpoint)
            if done >= preset.epochs:
                logger.info("%s: finished (%d epochs), not retrained", name, done)
                continue
            command = [sys.executable, "-m", "asff_viz.train",
                       *train_arguments(preset, data, folder, mode, seed, device)]
            if max_iterations:
                command += ["--max-iterations", str(max_iterations)]
            if done > 0:
                command += ["--resume", str(checkpoint)]
                logger.info("%s: resuming after epoch %d", name, done - 1)
            folder.mkdir(parents=True, exist_ok=True)
            pending.append((name, command, folder / "train.log"))
    threads = max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(pending))))
    failed = {}
    with tqdm(total=len(pending), desc="training", unit="model", dynamic_ncols=True) as bar, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_train_one, command, log, threads): (name, log) for name, command, log in pending}
        for future in concurrent.futures.as_completed(futures):
            name, log = futures[future]
            done = trained_epochs(runs[name])
            if future.result() != 0 or done < preset.epochs:
                failed[name] = _failure(log, done)
                logger.warning("%s did not finish: %s (see %s)", name, failed[name], log)
            bar.update(1)
            bar.set_postfix_str(name)
    return {name: path for name, path in runs.items() if name not in failed}, failed


def _failure(log: Path, epochs_done: int) -> str:
    """Why a run stopped, from the last error line of its log."""
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if "stopping" in line or line.startswith("error") or "Error" in line]
    reason = lines[-1].split(" ", 1)[-1] if lines else "the training process failed"
    return f"stopped after {epochs_done} epoch(s): {reason[:200]}"


def _cached_json(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")
    return value


def evaluate_run(checkpoint: Path, annotations: Path, images: Path, size: int, cache: Path) -> dict:
    """COCO metrics, parameters and GFLOP at 416 of one checkpoint, cached by its sha256."""
    from ..bench.models import model_flops
    from ..checkpoint import file_sha256, load_model
    from ..data.coco import COCODetection
    from ..inference.coco_eval import evaluate_coco

    sha = file_sha256(checkpoint)

    def compute() -> dict:
        model = load_model(checkpoint)
        dataset = COCODetection(annotations, images)
        metrics, _ = evaluate_coco(model, dataset, size, conf_threshold=0.001, nms_threshold=0.65,
                                   batch_size=8, device="cpu")
        return {"sha256": sha, "metrics": metrics, "parameters": sum(p.numel() for p in model.parameters()),
                "gflop_416": model_flops(model, LATENCY_SIZE)["gflop"], "size": size,
                "fusion": model.config.fusion}

    return _cached_json(cache / f"evaluation_{sha[:16]}_{size}.json", compute)


def latencies(checkpoints: dict[str, Path], repeats: int = 7) -> dict[str, float]:
    """Median CPU latency (ms, batch 1, 416 px, float32 as built) of every model, timed interleaved in one run."""
    from ..checkpoint import load_model
    from ..utils.timing import median, run_interleaved

    images = torch.randn(1, 3, LATENCY_SIZE, LATENCY_SIZE, generator=torch.Generator().manual_seed(0))
    models = {name: load_model(path).eval() for name, path in checkpoints.items()}

    def case(model):
        def run():
            with torch.no_grad():
                model(images)
        return run

    times = run_interleaved({name: case(model) for name, model in models.items()}, repeats=repeats, warmup=1,
                            device=torch.device("cpu"))
    return {name: median(parts["total"]) * 1e3 for name, parts in times.items()}


def control_mode(name: str, control: str) -> str:
    """The statistics' mode name of run `name`'s conflict under one control (`introspection.controls`)."""
    return f"{name} {CONTROL_PREFIX}{control}"


def flow_statistics(checkpoints: dict[str, Path], annotations: Path, images: Path, limit: int, size: int,
                    cache: Path, controlled: Sequence[str] = ()):
    """Gradient-flow statistics of the training loss of every model with fusion paths, on the same images; for
    the runs in `controlled`, also under every control of the conflict metric (modes `control_mode(run, control)`,
    computed in the run's own backward pass, each image's draws seeded by its sha256)."""
    from ..analyze.flow_statistics import GradientFlowStatistics
    from ..analyze.results_cache import AnalysisCache
    from ..analyze.sources import AnalysisDataset, load_analysed_model, loss_truths
    from ..data.loading import default_workers
    from ..introspection.controls import ALL_CONTROLS

    dataset = AnalysisDataset(annotations, images, limit)
    models = {name: load_analysed_model(path, torch.device("cpu"), label=name) for name, path in checkpoints.items()}
    results = AnalysisCache(cache)
    statistics = GradientFlowStatistics(list(models) + [control_mode(name, control) for name in models
                                                        if name in controlled for control in ALL_CONTROLS])
    from tqdm import tqdm

    skipped = 0
    images = list(dataset)
    truths = loss_truths(images)
    streams = [results.gradient_summaries(model, truths, size=size, workers=default_workers(),
                                          controls=name in controlled, control_seed=0)
               for name, model in models.items()]
    for image, *per_model in tqdm(zip(images, *streams, strict=True), total=len(images), desc="gradient flow",
                                  dynamic_ncols=True):
        summaries = dict(zip(models, per_model, strict=True))
        # An image is used for every model or for none, so that all modes describe the same images.
        if all(all(np.isfinite(value).all() for key, value in summary.items() if key != "controls")
               for summary in summaries.values()):
            for name, summary in summaries.items():
                statistics.add(name, summary, image.file_name)
                for control, control_summary in (summary.get("controls") or {}).items():
                    statistics.add(control_mode(name, control), control_summary, image.file_name)
        else:
            skipped += 1
    if skipped:
        logger.warning("gradient flow: %d of %d images left out (a model gave non-finite loss gradients)", skipped,
                       len(dataset))
    return statistics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.experiments.ablation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_folder, default="runs/ablation", help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the preset's")
    parser.add_argument("--device", default=None, help="training device (cpu, cuda); analyses run on the CPU")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="models trained at once (the cores are split between them)")
    parser.add_argument("--analysis-images", type=positive_int, default=None,
                        help="validation images for the gradient-flow and scale statistics (default: the preset's)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="override the preset (quick runs)")
    parser.add_argument("--train-images", type=positive_int, default=None, help="override the preset (quick runs)")
    parser.add_argument("--val-images", type=positive_int, default=None, help="override the preset (quick runs)")
    parser.add_argument("--max-iterations", type=positive_int, default=None,
                        help="cap the iterations per epoch (quick runs and tests)")
    return parser


def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    changes = {name: getattr(args, name) for name in ("epochs", "train_images", "val_images")
               if getattr(args, name) is not None}
    if args.analysis_images is not None:
        changes["analysis_images"] = args.analysis_images
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return replace(preset, **changes)


def ensure_data(preset: Preset, folder: Path) -> Path:
    """The synthetic set of the protocol (generated once, seed 0); an existing one must match the preset."""
    from ..data.synthetic import generate

    manifest = folder / "ablation_data.json"
    wanted = {"train": preset.train_images, "val": preset.val_images, "size": preset.image_size, "seed": 0}
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found != wanted:
            raise ValueError(f"{folder} holds another data set ({found}); this protocol needs {wanted}: give another "
                             "--out")
        return folder
    generate(folder, seed=0, train=preset.train_images, val=preset.val_images, size=preset.image_size)
    atomic_write_text(manifest, json.dumps(wanted) + "\n")
    return folder


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    preset = resolve_preset(args)
    out = Path(args.out)
    started = time.time()
    try:
        out.mkdir(parents=True, exist_ok=True)
        data = ensure_data(preset, out / "data")
        runs, failed = train_all(preset, out, args.modes, preset.seeds, data, args.device, args.jobs,
                                 args.max_iterations)
        if not runs:
            raise RuntimeError(f"no model finished training: {failed}")
        rows = analyse(preset, out, runs, args.modes, data, failed)
    except (ValueError, RuntimeError, OSError) as error:
        message = describe_os_error(error) if isinstance(error, OSError) else str(error)
        sys.exit(f"error: {message}")
    record = {"command_line": "python -m asff_viz.experiments.ablation " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
              "preset": args.preset, "protocol": asdict(preset), "modes": list(args.modes),
              "recipe": train_arguments(preset, data, out / "models" / "MODE_sSEED", "MODE", 0, args.device),
              "checkpoints": {name: str(path) for name, path in runs.items()}, "did_not_finish": failed,
              "seconds": round(time.time() - started),
              "platform": _platform()}
    atomic_write_text(out / "run.json", json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s and %s", out / "ablation.md", out / "ablation.csv")
    return rows


def analyse(preset: Preset, out: Path, runs: dict[str, Path], modes: Sequence[str], data: Path,
            failed: dict[str, str] | None = None) -> list[dict]:
    """Evaluation, cost, gradient flow and scale statistics of every trained model; writes the table and figures."""
    from ..analyze.cli import main as analyze_main
    from ..figures.style import write_csv

    annotations, images = data / "annotations" / "val.json", data / "images" / "val"
    cache = out / "cache"
    evaluations = {name: evaluate_run(path, annotations, images, preset.eval_size, cache)
                   for name, path in runs.items()}
    shas = "-".join(sorted(e["sha256"][:8] for e in evaluations.values()))
    latency = _cached_json(cache / f"latency_{shas}.json", lambda: latencies(runs))
    finished = [mode for mode in modes if all(run_name(mode, seed) in runs for seed in preset.seeds)]
    flow_runs = {run_name(mode, seed): runs[run_name(mode, seed)] for mode in finished if mode in FLOW_MODES
                 for seed in preset.seeds}
    controlled = [name for name in flow_runs if name.rsplit("_s", 1)[0] in CONTROLLED_MODES]
    flows = flow_statistics(flow_runs, annotations, images, preset.analysis_images, preset.eval_size, cache,
                            controlled) if flow_runs else None
    conflicts = conflict_intervals(flows, list(flow_runs))
    control_table = conflict_controls(flows, controlled) if flows is not None else []
    for mode in finished:
        if mode in WEIGHTED_MODES:
            for seed in preset.seeds:
                name = run_name(mode, seed)
                analyze_main(["scale-stats", "--weights", str(runs[name]), "--annotations", str(annotations),
                              "--images", str(images), "--limit", str(preset.analysis_images), "--size",
                              str(preset.eval_size), "--out", str(out / "scale-stats" / name), "--cache", str(cache)])
    skipped = {name: training_record(path)["skipped_steps"] for name, path in runs.items()}
    rows = table_rows(evaluations, latency, conflicts, finished, preset.seeds, skipped)
    add_paired_ap(rows, runs, finished, preset, annotations, images, out, cache)
    write_csv(out / "ablation.csv", rows)
    if control_table:
        write_csv(out / "ablation_conflict_controls.csv", control_table)
    failures = "".join(f"\n* `{name}` did not finish training: {reason}\n" for name, reason in (failed or {}).items())
    atomic_write_text(out / "ablation.md", markdown_table(rows, preset.seeds) + skipped_steps_markdown(skipped)
                      + controls_markdown(control_table) + failures)
    write_figures(out, rows, conflicts, finished, preset.seeds)
    return rows


def conflict_controls(flows, controlled: Sequence[str], samples: int = 1000) -> list[dict]:
    """Rows of each controlled run's conflict rate minus each control's, paired over the images, 95 % CI: a lower
    rate than the plain sum's alone does not show filtering, since peaked weights lower it whatever the
    gradients' directions (docs/analysis.md, controls)."""
    from ..analyze.gradflow import paired_rows

    rows = []
    for name in controlled:
        if not flows.images.get(name):
            continue
        prefix = f"{name} {CONTROL_PREFIX}"
        others = [mode for mode in flows.modes if mode.startswith(prefix) and flows.images.get(mode)]
        found, _, _, _ = paired_rows(flows, name, others, samples=samples, seed=0, column="control",
                                     name=lambda mode: mode.rsplit(CONTROL_PREFIX, 1)[1])
        rows += [{"run": name, **row} for row in found]
    return rows


def controls_markdown(rows: list[dict]) -> str:
    """The controls table of ablation.md: run minus control, by region and source level."""
    if not rows:
        return ""
    controls = list(dict.fromkeys(row["control"] for row in rows))
    head = ["run", "source", "region", *(f"minus {control}" for control in controls)]
    lines = ["", "Conflict minus each control of the metric, paired over the images [95 % CI] (docs/analysis.md, "
             "controls): below zero, the learned weights conflict less than weights that keep their statistics "
             "but not their placement (shuffled, rolled), than uniform weights, or than random directions of the "
             "same norms; with_weight_branch adds the weight branch's gradient to the value path. n/a: no active "
             "location of that kind.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = {(row["run"], row["source"], row["region"], row["control"]): row for row in rows}
    for run in dict.fromkeys(row["run"] for row in rows):
        for region in dict.fromkeys(row["region"] for row in rows):
            for source in dict.fromkeys(row["source"] for row in rows):
                values = []
                for control in controls:
                    row = cells.get((run, source, region, control))
                    numbers = [row["difference"], row["ci95_low"], row["ci95_high"]] if row is not None else [np.nan]
                    defined = bool(np.isfinite(numbers).all())
                    values.append(f"{row['difference']:+.3f} [{row['ci95_low']:+.3f}, {row['ci95_high']:+.3f}]"
                                  if defined else "n/a")
                lines.append("| " + " | ".join([run, source, region, *values]) + " |")
    return "\n".join(lines) + "\n"


def _platform() -> dict:
    from ..bench.environment import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}


if __name__ == "__main__":
    main()
