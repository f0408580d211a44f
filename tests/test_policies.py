"""Per-image augmentation policies: each operation against torchvision's v2 functional image by image, the
policies' draws and their distributions, random erasing's rectangles, and MixUp/CutMix's mixing and targets."""
import itertools
import math

import pytest
import torch
from torchvision.transforms.v2 import TrivialAugmentWide
from torchvision.transforms.v2 import functional as TF

from dtrain.data import mixing as M
from dtrain.data import policies as P
from dtrain.data.augment import batch_seed, random_erasing

NEAREST = TF.InterpolationMode.NEAREST
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Color", "Contrast", "Sharpness")    # float blends: within one grey level of torchvision
SHAPES = [(3, 13, 11), (1, 13, 11), (3, 32, 32), (1, 9, 16), (1, 31, 33)]   # >= 510 pixels: Equalize acts


def images(n, c, h, w, seed=0):
    """Random images, every third one low-contrast (so AutoContrast and Equalize have work to do)."""
    x = torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    x[::3] = x[::3] // 4 + 60
    return x


def torchvision_op(name, img, m, fill=None):
    """torchvision.transforms.v2.functional on one image, as torchvision's AutoAugment family calls it."""
    affine = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST, fill=fill)
    if name == "Identity":
        return img
    if name == "ShearX":
        return TF.affine(img, **{**affine, "shear": [math.degrees(math.atan(m)), 0.0]}, center=[0, 0])
    if name == "ShearY":
        return TF.affine(img, **{**affine, "shear": [0.0, math.degrees(math.atan(m))]}, center=[0, 0])
    if name == "TranslateX":
        return TF.affine(img, **{**affine, "translate": [int(m), 0]})
    if name == "TranslateY":
        return TF.affine(img, **{**affine, "translate": [0, int(m)]})
    if name == "Rotate":
        return TF.rotate(img, angle=m, interpolation=NEAREST, fill=fill)
    return {"Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
            "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
            "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
            "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
            "Posterize": lambda: TF.posterize(img, int(m)),
            "Solarize": lambda: TF.solarize(img, 255.0 * m),
            "AutoContrast": lambda: TF.autocontrast(img),
            "Equalize": lambda: TF.equalize(img),
            "Invert": lambda: TF.invert(img)}[name]()


def magnitudes(name, h, w):
    """Every magnitude the three policies can give `name` on an h x w image (both signs where signed), the
    extremes included, plus the rotations torchvision special-cases."""
    values = set()
    for space, bins in (P._STANDARD_SPACE, 10), (P._STANDARD_SPACE, 31), (P._WIDE_SPACE, 31):
        if name in space:
            fn, signed = space[name]
            values.update(float(v) for v in fn(bins, h, w))
            values.update(-float(v) for v in fn(bins, h, w) if signed)
    if name == "Rotate":
        values.update([90.0, -90.0, 180.0, 270.0, 360.0])
    if name == "Posterize":
        values.update(range(9))
    values = sorted(values) or [0.0]
    return torch.tensor(values * math.ceil(12 / len(values)))     # 12 images at least


def torchvision_matrix(name, m, h, w):
    """torchvision's float32 inverse affine matrix for the operation (its private helper), 1 x 2 x 3."""
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix
    shear = math.degrees(math.atan(m))
    args = {"ShearX": ([-0.5 * w, -0.5 * h], 0.0, [0.0, 0.0], [shear, 0.0]),
            "ShearY": ([-0.5 * w, -0.5 * h], 0.0, [0.0, 0.0], [0.0, shear]),
            "TranslateX": ([0.0, 0.0], 0.0, [float(int(m)), 0.0], [0.0, 0.0]),
            "TranslateY": ([0.0, 0.0], 0.0, [0.0, float(int(m))], [0.0, 0.0]),
            "Rotate": ([0.0, 0.0], -(m % 360), [0.0, 0.0], [0.0, 0.0])}[name]
    center, angle, translate, shear = args
    return torch.tensor(_get_inverse_affine_matrix(center, angle, translate, 1.0, shear), dtype=torch.float32).view(
        1, 2, 3)


