"""The benchmark's report: the targets met or missed, and the Markdown table."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..utils.timing import paired_ratio


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    rows = []

    def add(name: str, value: float | None, limit: float, better: str, note: str = "") -> None:
        met = None if value is None or math.isnan(value) else (value <= limit if better == "max" else value >= limit)
        rows.append({"target": name, "value": value, "limit": limit, "kind": better, "met": met, "note": note})

    def forward(variant: str, size: int, batch: int) -> dict | None:
        return next((r for r in results.get("forward", []) if r["variant"] == variant and r["size"] == size
                     and r["batch"] == batch), None)

    capture = results.get("capture", {})
    if "eager_fp32" in capture:
        add("fusion capture on/off at 416 (model as built)", capture["eager_fp32"]["ratio"], 1.03, "max")
    if "fast_fp32" in capture:
        add("fusion capture on/off at 416 (fast fp32)", capture["fast_fp32"]["ratio"], 1.03, "max")
    deform = results.get("deform", {})
    if "time_share_fast_fp32" in deform:
        add("deformable conv share of a forward at 416 (fast fp32)", deform["time_share_fast_fp32"], 0.10, "max",
            f"its FLOPs alone are {deform['flop_share']:.1%} of the model's")
    for name, ratio in deform.get("ratios", {}).items():
        add(f"model / plain-conv model at 416 ({name})", ratio, 1.25, "max", "issue 2")
    # Issue 17: fast fp32 >= 0.75 of the fp32 ceiling and fast bf16 >= 0.6 of the bf16 ceiling, at 416 and 608,
    # batch 1 and 8, on every CPU.
    for variant, limit in (("fast_fp32", 0.75), ("fast_fp32_compiled", 0.75), ("fast_bf16", 0.6)):
        for size in (416, 608):
            for batch in (1, 8):
                row = forward(variant, size, batch)
                if row is not None and row["efficiency"] is not None:
                    add(f"{variant.replace('_', ' ')} at {size}, batch {batch}: share of the conv ceiling",
                        row["efficiency"], limit, "min")
    row = forward("eager_fp32", 608, 1)
    if row is not None and row["efficiency"] is not None:
        add("model as built, fp32 at 608, batch 1: share of the conv ceiling", row["efficiency"], 0.75, "min",
            "reference")
    for batch in sorted({r["batch"] for r in results.get("forward", [])}):
        fp32, bf16 = forward("fast_fp32", 416, batch), forward("fast_bf16", 416, batch)
        if fp32 and bf16:
            speedup = (paired_ratio(fp32["latency_all_ms"], bf16["latency_all_ms"]) if "latency_all_ms" in fp32
                       else fp32["latency_ms"] / bf16["latency_ms"])
            add(f"bf16 speed-up over fast fp32 at 416, batch {batch}", speedup, 1.5, "min")
    accuracy = results.get("bf16_accuracy", {})
    if "AP_difference_points" in accuracy:
        add("bf16 AP minus fp32 AP (points, absolute)", abs(accuracy["AP_difference_points"]), 0.5, "max")
    dataset_limits = {"scale-stats": 0.8, "gradflow (learned)": 0.3, "evaluate": 0.8}
    for model in results.get("dataset", []):
        for row in model["rows"]:
            if row["command"] in dataset_limits:
                add(f"{row['command']} / plain inference, images/s over a dataset ({model['model']} model)",
                    row["pass_ratio"], dataset_limits[row["command"]], "min",
                    f"end to end, figures included: {row['end_to_end_ratio']:.2f}")
    if results.get("environment", {}).get("device", "").startswith("cuda"):
        for variant in ("fast_bf16_compiled", "fast_bf16", "fast_fp32"):
            row = forward(variant, 608, 1)
            if row:
                add(f"GPU batch-1 latency at 608 ms ({variant})", row["latency_ms"], 5.0, "max")
                break
        for variant in ("fast_bf16_compiled", "fast_bf16"):
            row = forward(variant, 416, 64)
            if row:
                add(f"GPU images/s at 416, batch 64 ({variant})", row["images_per_s"], 2000.0, "min")
                break
    return rows


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _mobilenet_lines(results: dict) -> list[str]:
    """The MobileNetV2 ASFF rows next to the Darknet-53 ones of the same run."""
    mobile = results.get("mobilenet")
    if not mobile:
        return []
    lines: list[str] = []
    darknet = {(row["variant"], row["size"], row["batch"]): row for row in results.get("forward", [])}
    lines += ["", f"{mobile['variant']} ({mobile['parameters'] / 1e6:.1f}M parameters; GFLOP at batch 1: "
              + ", ".join(f"{size} px {_number(f['gflop'], 1)}" for size, f in mobile["flops"].items())
              + "), timed in the same run:", "",
              "| variant | size | batch | model ms | images/s | GFLOP/s | of ceiling | Darknet-53 ASFF ms | "
              "speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for row in mobile["forward"]:
        other = darknet.get((row["variant"], row["size"], row["batch"]))
        other_ms = other["latency_ms"] if other else math.nan
        lines.append(f"| {row['variant']} | {row['size']} | {row['batch']} | {_number(row['latency_ms'], 1)} | "
                     f"{_number(row['images_per_s'], 2)} | {_number(row['gflops_per_s'], 1)} | "
                     f"{_number(row['efficiency'], 2)} | {_number(other_ms, 1)} | "
                     f"{_number(other_ms / row['latency_ms'], 2)} |")
    return lines


def _profile_lines(results: dict) -> list[str]:
    """Per-part time and efficiency of the fast fp32 forward (and the bf16 one where this CPU runs it), and the
    operator kinds' shares, of the full-size model and (when measured) the MobileNetV2 one."""
    lines: list[str] = []
    for model, profile in (("full-size Darknet-53 model", results.get("profile")),
                           ("full-size Darknet-53 model", results.get("profile_bf16")),
                           ("MobileNetV2 model", (results.get("mobilenet") or {}).get("profile"))):
        if not profile:
            continue
        lines += ["", f"Where the time goes, {model}: {profile['variant']} at {profile['size']}, batch "
                  f"{profile['batch']}, {_number(profile['total_ms'], 1)} ms per forward (module hooks, medians):", "",
                  "| part | ms | share of the forward | GFLOP | GFLOP/s | of the same-dtype ceiling |",
                  "|---|---|---|---|---|---|"]
        for row in profile["parts"]:
            lines.append(f"| {row['part']} | {_number(row['ms'], 1)} | {row['share']:.1%} | "
                         f"{_number(row['gflop'], 2)} | {_number(row['gflops_per_s'], 1)} | "
                         f"{_number(row['efficiency'], 2)} |")
        lines += ["", "Self CPU time by operator kind (torch.profiler): " + ", ".join(
            f"{kind} {share:.1%}" for kind, share in profile["operators"].items()) + "."]
    return lines


