"""Batched augmentation on the device: uint8 N x C x H x W in, normalised float out.

A per-image policy (AutoAugment, RandAugment, TrivialAugment: dtrain.data.policies), random crop after
padding (zero or reflect), flips, translation/rotation, Cutout and random erasing all run on whole batches
wherever the images are (GPU or CPU), each image drawing its own parameters. The order is the papers': the
policy, then crop and flips, then (after normalisation) Cutout and random erasing.

The draws come from a generator seeded from (seed, epoch, batch) alone, the same on every process, and are
made for the whole global batch, each process keeping its own images' rows (`ShardDraws`): an image's
augmentation depends on its place in the epoch's order, not on the number of processes, so a run, a resumed
run and a run on another number of processes draw the same augmentations for the same image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dtrain.data.policies import build_policy


@dataclass
class AugmentSpec:
    crop_padding: int = 0
    pad_mode: str = "constant"
    hflip: bool | str = False       # True: random per image; "alternate": airbench's alternating flip
    vflip: bool = False
    translate: float = 0.0
    rotate: float = 0.0
    cutout_holes: int = 0
    cutout_length: int = 16
    policy: str = "none"            # dtrain.data.policies.POLICY_NAMES
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0     # the chance per image
    seed: int = 0                   # the alternating flip's choice of the first epoch's half

    @classmethod
    def from_config(cls, cfg) -> "AugmentSpec":
        if not cfg.augment:
            return cls()
        return cls(crop_padding=cfg.crop_padding, pad_mode=cfg.pad_mode, hflip=cfg.hflip, vflip=cfg.vflip,
                   translate=cfg.translate, rotate=cfg.rotate, cutout_holes=cfg.cutout_holes,
                   cutout_length=cfg.cutout_length, policy=cfg.augment_policy, randaugment_ops=cfg.randaugment_ops,
                   randaugment_magnitude=cfg.randaugment_magnitude, random_erasing=cfg.random_erasing,
                   seed=cfg.seed)


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

    A batch's draws depend only on (seed, epoch, batch index), the same on every process, so a run resumed
    mid-epoch draws the same augmentations for the remaining batches. Re-seeding sets the host-side seed and
    Philox offset only: no device work, no synchronisation, and no new generator object per step.
    """

    def __init__(self, device, seed: int):
        self.generator = torch.Generator(device=device)
        self.seed = seed

    def batch(self, epoch: int, batch: int) -> torch.Generator:
        return self.generator.manual_seed(batch_seed(self.seed, epoch, batch, 0))