def assert_matches_torchvision(name, out, x, m, fill=None):
    """Image by image: exact, blends within one grey level. One exception, for the per-op functions, which build
    their matrices on the device: where torchvision's float32 matrix lands on a rounding tie decided by the C
    library's last bit, torch's float64 trigonometry may round it the other way (a shear on ~0.4% of magnitude
    and size pairs), moving pixels exactly half-way between two source pixels; there the sampler, given
    torchvision's matrix, must agree."""
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        ref = torchvision_op(name, x[i], float(m[i]), fill)
        if name in GEOMETRIC and not torch.equal(out[i], ref):
            tv_matrix = torchvision_matrix(name, float(m[i]), h, w)
            assert not torch.equal(P._matrices(name, m[i:i + 1], h, w), tv_matrix), (name, float(m[i]))
            assert torch.equal(P.warp(x[i:i + 1], tv_matrix, fill)[0], ref), (name, float(m[i]))
            continue
        diff = (out[i].int() - ref.int()).abs().max().item()
        assert diff <= (1 if name in BLENDS else 0), (name, float(m[i]), diff)


def test_reference_is_torchvisions_own_mapping():
    """The mapping above (name, magnitude) -> functional call is the one torchvision's policies use."""
    ta = TrivialAugmentWide()
    if not hasattr(ta, "_apply_image_or_video_transform"):
        pytest.skip("torchvision's private per-op dispatcher is gone")
    x = images(1, 3, 13, 11)[0]
    for name in P.OP_NAMES:
        for m in magnitudes(name, 13, 11)[::7]:
            ref = ta._apply_image_or_video_transform(x, name, float(m), interpolation=NEAREST, fill={"others": None})
            assert torch.equal(torchvision_op(name, x, float(m)), ref), (name, float(m))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", P.OP_NAMES)
def test_op_matches_torchvision_image_by_image(name, shape):
    """Each image of the batch has its own magnitude; geometric and table operations are exact, blends
    within one grey level."""
    c, h, w = shape
    m = magnitudes(name, h, w)
    x = images(len(m), c, h, w)
    out = P.OPS[name](x, m)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert_matches_torchvision(name, out, x, m)


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
@pytest.mark.parametrize("h, w", [(13, 11), (31, 33), (46, 46)])
def test_policy_geometry_is_exact_at_every_bin(policy, h, w):
    """Every geometric operation a policy can draw, at every bin and sign, equals torchvision exactly: the
    policies build their matrices on the host as torchvision does (31 x 33 and 46 x 46 hold rounding ties)."""
    table, _ = P._magnitude_table(policy, h, w, torch.device("cpu"))
    op, bin_, negated = torch.tensor(list(itertools.product(
        [P.OP_NAMES.index(name) for name in GEOMETRIC], range(table.shape[1]), [False, True]))).unbind(1)
    magnitude = torch.where(negated.bool(), -table[op, bin_], table[op, bin_])
    x = images(len(op), 1, h, w)
    out = P.build_policy(policy).apply(x, [P.OpDraw(op, bin_, negated.bool(), magnitude)])
    for i in range(len(op)):
        assert torch.equal(out[i], torchvision_op(P.OP_NAMES[op[i]], x[i], float(magnitude[i]))), (
            P.OP_NAMES[op[i]], float(magnitude[i]))


@pytest.mark.parametrize("fill", [0, 77, (10, 200, 30)])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_fill_matches_torchvision(name, fill):
    c = 3 if isinstance(fill, tuple) else 1
    m = magnitudes(name, 13, 11)
    x = images(len(m), c, 13, 11)
    assert_matches_torchvision(name, P.OPS[name](x, m, fill=fill), x, m, fill=list(fill) if c == 3 else fill)


def random_layer(n, names=P.OP_NAMES, seed=0):
    """Random operations and wide-range magnitudes, as a policy draws them."""
    g = torch.Generator().manual_seed(seed)
    op = torch.tensor([P.OP_NAMES.index(names[i]) for i in torch.randint(len(names), (n,), generator=g)])
    table, signed = P._magnitude_table("trivialaugment", 13, 11, torch.device("cpu"))
    return P._draw_signed(table, signed, op, torch.randint(31, (n,), generator=g), g)


