"""The ablation command end to end on a tiny protocol: one recipe for every mode, the table, and a re-run that
trains nothing again."""

from __future__ import annotations

import csv

import pytest

from asff_viz.experiments import ablation

TINY = ["--modes", "sum", "weighted", "--epochs", "1", "--train-images", "8", "--val-images", "4",
        "--max-iterations", "1", "--analysis-images", "2"]


def test_the_recipe_differs_only_in_fusion_seed_and_folder(tmp_path):
    preset = ablation.PRESETS["cpu"]
    first = ablation.train_arguments(preset, tmp_path, tmp_path / "a", "sum", 0, None)
    second = ablation.train_arguments(preset, tmp_path, tmp_path / "b", "asff", 1, None)
    differing = {first[i - 1] for i, (x, y) in enumerate(zip(first, second, strict=True)) if x != y}
    assert differing == {"--out", "--fusion", "--seed"}
    for epochs in (1, 2, 3, 6, 24):  # every schedule fits its epochs (the training command checks it)
        from asff_viz.training.config import check_schedule, parse_args

        args = ablation.train_arguments(ablation.replace(preset, epochs=epochs), tmp_path, tmp_path / "c", "asff",
                                        0, None)
        config = parse_args(["--train-annotations", "a.json", "--train-images", "i", *args[2:]])
        check_schedule(config)


def test_a_tiny_ablation_writes_its_table_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "ablation"
    rows = ablation.main(["--out", str(out), *TINY])
    assert [row["mode"] for row in rows] == ["sum", "weighted"]
    with open(out / "ablation.csv") as handle:
        table = list(csv.DictReader(handle))
    for column in ("mode", "AP", "AP50", "AP75", "APs", "APm", "APl", "parameters_M", "gflop_416", "latency_ms_416",
                   "conflict_positive_s8", "conflict_positive_s8_low", "conflict_background_s32_high"):
        assert column in table[0], column
    assert all(float(row["gflop_416"]) > 0 and float(row["latency_ms_416"]) > 0 for row in table)
    # A model trained for one step may give non-finite loss gradients on every image (overflowing box sizes):
    # then its conflict is n/a (empty), never a number computed from nothing.
    for row in table:
        if int(row["gradflow_images"]) > 0:
            assert float(row["conflict_positive_s32_low"]) <= float(row["conflict_positive_s32"]) <= float(
                row["conflict_positive_s32_high"])
        else:
            assert row["conflict_positive_s32"] == "" and "n/a" in (out / "ablation.md").read_text()
    names = ["ablation_ap"] + (["ablation_conflict"] if any(int(r["gradflow_images"]) for r in table) else [])
    for name in names:
        assert (out / f"{name}.png").is_file() and (out / f"{name}.pdf").is_file() and (out / f"{name}.csv").is_file()
    assert (out / "scale-stats" / "weighted_s0").is_dir()
    logs = {name: (out / "models" / name / "train.log").read_text() for name in ("sum_s0", "weighted_s0")}
    checkpoints = {name: (out / "models" / name / "last.pt").stat().st_mtime_ns for name in logs}

    again = ablation.main(["--out", str(out), *TINY])
    assert str(again) == str(rows)  # the same numbers (NaN spreads included), from the caches
    for name, text in logs.items():
        assert (out / "models" / name / "train.log").read_text() == text  # not trained again
        assert (out / "models" / name / "last.pt").stat().st_mtime_ns == checkpoints[name]
    assert [row["skipped_steps"] for row in table] == ["0", "0"]
    assert "Training steps skipped for a non-finite loss or gradients: none in any run." in (
        out / "ablation.md").read_text()

    # A run that left steps out (non-finite loss or gradients) trained on fewer updates: the report says which.
    import torch

    from asff_viz.checkpoint import atomic_save

    checkpoint = torch.load(out / "models" / "sum_s0" / "last.pt", map_location="cpu", weights_only=True)
    checkpoint["training"]["skipped_steps"] = 2
    atomic_save(checkpoint, out / "models" / "sum_s0" / "last.pt")
    assert ablation.training_record(out / "models" / "sum_s0" / "last.pt") == {"epochs": 1, "skipped_steps": 2}
    marked = ablation.main(["--out", str(out), *TINY])
    assert [row["skipped_steps"] for row in marked] == [2, 0]
    assert "(their update left out): `sum_s0` 2; none in the other runs." in (out / "ablation.md").read_text()
    with pytest.raises(SystemExit, match="another data set"):
        ablation.main(["--out", str(out), *TINY[:-6], "--val-images", "5", "--max-iterations", "1"])


def test_the_asff_runs_conflict_is_set_against_the_metrics_controls(tmp_path):
    # A lower conflict rate than the plain sum's does not show filtering on its own (peaked weights lower it
    # whatever the directions): the ablation reports the ASFF run minus each control, paired over images.
    from asff_viz.checkpoint import default_checkpoint_path
    from asff_viz.introspection.controls import ALL_CONTROLS
    from asff_viz.samples import ANNOTATIONS_FILE, SAMPLES_DIR

    if not default_checkpoint_path().is_file():
        pytest.skip("the embedded default model is not installed")
    flows = ablation.flow_statistics({"asff_s0": default_checkpoint_path()}, ANNOTATIONS_FILE, SAMPLES_DIR, 4, 128,
                                     tmp_path / "cache", ["asff_s0"])
    assert all(flows.images[ablation.control_mode("asff_s0", control)] == 4 for control in ALL_CONTROLS)
    rows = ablation.conflict_controls(flows, ["asff_s0"], samples=200)
    assert {row["control"] for row in rows} == set(ALL_CONTROLS) and len(rows) == len(ALL_CONTROLS) * 3 * 3
    shuffled = next(r for r in rows if r["control"] == "shuffled" and r["source_level"] == 1
                    and r["region"] == "positive")
    rate = flows.conflict_rates("asff_s0")[0][1, 0]
    other = flows.conflict_rates(ablation.control_mode("asff_s0", "shuffled"))[0][1, 0]
    assert shuffled["difference"] == pytest.approx(rate - other)
    table = ablation.controls_markdown(rows)
    assert table.count("| asff_s0 |") == 9 and "minus shuffled" in table and "nan" not in table
    assert ablation.controls_markdown([]) == ""
