"""Batched augmentation on uint8 batches: exact equivalences with the textbook operations, seeding, and
the distribution of the random draws."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dtrain.data.augment import (AugmentSpec, BatchRNG, Pipeline, batch_generator, batch_seed, cutout, flip,
                                 shift)


def images(n=16, c=3, h=12, w=10, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_shift_equals_pad_then_crop(mode):
    x = images()
    pad = 4
    n, _, h, w = x.shape
    for dy, dx in itertools.product(range(-pad, pad + 1), repeat=2):
        out = shift(x, torch.full((n,), dy), torch.full((n,), dx), mode)
        padded = F.pad(x.float(), (pad,) * 4, mode=mode)      # F.pad reflects float tensors only
        ref = padded[:, :, pad + dy:pad + dy + h, pad + dx:pad + dx + w].to(torch.uint8)
        assert out.dtype == torch.uint8
        assert torch.equal(out, ref), (mode, dy, dx)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_shift_per_sample(mode):
    x = images(n=9)
    dy, dx = torch.arange(-4, 5), torch.arange(4, -5, -1)
    out = shift(x, dy, dx, mode)
    for i in range(9):
        one = shift(x[i:i + 1], dy[i:i + 1], dx[i:i + 1], mode)
        assert torch.equal(out[i:i + 1], one)


def test_flip_mask():
    x = images(n=6)
    mask = torch.tensor([True, False, True, False, False, True])
    out = flip(x, mask, 3)
    for i in range(6):
        assert torch.equal(out[i], x[i].flip(2) if mask[i] else x[i])


def test_cutout_hole_size_and_position():
    n, h, w, length = 64, 32, 32, 8
    x = torch.ones(n, 3, h, w)
    out = cutout(x, 1, length, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    cy, cx = torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    for i in range(n):
        y0, x0 = int(cy[i]) - length // 2, int(cx[i]) - length // 2
        expect = torch.ones(h, w)
        expect[max(y0, 0):max(y0 + length, 0), max(x0, 0):max(x0 + length, 0)] = 0
        assert torch.equal(out[i, 0], expect) and torch.equal(out[i, 1], expect)
        inside = 0 <= y0 and y0 + length <= h and 0 <= x0 and x0 + length <= w
        zeros = int((out[i, 0] == 0).sum())
        assert zeros == length * length if inside else 0 < zeros <= length * length


def spec(**kw):
    base = dict(crop_padding=4, pad_mode="reflect", hflip=True, cutout_holes=1, cutout_length=8)
    base.update(kw)
    return AugmentSpec(**base)


def test_same_seed_same_output_and_different_seeds_differ():
    x = images(n=32, h=32, w=32)
    pipe = Pipeline(spec(), (0.5,) * 3, (0.25,) * 3, "cpu")
    a = pipe(x, batch_generator("cpu", 7, 2, 5, 0))
    b = pipe(x, batch_generator("cpu", 7, 2, 5, 0))
    assert torch.equal(a, b)
    for other in [(8, 2, 5, 0), (7, 3, 5, 0), (7, 2, 6, 0), (7, 2, 5, 1)]:
        assert not torch.equal(a, pipe(x, batch_generator("cpu", *other)))


def test_batch_rng_is_the_fresh_generator_of_that_batch_in_any_order():
    """The loop re-seeds one generator per batch: batch b's draws do not depend on what came before, so a
    run resumed at batch b draws what the uninterrupted run drew there."""
    rng = BatchRNG("cpu", seed=3)
    fresh = [torch.rand(5, generator=batch_generator("cpu", 3, e, b, 0)) for e, b in [(0, 0), (0, 1), (1, 4)]]
    reused = [torch.rand(5, generator=rng.batch(e, b)) for e, b in [(1, 4), (0, 0), (0, 1)]]
    assert torch.equal(fresh[0], reused[1]) and torch.equal(fresh[1], reused[2]) and torch.equal(fresh[2], reused[0])


def test_batch_seeds_do_not_collide():
    seeds = {batch_seed(s, e, b, r) for s in range(2) for e in range(30) for b in range(400) for r in range(8)}
    assert len(seeds) == 2 * 30 * 400 * 8
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_eval_pipeline_normalises_only():
    x = images(n=4, h=8, w=8)
    pipe = Pipeline(spec(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "cpu", channels_last=True)
    out = pipe(x)  # no generator: evaluation, no augmentation
    ref = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def marker_images(n, size=32):
    """Each image has one bright pixel at the centre: its position after the crop gives the shift."""
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[:, :, size // 2, size // 2] = 255
    return x


def test_distribution_of_crop_offsets_and_flips():
    n, pad = 9000, 4
    x = marker_images(n)
    pipe = Pipeline(AugmentSpec(crop_padding=pad, pad_mode="constant"), (0.0,) * 3, (1 / 255,) * 3, "cpu")
    out = pipe(x, batch_generator("cpu", 0, 0, 0, 0))[:, 0]
    pos = (out == 255).flatten(1).float().argmax(1)
    dy, dx = 16 - pos // 32, 16 - pos % 32
    for d in (dy, dx):
        counts = torch.bincount((d + pad).long(), minlength=2 * pad + 1).float() / n
        assert counts.numel() == 2 * pad + 1
        assert torch.allclose(counts, torch.full_like(counts, 1 / (2 * pad + 1)), atol=0.02), counts
    # dy and dx drawn independently
    assert abs(torch.corrcoef(torch.stack([dy.float(), dx.float()]))[0, 1]) < 0.05

    xf = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    xf[:, :, :, 0] = 255
    pipe = Pipeline(AugmentSpec(hflip=True), (0.0,) * 3, (1 / 255,) * 3, "cpu")
    flipped = pipe(xf, batch_generator("cpu", 0, 0, 1, 0))[:, 0, 0, 3] == 255
    assert abs(flipped.float().mean().item() - 0.5) < 0.03


def test_reflect_crop_keeps_every_pixel_real():
    """Reflect padding never brings in zeros: a crop of an image without zeros has none."""
    x = images(n=64, h=32, w=32).clamp_min(1)
    out = Pipeline(AugmentSpec(crop_padding=2, pad_mode="reflect"), (0.0,) * 3, (1 / 255,) * 3, "cpu")(
        x, batch_generator("cpu", 0, 0, 0, 0))
    assert (out > 0.5).all()


@pytest.mark.parametrize("world", [2, 4])
def test_a_shard_is_augmented_as_its_images_are_in_the_whole_batch(world):
    """Every augmentation, the policy included, draws for the global batch: process r's shard (global
    positions r, r + P, ...) comes out as those rows of the batch augmented on one process."""
    x = images(n=16, h=32, w=32)
    full = spec(vflip=True, translate=0.1, rotate=10, policy="trivialaugment", random_erasing=0.5)
    whole = Pipeline(full, (0.5,) * 3, (0.25,) * 3, "cpu")(x, batch_generator("cpu", 1, 2, 3, 0))
    for rank in range(world):
        shard = Pipeline(full, (0.5,) * 3, (0.25,) * 3, "cpu", rank=rank, world=world)
        assert torch.equal(shard(x[rank::world], batch_generator("cpu", 1, 2, 3, 0)), whole[rank::world])


# ---- the augmentations of the best CIFAR results, end to end ---------------------------------------------

EVERY = ["--crop-padding", "4", "--pad-mode", "reflect", "--cutout-holes", "1", "--cutout-length", "8",
         "--augment-policy", "trivialaugment", "--random-erasing", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
         "--label-smoothing", "0.1"]


def test_each_augmentation_setting_reaches_its_component(tmp_path):
    """Through a recipe file and flags, as a run resolves them: every value lands where it acts (a MixUp alpha
    handed to CutMix, as once in torchvision's references, would fail here)."""
    from dtrain.data.mixing import Mixer, MixSpec
    from dtrain.settings import build_config
    recipe = tmp_path / "r.toml"
    recipe.write_text('arch = "cnn"\naugment_policy = "randaugment"\nrandaugment_ops = 3\nrandaugment_magnitude = 14\n'
                      'mixup = 0.2\ncutmix = 0.0\nmix_prob = 0.7\nrandom_erasing = 0.3\nlabel_smoothing = 0.1\n')
    cfg = build_config(["--recipe", str(recipe)])
    spec = AugmentSpec.from_config(cfg)
    assert (spec.policy, spec.randaugment_ops, spec.randaugment_magnitude, spec.random_erasing) == \
        ("randaugment", 3, 14, 0.3)
    policy = Pipeline(spec, (0.5,) * 3, (0.25,) * 3, "cpu").policy
    assert (policy.name, policy.num_ops, policy.magnitude) == ("randaugment", 3, 14)
    mix = MixSpec.from_config(cfg)
    assert (mix.mixup, mix.cutmix, mix.prob, mix.label_smoothing) == (0.2, 0.0, 0.7, 0.1)
    # behaviour, not only fields: MixUp alone never pastes a box; CutMix alone always does
    from dtrain.data.mixing import draw_mix
    assert all(draw_mix(s, 32, 32, mix.mixup, mix.cutmix, 1.0).box is None for s in range(50))
    cutmix_only = MixSpec.from_config(build_config(["--recipe", str(recipe), "--mixup", "0", "--cutmix", "1.0"]))
    assert all(draw_mix(s, 32, 32, cutmix_only.mixup, cutmix_only.cutmix, 1.0).box is not None for s in range(50))
    assert MixSpec.from_config(build_config(["--arch", "cnn"])) is None
    assert Mixer(mix, 10, 2).partner_stride == 4 and Mixer(mix, 10, 3).partner_stride == 1
    assert AugmentSpec.from_config(build_config(["--recipe", str(recipe), "--no-augment"])).policy == "none"


@pytest.mark.process
def test_one_and_two_processes_train_the_same_weights_with_every_augmentation_on(cifar_dir, tmp_path):
    """Crop, flip, Cutout, TrivialAugment, random erasing, MixUp/CutMix with label smoothing: each image's
    augmentation and each batch's mixing depend on its place in the epoch, not on the number of processes."""
    from helpers import train
    from dtrain.checkpoint import load_checkpoint
    args = ["--arch", "cnn", "--data-dir", cifar_dir, "--no-download", "-b", "40", "--eval-batch-size", "64",
            "--workers", "0", "--norm", "group", "--epochs", "1", "--lr", "0.05", *EVERY]
    train([*args, "--output-dir", tmp_path / "p1"])
    train([*args, "--output-dir", tmp_path / "p2"], nproc=2)
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("p1", "p2"))
    assert max((a[k] - b[k]).abs().max() for k in a) <= 1e-5


def test_a_run_with_every_augmentation_on_resumes_exactly(tmp_path):
    """2 epochs stopped mid-epoch and resumed == 2 epochs straight, every new augmentation on."""
    from helpers import train_here
    from dtrain.checkpoint import load_checkpoint
    common = ["--arch", "cnn", "--dataset", "fake", "--fake-size", "160", "-b", "32", "--eval-batch-size", "40",
              "--epochs", "2", "--workers", "0", "--scheduler", "none", "--lr", "0.05", *EVERY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_here([*common, "--output-dir", straight])
    train_here([*common, "--max-steps", "7", "--output-dir", split])
    train_here([*common, "--resume", "auto", "--output-dir", split])
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
