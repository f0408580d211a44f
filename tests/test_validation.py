"""Every setting is checked when the Config is built, from flags and recipes alike: a bad value ends the
run before any training with one line that names the flag, and exit status 2."""
import pytest

from helpers import cli_error as run_cli
from helpers import tiny_run

BASE = tiny_run(None, "--epochs", "1")  # "--arch", "cnn" first

BAD_FLAGS = [
    (["--eval-every", "0"], "--eval-every must be at least 1, not 0"),
    (["--log-every", "0"], "--log-every must be at least 1, not 0"),
    (["--save-every", "0"], "--save-every must be at least 1, not 0"),
    (["--crop-padding", "-3"], "--crop-padding must be at least 0, not -3"),
    (["--label-smoothing", "2"], "--label-smoothing must be between 0 and 1, not 2.0"),
    (["--lr", "-1"], "--lr must be at least 0, not -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--lr", "inf"], "--lr must be a finite number, not inf"),
    (["--image-size", "-5"], "--image-size must be at least 1, not -5"),
    (["--image-size", "0"], "--image-size must be at least 1, not 0"),
    (["--fake-size", "0"], "--fake-size must be at least 1, not 0"),
    (["--max-steps", "0"], "--max-steps must be at least 1, not 0"),
    # an epoch count of 0 trains nothing, whatever --max-steps says
    (["--epochs", "0", "--max-steps", "5"], "--epochs must be at least 1, not 0"),
    (["--num-classes", "0"], "--num-classes must be at least 1, not 0"),
    (["--momentum", "2"], "--momentum must be between 0 and 1 (1 excluded), not 2.0"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0, not -1.0"),
    (["--plateau-factor", "-1"], "--plateau-factor must be between 0 and 1 (0 excluded), not -1.0"),
    (["--milestones", "3", "-1"], "--milestones must be a list of values each at least 0, not [3, -1]"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--workers", "-1"], "--workers must be at least 0, not -1"),
    (["--ema", "1.5"], "--ema must be between 0 and 1 (0 and 1 excluded), not 1.5"),
    (["--grad-clip", "0"], "--grad-clip must be positive, not 0.0"),
    (["--translate", "-0.1"], "--translate must be between 0 and 1, not -0.1"),
    (["--lookahead", "5"], "--lookahead N needs --ema DECAY"),
    (["--tta-shift", "1"], "--tta-shift N needs --tta"),
    (["--cutout-holes", "1", "--cutout-length", "0"], "--cutout-length must be at least 1 when --cutout-holes"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --momentum above 0"),
    (["--no-augment", "--augment-policy", "autoaugment"], "--augment-policy acts only with --augment"),
    (["--no-augment", "--random-erasing", "0.5", "--rotate", "5"],
     "--random-erasing and --rotate act only with --augment"),
    (["--mix-prob", "0.5"], "--mix-prob P needs --mixup ALPHA or --cutmix ALPHA"),
    (["--randaugment-ops", "3"], "--randaugment-ops and --randaugment-magnitude need --augment-policy randaugment"),
    (["--lr", "1e39"], "--lr must be within float32's range (3.4e38), not 1e+39"),
    (["--mixup", "2000"], "--mixup must be between 0 and 1000, not 2000.0"),   # Beta(1e308, 1e308) never returns
    (["--mixup", "0.2", "--mix-prob", "0"], "--mix-prob 0 mixes no batch"),
    (["--muon-lr", "0.5"], "--muon-aux need --optimizer muon"),
    (["--no-augment", "--hflip", "alternate"], "--hflip acts only with --augment"),
    # SWA that would never start (BASE trains 1 epoch)
    (["--swa-start", "1", "--swa-lr", "0.01"], "--swa-start 1 is not below --epochs 1: no weights would be averaged"),
]

BAD_RECIPES = [
    ('milestones = ["a"]', "milestones must be a list of int values"),
    ("lr = nan", "--lr must be a finite number, not nan"),
    ("lr = -1", "--lr must be at least 0, not -1.0"),
    ("eval_every = 0", "--eval-every must be at least 1, not 0"),
    ("momentum = true", "momentum must be of type float"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flag_values_end_with_one_line_naming_the_flag(flags, message, tmp_path):
    line = run_cli([*BASE, "--output-dir", str(tmp_path / "run"), *flags])
    assert message in line
    assert not (tmp_path / "run").exists()          # refused before anything was set up


@pytest.mark.parametrize("setting,message", BAD_RECIPES, ids=[r[0] for r in BAD_RECIPES])
def test_bad_recipe_values_end_with_one_line_naming_the_setting(setting, message, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(f'arch = "cnn"\n{setting}\n')
    line = run_cli(["--recipe", str(recipe), *BASE[2:], "--output-dir", str(tmp_path / "run")])
    assert message in line


def test_every_shipped_recipe_and_the_defaults_pass_the_rules():
    from dtrain.config import Config, list_recipes, validate
    from dtrain.settings import build_config
    validate(Config())
    for name in list_recipes():
        build_config(["--recipe", name])


def test_none_turns_off_what_a_recipe_set():
    """--arch wrn16-8 brings the wrn16-8-sam recipe: `--sam none` trains it without SAM; the same for the
    other settings that are off unless set."""
    from dtrain.settings import build_config
    assert build_config(["--arch", "wrn16-8"]).sam == 0.05
    assert build_config(["--arch", "wrn16-8", "--sam", "None"]).sam is None
    cfg = build_config(["--recipe", "wrn28-10-swa", "--swa-start", "none", "--swa-lr", "none", "--ema", "0.99"])
    assert (cfg.swa_start, cfg.swa_lr, cfg.ema) == (None, None, 0.99)
    assert build_config(["--recipe", "airbench", "--ema", "none", "--lookahead", "0"]).ema is None
    assert build_config(["--hflip", "Alternate"]).hflip == "alternate"


def test_an_augmentation_asked_for_under_a_recipe_without_augmentation_is_refused():
    """mnist-cnn's recipe turns augmentation off: a policy given on top would be ignored, so it is refused; a
    recipe's own augmentations are simply turned off by --no-augment."""
    from dtrain.errors import UserError
    from dtrain.settings import build_config
    with pytest.raises(UserError, match="--augment-policy acts only with --augment .* add --augment"):
        build_config(["--arch", "mnist-cnn", "--augment-policy", "autoaugment"])
    assert build_config(["--arch", "mnist-cnn", "--augment", "--augment-policy", "autoaugment"]).augment
    assert not build_config(["--recipe", "resnet18-96", "--no-augment"]).augment


def test_a_model_too_large_to_allocate_is_one_line_and_the_folder_stays_free(tmp_path):
    """wrn10-100000 asks for ~92 TB of weights: one line naming the arch, and no config.json left behind, so the
    corrected run starts in the same folder."""
    line = run_cli([*BASE[2:], "--arch", "wrn10-100000", "--output-dir", str(tmp_path / "run")])
    assert "arch wrn10-100000 does not fit in this machine's memory" in line
    assert not (tmp_path / "run" / "config.json").exists()
