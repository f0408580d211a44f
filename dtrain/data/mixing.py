"""MixUp and CutMix of a training batch, the same on 1 or P processes.

`Mixer(spec, num_classes, world)(x, y, epoch, batch)` mixes a normalised float batch and returns it with soft
targets (label smoothing applied to them, as timm's mixup_target does). Each batch's decision (mixed or not,
MixUp or CutMix, lambda, CutMix's box) is drawn on the host from a seed of (seed, epoch, batch) alone, so every
process mixes a step the same way, with no device work. An image's partner is the image at the mirrored
position within its class of global positions mod MIX_GROUPS: on P processes (P dividing MIX_GROUPS) that is
each process's own shard reversed within its positions mod MIX_GROUPS / P, so 1 and P processes mix the same
pairs without exchanging images (`mix_batch`'s docstring weighs the alternatives). Other process counts mix
within each shard: equally random pairs, other weights than 1 process.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from dtrain.data.augment import batch_seed

MIX_GROUPS = 8
MIX_STREAM = 2**64 - 1   # the rank slot of batch_seed that no process's augmentation stream uses


@dataclass(frozen=True)
class MixSpec:
    """What mixing needs from the Config."""
    mixup: float = 0.0          # MixUp's Beta(alpha, alpha) (0: off)
    cutmix: float = 0.0         # CutMix's alpha (0: off)
    prob: float = 1.0           # the chance that a batch is mixed
    label_smoothing: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "MixSpec | None":
        """The spec, or None when neither MixUp nor CutMix is on."""
        if not (cfg.mixup > 0 or cfg.cutmix > 0):
            return None
        return cls(cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.label_smoothing, cfg.seed)


class Mixer:
    """`parts`: how many parts a step's global batch is cut into (processes x accumulated micro-batches)."""

    def __init__(self, spec: MixSpec, num_classes: int, parts: int):
        self.spec, self.num_classes = spec, num_classes
        self.partner_stride = MIX_GROUPS // parts if MIX_GROUPS % parts == 0 else 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix micro-batch x of step `step` of `epoch` (its index in the epoch): every part of a step shares
        the step's decision."""
        s = self.spec
        return mix_batch(x, y, self.num_classes, batch_seed(s.seed, epoch, step, MIX_STREAM), s.mixup, s.cutmix,
                         s.prob, s.label_smoothing, self.partner_stride)


@dataclass(frozen=True)
class MixDraw:
    """One batch's MixUp/CutMix decision, host-side numbers.

    lam: the weight of each image itself, its partner's 1 - lam (1.0: not mixed); box: for CutMix, the rows
    and columns (top, bottom, left, right; half-open) pasted from the partner, and lam is 1 - box area / image
    area; None for MixUp and for an unmixed batch."""
    lam: float
    box: tuple[int, int, int, int] | None = None


def draw_mix(seed: int, height: int, width: int, mixup_alpha: float, cutmix_alpha: float,
             prob: float) -> MixDraw:
    """timm's Mixup decision for one batch (mode "batch", switch probability 0.5, corrected lambda), drawn on the
    host from random.Random(seed): no device work, so the same seed gives the same decision on every process.

    With probability prob the batch is mixed: CutMix if only cutmix_alpha > 0, MixUp if only mixup_alpha > 0,
    either with even odds if both are; lambda ~ Beta(alpha, alpha), exact (random.betavariate: the ratio of two
    gamma variates). CutMix's box has sides int(H * sqrt(1 - lam)), int(W * sqrt(1 - lam)) about a uniform
    centre, clipped to the image, and lambda is recomputed from the clipped box."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("MixUp/CutMix need mixup_alpha > 0 or cutmix_alpha > 0")
    rng = random.Random(seed)
    if not rng.random() < prob:
        return MixDraw(1.0)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = rng.betavariate(alpha, alpha)
    if not use_cutmix:
        return MixDraw(lam)
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return MixDraw(1 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))


def mix_partners(n: int, stride: int, device: torch.device | str) -> torch.Tensor:
    """The index of each image's partner in a batch of n: the batch reversed within each class of positions
    i mod stride (stride 1: x.flip(0), timm's partner). Always an involution (partners pair up)."""
    i = torch.arange(n, device=device)
    residue, rank = i % stride, i // stride
    class_size = (n - residue + stride - 1) // stride
    return residue + stride * (class_size - 1 - rank)


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """N x K float32 targets: smoothing / K everywhere, 1 - smoothing + smoothing / K at the label (timm's)."""
    off = smoothing / num_classes
    targets = torch.full((y.shape[0], num_classes), off, device=y.device)
    return targets.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def apply_mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, draw: MixDraw, label_smoothing: float = 0.0,
              partner_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed float batch, soft targets N x K) for one MixDraw; x and y are not modified.

    MixUp: lam * x + (1 - lam) * partner; CutMix: the box pasted from the partner; targets
    lam * one_hot(y) + (1 - lam) * one_hot(partner's y), both smoothed (timm's mixup_target). Partners as
    mix_partners(N, partner_stride)."""
    targets = smooth_one_hot(y, num_classes, label_smoothing)
    if draw.lam == 1.0:
        return x, targets
    partner = mix_partners(x.shape[0], partner_stride, x.device)
    if draw.box is None:
        mixed = x[partner].lerp_(x, draw.lam)
    else:
        top, bottom, left, right = draw.box
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    return mixed, targets * draw.lam + targets[partner] * (1 - draw.lam)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, mixup_alpha: float, cutmix_alpha: float,
              prob: float, label_smoothing: float = 0.0, partner_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp/CutMix a float N x C x H x W batch with labels y (N,) as timm's Mixup does: returns the mixed
    batch and N x K soft targets (each row sums to 1). The decision comes from draw_mix(seed, ...), host-side.

    Contract under data parallelism (each process holds a shard of the global batch; for 1 and P processes to
    train the same weights, every step must mix the global batch the same way whatever P is):
    - lambda and the mode must be the same on every process of a step: `seed` must not depend on the rank (for
      example batch_seed(seed, epoch, batch, rank=-1), a stream no process's augmentation generator uses);
    - the partner of an image must be the same image whatever P is. dtrain's shards interleave the global batch
      (process r holds global positions r, r + P, r + 2P, ...), so timm's partner on one process, the global
      batch reversed, is on another process for P > 1. The options:
        a. reverse the global batch: exactly timm's pairing, but each process needs the partner shard of process
           P - 1 - r, reversed: one exchange of a shard of images per step (uint8 before normalisation
           suffices: mixing commutes with the per-channel normalisation);
        b. reverse each process's shard (partner_stride=1 everywhere): free, but the pairs depend on P, so 1 and
           P processes train different (statistically equivalent) weights;
        c. reverse within the classes of global positions mod G, a constant of the run (G = 8, say):
           for P dividing G it is, on each process, the shard reversed within its positions mod G / P, so
           the engine passes partner_stride=G // P; free, and the same pairs for every P dividing G.
      Recommended: c (partner_stride = G // world_size, with G fixed in the configuration and world sizes
      restricted to its divisors); it keeps the pairs world-size-independent without communication, and the
      pairing is as random as timm's since the global batch is a random draw.
    - the images, too, must be augmented the same way whatever P is; a per-process augmentation generator
      (BatchRNG seeds by rank) already breaks that for the per-image policies, independently of mixing."""
    draw = draw_mix(seed, x.shape[2], x.shape[3], mixup_alpha, cutmix_alpha, prob)
    return apply_mix(x, y, num_classes, draw, label_smoothing, partner_stride)
