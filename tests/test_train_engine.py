"""Tests of the training engine (asff_viz.training.engine) on in-memory batches: DDP, non-finite losses, statistics,
checkpoints. Models are tiny (width 0.125, depth 0.33) and inputs 64 px."""

from __future__ import annotations

import gc
import math
import os
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from asff_viz import load_model
from asff_viz.models import build_model
from asff_viz.models.config import ModelConfig
from asff_viz.training.distributed import DistributedContext
from asff_viz.training.ema import ModelEMA
from asff_viz.training.engine import EpochOptions, NonFiniteLossError, train_one_epoch
from asff_viz.training.loss import build_criterion
from asff_viz.training.monitors import FusionWeightStatistics, GradientNormTracker
from asff_viz.training.params import grouped_parameters, initialize_weights, set_objectness_prior
from asff_viz.training.schedule import LearningRateSchedule, ScheduleConfig, learning_rate
from asff_viz.training.state import StepState, restore_training_state, save_training_checkpoint, training_checkpoint
from tests.conftest import calibrate_batchnorm

NUM_CLASSES = 3


def tiny_model(seed: int = 0) -> nn.Module:
    """A tiny model with the official init and BatchNorm statistics calibrated on random images.

    Calibration matters when BatchNorm is frozen: with the initial statistics (mean 0, var 1) the activations
    of a freshly initialized network grow layer by layer until exp() of the box sizes overflows.
    """
    torch.manual_seed(seed)
    model = build_model(ModelConfig(num_classes=NUM_CLASSES, width=0.125, depth=0.33))
    initialize_weights(model)
    batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    return calibrate_batchnorm(model, batches, momentum_after=0.1)


