"""Inference over a sharded set: logits for every item, each exactly once over all processes, with the
mirror (and shift) test-time augmentation; evaluation's loss and accuracies from them. Shared by the
training loop's evaluation and by `dtrain predict`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dtrain.distributed import gather_samples


@dataclass
class Evaluation:
    loss: float
    acc: float
    index: torch.Tensor     # dataset indices, sorted
    preds: torch.Tensor
    targets: torch.Tensor
    top5: float | None = None   # top-5 accuracy, for more than 5 classes

    def confusion(self, num_classes: int) -> torch.Tensor:
        """rows: true class, columns: predicted class."""
        return torch.bincount(self.targets * num_classes + self.preds,
                              minlength=num_classes * num_classes).view(num_classes, num_classes)


def eager(model):
    """The module under a torch.compile wrapper (the same parameters), or the model itself."""
    return getattr(model, "_orig_mod", model)


def module_for(model, n: int, full: int | None):
    """The module to run a batch of `n` on: a compiled model keeps the shape of a full batch, so a shorter
    one (an epoch's last) runs on the eager module beneath it rather than compiling a second graph."""
    return model if full is None or n == full else eager(model)


def tta_logits(model, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Mean logits of the image and its mirror; with `shift`, averaged (1/2 each) with those of the image
    moved by -shift and +shift pixels in both axes (reflect padding), as airbench's TTA."""
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format

    def pair(t):
        return (model(t).float() + model(t.flip(3).contiguous(memory_format=fmt)).float()) / 2

    logits = pair(x)
    if shift:
        h, w = x.shape[2:]
        padded = F.pad(x, (shift,) * 4, mode="reflect")
        moved = [padded[:, :, :h, :w], padded[:, :, 2 * shift:, 2 * shift:]]
        logits = logits / 2 + sum(pair(m.contiguous(memory_format=fmt)) for m in moved) / 4
    return logits


def eval_logits(model, x: torch.Tensor, tta: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """float logits of a batch, with the mirror (and shift) test-time augmentation when asked."""
    return tta_logits(model, x, tta_shift) if tta else model(x).float()


@torch.no_grad()
def predict_logits(model, loader, pipeline, accelerator, *, tta: bool = False, tta_shift: int = 0):
    """Logits for every item of `loader` (an evaluation shard per process), gathered: (index, logits). The
    model is run as given: pass the module beneath DDP, whose forward makes no collective call, so that a
    process with an empty shard makes the same calls as the others."""
    model.eval()
    idx_parts, logit_parts = [], []
    full = getattr(loader, "batch_size", None)
    for x, _, idx in loader.batches():
        x = pipeline(x)
        with accelerator.autocast():
            logits = eval_logits(module_for(model, len(x), full), x, tta, tta_shift)
        idx_parts.append(idx)
        logit_parts.append(logits)
    device = accelerator.device
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long, device=device)
    logits = torch.cat(logit_parts) if logit_parts else torch.zeros(0, 0, device=device)
    return gather_samples(accelerator, idx, logits)


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, k: int) -> float:
    """Share of samples whose class is among the k highest logits (or is the top-1 prediction, so that
    ties never make top-k lower than top-1)."""
    hit = (logits.topk(k, dim=1).indices == targets[:, None]).any(1) | (preds == targets)
    return hit.float().mean().item()


def evaluate(model, loader, pipeline, accelerator, labels: torch.Tensor, *, tta: bool = False,
             tta_shift: int = 0) -> Evaluation:
    index, logits = predict_logits(model, loader, pipeline, accelerator, tta=tta, tta_shift=tta_shift)
    targets = labels.cpu()[index]
    loss = F.cross_entropy(logits, targets).item() if len(index) else float("nan")
    preds = logits.argmax(1)
    acc = (preds == targets).float().mean().item() if len(index) else float("nan")
    top5 = top_k_accuracy(logits, targets, preds, 5) if len(index) and logits.shape[1] > 5 else None
    return Evaluation(loss, acc, index, preds, targets, top5)
