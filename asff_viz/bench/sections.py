"""The benchmark's measurements, one function per section: the convolution ceiling, forward latency and
throughput, the deformable conv's cost, capture, analysis, training, the data loader and bf16 accuracy.
Timed with the clock the run chose (`asff_viz.utils.timing.CLOCKS`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.fast import optimize_for_inference
from ..inference.postprocess import DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD, postprocess
from ..models import build_model
from ..utils.timing import median, paired_ratio, run_interleaved, spread, synchronize
from .models import sample_image, without_deformation

CEILING_SHAPE = (256, 152, 152)  # channels, height, width of the 256 -> 256 3x3 reference convolution


def ceiling_case(device: torch.device, dtype: torch.dtype, shape: Sequence[int]) -> tuple[Callable[[], object], int]:
    """A C -> C 3x3 conv on a (B, C, H, W) input, channels-last (the layout the fast paths use), and its FLOPs."""
    batch, channels, height, width = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator).to(device, dtype)
    weight = (torch.randn(channels, channels, 3, 3, generator=generator) * 0.02).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)

    def case() -> None:
        with torch.inference_mode():
            F.conv2d(x, weight, padding=1)

    return case, 2 * batch * channels * channels * 9 * height * width


def conv_ceiling(device: torch.device, dtype: torch.dtype, repeats: int, batch: int, *,
                 clock: Callable[[], float] = time.perf_counter) -> dict:
    """GFLOP/s of the fastest of a few large 3x3 convs: 256 channels at 152 x 152 (the reference shape) and the
    model's own 256/512/1024-channel shapes at 608 px. The fastest shape is then re-timed next to the model in
    every forward measurement, so that efficiency is a ratio of numbers taken under the same load."""
    candidates = [(batch, *CEILING_SHAPE), (batch, 256, 76, 76), (batch, 512, 38, 38), (batch, 1024, 19, 19)]
    cases, flops = {}, {}
    for shape in candidates:
        name = "x".join(map(str, shape))
        cases[name], flops[name] = ceiling_case(device, dtype, shape)
    times = run_interleaved(cases, clock=clock, repeats=repeats, warmup=1, device=device)
    rates = {name: flops[name] / median(times[name]["total"]) / 1e9 for name in cases}
    best = max(rates, key=rates.get)
    seconds = median(times[best]["total"])
    return {"dtype": str(dtype).replace("torch.", ""), "shape": [int(v) for v in best.split("x")],
            "gflop": flops[best] / 1e9, "ms": seconds * 1e3, "gflops_per_s": rates[best],
            "spread": spread(times[best]["total"]), "candidates_gflops_per_s": rates}


def forward_case(model: nn.Module, images: torch.Tensor, device: torch.device, *,
                 clock: Callable[[], float] = time.perf_counter) -> Callable[[], dict]:
    """A self-timed forward, then decode + threshold + NMS on the CPU as `Detector` runs them."""

    def case() -> dict:
        with torch.inference_mode():
            start = clock()
            outputs = model(images)
            synchronize(device)
            model_done = clock()
            decoded = model.decode(outputs).float().cpu()
            postprocess(decoded, DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD)
            end = clock()
        return {"model": model_done - start, "end_to_end": end - start}

    return case


def forward_grid(variants: dict, flops: dict, ceilings: dict, sizes: Sequence[int], batches: Sequence[int],
                 repeats: int, warmup: int, device: torch.device, log: Callable[[str], None], *,
                 clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Every variant at every size and batch, with the ceiling convs timed in the same rounds."""
    rows = []
    for size in sizes:
        for batch in batches:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
            cases = {name: forward_case(model, images, device, clock=clock) for name, model in variants.items()}
            ceiling_flops = {}
            for dtype_name, ceiling in ceilings.items():
                cases[f"ceiling_{dtype_name}"], ceiling_flops[dtype_name] = ceiling_case(
                    device, getattr(torch, dtype_name), ceiling["shape"])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times = run_interleaved(cases, clock=clock, repeats=repeats, warmup=warmup, device=device)
            except torch.cuda.OutOfMemoryError:
                log(f"  {size}px batch {batch}: out of memory, skipped")
                continue
            for name in variants:
                parts = times[name]
                seconds, total = median(parts["model"]), median(parts["end_to_end"])
                gflops = flops[size]["gflop"] * batch / seconds
                dtype_name = "bfloat16" if "bf16" in name else "float32"
                row = {"variant": name, "size": size, "batch": batch, "latency_ms": seconds * 1e3,
                       "end_to_end_ms": total * 1e3, "images_per_s": batch / seconds,
                       "end_to_end_images_per_s": batch / total, "gflops_per_s": gflops, "efficiency": None,
                       "spread": spread(parts["model"]), "latency_all_ms": [t * 1e3 for t in parts["model"]]}
                if dtype_name in ceiling_flops:
                    # model GFLOP/s / ceiling GFLOP/s, round by round = (model FLOPs / ceiling FLOPs) x time ratio.
                    ceiling_times = times[f"ceiling_{dtype_name}"]["total"]
                    row["ceiling_gflops_per_s"] = ceiling_flops[dtype_name] / median(ceiling_times) / 1e9
                    row["efficiency"] = (flops[size]["gflop"] * 1e9 * batch / ceiling_flops[dtype_name]
                                         * paired_ratio(ceiling_times, parts["model"]))
                rows.append(row)
                efficiency = f", {row['efficiency']:.2f} of the ceiling" if row["efficiency"] is not None else ""
                log(f"  {size}px batch {batch} {name:>20}: {seconds * 1e3:8.1f} ms model, {total * 1e3:8.1f} ms end "
                    f"to end, {gflops:7.1f} GFLOP/s{efficiency}")
            if device.type == "cuda":
                rows[-1]["peak_memory_mb_all_variants"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
    return rows


def deform_cost(variants: dict, flops: dict, size: int, repeats: int, warmup: int, device: torch.device,
                log: Callable[[str], None], names: Sequence[str] | None = None, *,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Each variant against itself with plain convs in the head (ratio), and the time inside the deformable
    convs as a share of the forward (measured with hooks on the fast float32 model)."""
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    cases = {}
    for name, model in variants.items():
        if "compiled" in name or (names is not None and name not in names):
            continue
        cases[name] = _forward_only(model, images)
        cases[name + "+plain_conv"] = _forward_only(without_deformation(model), images)
    times = run_interleaved(cases, clock=clock, repeats=repeats, warmup=warmup, device=device)
    result = {"size": size, "batch": 1, "flop_share": flops[size]["deform_share_of_flops"], "ratios": {}}
    for name in variants:
        if name in cases:
            ratio = paired_ratio(times[name]["total"], times[name + "+plain_conv"]["total"])
            result["ratios"][name] = ratio
            log(f"  {name}: full model / plain-conv model = {ratio:.3f}")
    for name in ("fast_fp32", "fast_bf16"):
        if name in variants:
            share = _deform_time_share(variants[name], images, repeats, device, clock=clock)
            result[f"time_share_{name}"] = share
            log(f"  {name}: deformable convs take {share:.1%} of the forward")
    return result


def _forward_only(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def case() -> None:
        with torch.inference_mode():
            model(images)
    return case


def _deform_time_share(model: nn.Module, images: torch.Tensor, repeats: int, device: torch.device, *,
                       clock: Callable[[], float] = time.perf_counter) -> float:
    inside: list[float] = []
    started: dict[int, float] = {}

    def before(module, _inputs):
        synchronize(device)
        started[id(module)] = clock()

    def after(module, _inputs, _output):
        synchronize(device)
        inside.append(clock() - started.pop(id(module)))

    handles = []
    for level in model.head.levels:
        handles.append(level.adaption.dconv.register_forward_pre_hook(before))
        handles.append(level.adaption.dconv.register_forward_hook(after))
    shares = []
    try:
        with torch.inference_mode():
            model(images)
            for _ in range(repeats):
                inside.clear()
                synchronize(device)
                start = clock()
                model(images)
                synchronize(device)
                shares.append(sum(inside) / (clock() - start))
    finally:
        for handle in handles:
            handle.remove()
    return median(shares)


def capture_cost(variants: dict, size: int, repeats: int, log: Callable[[str], None],
                 names: Sequence[str] = ("eager_fp32", "fast_fp32", "fast_bf16")) -> dict:
    """Forward with fusion capture on / off (interleaved), through the introspection package's own measure."""
    from ..introspection.overhead import measure_capture_overhead

    result = {"size": size, "batch": 1}
    for name in names:
        if name in variants:
            measured = measure_capture_overhead(variants[name], size=size, repeats=repeats, warmup=1)
            result[name] = {"ratio": measured["ratio"], "plain_ms": measured["plain_seconds"] * 1e3,
                            "captured_ms": measured["captured_seconds"] * 1e3}
            log(f"  {name}: capture on / off = {measured['ratio']:.3f}")
    return result


def analysis_cost(model: nn.Module, size: int, repeats: int, device: torch.device, *, integrated_steps: int,
                  log: Callable[[str], None], clock: Callable[[], float] = time.perf_counter) -> dict:
    """Gradient-flow analysis vs a forward (interleaved), and attributions (time)."""
    from ..introspection.attribution import integrated_gradients, saliency
    from ..introspection.decomposition import gradient_flow
    from ..introspection.objectives import SumOfScores

    image = sample_image(size, device)
    with torch.inference_mode():
        decoded = model.decode(model(image.unsqueeze(0)))[0]
    row = int((decoded[:, 4] * decoded[:, 5:].max(dim=1).values).argmax())
    cases = {"forward": _forward_only(model, image.unsqueeze(0)),
             "gradient_flow": lambda: gradient_flow(model, image, SumOfScores())}
    times = run_interleaved(cases, clock=clock, repeats=repeats, warmup=1, device=device)
    forward = median(times["forward"]["total"])
    result = {"size": size, "forward_ms": forward * 1e3,
              "gradient_flow_ms": median(times["gradient_flow"]["total"]) * 1e3,
              "gradient_flow_ratio": median(times["gradient_flow"]["total"]) / forward}
    log(f"  gradient flow = {result['gradient_flow_ratio']:.1f} forwards ({result['gradient_flow_ms']:.0f} ms)")
    start = clock()
    saliency(model, image, row)
    synchronize(device)
    result["saliency_ms"] = (clock() - start) * 1e3
    log(f"  saliency: {result['saliency_ms']:.0f} ms")
    if integrated_steps:
        start = clock()
        integrated_gradients(model, image, row, n_steps=integrated_steps, internal_batch_size=4)
        synchronize(device)
        result["integrated_gradients_ms"] = (clock() - start) * 1e3
        result["integrated_gradients_steps"] = integrated_steps
        log(f"  integrated gradients ({integrated_steps} steps): {result['integrated_gradients_ms']:.0f} ms")
    return result


def random_labels(batch: int, size: int, num_classes: int, generator: torch.Generator, boxes: int = 6
                  ) -> torch.Tensor:
    """(B, boxes, 6) training labels [class, cx, cy, w, h, mixup ratio 1] in input pixels."""
    sizes = torch.empty(batch, boxes, 2).uniform_(0.05, 0.5, generator=generator) * size
    centres = torch.empty(batch, boxes, 2).uniform_(0.25, 0.75, generator=generator) * size
    classes = torch.randint(0, num_classes, (batch, boxes, 1), generator=generator).float()
    return torch.cat([classes, centres, sizes, torch.ones(batch, boxes, 1)], dim=2)


def training_throughput(width: float, size: int, batch: int, steps: int, device: torch.device,
                        log: Callable[[str], None], channels_first: bool = True, *,
                        clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Images/s of SGD steps with random labels: float32 channels-last (and NCHW unless `channels_first` is
    False), and on a GPU bf16 autocast."""
    from ..training.loss import YOLOv3Loss
    from ..training.params import set_objectness_prior

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    settings = ([("fp32", None, False)] if channels_first else []) + [("fp32_channels_last", None, True)]
    if device.type == "cuda":
        settings += [("amp_bf16", torch.bfloat16, False), ("amp_bf16_channels_last", torch.bfloat16, True)]
    cases = {}
    for name, amp_dtype, channels_last in settings:
        torch.manual_seed(0)
        model = build_model(width=width).to(device)
        set_objectness_prior(model, 0.01)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        criterion = YOLOv3Loss.from_config(model.config).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
        labels = random_labels(batch, size, model.num_classes, generator).to(device)
        batch_images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        cases[name] = _training_step(model, criterion, optimizer, batch_images, labels, amp_dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = run_interleaved(cases, clock=clock, repeats=steps, warmup=1, device=device)
    rows = []
    for name, parts in times.items():
        seconds = median(parts["total"])
        rows.append({"width": width, "size": size, "batch": batch, "variant": name, "step_ms": seconds * 1e3,
                     "images_per_s": batch / seconds, "spread": spread(parts["total"])})
        log(f"  width {width} {size}px batch {batch} {name:>22}: {batch / seconds:6.2f} images/s "
            f"({seconds * 1e3:.0f} ms/step)")
    if device.type == "cuda":
        rows[-1]["peak_memory_mb_all_variants"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
    return rows


def _training_step(model, criterion, optimizer, images, labels, amp_dtype, device) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        loss = criterion(outputs, labels)["total"]
        loss.backward()
        optimizer.step()
    return step


def loader_throughput(synthetic: str, size: int, batch: int, batches: int, workers: int, device: torch.device,
                      log: Callable[[str], None]) -> dict:
    """Images/s the training data pipeline (decode, augment, collate) delivers with `workers` processes."""
    from torch.utils.data import DataLoader

    from ..data.coco import COCODetection
    from ..data.loading import TrainDataset, collate

    root = Path(synthetic)
    dataset = TrainDataset(COCODetection(root / "annotations" / "train.json", root / "images" / "train"),
                           input_size=size)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            images = next(iterator)[0]
        except StopIteration:
            break
        count += images.shape[0]
    seconds = time.perf_counter() - start
    result = {"size": size, "batch": batch, "workers": workers, "images_per_s": count / seconds if count else None}
    log(f"  data loader ({workers} workers): {result['images_per_s'] or 0:.1f} images/s")
    return result


def bf16_accuracy(variants: dict, size: int, device: torch.device, *, weights: str | None,
                  synthetic: str | None, log: Callable[[str], None]) -> dict:
    """bf16 vs float32: AP points on the synthetic validation split with a trained checkpoint (at its input
    size), else the agreement of the decoded outputs of the calibrated random model on a sample image."""
    if "fast_bf16" not in variants:
        return {"skipped": "bf16 is not supported on this device"}
    if weights is not None:
        from ..checkpoint import load_model
        from ..data.coco import COCODetection
        from ..inference.coco_eval import evaluate_coco

        model = load_model(weights, device=device)
        size = int(model.metadata.get("input_size") or size)  # the size the checkpoint was trained for
        if synthetic is None:
            root = Path(tempfile.mkdtemp(prefix="asff_bench_val_"))
            from ..data.synthetic import generate

            paths = generate(root, seed=12345, train=0, val=100, size=size)
            annotations, images = paths.val_annotations, paths.val_images
        else:
            annotations = Path(synthetic) / "annotations" / "val.json"
            images = Path(synthetic) / "images" / "val"
        dataset = COCODetection(annotations, images)
        result = {"weights": str(weights), "images": len(dataset), "size": size}
        for name, candidate in (("fp32", model), ("bf16", optimize_for_inference(model, dtype=torch.bfloat16))):
            metrics, _ = evaluate_coco(candidate, dataset, size, device=device, batch_size=8)
            result[f"AP_{name}"], result[f"AP50_{name}"] = metrics["AP"], metrics["AP50"]
        result["AP_difference_points"] = 100 * (result["AP_bf16"] - result["AP_fp32"])
        log(f"  AP fp32 {result['AP_fp32']:.4f}, bf16 {result['AP_bf16']:.4f}: "
            f"{result['AP_difference_points']:+.2f} points")
        return result
    image = sample_image(size, device).unsqueeze(0)
    with torch.inference_mode():
        reference = variants["eager_fp32"](image)
        candidate = variants["fast_bf16"](image)
        reference_rows = variants["eager_fp32"].decode(reference)[0]
        candidate_rows = variants["fast_bf16"].decode(candidate)[0]
    relative = [float((c.prediction.float() - r.prediction).abs().max() / r.prediction.abs().max())
                for c, r in zip(candidate, reference, strict=True)]
    score_reference = reference_rows[:, 4] * reference_rows[:, 5:].max(dim=1).values
    score_candidate = candidate_rows[:, 4] * candidate_rows[:, 5:].max(dim=1).values
    top_reference = set(score_reference.topk(10).indices.tolist())
    top_candidate = set(score_candidate.topk(10).indices.tolist())
    result = {"weights": None, "size": size, "max_relative_logit_error_per_level": relative,
              "max_score_difference": float((score_candidate - score_reference).abs().max()),
              "top10_same_rows": len(top_reference & top_candidate),
              "note": "random weights amplify rounding from layer to layer; the accuracy check is the AP one "
                      "(--weights)"}
    log(f"  random model: logits within {max(relative):.1%} of their range, scores within "
        f"{result['max_score_difference']:.3f}, {result['top10_same_rows']}/10 same top rows "
        "(random weights: not an accuracy measure; pass --weights for the AP check)")
    return result