def fixed_batch(batch_size: int = 4, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.zeros(batch_size, 50, 6)
    for b in range(batch_size):
        for t in range(1 + b % 3):
            w, h = (torch.rand(2, generator=generator) * 40 + 8).tolist()
            cx, cy = (torch.rand(2, generator=generator) * (size - 16) + 8).tolist()
            labels[b, t] = torch.tensor([(b + t) % NUM_CLASSES, cx, cy, w, h, 1.0])
    return images, labels


def constant_schedule(optimizer, lr: float) -> LearningRateSchedule:
    config = ScheduleConfig(base_lr=lr, epochs=100, burn_in_epochs=0, flat_until_epoch=99, final_epochs=0)
    return LearningRateSchedule(optimizer, config, iterations_per_epoch=1)


def quiet() -> EpochOptions:
    return EpochOptions(progress=False, freeze_batchnorm=True)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------------------------------- schedule


def test_schedule_warmup_flat_cosine_floor():
    config = ScheduleConfig(base_lr=0.01, epochs=301)  # the official 0..300
    assert learning_rate(config, 0, 0, 100) == 0.0
    assert learning_rate(config, 2, 50, 100) == pytest.approx(0.01 * (250 / 500) ** 4)
    assert learning_rate(config, 10, 0, 100) == 0.01
    assert learning_rate(config, 20, 0, 100) == 0.01
    assert learning_rate(config, 145, 0, 100) == pytest.approx(1e-5 + 0.5 * (0.01 - 1e-5))  # cosine midpoint
    assert learning_rate(config, 270, 0, 100) == pytest.approx(1e-5)
    assert learning_rate(config, 290, 0, 100) == 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        ScheduleConfig(epochs=10)


# ------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, store: str, out_dir: str, poisoned_on_rank1: tuple = ()) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        model = tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        criterion = build_criterion(model.config)
        if rank == 1 and poisoned_on_rank1:
            criterion = PoisonedLoss(criterion, poisoned_on_rank1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
        schedule = constant_schedule(optimizer, 1e-4)  # small enough that no step overflows
        images, labels = fixed_batch(4)
        local = slice(2 * rank, 2 * rank + 2)  # each rank holds half of the global batch
        context = DistributedContext(rank, world_size, rank, torch.device("cpu"))
        state = StepState()
        for step in range(3):
            train_one_epoch(ddp, criterion, [(images[local], labels[local])], optimizer, schedule, 0,
                            context=context, state=state, options=quiet())
            parameters = flat_parameters(model)
            gathered = [torch.empty_like(parameters) for _ in range(world_size)]
            dist.all_gather(gathered, parameters)
            if rank == 0:
                torch.save({"step": step, "identical": all(torch.equal(gathered[0], g) for g in gathered),
                            "skipped": state.skipped_steps},
                           os.path.join(out_dir, f"step{step}.pt"))
                if step == 0:
                    torch.save(parameters, os.path.join(out_dir, "first_update.pt"))
        dist.barrier()  # no rank tears its connections down while the other still writes or waits
        # DDP's reducer must be freed while its process group lives: freed after destroy_process_group, at
        # the worker's exit, it aborted a rank in gloo ("terminate called without an active exception") in 14
        # of 80 runs; freed here, in none of 80.
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path, monkeypatch):
    # Loopback only: the spawned ranks inherit this, so gloo never depends on how the host name resolves.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # At lr 1e-4 no step is skipped (checked below; at 1e-3 the third step overflowed on every run). A rank
    # killed by a signal is retried (twice) as a safety net, with a warning, while a Python error or a failed
    # check in a rank is not; the one such death seen, a gloo abort at exit, is fixed in the worker.
    for attempt in range(3):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        try:
            mp.spawn(_ddp_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
            break
        except mp.ProcessExitedException as error:
            if attempt == 2:
                raise
            warnings.warn(f"2-process DDP run {attempt} crashed ({error}); retrying", RuntimeWarning, stacklevel=1)
    for step in range(3):
        record = torch.load(out / f"step{step}.pt", weights_only=True)
        assert record["identical"], f"ranks diverged after step {step}"
        assert record["skipped"] == 0, f"step {step} was skipped (non-finite loss): the check would be vacuous"
    # One process, same initial weights, the whole batch of 4: same first update (BatchNorm frozen, so the
    # split of the batch cannot matter; the loss is per-rank-batch normalized and DDP averages gradients).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same summation order inside each op
    try:
        model = tiny_model()
        before = flat_parameters(model).clone()
        criterion = build_criterion(model.config)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
        train_one_epoch(model, criterion, [fixed_batch(4)], optimizer, constant_schedule(optimizer, 1e-4), 0,
                        options=quiet())
    finally:
        torch.set_num_threads(threads)
    single = flat_parameters(model)
    distributed = torch.load(out / "first_update.pt", weights_only=True)
    update = single - before
    assert update.abs().max() > 1e-5
    # Only the order of float sums differs (two half batches vs one batch): float32 round-off of the weights.
    torch.testing.assert_close(distributed - before, update, rtol=1e-4, atol=5e-7)


def test_ddp_ranks_skip_a_non_finite_step_together(tmp_path, monkeypatch):
    # Only rank 1's loss is NaN at step 1: both ranks must skip it and stay in lockstep, and the run must end
    # cleanly (a skipped DDP step used to leave a gradient reduction pending).
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), (1,)), nprocs=2, join=True)
    records = [torch.load(tmp_path / f"step{step}.pt", weights_only=True) for step in range(3)]
    assert [record["skipped"] for record in records] == [0, 1, 1]
    assert all(record["identical"] for record in records)


# ------------------------------------------------------------------------------------------- non-finite


class PoisonedLoss(nn.Module):
    """The real loss, but NaN on chosen calls (counted from 0)."""

    def __init__(self, criterion, poisoned_calls):
        super().__init__()
        self.criterion, self.poisoned_calls, self.calls = criterion, set(poisoned_calls), 0

    def forward(self, outputs, labels):
        terms = self.criterion(outputs, labels)
        if self.calls in self.poisoned_calls:
            terms = {k: v * float("nan") for k, v in terms.items()}
        self.calls += 1
        return terms


