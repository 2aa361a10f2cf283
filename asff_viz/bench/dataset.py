"""Dataset-scale analyses against plain inference over the same images (the bench's `dataset` section).

Each analysis is its real command, run in this process over the first N images of a synthetic validation split
at one size: `analyze scale-stats`, `gradflow` (the learned weights alone, with and without the conflict
metric's controls, and the default learned + uniform), `compare` (learned vs uniform weights), `evolution`
(two checkpoints) and `evaluate`. Plain inference is the
float32 fast path (BatchNorm folded, channels-last, fused conv + activation), batched, with the same image
reader and the same workers, plus decoding and NMS: what a user's detection pass over the images costs. It is
timed right before each command, so the ratio of the two is measured under the same load.

An analysis command is timed twice: cold (an empty cache: every image goes through the model) and again on the
filled cache (nothing runs the model: loading, statistics, figures and files only). `pass` = cold - cached is
the dataset pass; its images/s is what grows with the dataset, `end_to_end` is the whole cold command. A command
that runs the model more than once per image (two weight modes, two checkpoints) says so in `passes`.
Wall-clock times: the image readers are other processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..analyze.batches import DEFAULT_BATCH_SIZE, read_batches
from ..checkpoint import load_model, save_checkpoint
from ..data.loading import default_workers
from ..inference.postprocess import DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD, postprocess
from ..models.config import ModelConfig
from .models import OBJECTNESS_PRIOR, calibrated_model

# name -> (command line after the common options, model passes per image, has a cache to re-plot from)
COMMANDS: dict[str, tuple[list[str], int, bool]] = {
    "scale-stats": (["scale-stats"], 1, True),
    "gradflow (learned)": (["gradflow", "--modes", "learned"], 1, True),
    "gradflow (learned, no controls)": (["gradflow", "--modes", "learned", "--no-controls"], 1, True),
    "gradflow (learned + uniform)": (["gradflow"], 2, True),
    "compare (learned vs uniform)": (["compare", "--counterfactual", "uniform"], 2, True),
    "evolution (2 checkpoints)": (["evolution"], 2, True),
    "evaluate": (["evaluate"], 1, False),
}


def subset_annotations(annotations: Path, count: int, out: Path) -> tuple[Path, int]:
    """The first `count` images of a COCO file and their annotations, written to `out`; (path, images)."""
    document = json.loads(annotations.read_text())
    images = document["images"][:count]
    kept = {image["id"] for image in images}
    document["images"] = images
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] in kept]
    out.write_text(json.dumps(document))
    return out, len(images)


def plain_inference(network: torch.nn.Module, images: list[Path], size: int, workers: int) -> float:
    """Seconds of a plain batched detection pass of `network` (decode and NMS included) over `images`."""
    start = time.perf_counter()
    for batch, _, _, _ in read_batches(images, size, DEFAULT_BATCH_SIZE, workers):
        with torch.no_grad():
            postprocess(network.decode(network(batch)).float(), DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD)
    return time.perf_counter() - start


def _run_quietly(function: Callable, argv: list[str]):
    """A command's main(argv) with its printed output swallowed (the bench prints its own lines)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(argv)


def command_line(name: str, weights: list[str], annotations: Path, images: Path, out: Path, size: int,
                 workers: int) -> tuple[Callable, list[str]]:
    """(main function, argv) of one analysis over the subset."""
    words, _, _ = COMMANDS[name]
    data = ["--annotations", str(annotations), "--images", str(images), "--out", str(out), "--size", str(size)]
    if words[0] == "evaluate":
        from ..evaluate import main as evaluate_main

        return evaluate_main, ["--weights", weights[0], *data, "--workers", str(workers)]
    from ..analyze.cli import main as analyze_main

    models = ["--checkpoints", *weights] if words[0] == "evolution" else ["--weights", weights[0]]
    return analyze_main, [*words, *models, *data, "--workers", str(workers), "--no-progress", "--png-dpi", "72"]


