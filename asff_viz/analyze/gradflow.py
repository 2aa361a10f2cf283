"""`gradflow`: over a dataset, which target level sends how much gradient to which source level, and how often
the contributions conflict, for the learned fusion, the uniform counterfactual and (optionally) a sum-fusion
checkpoint.

Per image the objective is the training loss against its ground truth; `asff_viz.introspection.decomposition`
splits its gradient at each source x^k into the value-path terms of the three target levels and measures,
per source location, whether significant terms point in opposite directions (conflict). Locations are grouped
by the ground-truth assignment: positive (the cell of an object at the level that owns it), object background
(the same object's cell at the other two levels: the case of the paper's argument), background (the rest).

Outputs (each figure also as .csv):
  gradflow_shares     share of each source's value-path gradient energy coming from each target level
  gradflow_conflict   conflict rate per source level and region, per fusion mode, 95 % bootstrap CI
  gradflow_paths      RMS gradient norm reaching each source by path (value paths, fusion, neck, total)
  gradflow_conflict_controls  learned minus each control of the conflict metric, paired over images, 95 % CI
  gradflow_threshold_sweep.csv  with --sweep: the same at every significance x cosine threshold pair
  gradflow_conflict_by_level.csv  the same rates at the positives / object background of each target level
  gradflow_per_image.csv          per image and mode: loss, conflict counts per source and region

Controls (computed in the learned weights' own backward pass, unless --no-controls): the conflict rate depends on
the weights' peakedness and on chance (random 64-channel directions conflict at a high rate), so "learned below
uniform" alone does not show targeted filtering. Each control changes one thing: shuffled (the learned weight
vectors at random locations), rolled (the sources permuted: same peakedness), uniform (1/3), random (the learned
terms' norms in random directions) and with_weight_branch (the weight branch's gradient added to the value path).
A learned-minus-control difference whose paired interval excludes zero is what the data support.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ..figures import flow_plots
from ..figures.palette import OKABE_ITO, category_color
from ..figures.style import LEVEL_LABELS
from ..introspection.controls import ALL_CONTROLS, CONTROLS
from ..introspection.decomposition import SWEPT
from ..utils.argtypes import cosine_value, positive_int, unit_interval
from .flow_statistics import MAIN_REGIONS, REGIONS, GradientFlowStatistics
from .provenance import preprocessing_record
from .results_cache import sweep_key
from .runner import (
    RunContext,
    add_common_options,
    add_dataset_options,
    mode_label,
    parse_counterfactual,
    record_dataset_images,
)
from .sources import AnalysisDataset, AnalysisError, load_analysed_model, loss_truths

logger = logging.getLogger(__name__)
MODE_COLORS = {"learned": OKABE_ITO["blue"], "uniform": OKABE_ITO["orange"], "sum": OKABE_ITO["reddish_purple"]}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "gradflow", help="gradient contributions between levels and their conflict rate over a dataset",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", type=parse_counterfactual, default=None,
                        help="fusion modes of the ASFF checkpoint to analyse (default: learned uniform)")
    parser.add_argument("--sum-weights", help="also analyse this sum-fusion checkpoint (trained with --fusion sum)")
    parser.add_argument("--significance", type=unit_interval, default=0.1,
                        help="a term counts in a conflict if its norm >= this x the largest there (default 0.1)")
    parser.add_argument("--active-fraction", type=unit_interval, default=1e-3,
                        help="locations whose gradient is below this x the image's largest are ignored")
    parser.add_argument("--cosine-threshold", type=cosine_value, default=0.0,
                        help="two significant terms conflict when their cosine is below this (default 0)")
    parser.add_argument("--no-controls", action="store_true",
                        help="skip the controls of the conflict metric (shuffled, rolled, uniform, random, "
                             "with the weight branch)")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure the learned weights and the weight controls at every significance "
                             f"{SWEEP_SIGNIFICANCE} x cosine threshold {SWEEP_COSINE} (gradflow_threshold_sweep.csv)")
    parser.add_argument("--bootstrap", type=positive_int, default=1000,
                        help="bootstrap resamples of the images for CIs")
    add_dataset_options(parser)
    add_common_options(parser)
    parser.set_defaults(handler=run)


def conflict_rows(statistics: GradientFlowStatistics, *, samples: int, seed: int) -> tuple[list[dict], dict]:
    rows, intervals = [], {}
    for mode in statistics.modes:
        rate, cancellation, active, conflicting = statistics.conflict_rates(mode)
        weighted = statistics.weighted_cancellation(mode)
        lower, upper = statistics.bootstrap_interval(mode, samples=samples, seed=seed)
        intervals[mode] = (rate, lower, upper)
        for source in range(3):
            for region, name in enumerate(REGIONS):
                rows.append({"mode": mode, "source_level": source, "source": LEVEL_LABELS[source], "region": name,
                             "active_locations": int(active[source, region]),
                             "conflicting_locations": int(conflicting[source, region]),
                             "conflict_rate": float(rate[source, region]),
                             "ci95_low": float(lower[source, region]), "ci95_high": float(upper[source, region]),
                             "mean_cancellation": float(cancellation[source, region]),
                             "gradient_weighted_cancellation": float(weighted[source, region]),
                             "images": statistics.images.get(mode, 0)})
    return rows, intervals


def share_rows(statistics: GradientFlowStatistics) -> list[dict]:
    rows = []
    for mode in statistics.modes:
        norms = statistics.rms_norms(mode)
        shares = statistics.energy_shares(mode)
        at_positive = statistics.energy_shares(mode, region=0)
        at_object_background = statistics.energy_shares(mode, region=1)
        at_background = statistics.energy_shares(mode, region=2)
        for target in range(3):
            for source in range(3):
                rows.append({"mode": mode, "target_level": target, "target": LEVEL_LABELS[target],
                             "source_level": source, "source": LEVEL_LABELS[source],
                             "energy_share": float(shares[target, source]),
                             "energy_share_positive": float(at_positive[target, source]),
                             "energy_share_object_background": float(at_object_background[target, source]),
                             "energy_share_background": float(at_background[target, source]),
                             "rms_value_norm": float(norms["value"][target, source]),
                             "rms_weight_branch_norm": float(norms["weight_branch"][target, source])})
    return rows


def path_rows(statistics: GradientFlowStatistics) -> list[dict]:
    rows = []
    for mode in statistics.modes:
        norms = statistics.rms_norms(mode)
        for source in range(3):
            paths = {**{f"value from {LEVEL_LABELS[t]}": norms["value"][t, source] for t in range(3)},
                     "fusion (value paths + weight branches)": norms["fusion_total"][source],
                     "neck top-down path": norms["neck"][source], "total": norms["total"][source]}
            for path, value in paths.items():
                rows.append({"mode": mode, "source_level": source, "source": LEVEL_LABELS[source], "path": path,
                             "rms_norm": float(value)})
    return rows


CONTROL_PREFIX = "control: "
SWEEP_PREFIX = "sweep: "
SWEEP_SIGNIFICANCE = (0.0, 0.05, 0.1, 0.25)
SWEEP_COSINE = (-0.25, 0.0, 0.25)


def sweep_rows(statistics: GradientFlowStatistics, *, samples: int, seed: int) -> list[dict]:
    """At each (significance, cosine) pair: the learned rate and learned minus each weight control, paired."""
    rows = []
    for significance in SWEEP_SIGNIFICANCE:
        for cosine in SWEEP_COSINE:
            learned = SWEEP_PREFIX + sweep_key("learned", significance, cosine)
            if not statistics.images.get(learned):
                continue
            rate, _, _, _ = statistics.conflict_rates(learned)
            for control in CONTROLS:
                other = SWEEP_PREFIX + sweep_key(control, significance, cosine)
                estimate, lower, upper = statistics.paired_difference(learned, other, samples=samples, seed=seed)
                for source in range(3):
                    for region in range(MAIN_REGIONS):
                        low, high = float(lower[source, region]), float(upper[source, region])
                        supported = bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))
                        rows.append({"significance": significance, "cosine_threshold": cosine, "control": control,
                                     "source_level": source, "region": REGIONS[region],
                                     "learned_rate": float(rate[source, region]),
                                     "difference": float(estimate[source, region]), "ci95_low": low,
                                     "ci95_high": high, "supported": supported})
    return rows


def paired_rows(statistics: GradientFlowStatistics, reference: str, others: list, *, samples: int, seed: int,
                column: str = "other", name=str) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """Paired differences `reference` minus each of `others` (modes over the same images): rows (the other mode
    as name(mode) in `column`), and the (M, 3, R) estimate and bounds."""
    rows, estimates, lowers, uppers = [], [], [], []
    for other in others:
        estimate, lower, upper = statistics.paired_difference(reference, other, samples=samples, seed=seed)
        estimates.append(estimate)
        lowers.append(lower)
        uppers.append(upper)
        for source in range(3):
            for region in range(MAIN_REGIONS):
                low, high = float(lower[source, region]), float(upper[source, region])
                rows.append({column: name(other), "source_level": source,
                             "source": LEVEL_LABELS[source], "region": REGIONS[region],
                             "difference": float(estimate[source, region]), "ci95_low": low, "ci95_high": high,
                             "supported": bool(np.isfinite(low) and np.isfinite(high) and (high < 0 or low > 0)),
                             "images": statistics.images.get(reference, 0)})
    if not others:
        empty = np.zeros((0, 3, len(REGIONS)))
        return rows, empty, empty, empty
    return rows, np.stack(estimates), np.stack(lowers), np.stack(uppers)


def control_rows(statistics: GradientFlowStatistics, reference: str, *, samples: int, seed: int
                 ) -> tuple[list[dict], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Paired differences `reference` minus each control mode: rows, control names, (M, 3, R) estimate, bounds."""
    controls = [m for m in statistics.modes if m.startswith(CONTROL_PREFIX) and statistics.images.get(m)]
    rows, estimates, lower, upper = paired_rows(statistics, reference, controls, samples=samples, seed=seed,
                                                column="control", name=lambda mode: mode[len(CONTROL_PREFIX):])
    return rows, controls, estimates, lower, upper