def test_non_finite_loss_skips_the_step_and_stops_after_three_in_a_row():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    schedule = constant_schedule(optimizer, 0.001)
    batch = fixed_batch(2)
    criterion = PoisonedLoss(build_criterion(model.config), poisoned_calls={1, 3, 4, 5})
    state = StepState()
    options = EpochOptions(progress=False)  # BatchNorm in train mode: a skipped step must restore its statistics
    with pytest.warns(RuntimeWarning, match="non-finite"):
        # calls 0 (good), 1 (NaN: skipped), 2 (good)
        train_one_epoch(model, criterion, [batch] * 3, optimizer, schedule, 0, state=state, options=options)
    assert state.global_step == 2 and state.skipped_steps == 1 and state.consecutive_nonfinite == 0
    good_parameters = flat_parameters(model).clone()
    good_buffers = [b.clone() for b in model.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteLossError, match="3 consecutive"):
            train_one_epoch(model, criterion, [batch] * 5, optimizer, schedule, 1, state=state, options=options)
    # Calls 3, 4, 5 were all NaN: nothing changed, not even the BatchNorm running statistics.
    assert torch.equal(flat_parameters(model), good_parameters)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), good_buffers, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_training_matches_nchw():
    # One step: later steps drift apart through the loss's discrete choices (ignore mask, best anchor), which
    # round-off can flip. The NHWC update must equal the NCHW update to well under 0.1% of its size.
    initial = flat_parameters(tiny_model())
    updated = []
    for channels_last in (False, True):
        model = tiny_model()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        schedule = constant_schedule(optimizer, 0.001)
        options = EpochOptions(progress=False, freeze_batchnorm=True, channels_last=channels_last)
        train_one_epoch(model, build_criterion(model.config), [fixed_batch(2)], optimizer, schedule, 0,
                        state=StepState(), options=options)
        if channels_last:
            conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # really ran NHWC
        updated.append(flat_parameters(model) - initial)
    step_nchw, step_nhwc = updated
    assert step_nchw.abs().max() > 1e-3  # the step did move the weights
    assert (step_nhwc - step_nchw).abs().max() <= 1e-3 * step_nchw.abs().max()


# ------------------------------------------------------------------------------------------- statistics


def test_fusion_statistics_hooks_are_removed_and_weights_are_distributions():
    model = tiny_model()
    images, labels = fixed_batch(2)
    softmaxes = [level.softmax for level in model.fusion.levels]
    with FusionWeightStatistics(model) as statistics:
        assert all(len(m._forward_hooks) == 1 for m in softmaxes)
        with torch.no_grad():
            model(images)
        statistics.update(labels)
    assert all(len(m._forward_hooks) == 0 for m in softmaxes)
    rows = statistics.rows(epoch=0)
    assert len(rows) == 9  # 3 target levels x 3 sizes
    counted = [r for r in rows if r["boxes"] > 0]
    assert counted
    for row in counted:
        total = row["weight_source_0"] + row["weight_source_1"] + row["weight_source_2"]
        assert total == pytest.approx(1.0, abs=1e-4)  # a mean of softmax outputs sums to 1
    # Every box counts once per target level.
    boxes_per_level = [sum(r["boxes"] for r in rows if r["level"] == level) for level in range(3)]
    assert boxes_per_level == [int((labels[..., 3] > 0).sum())] * 3
    # The hooks are removed after an exception too.
    with pytest.raises(RuntimeError):
        with FusionWeightStatistics(model):
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in softmaxes)


def test_gradient_norms_cover_every_layer():
    model = tiny_model()
    tracker = GradientNormTracker(model)
    criterion = build_criterion(model.config)
    images, labels = fixed_batch(2)
    criterion(model(images), labels)["total"].backward()
    tracker.update()
    rows = tracker.rows(epoch=0)
    layers = {r["layer"] for r in rows}
    assert "head.levels.0.predict" in layers and "fusion.levels.2.weight_logits" in layers
    assert all(r["grad_norm"] >= 0 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows if r["layer"].startswith("backbone"))


# ------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(model, optimizer, ema=None, epoch=1):
    return training_checkpoint(model, {"class_names": ["a", "b", "c"], "input_size": 64}, optimizer=optimizer,
                               schedule=constant_schedule(optimizer, 0.001), epoch=epoch, state=StepState(5),
                               train_config={"seed": 0}, ema=ema)