def _dataset_lines(results: dict) -> list[str]:
    """Each dataset analysis's images/s next to plain batched inference over the same images."""
    lines: list[str] = []
    for model in results.get("dataset", []):
        note = f"; {model['note']}" if model.get("note") else ""
        lines += ["", f"Dataset analyses, {model['model']} model ({model['weights'].rsplit('/', 1)[-1]}{note}), first "
                  f"{model['images']} synthetic validation images at {model['size']}, batch {model['batch_size']}, "
                  f"{model['workers']} reader process(es), {model['threads']} torch threads; plain = fast fp32 "
                  "forward + decode + NMS over the same reader, timed right before each command:", "",
                  "| command | model passes per image | plain images/s | pass images/s | pass / plain | "
                  "end to end / plain | cached re-run s |", "|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            lines.append(f"| {row['command']} | {row['passes']} | {_number(row['plain_images_per_s'], 1)} | "
                         f"{_number(row['pass_images_per_s'], 1)} | {_number(row['pass_ratio'], 2)} | "
                         f"{_number(row['end_to_end_ratio'], 2)} | {_number(row['cached_s'], 1)} |")
    return lines


def _allocator(env: dict) -> str:
    """How memory was allocated: glibc keeping freed memory (the commands' setting), or why not."""
    if env.get("freed_memory_kept"):
        return "freed memory kept for reuse (glibc thresholds 1 GiB)"
    if "freed_memory_kept" not in env:  # results written before the setting existed
        return "glibc's default allocator settings"
    return f"allocator as configured ({env.get('allocator_note') or 'not glibc'})"