@pytest.mark.parametrize("shape", [(3, 13, 11), (1, 9, 16)], ids=lambda s: "x".join(map(str, s)))
def test_apply_ops_is_each_image_through_its_own_op(shape):
    layer = random_layer(96)
    x = images(96, *shape)
    out = P.apply_ops(x, layer.op, layer.magnitude)
    for i in range(96):
        name = P.OP_NAMES[layer.op[i]]
        alone = P.OPS[name](x[i:i + 1], layer.magnitude[i:i + 1])
        assert torch.equal(out[i:i + 1], alone), name
        ref = torchvision_op(name, x[i], float(layer.magnitude[i]))
        assert (out[i].int() - ref.int()).abs().max() <= (1 if name in BLENDS else 0), name


@pytest.mark.parametrize("fill", [None, (5, 6, 7)])
def test_identity_leaves_every_family_untouched(fill):
    x = images(8, 3, 13, 11)
    op = torch.zeros(8, dtype=torch.long)
    assert torch.equal(P.apply_ops(x, op, torch.linspace(-1, 1, 8), fill=fill), x)


def test_policy_names_and_settings():
    assert P.build_policy("randaugment", 3, 12) == P.AugmentPolicy("randaugment", 3, 12)
    for bad in [dict(name="autoaug"), dict(name="randaugment", num_ops=-1), dict(name="randaugment", magnitude=31)]:
        with pytest.raises(ValueError):
            P.AugmentPolicy(**bad)
    x = images(4, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert P.build_policy("none")(x, g) is x and torch.equal(g.get_state(), state)


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment", "autoaugment"])
def test_policy_matches_torchvision_image_by_image(name):
    """A whole policy on a batch = torchvision's functional ops applied in sequence to each image with the
    drawn operations and magnitudes; and = the policy applied to each image alone with its draws."""
    policy = P.build_policy(name)
    x = images(48, 3, 27, 21)
    draws = policy.draw(48, 27, 21, torch.Generator().manual_seed(5))
    out = policy.apply(x, draws)
    for i in range(48):
        alone = policy.apply(x[i:i + 1], [P.OpDraw(*(t[i:i + 1] for t in (d.op, d.bin, d.negated, d.magnitude)))
                                          for d in draws])
        assert torch.equal(out[i:i + 1], alone)
        ref = x[i]
        for d in draws:
            ref = torchvision_op(P.OP_NAMES[d.op[i]], ref, float(d.magnitude[i]))
        assert (out[i].int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment", "autoaugment"])
def test_policy_is_deterministic_and_per_image(name):
    policy = P.build_policy(name)
    x = images(1, 3, 16, 16).expand(64, 3, 16, 16).contiguous()     # one image, 64 times
    a = policy(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, policy(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, policy(x, torch.Generator().manual_seed(4)))
    distinct = {tuple(img.flatten().tolist()) for img in a}
    assert len(distinct) > 16, "copies of one image should come out differently augmented"


def test_trivialaugment_draws_uniform_ops_bins_and_signs():
    n = 28_000
    (layer,) = P.build_policy("trivialaugment").draw(n, 32, 32, torch.Generator().manual_seed(0))
    ops = torch.bincount(layer.op, minlength=len(P.OP_NAMES)).float() / n
    for name in P.OP_NAMES:
        expected = 1 / 14 if name != "Invert" else 0.0
        assert abs(ops[P.OP_NAMES.index(name)] - expected) < 0.01, name
    bins = torch.bincount(layer.bin, minlength=31).float() / n
    assert torch.allclose(bins, torch.full_like(bins, 1 / 31), atol=0.008)
    table, signed = P._magnitude_table("trivialaugment", 32, 32, torch.device("cpu"))
    assert torch.equal(layer.magnitude.abs(), table[layer.op, layer.bin].abs())
    for name in ("Rotate", "Brightness", "TranslateX"):
        picked = layer.op == P.OP_NAMES.index(name)
        assert set(layer.magnitude[picked].tolist()) == set(table[P.OP_NAMES.index(name)].tolist()) | set(
            (-table[P.OP_NAMES.index(name)]).tolist())                  # every bin, both signs
        assert abs(layer.negated[picked].float().mean() - 0.5) < 0.05
    assert not layer.negated[layer.op == P.OP_NAMES.index("Solarize")].any()


def test_randaugment_draws_num_ops_uniform_ops_at_the_fixed_bin():
    n = 14_000
    draws = P.build_policy("randaugment", 3, 12).draw(n, 32, 32, torch.Generator().manual_seed(0))
    assert len(draws) == 3
    for layer in draws:
        freq = torch.bincount(layer.op, minlength=len(P.OP_NAMES)).float() / n
        assert (freq[:-1] - 1 / 14).abs().max() < 0.012 and freq[-1] == 0
        assert (layer.bin == 12).all()
    assert (draws[0].op != draws[1].op).float().mean() > 0.9      # independent layers


def test_autoaugment_draws_follow_the_cifar10_subpolicies():
    n = 50_000
    draws = P.build_policy("autoaugment").draw(n, 32, 32, torch.Generator().manual_seed(0))
    for k, layer in enumerate(draws):
        freq = torch.bincount(layer.op, minlength=len(P.OP_NAMES)).float() / n
        expected = torch.zeros(len(P.OP_NAMES))
        for sub in P._CIFAR10_SUBPOLICIES:
            name, prob, _ = sub[k]
            expected[P.OP_NAMES.index(name)] += prob / 25
            expected[0] += (1 - prob) / 25
        assert (freq - expected).abs().max() < 0.01, k
    assert len(P.build_policy("autoaugment").op_names) == 14 and "ShearX" not in P.build_policy("autoaugment").op_names


def erased_boxes(out):
    """(top, left, height, width) of each image's zeroed rectangle, None where nothing was erased."""
    boxes = []
    for img in out[:, 0] == 0:
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        if len(rows) == 0:
            boxes.append(None)
            continue
        top, left = int(rows[0]), int(cols[0])
        h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
        assert img[top:top + h, left:left + w].all() and int(img.sum()) == h * w, "not one rectangle"
        boxes.append((top, left, h, w))
    return boxes


def test_random_erasing_rectangles():
    n, size = 4000, 32
    x = torch.ones(n, 3, size, size)
    out = random_erasing(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0) and ((out == 0) | (out == 1)).all()
    boxes = [b for b in erased_boxes(out) if b is not None]
    assert abs(len(boxes) / n - 0.5) < 0.03
    areas, aspects = [], []
    for top, left, h, w in boxes:
        assert h < size and w < size and top + h <= size and left + w <= size
        # h = round(sqrt(A r)), w = round(sqrt(A / r)): A and r within the rounding of h and w
        assert (h - 0.5) * (w - 0.5) <= 0.4 * size * size and (h + 0.5) * (w + 0.5) >= 0.02 * size * size
        assert (h - 0.5) / (w + 0.5) <= 3.3 and (h + 0.5) / (w - 0.5) >= 0.3
        areas.append(h * w / size ** 2)
        aspects.append(math.log(h / w))
    assert 0.19 < sum(areas) / len(areas) < 0.22                 # uniform area fraction in [0.02, 0.4] (the paper's)
    assert sum(a > 0.34 for a in areas) > 0.1 * len(areas)       # not torchvision's default ceiling of 0.33
    assert abs(sum(aspects) / len(aspects)) < 0.05                # log-uniform aspect, symmetric about 1
    assert min(b[0] for b in boxes) == 0 and max(b[0] + b[2] for b in boxes) == size


def test_random_erasing_value_probability_and_fallback():
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(random_erasing(x, 0.0, torch.Generator().manual_seed(1)), x)
    out = random_erasing(x, 1.0, torch.Generator().manual_seed(1), value=7.0)
    assert ((out == 7.0).flatten(1).any(1)).all() and torch.equal(out[out != 7.0], x[out != 7.0])
    assert torch.equal(out, random_erasing(x, 1.0, torch.Generator().manual_seed(1), value=7.0))
    never_fits = random_erasing(x, 1.0, torch.Generator().manual_seed(1), scale=(0.95, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(never_fits, x)


def test_mix_draws():
    draws = [M.draw_mix(s, 32, 32, 0.8, 1.0, 1.0) for s in range(2000)]
    cut = [d for d in draws if d.box is not None]
    assert 0.45 < len(cut) / len(draws) < 0.55
    assert all(0.0 <= d.lam <= 1.0 for d in draws)
    for d in cut:
        top, bottom, left, right = d.box
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert d.lam == 1 - (bottom - top) * (right - left) / 1024
    mixup = [M.draw_mix(s, 32, 32, 0.4, 0.0, 1.0).lam for s in range(4000)]
    mean = sum(mixup) / len(mixup)
    var = sum((v - mean) ** 2 for v in mixup) / len(mixup)
    assert abs(mean - 0.5) < 0.02 and abs(var - 1 / (4 * (2 * 0.4 + 1))) < 0.01        # Beta(0.4, 0.4)
    assert all(M.draw_mix(s, 32, 32, 0.8, 1.0, 0.0) == M.MixDraw(1.0) for s in range(100))
    assert 0.45 < sum(M.draw_mix(s, 32, 32, 0.8, 0.0, 0.5).lam < 1 for s in range(2000)) / 2000 < 0.55
    assert M.draw_mix(7, 32, 32, 0.8, 1.0, 1.0) == M.draw_mix(7, 32, 32, 0.8, 1.0, 1.0)
    with pytest.raises(ValueError):
        M.draw_mix(0, 32, 32, 0.0, 0.0, 1.0)


def batch(n=12, k=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g), k


def test_mixup_and_targets():
    x, y, k = batch()
    mixed, targets = M.apply_mix(x, y, k, M.MixDraw(0.3), label_smoothing=0.1)
    assert torch.allclose(mixed, 0.3 * x + 0.7 * x.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(len(y)))
    one_hot = torch.full((len(y), k), 0.1 / k).scatter_(1, y[:, None], 1 - 0.1 + 0.1 / k)
    assert torch.allclose(targets, 0.3 * one_hot + 0.7 * one_hot.flip(0))


def test_cutmix_pastes_the_box_and_weighs_targets_by_area():
    x, y, k = batch()
    draw = M.draw_mix(next(s for s in range(100) if M.draw_mix(s, 8, 8, 0.0, 1.0, 1.0).lam < 0.9), 8, 8, 0.0, 1.0,
                      1.0)
    top, bottom, left, right = draw.box
    mixed, targets = M.apply_mix(x, y, k, draw)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(mixed[:, :, inside], x.flip(0)[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    assert abs(draw.lam - (1 - inside.float().mean().item())) < 1e-12
    own = targets.gather(1, y[:, None]).squeeze(1)
    differ = y != y.flip(0)
    assert torch.allclose(own[differ], torch.full_like(own[differ], draw.lam))
    assert torch.allclose(targets.sum(1), torch.ones(len(y)))


def test_unmixed_batch_gets_smoothed_one_hot_targets():
    x, y, k = batch()
    mixed, targets = M.mix_batch(x, y, k, seed=3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.2)
    assert mixed is x
    assert torch.allclose(targets, torch.full((len(y), k), 0.04).scatter_(1, y[:, None], 0.84))


def test_partners_pair_up():
    for n, stride in [(12, 1), (12, 4), (13, 3), (5, 8)]:
        partner = M.mix_partners(n, stride, "cpu")
        assert torch.equal(partner[partner], torch.arange(n))
        assert torch.equal(partner % stride, torch.arange(n) % stride)
    assert torch.equal(M.mix_partners(7, 1, "cpu"), torch.arange(6, -1, -1))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_mixing_equals_the_global_batch_mixed_once(world):
    """The recommended contract: one seed for all processes, partner_stride = G // world on interleaved
    shards (process r holds global positions r, r + P, ...): every process's mixed shard is its shard of
    the global batch mixed on one process with stride G."""
    groups, n = 4, 24
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    seed = batch_seed(0, 1, 2, -1)
    for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0)]:
        whole = M.mix_batch(x, y, 10, seed, mixup, cutmix, 1.0, 0.1, partner_stride=groups)
        for rank in range(world):
            part = M.mix_batch(x[rank::world], y[rank::world], 10, seed, mixup, cutmix, 1.0, 0.1,
                               partner_stride=groups // world)
            assert torch.allclose(part[0], whole[0][rank::world]) and torch.allclose(part[1], whole[1][rank::world])
