"""Hostile input and faults on the command-line tools: each gets a clear message naming the file or flag and the
problem, the right exit status, no traceback, and nothing overwritten or lost.

The table `BAD_FLAGS` drives the flag cases; the other tests each cover one defect of the integrity audit
(repeated annotation ids, classes matched by count, unreadable images, resume settings, non-finite weights,
file names leaving the image folder, full disks, malformed COCO, colliding outputs, log rows after a resume,
misleading messages, broken links).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import asff_viz.utils.fileio
from asff_viz import bench, convert, detect, evaluate
from asff_viz import train as train_module
from asff_viz.analyze import cli as analyze_cli
from asff_viz.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from asff_viz.data import synthetic as synthetic_module
from asff_viz.data.class_names import ClassMismatchError, match_classes
from asff_viz.data.coco import COCODetection, load_rgb_image
from asff_viz.data.errors import DatasetError
from asff_viz.data.synthetic import generate
from asff_viz.detect import output_names
from asff_viz.inference.coco_eval import write_evaluation
from asff_viz.models import build_model
from asff_viz.training import run as training_run
from asff_viz.training.engine import EpochOptions, train_one_epoch
from asff_viz.training.loss import build_criterion
from asff_viz.training.monitors import truncate_csv_epochs
from asff_viz.training.schedule import LearningRateSchedule, ScheduleConfig

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


# ------------------------------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=11, train=4, val=4, size=64)


@pytest.fixture(scope="module")
def class_names(data):
    return COCODetection(data.val_annotations, data.val_images).class_names


@pytest.fixture(scope="module")
def weights(tmp_path_factory, class_names) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, build_model(width=0.125, depth=0.33, num_classes=len(class_names)),
                    {"class_names": class_names, "input_size": 64})
    return path


def run_tool(main, argv, capsys, caplog=None) -> tuple[int, str]:
    """Run a tool's `main` in-process as `python -m` would: (exit status, everything it said about errors).

    Any exception other than SystemExit escapes and fails the test: that is the traceback a user must not see.
    """
    message = ""
    try:
        result = main([str(a) for a in argv])
        code = result if isinstance(result, int) else int(isinstance(result, dict) and "error" in result)
    except SystemExit as exit_:
        code, message = (1, exit_.code) if isinstance(exit_.code, str) else (exit_.code or 0, "")
    captured = capsys.readouterr()
    logged = caplog.text if caplog is not None else ""
    return code, "\n".join(part for part in (message, captured.err, logged) if part)


def error_line(text: str) -> str:
    """The line that states the error (argparse prints its usage before it)."""
    lines = [line for line in text.splitlines() if "error" in line.lower()]
    assert lines, f"no error line in {text!r}"
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_train_args(data, out, epochs=2, extra=()):
    return ["--synthetic", data.root, "--out", out, "--epochs", epochs, "--burn-in", "0", "--flat-until", "0",
            "--final-epochs", "0", "--fixed-size-epochs", "0", "--size", "64", "--min-size", "64",
            "--max-size", "64", "--batch-size", "2", "--workers", "0", "--width", "0.125", "--depth", "0.33",
            "--eval-interval", "0", "--checkpoint-interval", "1", "--lr", "1e-4", "--optimizer", "adamw",
            "--no-progress", "--grad-norm-interval", "0", *extra]


# --------------------------------------------------------------------------------- 9. bad flag values


def _analyze(argv):
    return analyze_cli.main(argv)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("a file where a folder is expected")
    return path


# (case, tool, arguments with {data}/{weights}/{file}/{folder}, what the error line must say)
BAD_FLAGS = [
    ("detect size 0", detect.main, ["--source", "{image}", "--out", "{folder}/o", "--size", "0"], "--size"),
    ("detect size -32", detect.main, ["--source", "{image}", "--out", "{folder}/o", "--size", "-32"], "--size"),
    ("detect conf 2", detect.main, ["--source", "{image}", "--out", "{folder}/o", "--conf", "2"], "between 0 and 1"),
    ("detect out is a file", detect.main, ["--source", "{image}", "--out", "{file}"], "is a file"),
    ("evaluate conf 2", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out", "{folder}/e",
                                        "--conf", "2"], "--conf"),
    ("evaluate nms -1", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out", "{folder}/e",
                                        "--nms", "-1"], "--nms"),
    ("evaluate size 0", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out", "{folder}/e",
                                        "--size", "0"], "multiple of 32"),
    ("evaluate size -32", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out",
                                          "{folder}/e", "--size", "-32"], "multiple of 32"),
    ("evaluate batch 0", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out", "{folder}/e",
                                         "--batch-size", "0"], "--batch-size"),
    ("evaluate out is a file", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out", "{file}"],
     "is a file"),
    ("train synthetic folder missing", train_module.main, ["--synthetic", "{folder}/nothing", "--out",
                                                           "{folder}/t"], "nothing: no such folder"),
    ("train synthetic folder not a set", train_module.main, ["--synthetic", "{folder}", "--out", "{folder}/t"],
     "is not a synthetic set"),
    ("train checkpoint interval 0", train_module.main, ["--synthetic", "{root}", "--out", "{folder}/t",
                                                        "--checkpoint-interval", "0"], "--checkpoint-interval"),
    ("train out is a file", train_module.main, ["--synthetic", "{root}", "--out", "{file}"], "is a file"),
    ("train size 100", train_module.main, ["--synthetic", "{root}", "--out", "{folder}/t", "--size", "100"],
     "multiple of 32"),
    ("train lr -1", train_module.main, ["--synthetic", "{root}", "--out", "{folder}/t", "--lr", "-1"], "--lr"),
    ("train schedule too long", train_module.main, ["--synthetic", "{root}", "--out", "{folder}/t", "--epochs",
                                                    "3"], "--flat-until"),
    ("analyze png-dpi 0", _analyze, ["figure3", "--images", "{image}", "--out", "{folder}/a", "--png-dpi", "0"],
     "--png-dpi"),
    ("analyze out is a file", _analyze, ["figure3", "--images", "{image}", "--out", "{file}"], "is a file"),
    ("analyze size 0", _analyze, ["scale-stats", "--annotations", "{ann}", "--images", "{images}", "--out",
                                  "{folder}/a", "--size", "0"], "multiple of 32"),
    ("bench sizes 100", bench.main, ["--sizes", "100", "--out", "{folder}/b.json"], "multiple of 32"),
    ("bench batches 0", bench.main, ["--batches", "0", "--out", "{folder}/b.json"], "--batches"),
    ("bench bad weights", bench.main, ["--weights", "{file}", "--out", "{folder}/b.json"], "results.txt"),
    ("bench out is a folder", bench.main, ["--out", "{folder}"], "is a folder"),
    ("synthetic val -1", synthetic_module.main, ["--out", "{folder}/s", "--val", "-1"], "--val"),
    ("synthetic objects", synthetic_module.main, ["--out", "{folder}/s", "--min-objects", "5", "--max-objects",
                                                  "2"], "min_objects"),
    ("synthetic out is a file", synthetic_module.main, ["--out", "{file}"], "is a file"),
    ("convert destination is a folder", convert.main, ["{weights}", "{folder}"], "is a folder"),
]
if not torch.cuda.is_available():
    BAD_FLAGS += [
        ("detect device cuda", detect.main, ["--source", "{image}", "--out", "{folder}/o", "--device", "cuda"],
         "no CUDA device"),
        ("evaluate device cuda", evaluate.main, ["--annotations", "{ann}", "--images", "{images}", "--out",
                                                 "{folder}/e", "--device", "cuda"], "no CUDA device"),
        ("train device cuda", train_module.main, ["--synthetic", "{root}", "--out", "{folder}/t", "--device",
                                                  "cuda"], "no CUDA device"),
    ]


@pytest.mark.parametrize("case, main, argv, expected", BAD_FLAGS, ids=[case[0] for case in BAD_FLAGS])
def test_bad_flag_values_are_refused_before_any_work(case, main, argv, expected, data, weights, a_file, tmp_path,
                                                     capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    image = next(iter(sorted(data.val_images.iterdir())))
    values = {"data": data.root, "root": data.root, "ann": data.val_annotations, "images": data.val_images,
              "image": image, "weights": weights, "file": a_file, "folder": folder}
    before = snapshot(tmp_path)
    code, text = run_tool(main, [str(a).format(**values) for a in argv], capsys)
    assert code == 2, (case, code, text)
    line = error_line(text)
    assert expected in line, (case, line)
    assert snapshot(tmp_path) == before  # nothing written, nothing overwritten
    assert "Traceback" not in text


# ------------------------------------------------------------------------------ 1. the non-finite guard


def test_weights_that_turn_nan_are_never_saved_and_the_good_checkpoint_is_named(data, tmp_path, capsys, caplog,
                                                                               monkeypatch):
    out = tmp_path / "run"
    code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=1), capsys)
    assert code == 0, text
    good = (out / "last.pt").read_bytes()
    real = training_run.train_one_epoch

    def poisoning(model, *args, **kwargs):  # a step with a finite loss that leaves NaN weights behind
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(training_run, "train_one_epoch", poisoning)
    code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=3, extra=[
        "--resume", out / "last.pt", "--allow-changes"]), capsys, caplog)
    assert code == 1
    assert "NaN or infinity" in text and "not saved" in text
    assert f"The last good checkpoint is {out / 'last.pt'} (the checkpoint this run resumed)" in text
    assert (out / "last.pt").read_bytes() == good  # the good file was not replaced
    assert not list(out.glob(".*.tmp"))


def test_exploded_but_finite_weights_are_caught_by_the_probe(tmp_path):
    model = build_model(width=0.125, depth=0.33, num_classes=3)
    probe = training_run.weight_probe(64, torch.device("cpu"))
    assert training_run.unsound_weights(model, None, probe) is None
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 4:
                parameter.mul_(1e6)  # finite, but the activations overflow float32
    problem = training_run.unsound_weights(model, None, probe)
    assert problem is not None and "non-finite outputs" in problem


def test_an_epoch_without_a_step_stops_the_run_and_saves_nothing(data, tmp_path, capsys, caplog, monkeypatch):
    def no_step(*args, **kwargs):
        return {"anchor": 0.0, "iou": 0.0, "l1": 0.0, "obj": 0.0, "cls": 0.0, "total": 0.0, "images": 0,
                "seconds": 0.1, "skipped_steps": 2, "steps": 0}

    monkeypatch.setattr(training_run, "train_one_epoch", no_step)
    out = tmp_path / "run"
    code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=1), capsys, caplog)
    assert code == 1 and "every step was skipped" in text and "No checkpoint was saved" in text
    assert "loss 0.000" not in text
    assert not (out / "last.pt").exists()


def test_a_step_with_finite_loss_but_non_finite_gradients_is_skipped():
    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=3)
    criterion = build_criterion(model.config)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    schedule = LearningRateSchedule(optimizer, ScheduleConfig(base_lr=1e-3, epochs=2, burn_in_epochs=0,
                                                              flat_until_epoch=1, final_epochs=0), 1)
    parameter = next(model.parameters())
    handle = parameter.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[[0, 20, 20, 10, 10, 1]], [[1, 40, 30, 12, 8, 1]]], dtype=torch.float32)
    try:
        with pytest.warns(RuntimeWarning, match="non-finite gradients"):
            result = train_one_epoch(model, criterion, [(images, labels)], optimizer, schedule, 0,
                                     options=EpochOptions(progress=False))
    finally:
        handle.remove()
    assert result["steps"] == 0 and result["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------------ 2 and 10. annotation files


def _document(data) -> dict:
    return json.loads(Path(data.val_annotations).read_text())


def _targets_by_file(dataset: COCODetection) -> dict[str, list]:
    return {dataset.info(i)["file_name"]: sorted(map(tuple, dataset.targets(i).tolist())) for i in range(len(dataset))}


def test_repeated_and_missing_annotation_ids_keep_every_image_its_own_boxes(data, tmp_path, caplog):
    expected = _targets_by_file(COCODetection(data.val_annotations, data.val_images))
    same_id = _document(data)
    for annotation in same_id["annotations"]:
        annotation["id"] = 7
    (tmp_path / "same.json").write_text(json.dumps(same_id))
    dataset = COCODetection(tmp_path / "same.json", data.val_images)
    assert _targets_by_file(dataset) == expected
    assert "appear more than once" in caplog.text
    mixed = _document(data)  # half without an id, the rest numbered 1, 2, ...: the old numbering collided
    for index, annotation in enumerate(mixed["annotations"]):
        if index % 2:
            del annotation["id"]
        else:
            annotation["id"] = index // 2 + 1
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    assert _targets_by_file(COCODetection(tmp_path / "mixed.json", data.val_images)) == expected


@pytest.mark.parametrize("case, change, message", [
    ("width as a string", lambda d: d["images"][0].__setitem__("width", "64"), "positive integers"),
    ("list as an image id", lambda d: d["images"][0].__setitem__("id", [1]), "is not an integer"),
    ("category id repeated", lambda d: d["categories"].append(dict(d["categories"][0], name="extra")),
     "appears twice"),
    ("category name missing", lambda d: d["categories"][0].pop("name"), "string 'name'"),
    ("file listed twice", lambda d: d["images"][1].__setitem__("file_name", "./" + d["images"][0]["file_name"]),
     "appears twice"),
])
def test_malformed_coco_structure_is_one_clear_error(case, change, message, data, tmp_path):
    document = _document(data)
    change(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=message) as raised:
        COCODetection(path, data.val_images)
    assert "bad.json" in str(raised.value)


@pytest.mark.parametrize("field, value", [
    ("area", "abc"), ("area", float("nan")), ("iscrowd", "yes"), ("iscrowd", 1.0), ("category_id", 1.0),
    ("category_id", True), ("image_id", 1.0), ("bbox", [True, 2, 10, 10]),
])
def test_an_annotation_with_a_malformed_field_is_skipped_and_counted(field, value, data, tmp_path, caplog):
    # Each once passed unnoticed (a NaN area counts in every COCOeval size range; 1.0 as a category id moved AP)
    # or stopped evaluation with a traceback ("yes" as iscrowd, a string as area).
    document = _document(data)
    expected = sum(len(COCODetection(data.val_annotations, data.val_images).targets(i)) for i in range(4))
    document["annotations"][0][field] = value
    path = tmp_path / "field.json"
    path.write_text(json.dumps(document))
    with caplog.at_level(logging.INFO):
        dataset = COCODetection(path, data.val_images)
    assert sum(len(dataset.targets(i)) for i in range(len(dataset))) == expected - 1
    assert dataset.skipped["malformed_box" if field == "bbox" else "malformed_field"] == 1
    assert "skipped 1 annotations" in caplog.text


def test_deeply_nested_json_is_one_clear_error(data, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="deep.json.*nested too deeply"):
        COCODetection(path, data.val_images)


def test_file_names_that_leave_the_image_folder_are_skipped_not_opened(data, tmp_path, caplog):
    document = _document(data)
    document["images"][0]["file_name"] = "/etc/passwd"
    document["images"][1]["file_name"] = "../" + Path(data.val_images).name + "/" + document["images"][1]["file_name"]
    path = tmp_path / "escape.json"
    path.write_text(json.dumps(document))
    dataset = COCODetection(path, data.val_images)
    assert len(dataset) == len(document["images"]) - 2
    assert dataset.skipped["unsafe_path"] == 2 and "leaves the image folder" in caplog.text


# ---------------------------------------------------------------------------- 3. classes by name


def test_classes_are_matched_by_name():
    assert match_classes(["a", "b"], ["a", "b"], "m.pt", "d.json") == ([0, 1], None)
    mapping, note = match_classes(["b", "a", "c"], ["a", "b", "c"], "m.pt", "d.json")
    assert mapping == [1, 0, 2] and "matched by name" in note
    mapping, note = match_classes(["class_0", "class_1"], ["x", "y"], "m.pt", "d.json")
    assert mapping == [0, 1] and "by position" in note
    with pytest.raises(ClassMismatchError, match="only in the checkpoint: b.*only in the dataset: z"):
        match_classes(["a", "b"], ["a", "z"], "m.pt", "d.json")
    with pytest.raises(ClassMismatchError, match="2 categories but m.pt predicts 3"):
        match_classes(["a", "b", "c"], ["a", "b"], "m.pt", "d.json")


def _renamed(data, tmp_path, rename) -> Path:
    document = _document(data)
    for category in document["categories"]:
        category["name"] = rename(category["name"])
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(document))
    return path


def test_evaluate_refuses_other_class_names_and_remaps_reordered_ones(data, weights, tmp_path, capsys, caplog):
    other = _renamed(data, tmp_path, lambda name: name.upper())
    code, text = run_tool(evaluate.main, ["--weights", weights, "--annotations", other, "--images", data.val_images,
                                          "--out", tmp_path / "e1"], capsys)
    assert code == 1 and "renamed.json" in error_line(text) and "only in the checkpoint" in text
    assert not (tmp_path / "e1").exists()
    document = _document(data)  # the same categories, their ids in reverse order of the names
    ids = [category["id"] for category in document["categories"]]
    remap = dict(zip(ids, reversed(ids), strict=True))
    for category in document["categories"]:
        category["id"] = remap[category["id"]]
    for annotation in document["annotations"]:
        annotation["category_id"] = remap[annotation["category_id"]]
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(document))
    code, text = run_tool(evaluate.main, ["--weights", weights, "--annotations", reordered, "--images",
                                          data.val_images, "--out", tmp_path / "e2", "--conf", "0.001"], capsys,
                          caplog)
    assert code == 0 and "matched by name" in text
    written = json.loads((tmp_path / "e2" / "detections.json").read_text())
    model_names = load_model(weights).metadata["class_names"]
    by_name = {category["name"]: category["id"] for category in document["categories"]}
    assert written and all(record["category_id"] in by_name.values() for record in written)
    # every written id is the id the *reordered* file gives the model's class name
    original = {category["id"]: category["name"] for category in _document(data)["categories"]}
    assert {original[remap[r["category_id"]]] for r in written} <= set(model_names)


# ------------------------------------------------------------------------------ 4. unreadable images


def _with_corrupt_images(data, tmp_path, count) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, path in enumerate(sorted(Path(data.val_images).iterdir())):
        target = folder / path.name
        target.write_bytes(b"\xff\xd8\xff\xe0 cut off" if index < count else path.read_bytes())
    return folder


def test_evaluate_skips_an_unreadable_image_with_a_count(data, weights, tmp_path, capsys, caplog):
    images = _with_corrupt_images(data, tmp_path, 1)
    code, text = run_tool(evaluate.main, ["--weights", weights, "--annotations", data.val_annotations, "--images",
                                          images, "--out", tmp_path / "out"], capsys, caplog)
    assert code == 0, text
    assert "skipped 1 of 4 images" in text
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["settings"]["images"] == 3 and len(metrics["settings"]["unreadable_images"]) == 1


def test_evaluate_fails_clearly_when_no_image_can_be_read(data, weights, tmp_path, capsys):
    images = _with_corrupt_images(data, tmp_path, 4)
    code, text = run_tool(evaluate.main, ["--weights", weights, "--annotations", data.val_annotations, "--images",
                                          images, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "none of the 4 images" in error_line(text)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_training_replaces_an_unreadable_image_and_counts_it(data, tmp_path, capsys, caplog):
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.json").write_bytes(Path(data.train_annotations).read_bytes())
    (root / "images").mkdir()
    train_images = root / "images" / "train"
    train_images.mkdir()
    for index, path in enumerate(sorted(Path(data.train_images).iterdir())):
        (train_images / path.name).write_bytes(b"not an image" if index == 0 else path.read_bytes())
    args = tiny_train_args(data, tmp_path / "run", epochs=1)
    args[1] = root
    code, text = run_tool(train_module.main, args, capsys, caplog)
    assert code == 0, text
    assert "could not be read and were replaced" in text
    assert (tmp_path / "run" / "last.pt").is_file()


def test_the_pixel_limit_applies_to_datasets(tmp_path):
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((64, 64, 3), np.uint8))
    assert load_rgb_image(path).shape == (64, 64, 3)
    with pytest.raises(DatasetError, match="big.png.*more than"):
        load_rgb_image(path, max_pixels=1000)


# ---------------------------------------------------------------------------------------- 5. resume


def test_resume_refuses_changed_settings_unless_allowed(data, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert run_tool(train_module.main, tiny_train_args(data, out, epochs=1), capsys)[0] == 0
    good = (out / "last.pt").read_bytes()
    for flag, value in (("--seed", "5"), ("--lr", "1e6"), ("--batch-size", "1"), ("--no-mixup", None)):
        extra = ["--resume", out / "last.pt", flag] + ([value] if value else [])
        code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=1, extra=extra), capsys)
        assert code == 1 and "was started with other settings" in text and "--allow-changes" in text, flag
        assert (out / "last.pt").read_bytes() == good
    # Without flags the run's own settings are used, optimizer included (AdamW here, not the SGD default).
    args = ["--synthetic", data.root, "--out", out, "--resume", out / "last.pt", "--epochs", "2",
            "--allow-changes", "--no-progress"]
    code, text = run_tool(train_module.main, args, capsys, caplog)
    assert code == 0, text
    assert "resume: epochs: 1 -> 2 (--allow-changes)" in text
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["training"]["train_config"]["optim"]["optimizer"] == "adamw"


def test_a_new_run_does_not_overwrite_another_runs_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tool(train_module.main, tiny_train_args(data, out, epochs=1), capsys)[0] == 0
    before = snapshot(out)
    code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=1), capsys)
    assert code == 1 and "already holds a run's last.pt" in text and "--resume" in text
    assert snapshot(out) == before


def test_log_rows_of_an_interrupted_epoch_are_not_repeated_and_stale_temporaries_go(data, tmp_path, capsys,
                                                                                      monkeypatch):
    out = tmp_path / "run"
    real = training_run.train_one_epoch

    def dies_after_logging(*args, **kwargs):
        result = real(*args, **kwargs)
        if args[5] == 1:  # epoch 1 ran and logged its scalars, then the process dies before its checkpoint
            raise KeyboardInterrupt("killed")
        return result

    monkeypatch.setattr(training_run, "train_one_epoch", dies_after_logging)
    with pytest.raises(KeyboardInterrupt):
        train_module.main([str(a) for a in tiny_train_args(data, out, epochs=2, extra=["--log-interval", "1"])])
    monkeypatch.setattr(training_run, "train_one_epoch", real)
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=2, extra=[
        "--log-interval", "1", "--resume", out / "last.pt"]), capsys)
    assert code == 0, text
    assert not (out / ".last.pt.abc123.tmp").exists()
    for name in ("fusion_weights.csv", "scalars.csv"):
        rows = (out / name).read_text().splitlines()
        assert len(rows) == len(set(rows)), name  # no row twice


def test_truncate_csv_epochs(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,value\n0,1\n1,2\n1,3\n2,4\n")
    assert truncate_csv_epochs(path, 1) == 3
    assert path.read_text().splitlines() == ["epoch,value", "0,1"]
    assert truncate_csv_epochs(tmp_path / "absent.csv", 0) == 0


def test_synthetic_set_without_validation_trains(tmp_path, capsys):
    paths = generate(tmp_path / "data", seed=2, train=4, val=0, size=64)
    args = tiny_train_args(paths, tmp_path / "run", epochs=1)
    code, text = run_tool(train_module.main, args, capsys)
    assert code == 0, text
    assert (tmp_path / "run" / "last.pt").is_file()


# ------------------------------------------------------------------------------ 6. non-finite weights


def test_checkpoints_with_nan_weights_are_refused_naming_the_tensors(weights, tmp_path, capsys):
    data = torch.load(weights, weights_only=True)
    key = sorted(data["model"])[3]
    data["model"][key] = torch.full_like(data["model"][key], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=rf"nan\.pt: 1 of \d+ tensors hold NaN or infinite values \({key}\)"):
        load_model(path)
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    code, text = run_tool(detect.main, ["--weights", path, "--source", image, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "NaN" in error_line(text)


def test_a_bad_stored_input_size_names_the_file(weights, tmp_path):
    data = torch.load(weights, weights_only=True)
    data["metadata"]["input_size"] = 100
    path = tmp_path / "size.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"size\.pt: its stored input size 100"):
        load_model(path)


# --------------------------------------------------------------------------------------- 8. full disks


class _FullDisk:
    """Files opened by `atomic_write` accept `room` bytes, then fail as a full disk does (ENOSPC)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.real = os.fdopen

    def __call__(self, handle, mode="r", *args, **kwargs):
        stream = self.real(handle, mode, *args, **kwargs)
        room = self.room
        real_write = stream.write

        def write(data):
            nonlocal room
            if len(data) > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            room -= len(data)
            return real_write(data)

        stream.write = write
        return stream


