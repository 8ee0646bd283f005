"""Which examples each optimizer step trains on, and how they become padded tensors.

The order is a pure function of (seed, epoch), so a resumed run at step s trains on exactly the
batches an uninterrupted run would have: no sampler state needs saving.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from ptst.tune.render import IGNORE, Rendered


def batches_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


def total_steps(examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """`max_steps` when given, else enough steps for `epochs` passes over the examples."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * batches_per_epoch(examples, batch_size)))


def batch_indices(step: int, examples: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): epoch-wise seeded shuffles."""
    per_epoch = batches_per_epoch(examples, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]


def loss_tokens(example: Rendered) -> int:
    """The tokens the causal-LM loss averages over: labels after the one-token shift."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def learning_rate(step: int, lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then constant or linear decay to 0 at `total`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    remaining = max(total - step, 0) / max(total - warmup, 1)
    return lr * remaining


def collate(examples: Sequence[Rendered], pad_id: int) -> dict[str, Any]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding) as tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        ids.append([*example.input_ids, *([pad_id] * pad)])
        mask.append([1] * len(example.input_ids) + [0] * pad)
        labels.append([*example.labels, *([IGNORE] * pad)])
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }
