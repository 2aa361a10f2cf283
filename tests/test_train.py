"""Tests of the training command (asff_viz.train) on a handful of tiny synthetic images: loss goes down,
exact resume, fine-tuning to another class count, non-finite losses, and a 2-process torchrun run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asff_viz.train as train_module
from asff_viz import load_model
from asff_viz.checkpoint import save_checkpoint
from asff_viz.data.augment import TrainTransform
from asff_viz.data.coco import COCODetection
from asff_viz.data.loading import TrainDataset, collate
from asff_viz.data.synthetic import generate
from asff_viz.models import build_model
from asff_viz.models.config import ModelConfig
from asff_viz.training import run as training_run
from asff_viz.training.engine import EpochOptions, train_one_epoch
from asff_viz.training.loss import build_criterion
from asff_viz.training.params import initialize_weights
from asff_viz.training.schedule import LearningRateSchedule, ScheduleConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=5, train=6, val=2, size=96)


def tiny_args(synthetic, out, epochs=2, extra=()):
    return ["--synthetic", str(synthetic.root), "--out", str(out), "--epochs", str(epochs), "--burn-in", "1",
            "--flat-until", "0", "--final-epochs", "0", "--fixed-size-epochs", "0", "--size", "64",
            "--min-size", "64", "--max-size", "96", "--batch-size", "2", "--workers", "0", "--width", "0.125",
            "--depth", "0.33", "--eval-interval", "0", "--checkpoint-interval", "1", "--lr", "0.001",
            "--no-progress", "--seed", "3", *extra]


def test_a_few_iterations_lower_the_loss(synthetic):
    torch.manual_seed(0)
    dataset = COCODetection(synthetic.train_annotations, synthetic.train_images)
    # No augmentation: the same 4 images every step, so the loss must go down.
    plain = TrainTransform(photometric=False, expand=False, crop=False, flip=False, affine=False,
                           random_interpolation=False)
    items = TrainDataset(dataset, plain, input_size=64)
    batch = collate([items[i] for i in range(4)])
    model = build_model(ModelConfig(num_classes=len(dataset.class_names), width=0.125, depth=0.33))
    initialize_weights(model)
    criterion = build_criterion(model.config)
    optimizer = torch.optim.SGD(model.parameters(), lr=2e-4, momentum=0.9)
    schedule = LearningRateSchedule(optimizer, ScheduleConfig(base_lr=2e-4, epochs=20, burn_in_epochs=0,
                                                              flat_until_epoch=19, final_epochs=0), 1)
    losses = [train_one_epoch(model, criterion, [batch], optimizer, schedule, epoch,
                              options=EpochOptions(progress=False))["total"] for epoch in range(12)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def _flat(state_dict):
    return {k: v for k, v in state_dict.items()}


def test_resume_reaches_the_same_weights(synthetic, tmp_path, monkeypatch):
    extra = ["--ema", "--ema-decay", "0.9"]
    straight = train_module.main(tiny_args(synthetic, tmp_path / "straight", extra=extra))
    assert "error" not in straight

    real_train_one_epoch = training_run.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 1:  # the epoch argument: die at the start of the second epoch
            raise KeyboardInterrupt("simulated crash")
        return real_train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(training_run, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_module.main(tiny_args(synthetic, tmp_path / "resumed", extra=extra))
    monkeypatch.setattr(training_run, "train_one_epoch", real_train_one_epoch)
    partial = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert partial["training"]["epoch"] == 1
    train_module.main(tiny_args(synthetic, tmp_path / "resumed",
                                extra=[*extra, "--resume", str(tmp_path / "resumed" / "last.pt")]))

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["training"]["epoch"] == b["training"]["epoch"] == 2
    for key in ("model",):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), "EMA weights differ"
    raw_a, raw_b = a["training"]["model"], b["training"]["model"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a), "raw weights differ"
    # ... and training really changed them.
    assert not all(torch.equal(raw_a[k], partial["training"]["model"][k]) for k in raw_a)
    # The checkpoint is a regular model checkpoint too.
    model = load_model(tmp_path / "resumed" / "last.pt")
    assert model.metadata["class_names"] == COCODetection(synthetic.train_annotations,
                                                           synthetic.train_images).class_names
    assert (tmp_path / "straight" / "fusion_weights.csv").read_text().count("\n") == 1 + 2 * 9
    assert (tmp_path / "straight" / "gradient_norms.csv").is_file()


def test_fine_tuning_to_another_class_count_keeps_box_outputs(synthetic, tmp_path):
    source = build_model(ModelConfig(num_classes=3, width=0.125, depth=0.33))
    save_checkpoint(tmp_path / "three.pt", source, {"class_names": ["a", "b", "c"], "input_size": 64})
    summary = train_module.main(tiny_args(synthetic, tmp_path / "run", epochs=1,
                                          extra=["--init", str(tmp_path / "three.pt"), "--lr", "1e-12",
                                                 "--weight-decay", "0", "--freeze-bn"]))
    assert "error" not in summary
    tuned = load_model(tmp_path / "run" / "last.pt")
    assert tuned.num_classes == 8
    old = source.head.levels[1].predict.weight
    new = tuned.head.levels[1].predict.weight
    for slot in range(4):  # rows tx, ty, tw, th, obj of each slot came over (lr ~ 0: unchanged)
        torch.testing.assert_close(new[slot * 13: slot * 13 + 5], old[slot * 8: slot * 8 + 5])
    backbone = dict(source.backbone.named_parameters())
    for name, parameter in tuned.backbone.named_parameters():
        torch.testing.assert_close(parameter, backbone[name])


def test_reset_fusion_weights_starts_the_fusion_from_uniform(synthetic, tmp_path):
    from asff_viz.introspection.capture import capture

    source = build_model(ModelConfig(num_classes=8, width=0.125, depth=0.33))
    for level in source.fusion.levels:
        torch.nn.init.normal_(level.weight_logits.weight, std=0.5)
    save_checkpoint(tmp_path / "trained.pt", source, {"class_names": list(map(str, range(8))), "input_size": 64})
    summary = train_module.main(tiny_args(synthetic, tmp_path / "run", epochs=1,
                                          extra=["--init", str(tmp_path / "trained.pt"), "--reset-fusion-weights",
                                                 "--lr", "1e-12", "--weight-decay", "0", "--freeze-bn"]))
    assert "error" not in summary
    tuned = load_model(tmp_path / "run" / "last.pt")
    for level in tuned.fusion.levels:
        assert level.weight_logits.weight.abs().max() < 1e-6 and level.weight_logits.bias.abs().max() < 1e-6
    with torch.no_grad(), capture(tuned) as recorder:
        tuned(torch.randn(1, 3, 64, 64))
    for weights in recorder.fusion_weights:
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))
    backbone = dict(source.backbone.named_parameters())  # everything else came over from the checkpoint
    for name, parameter in tuned.backbone.named_parameters():
        torch.testing.assert_close(parameter, backbone[name])


def test_reset_fusion_weights_needs_an_asff_checkpoint_to_start_from(synthetic, tmp_path):
    with pytest.raises(SystemExit):  # argparse: no --init
        train_module.parse_args(tiny_args(synthetic, tmp_path / "a", extra=["--reset-fusion-weights"]))
    save_checkpoint(tmp_path / "sum.pt", build_model(ModelConfig(num_classes=8, width=0.125, depth=0.33,
                                                                 fusion="sum")),
                    {"class_names": list(map(str, range(8))), "input_size": 64})
    with pytest.raises(SystemExit, match="only an ASFF model has fusion weights"):
        train_module.main(tiny_args(synthetic, tmp_path / "b", epochs=1,
                                    extra=["--init", str(tmp_path / "sum.pt"), "--reset-fusion-weights"]))


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(synthetic, tmp_path, monkeypatch):
    real_build = training_run.build_criterion

    class PoisonAfterFirstEpoch(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, outputs, labels):
            terms = self.criterion(outputs, labels)
            self.calls += 1
            if self.calls > 3:  # epoch 0 has 3 iterations (6 images, batch 2)
                terms = {k: v * float("inf") for k, v in terms.items()}
            return terms

    monkeypatch.setattr(training_run, "build_criterion", lambda *a, **k: PoisonAfterFirstEpoch(real_build(*a, **k)))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        summary = train_module.main(tiny_args(synthetic, tmp_path, epochs=3))
    assert "3 consecutive non-finite" in summary["error"]
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["training"]["epoch"] == 1  # written after epoch 0, never overwritten
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_torchrun_two_processes_on_cpu(synthetic, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "asff_viz.train",
               *tiny_args(synthetic, out, epochs=1, extra=["--eval-interval", "1", "--channels-last"])]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    # 6 images, 2 per process, 2 processes: one full global batch of 4 per step, 1 step (drop_last).
    assert checkpoint["training"]["global_step"] == 1
    assert (out / "metrics.csv").is_file()
    model = load_model(out / "last.pt")  # saved from a channels-last model, loads as usual
    assert model.num_classes == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_gpu(synthetic, tmp_path, amp):
    summary = train_module.main(tiny_args(synthetic, tmp_path, epochs=2,
                                          extra=["--device", "cuda", "--amp", amp, "--eval-interval", "1"]))
    assert "error" not in summary
    assert all(math.isfinite(v) for v in summary["losses"].values())
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (checkpoint["training"]["scaler"] is not None) == (amp == "fp16")
    assert load_model(tmp_path / "last.pt").num_classes == 8


def test_adamw_option_trains_and_resumes_with_its_own_state(synthetic, tmp_path):
    summary = train_module.main(tiny_args(synthetic, tmp_path / "adamw", epochs=1, extra=["--optimizer", "adamw"]))
    assert "error" not in summary and all(math.isfinite(v) for v in summary["losses"].values())
    checkpoint = torch.load(tmp_path / "adamw" / "last.pt", weights_only=True)
    states = checkpoint["training"]["optimizer"]["state"]
    assert states and all("exp_avg_sq" in state for state in states.values())  # AdamW's moments, not SGD's
    # Resumed without --optimizer: the run's own settings (AdamW) come from the checkpoint; the longer schedule
    # is a change of settings, accepted with --allow-changes.
    resumed = train_module.main(tiny_args(synthetic, tmp_path / "adamw", epochs=2,
                                          extra=["--resume", str(tmp_path / "adamw" / "last.pt"),
                                                 "--allow-changes"]))
    assert "error" not in resumed
    checkpoint = torch.load(tmp_path / "adamw" / "last.pt", weights_only=True)
    assert checkpoint["training"]["train_config"]["optim"]["optimizer"] == "adamw"
    assert checkpoint["training"]["epoch"] == 2


def test_the_parser_takes_its_defaults_from_the_config_dataclasses():
    from dataclasses import fields

    from asff_viz.training.config import FLAG_FIELDS, DataConfig, OptimConfig, RunConfig

    config = train_module.parse_args(["--train-annotations", "a.json", "--train-images", "images"])
    assert config.optim == OptimConfig() and config.run == RunConfig() and config.model == {}
    assert config.data == DataConfig(train_annotations="a.json", train_images="images")
    assert set(config.given) == {"train_annotations", "train_images"}
    # Every field is set by exactly one flag, except the multi-scale interval (official: every 10 iterations).
    targets = [(section, name) for section, name, *_ in FLAG_FIELDS.values() if section != "model"]
    assert len(targets) == len(set(targets))
    every_field = {(section, f.name) for section, cls in (("data", DataConfig), ("optim", OptimConfig),
                                                          ("run", RunConfig)) for f in fields(cls)}
    assert every_field - set(targets) == {("data", "multiscale_interval")}
