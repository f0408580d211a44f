"""Model registry: shapes, exact parameter counts, options, checkpoints, torchvision models and weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from dtrain.checkpoint import load_checkpoint
from dtrain.errors import UserError
from dtrain.models import build_model, check_input_size, count_parameters, list_archs, model_from_checkpoint, pyramidnet
from dtrain.models.cifar_resnet import SubsampleZeroPad
from dtrain.models.pyramidnet import ShakeDrop, shakedrop_probabilities
from helpers import train_here
from test_imagefolder import write_folder

# arch -> (in_channels, image_size, parameters for 10 classes at that channel count)
PARAMS = {
    "resnet18": (3, 32, 11_173_962),
    "googlenet": (3, 32, 6_166_250),  # the widely used CIFAR GoogLeNet's count
    "cnn": (3, 32, 288_746),
    "mnist-cnn": (1, 28, 8_550),
    "mnist-cnn-deep": (1, 28, 232_554),
    "mnist-resnet": (1, 28, 577_402),
    "airbench": (3, 32, 1_972_768),
    "airbench96": (3, 32, 9_918_752),  # lib_airbench96.py's layout less its 24-parameter whitening bias
    "preact-resnet18": (3, 32, 11_171_146),  # kuangliu's PreActResNet18, MixUp's network (He et al. 2016b)
    "resnet20": (3, 32, 269_722),  # He et al. 2016a, Table 6: 0.27M (option A shortcuts)
    "resnet32": (3, 32, 464_154),  # 0.46M
    "resnet44": (3, 32, 658_586),  # 0.66M
    "resnet56": (3, 32, 853_018),  # 0.85M
    "resnet110": (3, 32, 1_727_962),  # 1.7M
    "wrn16-8": (3, 32, 10_961_370),  # Zagoruyko & Komodakis 2016: 11.0M
    "wrn28-10": (3, 32, 36_479_194),  # 36.5M
    "wrn40-2": (3, 32, 2_243_546),  # 2.2M
    "pyramidnet110-48": (3, 32, 1_772_706),  # Han et al. 2017: 1.7M
    "pyramidnet272-200": (3, 32, 26_210_842),  # 26.0M
}

# The big ones: forwarded once, at batch 1; their code paths run in the other tests through small members of
# their families (wrn10-2, a depth-20 bottleneck PyramidNet).
HEAVY = {"wrn16-8", "wrn28-10", "pyramidnet272-200"}
LIGHT = sorted(set(PARAMS) - HEAVY)


def test_every_arch_is_covered():
    assert sorted(PARAMS) == list_archs()


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_shape_and_parameter_count(arch):
    channels, size, params = PARAMS[arch]
    model = build_model(arch, 10, in_channels=channels, image_size=size)
    assert count_parameters(model) == params
    model.eval()
    batch = 1 if arch in HEAVY else 2
    with torch.no_grad():
        assert model(torch.randn(batch, channels, size, size)).shape == (batch, 10)


def test_airbench_trainable_parameters():
    model = build_model("airbench", 10)
    assert count_parameters(model, trainable_only=True) == 1_971_328
    assert not model.whiten.weight.requires_grad


@pytest.mark.parametrize("arch, flatten", [("mnist-cnn", 320), ("mnist-cnn-deep", 576), ("mnist-resnet", 3136)])
def test_mnist_flatten_sizes(arch, flatten):
    model = build_model(arch, 10, in_channels=1, image_size=28)
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == flatten
    # at 28x28 the adaptive pool before the flatten is an identity: the write-up's exact layout
    feats = {}
    model.pool.register_forward_hook(lambda mod, inp, out: feats.update(inp=inp[0].shape, out=out.shape))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    assert feats["inp"] == feats["out"] and feats["out"][1:].numel() == flatten


@pytest.mark.parametrize("arch", LIGHT)
@pytest.mark.parametrize("channels, size", [(1, 64), (3, 64), (1, 32)])
def test_other_channels_and_sizes_flow(arch, channels, size):
    if arch in ("googlenet", "resnet56", "resnet110", "pyramidnet110-48") and size == 64:
        size = 48  # same code path, cheaper
    model = build_model(arch, 5, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 5)


def small_bottleneck_pyramidnet(num_classes: int, in_channels: int, **options) -> nn.Module:
    """pyramidnet272-200's code path (bottleneck blocks) at depth 20: two blocks a stage."""
    return pyramidnet.pyramidnet(20, 24, True, num_classes, in_channels, **options)