def test_training_checkpoint_loads_as_a_model_and_restores_training_state(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_one_epoch(model, build_criterion(model.config), [fixed_batch(2)], optimizer,
                    constant_schedule(optimizer, 0.001), 0, options=quiet())
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # raw weights now differ from the EMA's
    path = tmp_path / "last.pt"
    save_training_checkpoint(path, _checkpoint(model, optimizer, ema, epoch=3))
    loaded = load_model(path)  # the inference model = the EMA weights
    assert torch.equal(flat_parameters(loaded), flat_parameters(ema.module))
    assert loaded.metadata["class_names"] == ["a", "b", "c"]

    restored = tiny_model(seed=9)
    restored_optimizer = torch.optim.SGD(restored.parameters(), lr=0.01, momentum=0.9)
    restored_ema = ModelEMA(restored)
    data = torch.load(path, map_location="cpu", weights_only=True)
    epoch, state = restore_training_state(data, restored, optimizer=restored_optimizer, ema=restored_ema)
    assert epoch == 3 and state.global_step == 5
    assert torch.equal(flat_parameters(restored), flat_parameters(model))  # raw weights, not the EMA's
    assert torch.equal(flat_parameters(restored_ema.module), flat_parameters(ema.module))
    momentum = [restored_optimizer.state[p]["momentum_buffer"] for p in restored.parameters()]
    expected = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected, strict=True))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "last.pt"
    save_training_checkpoint(path, _checkpoint(model, optimizer, epoch=1))
    original = path.read_bytes()
    real_save = torch.save

    def crash_mid_write(obj, stream, *args, **kwargs):
        stream.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(path, _checkpoint(model, optimizer, epoch=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["training"]["epoch"] == 1


def test_weight_decay_groups():
    model = tiny_model()
    (official,) = grouped_parameters(model, 5e-4)
    assert len(official["params"]) == len(list(model.parameters()))  # official: decay on everything
    decay, no_decay = grouped_parameters(model, 5e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    decayed = {id(p) for p in decay["params"]}
    assert id(model.backbone.stem.conv.weight) in decayed
    assert id(model.backbone.stem.bn.weight) not in decayed
    assert id(model.head.levels[0].predict.bias) not in decayed


def test_ema_follows_the_weights_with_a_ramped_decay():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.9, ramp=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = flat_parameters(ema.module).clone()
    ema.update(model)  # decay 0.9 * (1 - e^-1) = 0.569
    decay = 0.9 * (1 - math.exp(-1.0))
    torch.testing.assert_close(flat_parameters(ema.module), before + (1 - decay) * 1.0)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_objectness_prior_sets_every_slot():
    model = tiny_model()
    set_objectness_prior(model, 0.01)
    images, _ = fixed_batch(1)
    model.eval()
    with torch.no_grad():
        decoded = model.decode(model(images))
    # The bias alone sets the prior; the features add a spread around it.
    assert decoded[..., 4].median().item() == pytest.approx(0.01, rel=0.5)


def test_training_fusion_statistics_use_the_analysis_definition_of_a_boxs_cells():
    """The training log and scale-stats measure one quantity: the same cells per box (box_cell_mask), the same
    COCO bins (of the area in input pixels)."""
    from asff_viz.analyze.cells import coco_size_bins, mean_weights_in_box

    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=3).eval()
    images = torch.randn(1, 3, 64, 64)
    # Boxes smaller than a cell, thin ones, ones on cell edges and large ones: [class, cx, cy, w, h] input px.
    labels = torch.tensor([[[0, 12.0, 20.0, 4.0, 3.0], [1, 30.0, 30.0, 40.0, 20.0], [2, 8.0, 8.0, 8.0, 8.0],
                            [0, 50.0, 10.0, 2.0, 30.0], [1, 33.0, 33.0, 60.0, 60.0], [2, 4.1, 60.0, 6.5, 5.0]]])
    with FusionWeightStatistics(model) as statistics, torch.no_grad():
        model(images)
        weights = [w[0].numpy() for _, w in sorted(statistics.captured.items())]
        statistics.update(labels)
    boxes = labels[0, :, 1:].numpy()
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
    expected = np.stack([mean_weights_in_box(weights, box, model.strides) for box in xyxy])  # (N, 3, 3)
    sizes = coco_size_bins(boxes[:, 2] * boxes[:, 3])
    for level in range(3):
        for size in range(3):
            chosen = sizes == size
            if chosen.any():
                np.testing.assert_allclose(statistics.sums[level, size].numpy(), expected[chosen, level].sum(0),
                                           rtol=1e-5, atol=1e-6)
                assert int(statistics.counts[level, size]) == int(chosen.sum())
