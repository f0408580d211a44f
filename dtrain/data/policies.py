"""Per-image augmentation policies on the device: AutoAugment (CIFAR-10), RandAugment, TrivialAugmentWide.

Everything works on whole batches wherever they are (CPU or GPU), with static shapes and no host
synchronisation: no .item()/.tolist() of device tensors, no branching on tensor values, no boolean indexing,
and no host-to-device copies after a policy's first batch of a given size (its tables are cached per device).

The operations take a uint8 batch N x C x H x W (C = 1 or 3) and a per-image magnitude tensor (N,), and return
uint8. The magnitude is the signed value torchvision's AutoAugment family hands its functional ops (the sign is
part of it: negative shears, translates and rotates the other way, and lowers brightness, saturation, contrast
and sharpness), so that OPS[name](x, m)[i] is torchvision.transforms.v2.functional applied to image i as
torchvision's AutoAugment/RandAugment/TrivialAugmentWide apply `name` at magnitude m[i]:

  ShearX, ShearY  shear by atan(m) about the top-left corner     TranslateX, TranslateY  shift by int(m) pixels
  Rotate          m degrees counter-clockwise about the centre   Brightness, Color, Contrast, Sharpness  factor 1 + m
  Posterize       keep int(m) bits     Solarize  invert the pixels >= 255 * m
  AutoContrast, Equalize, Invert, Identity: m is ignored.

Agreement with torchvision (tests/test_policies.py, image by image, odd sizes, C = 1 and 3):
- geometric operations sample with nearest neighbour (torchvision's default in these policies) and fill with 0
  or `fill`, through torchvision's own float64 inverse matrix and float32 grid: the same pixels. The policies
  build their matrices on the host with Python's math, bit for bit torchvision's. The per-op functions build
  them on the device with torch's float64 trigonometry, whose last bit now and then differs from the C
  library's: where that decides a float32 rounding tie in the matrix (a shear, for ~0.4% of magnitude and
  image size pairs), pixels exactly half-way between two source pixels come from the other one;
- table operations (Posterize, Solarize, Invert, AutoContrast, Equalize, Brightness, Contrast) are exact;
- the blends (Color, Contrast, Sharpness) use fused multiply-adds where torchvision's kernels do (addcmul),
  and are exact on the CPU here; a build or device that fuses differently can move a value lying within a
  float32 rounding of an integer across the truncation to uint8: one grey level.

How a policy applies a different operation to each image without sub-batches (whose sizes the host would have
to read, a device synchronisation): the operations form four families, each applied to the whole batch at once
with per-image parameters, the images whose operation is elsewhere getting the family's identity:
  warp     ShearX, ShearY, TranslateX, TranslateY, Rotate: one grid_sample, per-image grids (a policy looks
           them up in a table of its bins' grids, built once);
  lookup   Brightness, Contrast, Posterize, Solarize, AutoContrast, Equalize, Invert: per-image (and
           per-channel) 256-entry tables, one index_select for all;
  Color, Sharpness: each on the whole batch, magnitude 0 (an exact identity) for the other images.
The alternative with static shapes, each operation on the whole batch and torch.where to keep the selected
images, measured 4-6 x slower (bench/augment.py, CPU, one thread, batch 512 of 3 x 32 x 32, TrivialAugmentWide:
~22-25 ms of CPU per batch as families, ~100-160 ms as every operation then where).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Fill = float | Sequence[float] | None

OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
POLICY_NAMES = ("none", "autoaugment", "randaugment", "trivialaugment")

_RAD_PER_DEG = math.pi / 180.0     # the factors of Python's math.radians / math.degrees, which torchvision uses
_DEG_PER_RAD = 180.0 / math.pi


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """float values in 0..255 -> uint8, truncated; through int16, which the CPU converts to ~3x faster than
    straight to uint8."""
    return values.to(torch.int16).to(torch.uint8)


def _truncate(values: torch.Tensor) -> torch.Tensor:
    """float -> uint8 as torchvision's integer kernels do it: clamp to 0..255 (in place), then truncate."""
    return _to_uint8(values.clamp_(0, 255))