def evolution_partner(weights: str, out: Path) -> str:
    """A second checkpoint for `evolution`: the same weights saved as another epoch (a different file, so the
    cache does not take it for the first)."""
    model = load_model(weights)
    save_checkpoint(out, model, {**model.metadata, "epoch": int(model.metadata.get("epoch") or 0) + 1})
    return str(out)


def detections_per_image(decoded: torch.Tensor, conf_threshold: float) -> float:
    """Mean number of detections per image that `postprocess` keeps from decoded rows (B, N, 5 + C)."""
    return sum(len(kept.scores) for kept in postprocess(decoded, conf_threshold, NMS_THRESHOLD)) / len(decoded)


def with_objectness_shift(model: torch.nn.Module, outputs: list, shift: float) -> torch.Tensor:
    """Decoded rows as they would be with every objectness logit moved by `shift` (the bias of its conv), from
    the raw outputs (decoded probabilities saturate at 1 in float32 and lose the logit)."""
    shifted = []
    for output in outputs:
        prediction = output.prediction.clone()
        prediction[:, :, 4] += shift
        shifted.append(type(output)(prediction, output.anchor_logwh))
    return model.decode(shifted).float()


def full_size_checkpoint(class_names: list[str], size: int, out: Path, images: list[Path], checkpoint: str
                         ) -> tuple[str, dict]:
    """The full-size model (width 1, BatchNorm calibrated on noise, random weights) for the split's classes, its
    objectness bias set so that it keeps as many detections per image at the evaluation threshold as the trained
    `checkpoint` on the same images; returns (path, metadata written). (At the calibrated prior of 0.01 the random
    model keeps about 11,700 of the 14,196 rows of a 416-px image at `evaluate`'s threshold of 0.001, and NMS over
    them, not the analysis, would be what the bench measured.)"""
    from ..inference.postprocess import EVAL_CONF_THRESHOLD
    from ..inference.transforms import preprocess, read_image
    from ..training.params import set_objectness_bias

    batch = torch.stack([preprocess(read_image(path), size)[0] for path in images])
    with torch.no_grad():
        trained = load_model(checkpoint)
        target = detections_per_image(trained.decode(trained(batch)).float(), EVAL_CONF_THRESHOLD)
        model = calibrated_model(ModelConfig(num_classes=len(class_names)))
        outputs = model(batch)
        low, high = -200.0, 50.0  # objectness logit shifts: from nothing to every row (random logits spread wide)
        for _ in range(30):
            middle = (low + high) / 2
            if detections_per_image(with_objectness_shift(model, outputs, middle), EVAL_CONF_THRESHOLD) > target:
                high = middle
            else:
                low = middle
        bias = math.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR)) + (low + high) / 2
        set_objectness_bias(model, bias)
        kept = detections_per_image(model.decode(model(batch)).float(), EVAL_CONF_THRESHOLD)
    metadata = {"class_names": list(class_names), "input_size": size, "objectness_bias": bias,
                "detections_per_image": kept, "checkpoint_detections_per_image": target}
    save_checkpoint(out, model, metadata)
    return str(out), metadata