@pytest.mark.parametrize("channels, size", [(1, 64), (3, 64), (1, 32)])
def test_heavy_families_flow_through_small_members(channels, size):
    for model in (build_model("wrn10-2", 5, in_channels=channels), small_bottleneck_pyramidnet(5, channels)):
        with torch.no_grad():
            assert model.eval()(torch.randn(2, channels, size, size)).shape == (2, 5)


@pytest.mark.parametrize("size", [29, 7])
def test_downsampling_shortcuts_fit_odd_sizes(size):
    models = [build_model(arch, 5) for arch in ("resnet20", "wrn10-2", "pyramidnet110-48", "preact-resnet18")]
    for model in [*models, small_bottleneck_pyramidnet(5, 3)]:
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_train_mode_backward_and_channels_last():
    sizes = {"cnn": 32, "mnist-resnet": 32, "airbench": 32, "resnet20": 16, "preact-resnet18": 16, "wrn10-2": 16,
             "pyramidnet110-48": 16}
    for arch, size in sizes.items():
        model = build_model(arch, 3, in_channels=3, image_size=size).to(memory_format=torch.channels_last)
        out = model(torch.randn(4, 3, size, size).to(memory_format=torch.channels_last))
        out.sum().backward()
        assert out.shape == (4, 3)
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


def test_unknown_arch_lists_names():
    with pytest.raises(UserError) as e:
        build_model("resnet1000", 10)
    msg = str(e.value)
    for name in list_archs():
        assert name in msg
    assert "tv:<name>" in msg and "wrnD-K" in msg


def test_arch_args_neutral_values_are_ignored_others_rejected():
    neutral = dict(norm="batch", aux_logits=False, pretrained=False, weights=None)
    for arch in list_archs():
        build_model(arch, 10, image_size=32, **neutral)
    with pytest.raises(UserError, match="aux_logits"):
        build_model("resnet18", 10, aux_logits=True)
    with pytest.raises(UserError, match="dropout"):
        build_model("cnn", 10, dropout=0.3)
    with pytest.raises(UserError, match="pretrained"):
        build_model("cnn", 10, pretrained=True)
    with pytest.raises(UserError, match="norm"):
        build_model("airbench", 10, norm="group")
    with pytest.raises(UserError, match="norm"):
        build_model("resnet18", 10, norm="layer")
    with pytest.raises(UserError, match="at least"):
        build_model("mnist-cnn-deep", 10, in_channels=1, image_size=16)


def test_group_norm_has_no_batch_statistics():
    for arch in ("cnn", "resnet18", "resnet20", "preact-resnet18", "wrn10-2", "pyramidnet110-48"):
        model = build_model(arch, 10, norm="group")
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    plain = build_model("cnn", 10, norm="none")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in plain.modules())


def test_googlenet_aux_logits():
    model = build_model("googlenet", 7, aux_logits=True)
    assert count_parameters(model) > 6_166_250
    x = torch.randn(2, 3, 16, 16)  # small input keeps the test cheap; the aux heads pool adaptively
    logits, aux = model.train()(x)
    assert logits.shape == (2, 7)
    assert [w for w, _ in aux] == [0.3, 0.3]
    assert all(a.shape == (2, 7) for _, a in aux)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


def test_model_from_checkpoint_round_trip():
    model = build_model("mnist-cnn", 4, in_channels=1, image_size=28, norm="group")
    ckpt = {
        "arch": "mnist-cnn", "num_classes": 4, "in_channels": 1, "image_size": 28,
        "arch_args": {"norm": "group", "pretrained": False, "weights": None, "aux_logits": False},
        # as saved from a compiled DDP model
        "model": {"module._orig_mod." + k: v for k, v in model.state_dict().items()},
    }
    rebuilt = model_from_checkpoint(ckpt)
    assert not rebuilt.training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_model_from_checkpoint_mismatch_is_user_error():
    state = build_model("cnn", 10).state_dict()
    with pytest.raises(UserError, match="do not fit"):
        model_from_checkpoint({"arch": "cnn", "num_classes": 5, "model": state, "arch_args": {}})