def format_table(results: dict) -> str:
    """The results as Markdown tables (what docs/performance.md shows)."""
    env = results["environment"]
    lines = [f"Machine: {env.get('gpu') or env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
             f"device {env['device']}, CPU flags {', '.join(env['cpu_flags']) or 'n/a'}, load average at start "
             f"{_number((env.get('load_average') or [math.nan])[0], 1)}; mode {results['settings']['mode']}, "
             f"{results['settings']['repeats']} repeats (medians), "
             f"{'thread CPU time' if results['settings'].get('clock') == 'cpu' else 'wall-clock time'}; "
             f"{_allocator(env)}.", ""]
    lines += ["| ceiling conv (fastest 3x3 tried) | dtype | ms | GFLOP/s | other shapes, GFLOP/s |",
              "|---|---|---|---|---|"]
    for ceiling in results["ceilings"].values():
        others = ", ".join(f"{name} {_number(rate, 0)}" for name, rate in ceiling["candidates_gflops_per_s"].items()
                           if [int(v) for v in name.split("x")] != ceiling["shape"])
        lines.append(f"| {'x'.join(map(str, ceiling['shape']))} | {ceiling['dtype']} | {_number(ceiling['ms'], 1)} "
                     f"| {_number(ceiling['gflops_per_s'], 1)} | {others} |")
    lines += ["", "| size | GFLOP (batch 1) | deformable conv share of FLOPs |", "|---|---|---|"]
    for size, flops in results["flops"].items():
        lines.append(f"| {size} | {_number(flops['gflop'], 1)} | {flops['deform_share_of_flops']:.1%} |")
    if results.get("forward"):
        lines += ["", "| variant | size | batch | model ms | end-to-end ms | images/s | GFLOP/s | of ceiling |",
                  "|---|---|---|---|---|---|---|---|"]
    for row in results.get("forward", []):
        lines.append(f"| {row['variant']} | {row['size']} | {row['batch']} | {_number(row['latency_ms'], 1)} | "
                     f"{_number(row['end_to_end_ms'], 1)} | {_number(row['images_per_s'], 2)} | "
                     f"{_number(row['gflops_per_s'], 1)} | {_number(row['efficiency'], 2)} |")
    lines += _profile_lines(results)
    lines += _mobilenet_lines(results)
    deform = results.get("deform")
    if deform:
        lines += ["", f"Deformable conv at {deform['size']}, batch 1: {deform['flop_share']:.1%} of the FLOPs; "
                  + "; ".join(f"time share ({name[len('time_share_'):]}) {value:.1%}"
                              for name, value in deform.items() if name.startswith("time_share_"))
                  + "; full model / plain-conv model: "
                  + ", ".join(f"{name} {ratio:.3f}" for name, ratio in deform["ratios"].items()) + "."]
    capture = results.get("capture")
    if capture:
        lines += ["", f"Fusion capture at {capture['size']}, batch 1, on / off: " + ", ".join(
            f"{name} {value['ratio']:.3f}" for name, value in capture.items() if isinstance(value, dict)) + "."]
    analysis = results.get("analysis")
    if analysis:
        text = (f"Analysis at {analysis['size']} (model as built): gradient flow {analysis['gradient_flow_ms']:.0f} ms "
                f"= {analysis['gradient_flow_ratio']:.1f} forwards; saliency {analysis['saliency_ms']:.0f} ms")
        if "integrated_gradients_ms" in analysis:
            text += (f"; integrated gradients ({analysis['integrated_gradients_steps']} steps) "
                     f"{analysis['integrated_gradients_ms']:.0f} ms")
        lines += ["", text + "."]
    if results.get("training"):
        lines += ["", "| training | size | batch | variant | images/s | ms/step |", "|---|---|---|---|---|---|"]
        for row in results["training"]:
            lines.append(f"| width {row['width']} | {row['size']} | {row['batch']} | {row['variant']} | "
                         f"{_number(row['images_per_s'], 2)} | {_number(row['step_ms'], 0)} |")
    if results.get("loader"):
        loader = results["loader"]
        lines += ["", f"Data loader at {loader['size']} px, batch {loader['batch']}, {loader['workers']} workers: "
                  f"{_number(loader['images_per_s'], 1)} images/s."]
    lines += _dataset_lines(results)
    accuracy = results.get("bf16_accuracy")
    if accuracy and "AP_difference_points" in accuracy:
        lines += ["", f"bf16 accuracy ({accuracy['images']} synthetic validation images at {accuracy['size']}): "
                  f"AP fp32 {accuracy['AP_fp32']:.4f}, bf16 {accuracy['AP_bf16']:.4f}, "
                  f"difference {accuracy['AP_difference_points']:+.2f} points."]
    elif accuracy and "max_score_difference" in accuracy:
        lines += ["", f"bf16 against fp32 without a checkpoint (random weights, sample image at {accuracy['size']}; "
                  "not an accuracy measure, run with --weights for the AP check): logits within "
                  f"{max(accuracy['max_relative_logit_error_per_level']):.1%} of their range, scores within "
                  f"{accuracy['max_score_difference']:.3f}, {accuracy['top10_same_rows']}/10 same top rows."]
    memory = results.get("memory", {})
    if memory:
        lines += ["", "Peak memory: " + ", ".join(f"{k} {_number(v, 0)} MB" for k, v in memory.items()) + "."]
    if results.get("targets"):
        lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
        for row in results["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
            note = f" ({row['note']})" if row["note"] else ""
            lines.append(f"| {row['target']}{note} | {_number(row['value'], 3)} | "
                         f"{'<=' if row['kind'] == 'max' else '>='} {row['limit']} | {met} |")
    return "\n".join(lines) + "\n"


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
