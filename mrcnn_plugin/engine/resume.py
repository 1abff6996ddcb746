"""What an exact resume needs beyond detectron2's checkpoint: the random states and the data
position.

detectron2's checkpoint holds the weights, the trainer's iteration and the hooks' states (the
LR scheduler's ``last_epoch``; MRCNNTrainer adds the optimizer). A resumed run still differed
from an uninterrupted one: its random generators start from the seed again (RPN / RoI sampling
draws from torch, the augmentations from numpy) and detectron2's ``TrainingSampler`` restarts
its infinite, seeded index stream at the first index. Here:

- :func:`rng_state` / :func:`load_rng_state`: python's, numpy's and torch's global generators as
  tensors and plain values, so that ``torch.load(weights_only=True)`` reads them back;
- :class:`ResumableSampler`: detectron2's sampler, started ``start`` indices in;
- :class:`ResumableLoader`: the data loader, iterated from a given iteration on. Creating a
  DataLoader iterator draws a seed from torch's global generator, in the first step of every
  run (detectron2 creates it lazily): after a resume that extra draw would shift every random
  number. Here the DataLoader draws from a generator of its own instead.

Exact (bit-identical on the CPU) when the batches are cut from the sampler's stream in order:
one process, DATALOADER.NUM_WORKERS 0, and either no aspect-ratio grouping or one image
orientation only (the grouping's half-filled buckets are not saved).
"""

import itertools
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResumableLoader", "ResumableSampler", "load_rng_state", "rng_state"]


def rng_state() -> dict:
    """The states of python's ``random``, numpy's global and torch's CPU generators, in types
    that weights-only loading accepts."""
    version, mt_words, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(mt_words, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }  # fmt: skip


def load_rng_state(state: dict) -> None:
    """Restores the generators saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({
        "bit_generator": npy["bit_generator"],
        "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"], "gauss": npy["gauss"],
    })  # fmt: skip
    torch.set_rng_state(state["torch"])


class ResumableSampler(Sampler):
    """Yields what ``sampler`` yields, without its first ``start`` indices. ``start`` may be
    changed until iteration begins (the loader's first batch)."""

    def __init__(self, sampler: Sampler, start: int = 0):
        self.sampler = sampler
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)


class ResumableLoader:
    """A training data loader over a :class:`ResumableSampler`: :meth:`start_at` makes the next
    iteration begin with the batch of a given training iteration."""

    def __init__(self, loader, sampler: ResumableSampler, batch_size: int):
        self.loader = loader
        self.sampler = sampler
        self.batch_size = batch_size  # images per iteration in this process
        self.dataset = loader.dataset
        # detectron2 returns a DataLoader, or one wrapped (aspect-ratio grouping, collate_fn)
        # in objects that keep it as ``.dataset``.
        node = loader
        for _ in range(4):
            if isinstance(node, DataLoader):
                if node.generator is None:
                    seed = int(torch.randint(2**62, ()))  # one draw, at build time in every run
                    node.generator = torch.Generator().manual_seed(seed)
                break
            node = getattr(node, "dataset", None)

    def start_at(self, iteration: int) -> None:
        self.sampler.start = iteration * self.batch_size

    def __iter__(self):
        # A generator: the DataLoader's iterator (and its workers) is made at the first batch,
        # after a resume had its chance to call start_at().
        yield from self.loader