# --- CIFAR ResNets, pre-activation ResNet18, Wide ResNets ----------------------------------------------


def conv_count(model: nn.Module, kernel: int) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel) for m in model.modules())


def test_cifar_resnets_have_parameter_free_option_a_shortcuts():
    for depth in (20, 56):
        model = build_model(f"resnet{depth}", 10)
        assert conv_count(model, 1) == 0
        assert conv_count(model, 3) == depth - 1  # plus the linear layer: the depth
    shortcut = SubsampleZeroPad(16, 32, 2)
    x = torch.randn(2, 16, 9, 9)
    y = shortcut(x)
    assert y.shape == (2, 32, 5, 5)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_preact_resnet18_layout():
    model = build_model("preact-resnet18", 10)
    # kuangliu's layout: no norm or activation after the stem conv or after the last block
    assert [type(m) for m in model.children()] == [nn.Conv2d, nn.Sequential, nn.AdaptiveAvgPool2d, nn.Linear]
    assert conv_count(model, 1) == 3  # projections where stages 2-4 halve the size and double the width


def test_wrn_names_resolve_by_pattern():
    assert {"wrn16-8", "wrn28-10", "wrn40-2"} <= set(list_archs())
    assert "wrn10-2" not in list_archs()
    model = build_model("wrn10-2", 10)
    assert count_parameters(model) == 303_706
    assert [stage[0].conv1.out_channels for stage in model.stages] == [32, 64, 128]
    assert len(model.stages[0]) == 1 and len(build_model("wrn40-2", 10).stages[0]) == 6
    assert conv_count(build_model("wrn10-1", 10), 1) == 2  # 16 -> 16 at stride 1 needs no projection


@pytest.mark.parametrize("name", ["wrn30-10", "wrn4-2", "wrn12-1"])
def test_wrn_invalid_depth_is_one_clear_line(name):
    with pytest.raises(UserError) as e:
        build_model(name, 10)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "6n + 4" in msg and "10, 16, 22, 28" in msg


def test_wrn_dropout_option():
    model = build_model("wrn10-2", 10, dropout=0.3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3] * 3
    assert not any(isinstance(m, nn.Dropout) for m in build_model("wrn10-2", 10).modules())
    with pytest.raises(UserError, match="dropout"):
        build_model("wrn10-2", 10, dropout=1.0)


@pytest.mark.parametrize("arch", ["resnet20", "preact-resnet18", "wrn10-2", "pyramidnet110-48"])
def test_new_families_refuse_other_norms(arch):
    for norm in ("none", "layer"):
        with pytest.raises(UserError, match=f"--norm '{norm}' is not supported by arch '{arch}'"):
            build_model(arch, 10, norm=norm)


def test_wrn_checkpoint_round_trip_by_pattern_name():
    model = build_model("wrn10-2", 4, norm="group")
    ckpt = {"arch": "wrn10-2", "num_classes": 4, "in_channels": 3, "image_size": 32,
            "arch_args": {"norm": "group"}, "model": model.state_dict()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model_from_checkpoint(ckpt)(x), model.eval()(x))


# --- PyramidNet and ShakeDrop ---------------------------------------------------------------------------


def test_pyramidnet_additive_widths_and_shortcuts():
    model = build_model("pyramidnet110-48", 10)
    widths = [block.branch[-1].num_features for block in model.blocks]
    assert len(widths) == 54 and widths[0] == 17 and widths[-1] == 64  # round(16 + 48 l / 54)
    assert widths == [round(16 + 48 * k / 54) for k in range(1, 55)]
    assert conv_count(model, 1) == 0  # zero-padded identity shortcuts
    big = build_model("pyramidnet272-200", 10)
    assert len(big.blocks) == 90 and big.fc.in_features == 864  # the paper's output feature dimension
    assert [i for i, b in enumerate(big.blocks) if isinstance(b.pool, nn.AvgPool2d)] == [30, 60]