def measure_model(label: str, weights: str, annotations: Path, image_dir: Path, count: int, size: int,
                  workdir: Path, log: Callable[[str], None], commands=tuple(COMMANDS)) -> dict:
    """Images/s of plain inference and of each analysis command over the first `count` images."""
    from ..analyze.sources import load_analysed_model

    workers = default_workers()
    subset, count = subset_annotations(annotations, count, workdir / f"{label}_subset.json")
    names = [image["file_name"] for image in json.loads(subset.read_text())["images"]]
    paths = [image_dir / name for name in names]
    partner = evolution_partner(weights, workdir / f"{label}_partner.pt")
    network = load_analysed_model(weights, torch.device("cpu")).fast(grad=False)
    plain_inference(network, paths[:DEFAULT_BATCH_SIZE], size, workers)  # warm-up: allocator, oneDNN kernels
    rows = []
    for name in commands:
        plain = plain_inference(network, paths, size, workers)
        _, passes, cached = COMMANDS[name]
        out = workdir / f"{label}_{len(rows)}"
        main, argv = command_line(name, [weights, partner], subset, image_dir, out, size, workers)
        start = time.perf_counter()
        _run_quietly(main, argv)
        cold = time.perf_counter() - start
        replot = None
        if cached:
            start = time.perf_counter()
            context = _run_quietly(main, argv)
            replot = time.perf_counter() - start
            if context.cache.misses:
                raise RuntimeError(f"{name}: the second run missed its cache {context.cache.misses} times; the pass "
                                   "time would be wrong")
        dataset_pass = cold - replot if replot is not None else cold
        if dataset_pass <= 0.05 * cold:
            # Too few images to tell the pass from the fixed cost (noise can make the cached run the slower one).
            log(f"  {label} {name}: the cached re-run took {replot:.2f} s of the cold {cold:.2f} s; too few images "
                "to separate the dataset pass (use more)")
            dataset_pass = None
        row = {"model": label, "command": name, "images": count, "passes": passes, "plain_s": plain,
               "cold_s": cold, "cached_s": replot, "pass_s": dataset_pass, "plain_images_per_s": count / plain,
               "pass_images_per_s": None if dataset_pass is None else count / dataset_pass,
               "end_to_end_images_per_s": count / cold,
               "pass_ratio": None if dataset_pass is None else plain / dataset_pass, "end_to_end_ratio": plain / cold}
        rows.append(row)
        log(f"  {label} {name}: plain {row['plain_images_per_s']:.1f} img/s, pass "
            f"{_rate(row['pass_images_per_s'])} img/s ({_rate(row['pass_ratio'], 2)}x), end to end "
            f"{row['end_to_end_ratio']:.2f}x")
    return {"model": label, "weights": weights, "images": count, "size": size, "workers": workers,
            "batch_size": DEFAULT_BATCH_SIZE, "threads": torch.get_num_threads(), "rows": rows}


def _rate(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def dataset_cost(synthetic: str, weights: str | None, *, size: int, images: int, full_size_images: int,
                 log: Callable[[str], None], commands=tuple(COMMANDS)) -> list[dict]:
    """The `dataset` section: the checkpoint (default: the embedded model) over `images` validation images, and
    the full-size model over `full_size_images` (0: left out)."""
    from ..checkpoint import default_checkpoint_path

    root = Path(synthetic)
    annotations, image_dir = root / "annotations" / "val.json", root / "images" / "val"
    class_names = [c["name"] for c in sorted(json.loads(annotations.read_text())["categories"],
                                             key=lambda c: c["id"])]
    results = []
    with tempfile.TemporaryDirectory(prefix="asff_viz_bench_") as folder:
        workdir = Path(folder)
        weights = str(weights or default_checkpoint_path())
        if images:
            log(f"dataset analyses at {size}: {Path(weights).name}, {images} images")
            results.append(measure_model("checkpoint", weights, annotations, image_dir, images, size, workdir, log,
                                         commands))
        if full_size_images:
            log(f"dataset analyses at {size}: the full-size model, {full_size_images} images")
            images_for_prior = [image_dir / image["file_name"]
                                for image in json.loads(annotations.read_text())["images"][:4]]
            full, metadata = full_size_checkpoint(class_names, size, workdir / "full_size.pt", images_for_prior,
                                                  weights)
            measured = measure_model("full-size", full, annotations, image_dir, full_size_images, size, workdir,
                                     log, commands)
            kept, target = metadata["detections_per_image"], metadata["checkpoint_detections_per_image"]
            measured["note"] = (f"random weights, objectness bias {metadata['objectness_bias']:.1f} so that it "
                                f"keeps {kept:.0f} detections per image at the evaluation threshold, the checkpoint "
                                f"{target:.0f} (the first 4 images)")
            results.append(measured)
    return results


__all__ = ["COMMANDS", "dataset_cost", "measure_model", "plain_inference", "subset_annotations"]
