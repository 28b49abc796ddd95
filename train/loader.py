"""Batches for `fit`: a deterministic function of (seed, batch index), so a resumed run continues at the same sample.

`data` is either a map-style dataset (`len` and `[i]`; shuffled per epoch with a permutation seeded by
(seed, epoch), `batch_size` items per global batch, the incomplete last batch dropped) or an iterable of
ready global batches (re-iterated at the end of each pass; on resume the first batches are skipped, so it must
yield the same batches each pass). Under torchrun each rank takes its contiguous slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def collate(items: list) -> Any:
    """Stack a list of samples: tensors along a new dim 0, numbers into a tensor, strings into a list;
    tuples and dicts field by field."""
    first = items[0]
    if isinstance(first, Tensor):
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch samples of different shapes {sorted(shapes)[:4]}; resize or crop them")
        return torch.stack(items)
    if isinstance(first, dict):
        return {k: collate([x[k] for x in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(collate(list(col)) for col in zip(*items))
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(items)
    if first is None:
        return None
    return list(items)


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """This rank's contiguous slice (dim 0) of a global batch; every tensor's first dim must split evenly."""
    if world == 1:
        return batch
    if isinstance(batch, Tensor):
        if batch.shape[0] % world:
            raise ValueError(f"a global batch of {batch.shape[0]} does not split over {world} processes")
        n = batch.shape[0] // world
        return batch[rank * n : (rank + 1) * n]
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(v, rank, world) for v in batch)
    return batch


def is_dataset(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (Tensor, dict))


def batches(data: Any, batch_size: int | None, *, seed: int, start: int = 0, rank: int = 0, world: int = 1
            ) -> Iterator[Any]:
    """Global batches number start, start + 1, ... of `data` (this rank's slice of each), without end."""
    if is_dataset(data):
        if batch_size is None or batch_size < 1:
            raise ValueError(f"a map-style dataset needs batch_size >= 1, got {batch_size!r}")
        n = len(data)
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} (the global batch) does not split over {world} processes")
        per_epoch, local = n // batch_size, batch_size // world
        k, epoch, perm = start, None, None
        while True:
            e, i = divmod(k, per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
            idx = perm[i * batch_size + rank * local : i * batch_size + (rank + 1) * local]
            yield collate([data[j] for j in idx.tolist()])
            k += 1
    if batch_size is not None:
        raise ValueError("batch_size is for map-style datasets; an iterable yields ready batches")
    k, produced = 0, False
    while True:
        for batch in data:
            produced = True
            if k >= start:
                yield shard_batch(batch, rank, world)
            k += 1
        if not produced:
            raise ValueError("data yielded no batch")