def test_shakedrop_linear_decay_rule():
    assert shakedrop_probabilities(0.5, 4) == [0.125, 0.25, 0.375, 0.5]
    model = build_model("pyramidnet110-48", 10, shakedrop=0.5)
    p = [block.shakedrop.p_drop for block in model.blocks]
    assert p == pytest.approx([0.5 * k / 54 for k in range(1, 55)])
    assert p[-1] == 0.5
    assert all(block.shakedrop.p_drop == 0 for block in build_model("pyramidnet110-48", 10).blocks)


def twin_pyramidnets(shakedrop: float) -> tuple[nn.Module, nn.Module]:
    """(plain, with shakedrop) basic-block PyramidNets of depth 20 (3 blocks a stage) with the same weights."""
    torch.manual_seed(0)
    plain = pyramidnet.pyramidnet(20, 24, False, 10)
    torch.manual_seed(0)
    shaken = pyramidnet.pyramidnet(20, 24, False, 10, shakedrop=shakedrop)
    for a, b in zip(plain.state_dict().values(), shaken.state_dict().values()):
        assert torch.equal(a, b)
    return plain, shaken


def test_shakedrop_evaluation_is_the_expectation():
    plain, shaken = twin_pyramidnets(0.5)
    plain.eval(), shaken.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = shaken(x)
        assert torch.equal(out, shaken(x))
        assert not torch.allclose(out, plain(x))
        for i in (0, 3, 8):  # the first, a downsampling and the last block
            block, ref = shaken.blocks[i], plain.blocks[i]
            h = torch.randn(2, block.branch[0].num_features, 8, 8)
            expected = ref(h) - block.shakedrop.p_drop * ref.branch(h)  # shortcut + (1 - p_l) * branch
            torch.testing.assert_close(block(h), expected)
        assert shaken.blocks[8].shakedrop.p_drop == 0.5


def test_shakedrop_zero_is_plain_pyramidnet():
    plain, shaken = twin_pyramidnets(0.0)
    plain.train(), shaken.train()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(shaken(x), plain(x))


def test_shakedrop_training_is_random_from_the_global_rng_and_trains():
    _, model = twin_pyramidnets(0.5)
    model.train()
    x = torch.randn(4, 3, 16, 16)
    first, second = model(x), model(x)
    assert not torch.allclose(first, second)
    torch.manual_seed(7)
    again = model(x)
    torch.manual_seed(7)
    torch.testing.assert_close(model(x), again)
    again.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_shakedrop_scales_forward_by_alpha_and_backward_by_beta():
    drop = ShakeDrop(1.0).train()  # b = 0 always: forward x alpha in [-1, 1], backward x beta in [0, 1]
    x = torch.ones(64, 3, 2, 2, requires_grad=True)
    y = drop(x)
    y.backward(torch.ones_like(y))
    alpha, beta = y.detach()[:, 0, 0, 0], x.grad[:, 0, 0, 0]
    assert torch.equal(y.detach(), alpha.view(-1, 1, 1, 1).expand_as(y))  # one draw per image
    assert torch.equal(x.grad, beta.view(-1, 1, 1, 1).expand_as(x))
    assert alpha.min() >= -1 and alpha.max() <= 1 and alpha.min() < 0 < alpha.max()
    assert beta.min() >= 0 and beta.max() <= 1
    assert not torch.equal(alpha, beta)
    kept = ShakeDrop(1e-9).train()  # b = 1 (almost surely): the identity both ways
    x = torch.randn(8, 3, 2, 2, requires_grad=True)
    y = kept(x)
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    torch.testing.assert_close(ShakeDrop(0.3).eval()(x), 0.7 * x)


def test_shakedrop_never_reads_a_value_back_to_the_host():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    drop = ShakeDrop(0.5).train()
    x = torch.randn(4, 8, 2, 2, requires_grad=True)
    with Ops() as ops:
        drop(x).sum().backward()
    assert ops.names and not any("_local_scalar_dense" in name for name in ops.names)  # what .item() runs