# ---- geometric operations ----------------------------------------------------------------------------------

GEOMETRIC_OPS = OP_NAMES[1:6]      # ShearX, ShearY, TranslateX, TranslateY, Rotate


def _inverse_affine(angle, tx, ty, shear_x, shear_y, cx: float, cy: float, lib) -> list:
    """The six terms of the matrix mapping output pixel coordinates (relative to the image centre) to input
    ones, for a rotation by `angle` and shears (degrees) about (cx, cy), then a translation (tx, ty).

    torchvision's inverse affine matrix with scale 1, term by term and in the same order, so that the float32
    matrix, and with it every nearest-neighbour pick, is the same. `lib` is `math` for Python floats (exactly
    torchvision's arithmetic) or `torch` for float64 tensors, one value per image."""
    rot, sx, sy = angle * _RAD_PER_DEG, shear_x * _RAD_PER_DEG, shear_y * _RAD_PER_DEG
    cos_sy, tan_sx = lib.cos(sy), lib.tan(sx)
    a = lib.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + lib.sin(rot))
    c = lib.sin(rot - sy) / cos_sy
    d = lib.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    cx_tx, cy_ty = cx + tx, cy + ty
    return [m0, m1, cx - m0 * cx_tx - m1 * cy_ty, m3, m4, cy - m3 * cx_tx - m4 * cy_ty]


def _matrix_terms(name: str, m, h: int, w: int, lib) -> list:
    """The inverse affine terms of geometric operation `name` at (signed) magnitude m on an h x w image, as
    torchvision's policies set it up: shears of atan(m) about the top-left corner, translations by int(m),
    rotations by m mod 360 about the centre. m: a float with lib=math, a float64 tensor with lib=torch."""
    zero = 0.0 if lib is math else torch.zeros_like(m)
    if name == "ShearX":
        return _inverse_affine(zero, zero, zero, lib.atan(m) * _DEG_PER_RAD, zero, -0.5 * w, -0.5 * h, lib)
    if name == "ShearY":
        return _inverse_affine(zero, zero, zero, zero, lib.atan(m) * _DEG_PER_RAD, -0.5 * w, -0.5 * h, lib)
    if name == "TranslateX":
        return _inverse_affine(zero, lib.trunc(m), zero, zero, zero, 0.0, 0.0, lib)
    if name == "TranslateY":
        return _inverse_affine(zero, zero, lib.trunc(m), zero, zero, 0.0, 0.0, lib)
    if name == "Rotate":
        return _inverse_affine(-(m % 360.0), zero, zero, zero, zero, 0.0, 0.0, lib)
    raise ValueError(f"{name} is not a geometric operation")


def _matrices(name: str, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N x 2 x 3 float32 matrices of one geometric operation, one per image's magnitude, computed on the device
    in float64 (float32 on MPS, which has no float64)."""
    m = magnitude.to(torch.float32 if magnitude.device.type == "mps" else torch.float64)
    return torch.stack(_matrix_terms(name, m, h, w, torch), 1).view(-1, 2, 3).float()


def _identity_matrix(n: int, device: torch.device) -> torch.Tensor:
    matrix = torch.zeros(n, 2, 3, device=device)
    matrix[:, 0, 0] = 1
    matrix[:, 1, 1] = 1
    return matrix


def _sampling_grid(matrix: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N x H x W x 2 grid_sample coordinates: each output pixel centre, relative to the image centre, mapped by
    the image's matrix and normalised by the half-size (torchvision's affine grid, batched)."""
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=matrix.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=matrix.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=matrix.device)], -1)
    scaled = torch.stack([matrix[:, 0] / (0.5 * w), matrix[:, 1] / (0.5 * h)], 2)     # N x 3 x 2
    n = matrix.shape[0]
    return base.view(1, h * w, 3).expand(n, h * w, 3).bmm(scaled).view(n, h, w, 2)


