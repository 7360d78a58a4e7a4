"""Training batches that depend only on ``(trial seed, step)``: resumable, and the same for any process count.

DomainBed draws, at every step, ``batch_size`` examples from each training domain. Here the draw of step ``t`` is a
pure function of the trial seed and ``t`` (and so is its augmentation), which gives two properties for free:

* a run killed at step ``t`` and resumed from a checkpoint sees exactly the batches it would have seen;
* the global batch of a step is the same whether it is computed by one process or sharded over ``P`` processes
  and ``A`` gradient-accumulation micro-steps (shard ``s = micro * P + rank`` takes every ``(A * P)``-th example).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from .data import seed_hash


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches (indices into ``ConcatDataset(domains)``) for steps ``start … steps-1``.

    Args:
        sizes: number of training examples of each training domain.
        batch_size: examples drawn from each domain per optimizer step (the global per-domain batch).
        steps: optimizer steps of the whole run.
        seed: the trial seed; with the step it fixes the draw.
        start_step: first step to yield (a resumed run starts at its checkpoint's step).
        accumulation: gradient-accumulation micro-steps per optimizer step.
        num_processes: processes the step is sharded over; ``accumulation * num_processes`` must divide the global
            batch (``batch_size * len(sizes)``).
        rank: this process's index; micro-step ``m`` of a step takes shard ``m * num_processes + rank``, i.e. every
            ``(accumulation * num_processes)``-th example of the global batch from that position on.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        steps: int,
        seed: int,
        start_step: int = 0,
        accumulation: int = 1,
        num_processes: int = 1,
        rank: int = 0,
    ):
        global_batch = batch_size * len(sizes)
        if global_batch % (accumulation * num_processes):
            raise ValueError(
                f"The global batch ({batch_size} per domain x {len(sizes)} training domains = {global_batch}) must "
                f"split evenly over {accumulation} accumulation step(s) x {num_processes} process(es); "
                "change --batch_size or --gradient_accumulation_steps."
            )
        self.sizes, self.batch_size, self.steps, self.seed = sizes, batch_size, steps, seed
        self.start_step, self.accumulation = start_step, accumulation
        self.num_processes, self.rank = num_processes, rank
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)

    def global_batch(self, step: int) -> torch.Tensor:
        """Indices of the whole step: ``batch_size`` drawn with replacement from each domain, domain-major."""
        out = []
        for d, (n, off) in enumerate(zip(self.sizes, self.offsets)):
            g = torch.Generator().manual_seed(seed_hash("batch", self.seed, step, d))
            out.append(torch.randint(n, (self.batch_size,), generator=g) + off)
        return torch.cat(out)

    def positions(self, micro: int) -> slice:
        """Which entries of the global batch this process takes at accumulation micro-step ``micro``."""
        stride = self.accumulation * self.num_processes
        return slice(micro * self.num_processes + self.rank, None, stride)

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(step)
            for micro in range(self.accumulation):
                yield batch[self.positions(micro)].tolist()

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accumulation


def collate(items) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(image, label), ...]`` → ``(images [B, 3, S, S], labels int64 [B])``."""
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# augmentation on uint8 batches, parameters drawn per global-batch position
# ----------------------------------------------------------------------------------------------------------------
def _draw(shape, g, low=0.0, high=1.0) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


def augment(
    images: torch.Tensor,
    seed: int,
    step: int,
    global_size: int,
    positions: slice,
    hflip: bool,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    jitter: float = 0.3,
    grayscale_p: float = 0.1,
) -> torch.Tensor:
    """DomainBed's augmentation on a uint8 batch ``[B, 3, S, S]``: random resized crop (scale ``crop_scale``, ratio
    3/4…4/3), optional horizontal flip, colour jitter (brightness, contrast, saturation, hue = ``jitter``) and random
    grayscale. Returns floats in [0, 1]. The parameters of the whole global batch are drawn from ``(seed, step)``
    and each example takes those of its position, so sharding does not change the result.
    """
    g = torch.Generator().manual_seed(seed_hash("augment", seed, step))
    n = global_size
    area = _draw(n, g, *crop_scale)
    log_ratio = _draw(n, g, math.log(3 / 4), math.log(4 / 3))
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx, cy = _draw(n, g, -1, 1) * (1 - w), _draw(n, g, -1, 1) * (1 - h)
    flip = (_draw(n, g) < 0.5) if hflip else torch.zeros(n, dtype=torch.bool)
    bright, contrast, sat = (_draw(n, g, 1 - jitter, 1 + jitter) for _ in range(3))
    hue = _draw(n, g, -jitter, jitter) * 0.5  # torchvision's hue range is [-0.5, 0.5] of a full turn
    gray = _draw(n, g) < grayscale_p

    sel = positions
    x = images.float() / 255.0
    b = x.shape[0]
    dev = x.device
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = (w[sel] * torch.where(flip[sel], -1.0, 1.0)).to(dev)
    theta[:, 0, 2] = cx[sel].to(dev)
    theta[:, 1, 1] = h[sel].to(dev)
    theta[:, 1, 2] = cy[sel].to(dev)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def per(v):
        return v[sel].to(dev).view(b, 1, 1, 1)

    luma = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    x = (x * per(bright)).clamp(0, 1)
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * per(contrast) + mean).clamp(0, 1)
    y = (x * luma).sum(1, keepdim=True)
    x = ((x - y) * per(sat) + y).clamp(0, 1)
    x = _rotate_hue(x, hue[sel].to(dev)).clamp(0, 1)
    y = (x * luma).sum(1, keepdim=True).expand_as(x)
    return torch.where(gray[sel].to(dev).view(b, 1, 1, 1), y, x)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue shift by ``turns`` of a full turn, as a rotation of the chroma plane in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    from_yiq = torch.linalg.inv(to_yiq)
    a = turns * 2 * math.pi
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.zeros(len(a), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = from_yiq @ rot @ to_yiq  # B, 3, 3
    return torch.einsum("bij,bjhw->bihw", m, x)


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for floats in [0, 1]."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
