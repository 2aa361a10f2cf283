"""The training data loader of an epoch: seeded shuffling, multi-scale batches, mixup on or off by phase."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .config import TrainConfig
from .distributed import DistributedContext
from .state import epoch_seed, seed_data_worker


def build_train_loader(dataset, config: TrainConfig, epoch: int, context: DistributedContext) -> DataLoader:
    """This epoch's loader over a `TrainDataset`.

    Shuffling, input sizes, mixup partners and augmentation depend only on (seed, epoch) (and the rank):
    the sampler and the loader's generator (which seeds the workers' torch RNG, from which `TrainDataset`
    draws each item's numpy Generator) are seeded per epoch.
    """
    from ..data.loading import MultiScaleBatchSampler, collate

    data, run = config.data, config.run
    final_phase = epoch >= run.epochs - config.optim.final_epochs
    dataset.mixup_enabled = data.mixup and not final_phase  # official: no mixup in the last epochs
    if context.distributed:
        sampler = DistributedSampler(dataset, context.world_size, context.rank, shuffle=True, seed=run.seed,
                                     drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed(run.seed, epoch)))
    batch_sampler = MultiScaleBatchSampler(sampler, data.batch_size, drop_last=True,
                                           sizes=range(data.min_size, data.max_size + 1, 32),
                                           change_every=data.multiscale_interval, seed=run.seed)
    batch_sampler.set_epoch(epoch)
    if epoch >= run.epochs - data.fixed_size_epochs:
        batch_sampler.fixed_size = data.input_size
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=data.workers, collate_fn=collate,
                      worker_init_fn=seed_data_worker,
                      generator=torch.Generator().manual_seed(epoch_seed(run.seed, epoch, 1 + context.rank)),
                      pin_memory=context.device.type == "cuda", persistent_workers=False)


class LimitedLoader:
    """At most `limit` batches of `loader` (for --max-iterations)."""

    def __init__(self, loader, limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index >= self.limit:
                break
            yield batch