def write_figures(context: RunContext, statistics: GradientFlowStatistics, *, samples: int) -> None:
    all_modes = [m for m in statistics.modes if statistics.images.get(m)]
    if any(m.startswith(SWEEP_PREFIX) for m in all_modes):
        context.table("gradflow_threshold_sweep", sweep_rows(statistics, samples=samples, seed=context.seed))
    all_modes = [m for m in all_modes if not m.startswith(SWEEP_PREFIX)]
    if any(m.startswith(CONTROL_PREFIX) for m in all_modes):
        rows, controls, estimates, lower, upper = control_rows(statistics, all_modes[0], samples=samples,
                                                               seed=context.seed)
        names = [c[len(CONTROL_PREFIX):] for c in controls]
        context.figure("gradflow_conflict_controls", lambda: flow_plots.paired_differences(
            names, estimates, lower, upper, reference=all_modes[0]), rows)
    modes = [m for m in all_modes if not m.startswith(CONTROL_PREFIX)]
    statistics.modes = modes
    colors = [MODE_COLORS.get(m.split(" ")[0], category_color(3 + i)) for i, m in enumerate(modes)]
    if len(modes) > 1:  # the first mode against each other one (a re-run counterfactual, a sum checkpoint)
        paired, estimates, lower, upper = paired_rows(statistics, modes[0], modes[1:], samples=samples,
                                                      seed=context.seed)
        context.figure("gradflow_conflict_paired", lambda: flow_plots.paired_differences(
            modes[1:], estimates, lower, upper, reference=modes[0], other="mode", colors=colors[1:]), paired)
    rows, intervals = conflict_rows(statistics, samples=samples, seed=context.seed)
    rates = np.stack([intervals[m][0] for m in modes])
    lower = np.stack([intervals[m][1] for m in modes])
    upper = np.stack([intervals[m][2] for m in modes])
    context.figure("gradflow_conflict", lambda: flow_plots.conflict_bars(modes, rates, lower, upper, colors=colors),
                   [r for r in rows if r["region"] in REGIONS[:MAIN_REGIONS]])
    context.table("gradflow_conflict_by_level", [r for r in rows if r["region"] not in REGIONS[:MAIN_REGIONS]])
    context.figure("gradflow_shares", lambda: flow_plots.share_matrices(
        [(m, statistics.energy_shares(m)) for m in modes]), share_rows(statistics))
    context.figure("gradflow_paths", lambda: flow_plots.path_norms(
        modes, [statistics.rms_norms(m) for m in modes], colors=colors), path_rows(statistics))
    context.table("gradflow_per_image", statistics.per_image_rows())


