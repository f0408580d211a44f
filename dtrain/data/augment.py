"""Batched augmentation on the device: uint8 N x C x H x W in, normalised float out.

Random crop after padding (zero or reflect), flips, translation/rotation, and Cutout all run on whole
batches wherever the images are (GPU or CPU), driven by a generator seeded from (seed, epoch, batch,
rank), so a run, and a resumed run, draws the same augmentations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentSpec:
    crop_padding: int = 0
    pad_mode: str = "constant"
    hflip: bool = False
    vflip: bool = False
    translate: float = 0.0
    rotate: float = 0.0
    cutout_holes: int = 0
    cutout_length: int = 16

    @classmethod
    def from_config(cls, cfg) -> "AugmentSpec":
        if not cfg.augment:
            return cls()
        return cls(cfg.crop_padding, cfg.pad_mode, cfg.hflip, cfg.vflip, cfg.translate, cfg.rotate,
                   cfg.cutout_holes, cfg.cutout_length)


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """A 63-bit seed for one batch: the four numbers mixed (splitmix64 steps), so no two
    (seed, epoch, batch, rank) of a run share a stream."""
    h = 0x9E3779B97F4A7C15
    for v in (seed, epoch, batch, rank):
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h >> 1


def batch_generator(device, seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(batch_seed(seed, epoch, batch, rank))
    return g


class BatchRNG:
    """The training loop's augmentation generator: one per process, re-seeded for every batch.

    A batch's draws depend only on (seed, epoch, batch index, rank), so a run resumed mid-epoch draws
    the same augmentations for the remaining batches. Re-seeding sets the host-side seed and Philox
    offset only: no device work, no synchronisation, and no new generator object per step.
    """

    def __init__(self, device, seed: int, rank: int):
        self.generator = torch.Generator(device=device)
        self.seed, self.rank = seed, rank

    def batch(self, epoch: int, batch: int) -> torch.Generator:
        return self.generator.manual_seed(batch_seed(self.seed, epoch, batch, self.rank))


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices outside 0..n-1 back inside, without repeating the edge (as reflect padding does)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mode: str = "constant") -> torch.Tensor:
    """out[n, :, i, j] = x[n, :, i + dy[n], j + dx[n]]: a random crop of the padded image, per sample."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None] + dy[:, None]     # N x H
    cols = torch.arange(w, device=x.device)[None] + dx[:, None]     # N x W
    if mode == "reflect":
        rows, cols, inside = _reflect(rows, h), _reflect(cols, w), None
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return out if inside is None else out * inside[:, None].to(out.dtype)


def flip(x: torch.Tensor, p_mask: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(p_mask[:, None, None, None], x.flip(dim), x)


def affine(x: torch.Tensor, angle_deg: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Rotate by angle and translate by (tx, ty) (fractions of the size), zero fill; float input."""
    a = angle_deg * math.pi / 180
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([cos, -sin, 2 * tx], 1), torch.stack([sin, cos, 2 * ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, holes: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Zero `holes` squares of side `length` per image, centred anywhere (clipped at the border)."""
    n, _, h, w = x.shape
    keep = torch.ones(n, h, w, dtype=torch.bool, device=x.device)
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for _ in range(holes):
        cy = torch.randint(0, h, (n,), generator=g, device=x.device)
        cx = torch.randint(0, w, (n,), generator=g, device=x.device)
        y0, x0 = cy - length // 2, cx - length // 2
        in_y = (ys[None] >= y0[:, None]) & (ys[None] < y0[:, None] + length)
        in_x = (xs[None] >= x0[:, None]) & (xs[None] < x0[:, None] + length)
        keep &= ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


class Pipeline:
    """uint8 batch -> (augmented) normalised float batch, in the model's memory format."""

    def __init__(self, spec: AugmentSpec, mean, std, device, channels_last: bool = False):
        self.spec = spec
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        s = self.spec
        train = g is not None
        n = x.shape[0]
        dev = x.device
        if train and s.crop_padding:
            d = torch.randint(-s.crop_padding, s.crop_padding + 1, (2, n), generator=g, device=dev)
            x = shift(x, d[0], d[1], s.pad_mode)
        if train and s.hflip:
            x = flip(x, torch.rand(n, generator=g, device=dev) < 0.5, 3)
        if train and s.vflip:
            x = flip(x, torch.rand(n, generator=g, device=dev) < 0.5, 2)
        x = x.float()
        if train and (s.translate or s.rotate):
            u = torch.rand(3, n, generator=g, device=dev) * 2 - 1
            x = affine(x, u[0] * s.rotate, u[1] * s.translate, u[2] * s.translate)
        x = (x - self.mean) / self.std
        if train and s.cutout_holes:
            x = cutout(x, s.cutout_holes, s.cutout_length, g)
        return x.contiguous(memory_format=self.memory_format)