class ShardDraws:
    """Random numbers for the n images of one process's shard of a batch, drawn for the whole global batch
    (n x world images: process `rank` holds its positions rank, rank + world, ...) and sliced to its rows."""

    def __init__(self, generator: torch.Generator, n: int, rank: int = 0, world: int = 1):
        self.generator, self.n, self.rank, self.world = generator, n, rank, world

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of a draw made for the global batch."""
        return t[self.rank::self.world]

    def rand(self, *shape: int) -> torch.Tensor:
        """n x *shape uniforms in [0, 1)."""
        return self.mine(torch.rand(self.n * self.world, *shape, generator=self.generator, device=self.device))

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return self.mine(torch.randint(low, high, (self.n * self.world, *shape), generator=self.generator,
                                       device=self.device))


def _draws(x: torch.Tensor, draws: "ShardDraws | torch.Generator") -> ShardDraws:
    return draws if isinstance(draws, ShardDraws) else ShardDraws(draws, x.shape[0])


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


def alternating(index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """airbench's alternating flip: whether each image (by its dataset index) is flipped in `epoch`. A fixed
    pseudo-random half of the images in even epochs, the other half in odd ones: every image is seen both ways
    in any two epochs in a row (a hash of index and seed; no generator, no host work)."""
    h = (index.long() * 0x9E3779B1 + (seed & 0xFFFF) * 0x85EBCA77) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) & 1).bool() ^ bool(epoch % 2)


def affine(x: torch.Tensor, angle_deg: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Rotate by angle and translate by (tx, ty) (fractions of the size), zero fill; float input."""
    a = angle_deg * math.pi / 180
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([cos, -sin, 2 * tx], 1), torch.stack([sin, cos, 2 * ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, holes: int, length: int, draws: "ShardDraws | torch.Generator") -> torch.Tensor:
    """Zero `holes` squares of side `length` per image, centred anywhere (clipped at the border)."""
    n, _, h, w = x.shape
    draws = _draws(x, draws)
    keep = torch.ones(n, h, w, dtype=torch.bool, device=x.device)
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for _ in range(holes):
        cy, cx = draws.randint(0, h), draws.randint(0, w)
        y0, x0 = cy - length // 2, cx - length // 2
        in_y = (ys[None] >= y0[:, None]) & (ys[None] < y0[:, None] + length)
        in_x = (xs[None] >= x0[:, None]) & (xs[None] < x0[:, None] + length)
        keep &= ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


class Pipeline:
    """uint8 batch -> (augmented) normalised float batch, in the model's memory format."""

    def __init__(self, spec: AugmentSpec, mean, std, device, channels_last: bool = False, rank: int = 0,
                 world: int = 1, accum: int = 1):
        self.spec, self.rank, self.world, self.accum = spec, rank, world, accum
        self.policy = build_policy(spec.policy, spec.randaugment_ops, spec.randaugment_magnitude)
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None, index: torch.Tensor | None = None,
                 epoch: int = 0, micro: int = 0) -> torch.Tensor:
        """The batch normalised; augmented too when given the step's generator (training). x is micro-batch
        `micro` of this process's shard of the step's global batch: part rank + world x micro of its
        world x accum interleaved parts (see ShardDraws and TrainShards.batches); `index` (the images'
        dataset indices) and `epoch` drive the alternating flip."""
        s = self.spec
        train = g is not None
        parts = self.world * self.accum
        if train:
            draws = ShardDraws(g, x.shape[0], self.rank + self.world * micro, parts)
        if train and s.policy != "none":
            layers = self.policy.draw(x.shape[0] * parts, x.shape[2], x.shape[3], g)
            x = self.policy.apply(x, [layer.rows(draws.mine) for layer in layers])
        if train and s.crop_padding:
            d = draws.randint(-s.crop_padding, s.crop_padding + 1, 2)
            x = shift(x, d[:, 0], d[:, 1], s.pad_mode)
        if train and s.hflip == "alternate":
            x = flip(x, alternating(index, epoch, s.seed), 3)
        elif train and s.hflip:
            x = flip(x, draws.rand() < 0.5, 3)
        if train and s.vflip:
            x = flip(x, draws.rand() < 0.5, 2)
        x = x.float()
        if train and (s.translate or s.rotate):
            u = draws.rand(3) * 2 - 1
            x = affine(x, u[:, 0] * s.rotate, u[:, 1] * s.translate, u[:, 2] * s.translate)
        x = (x - self.mean) / self.std
        if train and s.cutout_holes:
            x = cutout(x, s.cutout_holes, s.cutout_length, draws)
        if train and s.random_erasing:
            x = random_erasing(x, s.random_erasing, draws)
        return x.contiguous(memory_format=self.memory_format)


def random_erasing(x: torch.Tensor, p: float, draws: "ShardDraws | torch.Generator",
                   scale: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 3.3),
                   value: float = 0.0, tries: int = 10) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) per image of a float N x C x H x W batch: with probability p, a
    rectangle of area scale x H x W (uniform; the paper's 2-40%, where torchvision's default stops at 33%) and
    aspect ratio h/w (log-uniform in `ratio`) set to `value`.

    Meant after normalisation, where 0 (the default) is the dataset mean. Sizes are drawn as torchvision's
    RandomErasing draws them: h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), kept if
    h < H and w < W, else drawn again, up to `tries` times, then no erasing. Vectorised: every image draws all
    its tries at once and takes the first that fits (the same distribution as drawing until one fits); the
    top-left corner is uniform over the positions where the rectangle fits."""
    n, _, h, w = x.shape
    dev = x.device
    draws = _draws(x, draws)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draws.rand(tries))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws.rand(tries))
    heights, widths = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (heights < h) & (widths < w)
    first = fits.long().argmax(1, keepdim=True)
    eh, ew = heights.gather(1, first).squeeze(1), widths.gather(1, first).squeeze(1)
    erase = fits.any(1) & (draws.rand() < p)
    corner = draws.rand(2)
    top = (corner[:, 0] * (h - eh + 1)).long().clamp(max=h - eh)
    left = (corner[:, 1] * (w - ew + 1)).long().clamp(max=w - ew)
    rows = torch.arange(h, device=dev).view(1, h)
    cols = torch.arange(w, device=dev).view(1, w)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :]) & erase.view(n, 1, 1)
    return x.masked_fill(mask[:, None], value)