def test_results_are_never_left_truncated_on_a_full_disk(tmp_path, monkeypatch):
    write_evaluation(tmp_path, {"AP": 0.5}, [{"image_id": 1}], {"settings": {}})
    before = snapshot(tmp_path)
    monkeypatch.setattr(asff_viz.utils.fileio.os, "fdopen", _FullDisk(room=10))
    with pytest.raises(OSError) as raised:
        write_evaluation(tmp_path, {"AP": 0.9}, [{"image_id": 2}] * 100, {"settings": {}})
    assert raised.value.errno == errno.ENOSPC
    assert snapshot(tmp_path) == before  # the previous files are intact, no temporaries remain


def test_a_checkpoint_save_on_a_full_disk_raises_the_disk_error_not_torch_s(weights, tmp_path, monkeypatch):
    model = load_model(weights)
    target = tmp_path / "model.pt"
    save_checkpoint(target, model, model.metadata)
    before = target.read_bytes()
    monkeypatch.setattr(asff_viz.utils.fileio.os, "fdopen", _FullDisk(room=4096))
    with pytest.raises(OSError) as raised:
        save_checkpoint(target, model, model.metadata)
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and snapshot(tmp_path) == {"model.pt": before}


def test_training_on_a_full_disk_stops_with_the_reason_and_keeps_the_last_checkpoint(data, tmp_path, capsys,
                                                                                     caplog, monkeypatch):
    out = tmp_path / "run"
    assert run_tool(train_module.main, tiny_train_args(data, out, epochs=1), capsys)[0] == 0
    good = (out / "last.pt").read_bytes()
    monkeypatch.setattr(asff_viz.utils.fileio.os, "fdopen", _FullDisk(room=4096))
    code, text = run_tool(train_module.main, tiny_train_args(data, out, epochs=2, extra=[
        "--resume", out / "last.pt", "--allow-changes"]), capsys, caplog)
    assert code == 1 and "no space left on the device" in text and "inline_container" not in text
    assert (out / "last.pt").read_bytes() == good