def _fill_values(fill: Fill, c: int) -> list[float]:
    values = [float(fill)] * c if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if len(values) == 1:
        values *= c
    if len(values) != c:
        raise ValueError(f"fill has {len(values)} values for {c} channels")
    return values


def _sample(x: torch.Tensor, grid: torch.Tensor, fill: Fill) -> torch.Tensor:
    """uint8 N x C x H x W sampled at a grid_sample grid, nearest neighbour, outside pixels 0 or `fill`
    (torchvision's _apply_grid_transform, batched)."""
    n, c, h, w = x.shape
    img = x.float()
    if fill is None:
        return _to_uint8(F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False))
    img = torch.cat([img, torch.ones(n, 1, h, w, device=x.device)], 1)
    out = F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out, outside = out[:, :c], out[:, c:] < 0.5
    out = torch.cat([out[:, i:i + 1].masked_fill(outside, v) for i, v in enumerate(_fill_values(fill, c))], 1)
    return _to_uint8(out.round_())


def warp(x: torch.Tensor, matrix: torch.Tensor, fill: Fill = None) -> torch.Tensor:
    """uint8 N x C x H x W sampled through per-image inverse affine matrices (N x 2 x 3, see _inverse_affine),
    nearest neighbour; pixels that come from outside the image are 0, or `fill` (a number or one per channel)."""
    return _sample(x, _sampling_grid(matrix, *x.shape[-2:]), fill)


def shear_x(x: torch.Tensor, magnitude: torch.Tensor, fill: Fill = None) -> torch.Tensor:
    """torchvision's ShearX: x' = x + m * y about the top-left corner (shear angle atan(m))."""
    return warp(x, _matrices("ShearX", magnitude, *x.shape[-2:]), fill)


def shear_y(x: torch.Tensor, magnitude: torch.Tensor, fill: Fill = None) -> torch.Tensor:
    """torchvision's ShearY: y' = y + m * x about the top-left corner (shear angle atan(m))."""
    return warp(x, _matrices("ShearY", magnitude, *x.shape[-2:]), fill)


def translate_x(x: torch.Tensor, magnitude: torch.Tensor, fill: Fill = None) -> torch.Tensor:
    """torchvision's TranslateX: shift right by int(m) pixels (truncated towards zero)."""
    return warp(x, _matrices("TranslateX", magnitude, *x.shape[-2:]), fill)


def translate_y(x: torch.Tensor, magnitude: torch.Tensor, fill: Fill = None) -> torch.Tensor:
    """torchvision's TranslateY: shift down by int(m) pixels (truncated towards zero)."""
    return warp(x, _matrices("TranslateY", magnitude, *x.shape[-2:]), fill)


def rotate(x: torch.Tensor, magnitude: torch.Tensor, fill: Fill = None) -> torch.Tensor:
    """torchvision's Rotate: m degrees counter-clockwise about the image centre, same size."""
    return warp(x, _matrices("Rotate", magnitude, *x.shape[-2:]), fill)


# ---- colour operations: per-image lookup tables -------------------------------------------------------------

def _grey_levels(x: torch.Tensor) -> torch.Tensor:
    """0..255 as float32 on x's device, shaped 1 x 1 x 256 for per-image tables."""
    return torch.arange(256, device=x.device, dtype=torch.float32).view(1, 1, 256)