def test_shakedrop_option_is_checked():
    with pytest.raises(UserError, match=r"shakedrop .* \[0, 1\]"):
        build_model("pyramidnet110-48", 10, shakedrop=1.5)
    with pytest.raises(UserError, match="does not support shakedrop"):
        build_model("wrn40-2", 10, shakedrop=0.5)


# --- torchvision models -------------------------------------------------------------------------------


def test_tv_head_swapped():
    model = build_model("tv:resnet18", 7)
    assert model.fc.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_tv_sequential_classifier_and_one_channel():
    model = build_model("tv:mobilenet_v3_small", 4, in_channels=1)
    assert model.model.classifier[-1].out_features == 4
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_tv_unknown_name():
    with pytest.raises(UserError, match="tv:resnet50"):
        build_model("tv:resnet1000", 10)


def test_tv_weights_file_keeps_body_swaps_head(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("tv:resnet18", 7, weights=str(path))
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[key], value)
    assert model.fc.weight.shape == (7, 512)
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError, match="different architecture"):
        build_model("tv:resnet18", 7, weights=str(path))


def test_tv_bad_weights_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        build_model("tv:resnet18", 7, weights=str(path))
    with pytest.raises(UserError, match="no such file"):
        build_model("tv:resnet18", 7, weights=str(tmp_path / "missing.pth"))


def test_tv_pretrained_offline_names_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "resnet18-f37072fd.pth")
    with pytest.raises(UserError) as e:
        build_model("tv:resnet18", 10, pretrained=True)
    assert expected in str(e.value)
    assert "--weights FILE" in str(e.value)


def test_tv_pretrained_from_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model("tv:resnet18", 3, pretrained=True)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3


def test_tv_checkpoint_round_trip_does_not_need_pretrained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: pretrained=True would fail
    model = build_model("tv:resnet18", 5, in_channels=1)
    ckpt = {"arch": "tv:resnet18", "num_classes": 5, "in_channels": 1, "image_size": 32,
            "arch_args": {"pretrained": True}, "model": model.state_dict()}
    rebuilt = model_from_checkpoint(ckpt)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))


@pytest.mark.parametrize("arch, size, takes", [("tv:vit_b_16", 32, 224), ("tv:vit_b_16", 256, 224),
                                              ("tv:inception_v3", 32, 75), ("tv:alexnet", 32, 63)])
def test_tv_model_that_cannot_take_the_image_size_names_the_size_it_takes(arch, size, takes):
    with pytest.raises(UserError) as e:
        check_input_size(arch, size)
    assert str(e.value).startswith(f"--arch {arch} cannot take {size}x{size} images (")
    assert str(e.value).endswith(f"pass --image-size {takes} (it takes {takes}x{takes})")
    check_input_size(arch, takes)                                 # the size it names works


@pytest.mark.parametrize("arch, size, channels", [("tv:resnet18", 32, 3), ("tv:regnet_x_400mf", 32, 1),
                                                  ("tv:swin_t", 32, 3), ("resnet18", 32, 3), ("mnist-cnn", 28, 1)])
def test_models_that_take_the_image_size_pass_the_check(arch, size, channels):
    check_input_size(arch, size, channels)
    check_input_size(arch, None)                                  # not known yet: nothing to check


def test_builtin_archs_keep_their_own_size_line():
    with pytest.raises(UserError, match="needs images of at least 16x16 pixels"):
        check_input_size("mnist-cnn", 8, 1)