@pytest.mark.skipif(ROOT, reason="root may write anywhere: permissions cannot be tested as root")
def test_an_unwritable_output_folder_is_refused_before_work(data, weights, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, text = run_tool(evaluate.main, ["--weights", weights, "--annotations", data.val_annotations,
                                              "--images", data.val_images, "--out", locked / "out"], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and "no permission to write" in error_line(text)


# ------------------------------------------------------------------------- 11 and 15. detect's files


def test_outputs_of_sources_sharing_a_stem_do_not_collide():
    names = output_names([Path("clip.avi"), Path("clip.mp4"), Path("photo.jpg"), Path("other.mov")])
    assert names == {Path("clip.avi"): "clip_avi.mp4", Path("clip.mp4"): "clip_mp4.mp4",
                     Path("photo.jpg"): "photo.jpg", Path("other.mov"): "other.mp4"}
    assert len(set(names.values())) == len(names)


def test_broken_symlinks_are_counted_as_skipped(weights, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    folder = tmp_path / "source"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), np.zeros((32, 32, 3), np.uint8))
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    code, text = run_tool(detect.main, ["--weights", weights, "--source", folder, "--out", tmp_path / "out"],
                          capsys, caplog)
    assert code == 0
    assert "gone.jpg: a broken symbolic link" in text and "(1 skipped)" in text


# --------------------------------------------------------------------------------------- 14. messages


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_checkpoint_refusals_say_what_is_wrong(tmp_path):
    cases = {}
    buffer = io.BytesIO()
    torch.save({"model": _Payload()}, buffer)
    cases["code.pt"] = (buffer.getvalue(), "refused: loading it would import and run Python code")
    cases["code.pkl"] = (pickle.dumps({"model": _Payload()}), "refused: loading it would import and run Python code")
    cases["random.pt"] = (np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint: neither")
    cases["plain.pkl"] = (pickle.dumps({"w": [1, 2]}, protocol=4), "a plain pickle")
    for name, (payload, message) in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(tmp_path / name)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path / "folder.pt")


def test_resume_of_a_missing_file_does_not_suggest_the_default_model(data, tmp_path, capsys):
    code, text = run_tool(train_module.main, tiny_train_args(data, tmp_path / "run", extra=[
        "--resume", tmp_path / "absent.pt"]), capsys)
    assert code == 1 and "absent.pt: no such checkpoint file" in text and "embedded default" not in text
    code, text = run_tool(convert.main, [tmp_path / "absent.pth", tmp_path / "out.pt"], capsys)
    assert code == 1 and "absent.pth" in text and "embedded default" not in text


def test_messages_name_flags_that_exist():
    with pytest.raises(ValueError) as raised:
        ScheduleConfig(base_lr=1e-3, epochs=3, burn_in_epochs=5, flat_until_epoch=20, final_epochs=30)
    flags = {word.strip(",.;()") for word in str(raised.value).replace("/", " ").split() if word.startswith("--")}
    parser_flags = {option for action in train_module.build_parser()._actions for option in action.option_strings}
    assert flags and flags <= parser_flags


@pytest.mark.skipif(ROOT, reason="root reads every file: permissions cannot be tested as root")
def test_permission_denied_is_not_called_corrupt(weights, tmp_path):
    locked = tmp_path / "locked.pt"
    locked.write_bytes(weights.read_bytes())
    locked.chmod(0o000)
    with pytest.raises(CheckpointError, match="permission denied"):
        read_checkpoint(locked)


def test_a_folder_is_not_reported_as_missing(data, tmp_path):
    with pytest.raises(DatasetError, match="is a folder"):
        COCODetection(tmp_path, data.val_images)


# ---------------------------------------------------------------- as a user runs them: no traceback


@pytest.mark.parametrize("argv, message", [
    (["-m", "asff_viz.evaluate", "--annotations", "{ann}", "--images", "{images}", "--out", "{out}", "--conf", "2"],
     "--conf"),
    (["-m", "asff_viz.detect", "--weights", "{bad}", "--source", "{images}", "--out", "{out}"], "bad.pt"),
])
def test_the_real_command_line_prints_one_error_and_no_traceback(argv, message, data, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    values = {"ann": data.val_annotations, "images": data.val_images, "out": tmp_path / "out", "bad": bad}
    completed = subprocess.run([sys.executable, *[a.format(**values) for a in argv]], capture_output=True,
                               text=True, cwd=REPO, timeout=120)
    assert completed.returncode in (1, 2)
    assert "Traceback" not in completed.stderr
    assert message in error_line(completed.stderr)


@pytest.mark.parametrize("case", ["corrupt", "folder"])
def test_figure3_checks_every_image_before_loading_a_model(case, data, tmp_path, capsys, monkeypatch):
    from asff_viz.analyze import figure3

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(figure3, "load_analysed_model", no_model)
    good = sorted(data.val_images.iterdir())[0]
    bad = tmp_path / ("broken.jpg" if case == "corrupt" else "a_folder")
    if case == "corrupt":
        bad.write_bytes(good.read_bytes()[:40])
    else:
        bad.mkdir()
    code, said = run_tool(_analyze, ["figure3", "--images", good, bad, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert str(bad) in error_line(said)
    assert ("not a readable image" if case == "corrupt" else "is a folder") in error_line(said)
    assert not any(path.is_file() for path in (tmp_path / "out").rglob("*"))  # nothing written


def test_analyses_warn_before_work_when_images_are_not_the_annotated_size(data, weights, tmp_path, capsys, caplog):
    document = _document(data)
    document["images"][0]["width"] += 17
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps(document))
    out = tmp_path / "out"
    code, said = run_tool(_analyze, ["scale-stats", "--weights", weights, "--annotations", path, "--images",
                                     data.val_images, "--out", out, "--no-progress"], capsys, caplog)
    assert code == 0
    assert "1 of 4 images are not the size sizes.json gives them" in said
    assert document["images"][0]["file_name"] in said
    record = json.loads((out / "run.json").read_text())
    assert record["dataset"]["size_mismatches"] == [document["images"][0]["file_name"]]


def test_header_size_applies_the_exif_orientation_as_the_readers_do(tmp_path):
    from PIL import Image

    from asff_viz.inference.transforms import header_size, read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 100 x 40, shown 40 x 100
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(tmp_path / "rotated.jpg", exif=exif)
    height, width = read_image(tmp_path / "rotated.jpg").shape[:2]
    assert header_size(tmp_path / "rotated.jpg") == (width, height) == (40, 100)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert header_size(tmp_path / "broken.jpg") is None