def run(args: argparse.Namespace, argv=None) -> RunContext:
    context = RunContext("gradflow", args, argv)
    dataset = AnalysisDataset(args.annotations, args.images, args.limit)
    model = load_analysed_model(args.weights, context.device)
    model.require_fusion_weights("pass the ASFF checkpoint as --weights and a sum-fusion one as --sum-weights.")
    dataset.check_classes(model)
    modes = args.modes or [parse_counterfactual("learned"), parse_counterfactual("uniform")]
    variants = [(model, counterfactual, mode_label(counterfactual)) for counterfactual in modes]
    context.record.add_checkpoint(model.record("model"))
    if args.sum_weights:
        sum_model = load_analysed_model(args.sum_weights, context.device)
        if sum_model.fusion_mode != "sum":
            raise AnalysisError(f"{args.sum_weights}: --sum-weights expects a sum-fusion checkpoint, this one fuses "
                                f"by {sum_model.fusion_mode!r}.")
        dataset.check_classes(sum_model)
        variants.append((sum_model, None, "sum checkpoint"))
        context.record.add_checkpoint(sum_model.record("sum fusion"))
    size = context.size_for(model)
    context.record["preprocessing"] = preprocessing_record(size)
    context.record["objective"] = "training loss (all terms, all levels) against the image's ground truth"

    record_dataset_images(context, dataset)
    with_controls = not args.no_controls and variants[0][1].is_learned
    control_modes = [CONTROL_PREFIX + name for name in ALL_CONTROLS] if with_controls else []
    context.record["conflict"] = {"significance": args.significance, "active_fraction": args.active_fraction,
                                  "cosine_threshold": args.cosine_threshold, "bootstrap_resamples": args.bootstrap,
                                  "controls": ({"names": list(ALL_CONTROLS), "seed": context.seed,
                                                "draws": "each image its own: seeded by (seed, the first 64 bits "
                                                         "of the image's sha256)",
                                                "reference": variants[0][2], "interval": "paired image bootstrap"}
                                               if with_controls else None)}
    sweep = tuple((sig, cos) for sig in SWEEP_SIGNIFICANCE for cos in SWEEP_COSINE) if with_controls and args.sweep \
        else ()
    sweep_modes = [SWEEP_PREFIX + sweep_key(name, sig, cos) for sig, cos in sweep for name in SWEPT]
    statistics = GradientFlowStatistics([label for _, _, label in variants] + control_modes + sweep_modes)
    skipped = []
    images = list(dataset)
    truths = loss_truths(images)
    streams = [context.cache.gradient_summaries(
        variant_model, truths, size=size, counterfactual=counterfactual, significance=args.significance,
        active_fraction=args.active_fraction, cosine_threshold=args.cosine_threshold,
        controls=with_controls and index == 0, control_seed=context.seed, sweep=sweep if index == 0 else (),
        **context.batching) for index, (variant_model, counterfactual, _) in enumerate(variants)]
    for image, *summaries in context.iterate(zip(images, *streams, strict=True), total=len(images),
                                             description="gradflow"):
        finite = [all(np.isfinite(value).all() for key, value in summary.items() if key not in ("controls", "sweep"))
                  for summary in summaries]
        if not all(finite):
            # A non-finite loss gradient (an untrained model's overflowing box sizes) would turn every sum into
            # NaN; the image is left out of every mode, so that all modes keep describing the same images.
            skipped.append({"image": image.file_name,
                            "modes": [label for (_, _, label), ok in zip(variants, finite, strict=True) if not ok]})
            continue
        for (_, _, label), summary in zip(variants, summaries, strict=True):
            statistics.add(label, summary, image.file_name)
        for name, summary in (summaries[0].get("controls") or {}).items():
            statistics.add(CONTROL_PREFIX + name, summary, image.file_name)
        for name, summary in (summaries[0].get("sweep") or {}).items():
            statistics.add(SWEEP_PREFIX + name, summary, image.file_name)
    context.record["skipped_images"] = skipped
    if skipped:
        logger.warning("gradflow: left out %d image(s) with non-finite gradients: %s", len(skipped),
                       ", ".join(s["image"] for s in skipped[:5]))
    if not any(statistics.images.values()):
        raise AnalysisError("gradflow: every image gave non-finite gradients; is the checkpoint trained?")
    context.record.add_outputs([statistics.save(context.out / "gradflow_statistics.npz")])  # for `replot`
    write_figures(context, statistics, samples=args.bootstrap)
    context.finish()
    return context