def test_tv_model_at_32_px_is_refused_before_the_folder_is_claimed_and_trains_at_the_size_it_names(tmp_path,
                                                                                                   cifar_dir):
    out = tmp_path / "run"
    common = ["--arch", "tv:inception_v3", "--data-dir", cifar_dir, "--no-download", "--max-steps", 1,
              "--batch-size", 4, "--eval-batch-size", 50, "--workers", 0, "--output-dir", out]
    r = train_here(common, status=2)
    assert r.stderr.strip().splitlines() == [
        "error: --arch tv:inception_v3 cannot take 32x32 images (Calculated padded input size per channel: (1 x 1). "
        "Kernel size: (3 x 3). Kernel size can't be greater than actual input size); pass --image-size 75 "
        "(it takes 75x75)"]
    assert not out.exists()                                       # refused before the output folder is claimed
    r = train_here(["--arch", "tv:vit_b_16", "--dataset", "fake", "--output-dir", out], status=2)
    assert "pass --image-size 224 (it takes 224x224)" in r.stderr and not out.exists()
    train_here([*common, "--image-size", 75])                     # CIFAR-10 resized to 75 px: it trains
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["image_size"] == 75 and ckpt["arch"] == "tv:inception_v3"


def test_image_folder_too_small_for_the_model_is_refused_before_anything_is_written(tmp_path):
    """An image folder's size is known once its images are scanned: the check runs then, before the run
    writes anything into its folder, so the corrected command can use the same folder."""
    root = write_folder(tmp_path / "data", n_train=2, n_test=1, sizes=((32, 32),))
    out = tmp_path / "run"
    common = ["--arch", "tv:inception_v3", "--dataset", "imagefolder", "--data-dir", root, "--max-steps", 1,
              "--batch-size", 4, "--workers", 0, "--output-dir", out]
    r = train_here(common, status=2)
    assert len(r.stderr.strip().splitlines()) == 1 and "pass --image-size 75" in r.stderr
    assert list(out.iterdir()) == []                              # claimed, then released: nothing written
    train_here([*common, "--image-size", 75])
    assert load_checkpoint(out / "last.pt")["image_size"] == 75


# --- airbench whitening ---------------------------------------------------------------------------------


def _patch_covariance(y: torch.Tensor) -> torch.Tensor:
    flat = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    return torch.cov(flat.T)


def test_airbench_whitening_from_data():
    torch.manual_seed(0)
    # correlated images: shared component across channels plus a spatially smoothed field
    base = torch.randn(200, 1, 33, 33)
    smooth = (base[..., 1:, 1:] + base[..., :-1, 1:] + base[..., 1:, :-1] + base[..., :-1, :-1]) / 2
    x = 0.8 * smooth + 0.5 * torch.randn(200, 3, 32, 32)
    model = build_model("airbench", 10)
    assert model.whiten.out_channels == 24
    model.init_from_data(x)
    with torch.no_grad():
        y = model.whiten(x)
    cov = _patch_covariance(y[:, :12])
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(model.whiten.weight[12:], -model.whiten.weight[:12])
    # the raw patches were far from white
    raw = torch.nn.functional.unfold(x, 2).transpose(1, 2).reshape(-1, 12)
    assert (torch.cov(raw.T.double()) - torch.eye(12, dtype=torch.float64)).abs().max() > 0.3


def test_model_hooks_loss_and_data_init():
    from dtrain.models import init_from_data, training_loss
    criterion = nn.CrossEntropyLoss()
    y = torch.tensor([1, 2])
    plain = build_model("cnn", 10)
    out = plain(torch.randn(2, 3, 32, 32))
    loss, logits = training_loss(plain, out, y, criterion)
    assert logits is out and loss.item() == pytest.approx(criterion(out, y).item())
    torch.manual_seed(0)
    g = build_model("googlenet", 10, aux_logits=True).train()
    out = g(torch.randn(2, 3, 32, 32))
    loss, logits = training_loss(g, out, y, criterion)
    main, aux = out
    assert logits is main and len(aux) == 2
    expected = criterion(main, y) + sum(w * criterion(a, y) for w, a in aux)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    g.eval()
    with torch.no_grad():
        assert training_loss(g, g(torch.randn(2, 3, 32, 32)), y, criterion)[1].shape == (2, 10)
    asked = []
    init_from_data(plain, lambda: asked.append(1))                     # no hook: no images loaded
    assert asked == []
    a = build_model("airbench", 10)
    before = a.whiten.weight.clone()
    init_from_data(a, lambda: torch.randn(64, 3, 32, 32))
    assert not torch.equal(before, a.whiten.weight)