def _per_image(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.float().view(-1, 1, 1)


def _table_entries(x: torch.Tensor) -> torch.Tensor:
    """int32 (N*C*H*W,): each pixel's entry in a flattened N x C x 256 table, (n * C + c) * 256 + x[n, c, i, j]."""
    n, c = x.shape[:2]
    offsets = torch.arange(0, n * c * 256, 256, dtype=torch.int32, device=x.device).view(n, c, 1, 1)
    return x.to(torch.int32).add_(offsets).view(-1)


def apply_lut(x: torch.Tensor, lut: torch.Tensor, entries: torch.Tensor | None = None) -> torch.Tensor:
    """out[n, c, i, j] = lut[n, c, x[n, c, i, j]]: uint8 tables N x C x 256 (or N x 1 x 256 for all channels).
    entries: _table_entries(x), if already computed."""
    n, c = x.shape[:2]
    entries = _table_entries(x) if entries is None else entries
    return lut.expand(n, c, 256).reshape(-1).index_select(0, entries).view_as(x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W float luma (ITU-R 601-2 weights, torchvision's), floored as torchvision does for uint8."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _identity_lut(x: torch.Tensor) -> torch.Tensor:
    return _grey_levels(x).to(torch.uint8).expand(x.shape[0], 1, 256)


def _brightness_lut(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _truncate(_grey_levels(x) * (1 + _per_image(magnitude)))


def _contrast_lut(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    grey = _grayscale(x) if x.shape[1] == 3 else x.float()
    mean = grey.mean(dim=(1, 2, 3)).view(-1, 1, 1)
    m = _per_image(magnitude)
    return _truncate(torch.addcmul(_grey_levels(x) * (1 + m), mean, -m))


def _posterize_lut(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    bits = magnitude.trunc().clamp(0, 8).long().view(-1, 1, 1)
    mask = (255 << (8 - bits)) & 255
    return (_grey_levels(x).long() & mask).to(torch.uint8)


def _solarize_lut(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    v = _grey_levels(x)
    return torch.where(v >= 255 * _per_image(magnitude), 255 - v, v).to(torch.uint8)


def _autocontrast_lut(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(2, 3)).float().unsqueeze(2)
    high = x.amax(dim=(2, 3)).float().unsqueeze(2)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return _truncate((_grey_levels(x) - torch.where(flat, 0.0, low)) / inv_scale)


def _equalize_lut(x: torch.Tensor, magnitude: torch.Tensor, entries: torch.Tensor | None = None) -> torch.Tensor:
    """PIL's equalisation per image and channel: level k maps to min(255, (pixels below k + step // 2) // step),
    where step = (pixels not at the brightest level present) // 255; a channel with step 0 is left as it is.
    The histograms: one index_add over the batch (no host synchronisation, unlike bincount on CUDA).
    entries: _table_entries(x), if already computed."""
    n, c, h, w = x.shape
    entries = _table_entries(x) if entries is None else entries
    hist = torch.zeros(n * c * 256, dtype=torch.int32, device=x.device)
    hist = hist.index_add_(0, entries, torch.ones(1, dtype=torch.int32, device=x.device).expand(entries.numel()))
    hist = hist.view(n, c, 256).long()
    at_top = hist.gather(2, x.view(n, c, h * w).amax(dim=2, keepdim=True).long())
    step = (h * w - at_top) // 255
    below = hist.cumsum(2) - hist
    # floor division in float32: exact while below + step < 2**24 (images under 16 million pixels)
    lut = ((below + step // 2).float() / step.clamp(min=1).float()).floor_()
    return _truncate(torch.where(step == 0, _grey_levels(x), lut))


def _invert_lut(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return (255 - _grey_levels(x)).to(torch.uint8)


_LUTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Brightness": _brightness_lut, "Contrast": _contrast_lut,
    "Posterize": _posterize_lut, "Solarize": _solarize_lut, "AutoContrast": _autocontrast_lut,
    "Equalize": _equalize_lut, "Invert": _invert_lut}


def identity(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The batch as it is (magnitude ignored)."""
    return x


def brightness(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness with factor 1 + m."""
    return apply_lut(x, _brightness_lut(x, magnitude))


def contrast(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_contrast with factor 1 + m: blend with the image's mean (floored) grey level."""
    return apply_lut(x, _contrast_lut(x, magnitude))


def posterize(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's posterize keeping int(m) high bits (clamped to 0..8)."""
    return apply_lut(x, _posterize_lut(x, magnitude))


def solarize(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's solarize with threshold 255 * m: pixels >= threshold are inverted."""
    return apply_lut(x, _solarize_lut(x, magnitude))


def autocontrast(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast: each channel stretched to 0..255 (magnitude ignored)."""
    return apply_lut(x, _autocontrast_lut(x, magnitude))


def equalize(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize: per-image, per-channel histogram equalisation (magnitude ignored)."""
    return apply_lut(x, _equalize_lut(x, magnitude))


def invert(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """255 - x (magnitude ignored)."""
    return apply_lut(x, _invert_lut(x, magnitude))


def _blend(x: torch.Tensor, other: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """x * (1 + m) - m * other per image, clamped and truncated to uint8: torchvision's _blend with factor 1 + m,
    down to its fused multiply-add (addcmul fuses it too)."""
    m = magnitude.float().view(-1, 1, 1, 1)
    return _truncate(x.float().mul_(1 + m).addcmul_(other, -m))


def color(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_saturation with factor 1 + m: blend with the floored grey image; 1 channel: as is."""
    if x.shape[1] == 1:
        return x
    return _blend(x, _grayscale(x), magnitude)


def _blur_sums(img: torch.Tensor) -> torch.Tensor:
    """The inner (H-2) x (W-2) pixels' 3 x 3 sums with weight 5 at the centre and 1 around it: integers, exact."""
    rows = img[..., :-2] + img[..., 1:-1]
    rows += img[..., 2:]
    sums = rows[..., :-2, :] + rows[..., 1:-1, :]
    sums += rows[..., 2:, :]
    return sums.add_(img[..., 1:-1, 1:-1], alpha=4)


def sharpness(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness with factor 1 + m: the inner pixels move away from (m > 0) or towards a
    3 x 3 blur (weights 1, and 5 at the centre, over 13, rounded); border pixels, and images of 2 pixels or fewer
    across, stay as they are. The blur is exact: an integer sum over 13 is never within float error of a half."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    img = x.float()
    inner = img[..., 1:-1, 1:-1]
    towards_blur = _blur_sums(img).div_(13).round_().sub_(inner)
    out = x.clone()
    out[..., 1:-1, 1:-1] = _truncate(inner.addcmul_(towards_blur, -magnitude.float().view(-1, 1, 1, 1)))
    return out


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Identity": identity, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
    "TranslateY": translate_y, "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
    "Equalize": equalize, "Invert": invert}


# ---- one operation per image --------------------------------------------------------------------------------

def _selects(op: torch.Tensor, name: str) -> torch.Tensor:
    return op == OP_NAMES.index(name)


def _warp_selected(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, names: Sequence[str], fill: Fill,
                   grid: torch.Tensor | None) -> torch.Tensor:
    geometric = [name for name in names if name in GEOMETRIC_OPS]
    if not geometric:
        return x
    if grid is None:
        n, _, h, w = x.shape
        matrix = _identity_matrix(n, x.device)
        for name in geometric:
            matrix = torch.where(_selects(op, name).view(-1, 1, 1), _matrices(name, magnitude, h, w), matrix)
        grid = _sampling_grid(matrix, h, w)
    return _sample(x, grid, fill)


def _lookup_selected(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor,
                     names: Sequence[str]) -> torch.Tensor:
    tabled = [name for name in names if name in _LUTS]
    if not tabled:
        return x
    entries = _table_entries(x)
    lut = _identity_lut(x)
    for name in tabled:
        table = _equalize_lut(x, magnitude, entries) if name == "Equalize" else _LUTS[name](x, magnitude)
        lut = torch.where(_selects(op, name).view(-1, 1, 1), table, lut)
    return apply_lut(x, lut, entries)


def _only_selected(magnitude: torch.Tensor, op: torch.Tensor, name: str) -> torch.Tensor:
    """The magnitudes of the images whose operation is `name`, 0 (a blend's identity) for the others."""
    return torch.where(_selects(op, name), magnitude, 0.0)


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, names: Sequence[str] = OP_NAMES,
              fill: Fill = None, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Image i gets OPS[OP_NAMES[op[i]]] with magnitude[i] (op: long (N,), indices into OP_NAMES).

    `names` lists the operations `op` may select (a policy's, fixed): families none of them belongs to are
    skipped. In each family the other images get the family's identity (identity matrix, identity table,
    magnitude 0 for Color and Sharpness: x * 1 - 0 * y is x exactly), so no whole-batch selection is needed.
    `grid`: the images' sampling grids (N x H x W x 2, the identity's for images without a geometric
    operation) where already known (a policy's cached ones); built from the magnitudes when None.
    Equal to running each image through its own operation (tests/test_policies.py)."""
    x = _warp_selected(x, op, magnitude, names, fill, grid)
    x = _lookup_selected(x, op, magnitude, names)
    if "Color" in names and x.shape[1] == 3:
        x = color(x, _only_selected(magnitude, op, "Color"))
    if "Sharpness" in names:
        x = sharpness(x, _only_selected(magnitude, op, "Sharpness"))
    return x


# ---- policies ----------------------------------------------------------------------------------------------

def _linear(top: float) -> Callable[[int, int, int], torch.Tensor]:
    return lambda bins, h, w: torch.linspace(0.0, top, bins)


def _posterize_bits(span: int) -> Callable[[int, int, int], torch.Tensor]:
    """Bits from 8 down to 8 - span over the bins, rounded."""
    return lambda bins, h, w: (8 - torch.arange(bins) / ((bins - 1) / span)).round()


def _solarize_thresholds(bins: int, h: int, w: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, bins)


# name -> (magnitude of each bin as a function of (bins, height, width), signed); operations without a
# magnitude are absent. The ranges of torchvision's AutoAugment/RandAugment and TrivialAugmentWide.
_STANDARD_SPACE = {
    "ShearX": (_linear(0.3), True), "ShearY": (_linear(0.3), True),
    "TranslateX": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins), True),
    "TranslateY": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins), True),
    "Rotate": (_linear(30.0), True), "Brightness": (_linear(0.9), True), "Color": (_linear(0.9), True),
    "Contrast": (_linear(0.9), True), "Sharpness": (_linear(0.9), True),
    "Posterize": (_posterize_bits(4), False), "Solarize": (_solarize_thresholds, False)}
_WIDE_SPACE = {
    "ShearX": (_linear(0.99), True), "ShearY": (_linear(0.99), True),
    "TranslateX": (_linear(32.0), True), "TranslateY": (_linear(32.0), True),
    "Rotate": (_linear(135.0), True), "Brightness": (_linear(0.99), True), "Color": (_linear(0.99), True),
    "Contrast": (_linear(0.99), True), "Sharpness": (_linear(0.99), True),
    "Posterize": (_posterize_bits(6), False), "Solarize": (_solarize_thresholds, False)}

# RandAugment's and TrivialAugmentWide's operations, drawn uniformly
_UNIFORM_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019): 25 sub-policies of two (operation, probability, bin of
# 10); one drawn uniformly per image, each of its operations applied with its probability.
_CIFAR10_SUBPOLICIES = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
_CIFAR10_OPS = ("Identity",) + tuple(sorted({name for sub in _CIFAR10_SUBPOLICIES for name, _, _ in sub},
                                            key=OP_NAMES.index))

_SPACES = {"autoaugment": (_STANDARD_SPACE, 10), "randaugment": (_STANDARD_SPACE, 31),
           "trivialaugment": (_WIDE_SPACE, 31)}


@lru_cache(maxsize=64)
def _magnitude_table(policy: str, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(OP_NAMES) x bins float32 magnitudes, len(OP_NAMES) bool signed) on the device: the bins as
    torchvision computes them (float32 linspace on the CPU), 0 for operations without a magnitude."""
    space, bins = _SPACES[policy]
    table = torch.zeros(len(OP_NAMES), bins)
    signed = torch.zeros(len(OP_NAMES), dtype=torch.bool)
    for name, (magnitudes, is_signed) in space.items():
        table[OP_NAMES.index(name)] = magnitudes(bins, h, w).float()
        signed[OP_NAMES.index(name)] = is_signed
    return table.to(device), signed.to(device)


@lru_cache(maxsize=8)
def _cifar10_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAugment's CIFAR-10 sub-policies as 25 x 2 tensors on the device: operation indices (into OP_NAMES),
    probabilities, magnitude bins (0 for operations without a magnitude)."""
    ops = torch.tensor([[OP_NAMES.index(name) for name, _, _ in sub] for sub in _CIFAR10_SUBPOLICIES])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in _CIFAR10_SUBPOLICIES])
    bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in _CIFAR10_SUBPOLICIES])
    return ops.to(device), probs.to(device), bins.to(device)


@lru_cache(maxsize=8)
def _uniform_op_indices(device: torch.device) -> torch.Tensor:
    return torch.tensor([OP_NAMES.index(name) for name in _UNIFORM_OPS]).to(device)


_WARPED = OP_NAMES[:6]     # Identity and the geometric operations: the rows of _grid_table, indexed by op


@lru_cache(maxsize=16)
def _grid_table(policy: str, h: int, w: int, device: torch.device) -> torch.Tensor:
    """6 x bins x 2 x H x W x 2 on the device: the sampling grid of Identity and of each geometric operation
    (rows in _WARPED order) at each magnitude bin, as drawn [..., 0, ...] and negated [..., 1, ...], built once
    per policy, image size and device so that batches look their grids up (TrivialAugmentWide on 32 x 32
    images: 3 MB; on 224 x 224: 150 MB).

    The matrices are computed on the host with Python's math, as torchvision computes them: bit for bit the
    same float32 matrices, also where a term lands on a float32 rounding tie that the C library's last bit
    decides (which torch's own float64 trigonometry, in _matrices, decides its own way now and then)."""
    table = _magnitude_table(policy, h, w, torch.device("cpu"))[0]
    bins = table.shape[1]
    terms = [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * (2 * bins)
    for name in GEOMETRIC_OPS:
        for m in table[OP_NAMES.index(name)].tolist():
            terms += [_matrix_terms(name, m, h, w, math), _matrix_terms(name, -m, h, w, math)]
    matrices = torch.tensor(terms, dtype=torch.float32).view(-1, 2, 3).to(device)
    return _sampling_grid(matrices, h, w).view(len(_WARPED), bins, 2, h, w, 2)


@dataclass(frozen=True)
class OpDraw:
    """One layer of a policy's draws: image i gets operation OP_NAMES[op[i]] at magnitude bin bin[i], negated
    where negated[i]; magnitude[i] is that signed value. All (N,) tensors on the generator's device."""
    op: torch.Tensor          # long
    bin: torch.Tensor         # long
    negated: torch.Tensor     # bool
    magnitude: torch.Tensor   # float32

    def rows(self, select: Callable[[torch.Tensor], torch.Tensor]) -> "OpDraw":
        """The layer for a subset of the images: `select` picks the same rows of each tensor."""
        return OpDraw(select(self.op), select(self.bin), select(self.negated), select(self.magnitude))


def _draw_signed(table: torch.Tensor, signed: torch.Tensor, op: torch.Tensor, bin_: torch.Tensor,
                 generator: torch.Generator) -> OpDraw:
    """The layer with magnitudes table[op, bin], negated with probability 1/2 for signed operations (the rule
    of torchvision's policies)."""
    negated = (torch.rand(op.shape, generator=generator, device=op.device) < 0.5) & signed[op]
    magnitude = table[op, bin_]
    return OpDraw(op, bin_, negated, torch.where(negated, -magnitude, magnitude))


@dataclass(frozen=True)
class AugmentPolicy:
    """A per-image augmentation policy on uint8 batches: `policy(x, generator)` draws every image's
    operation(s) and magnitude(s) from `generator` (on x's device) and applies them.

    name: "none" (the batch as it is, nothing drawn), "autoaugment" (AutoAugment's CIFAR-10 policy, 10 bins),
    "randaugment" (num_ops operations per image, uniform over 14, all at bin `magnitude` of 31), or
    "trivialaugment" (TrivialAugmentWide: one operation per image, uniform over 14, uniform bin of 31).
    Geometric operations fill with `fill` (default 0). The same generator state on the same device gives the
    same output."""
    name: str
    num_ops: int = 2
    magnitude: int = 9
    fill: Fill = None

    def __post_init__(self):
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown augmentation policy {self.name!r}: expected one of {', '.join(POLICY_NAMES)}")
        if self.num_ops < 0:
            raise ValueError(f"RandAugment's number of operations must be >= 0, got {self.num_ops}")
        if not 0 <= self.magnitude < 31:
            raise ValueError(f"RandAugment's magnitude must be a bin in 0..30, got {self.magnitude}")

    @property
    def op_names(self) -> tuple[str, ...]:
        """The operations this policy can apply."""
        return {"none": (), "autoaugment": _CIFAR10_OPS}.get(self.name, _UNIFORM_OPS)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> list[OpDraw]:
        """The operations of n images of height x width, layer by layer (applied in order)."""
        device = generator.device
        if self.name == "none":
            return []
        table, signed = _magnitude_table(self.name, height, width, device)
        if self.name == "autoaugment":
            return self._draw_autoaugment(n, table, signed, generator)
        layers = 1 if self.name == "trivialaugment" else self.num_ops
        draws = []
        for _ in range(layers):
            op = _uniform_op_indices(device)[torch.randint(len(_UNIFORM_OPS), (n,), generator=generator,
                                                           device=device)]
            if self.name == "trivialaugment":
                bin_ = torch.randint(table.shape[1], (n,), generator=generator, device=device)
            else:
                bin_ = torch.full((n,), self.magnitude, device=device)
            draws.append(_draw_signed(table, signed, op, bin_, generator))
        return draws

    def _draw_autoaugment(self, n: int, table: torch.Tensor, signed: torch.Tensor,
                          generator: torch.Generator) -> list[OpDraw]:
        device = generator.device
        ops, probs, bins = _cifar10_tables(device)
        sub = torch.randint(len(_CIFAR10_SUBPOLICIES), (n,), generator=generator, device=device)
        draws = []
        for k in range(2):
            applied = torch.rand(n, generator=generator, device=device) < probs[sub, k]
            op = torch.where(applied, ops[sub, k], OP_NAMES.index("Identity"))
            draws.append(_draw_signed(table, signed, op, bins[sub, k], generator))
        return draws

    def apply(self, x: torch.Tensor, draws: Sequence[OpDraw]) -> torch.Tensor:
        """x with the drawn operations applied, layer by layer."""
        for layer in draws:
            x = apply_ops(x, layer.op, layer.magnitude, self.op_names, self.fill, self._grids(layer, x))
        return x

    def _grids(self, layer: OpDraw, x: torch.Tensor) -> torch.Tensor:
        """The layer's sampling grids, looked up in the policy's table (identity for non-geometric images)."""
        table = _grid_table(self.name, x.shape[2], x.shape[3], x.device)
        row = torch.where(layer.op < len(_WARPED), layer.op, 0)
        return table[row, layer.bin, layer.negated.long()]

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], generator))


def build_policy(name: str, randaugment_ops: int = 2, randaugment_magnitude: int = 9,
                 fill: Fill = None) -> AugmentPolicy:
    """The policy called `name` (one of POLICY_NAMES); the RandAugment settings are ignored by the others."""
    return AugmentPolicy(name, randaugment_ops, randaugment_magnitude, fill)


# ---- random erasing ----------------------------------------------------------------------------------------
