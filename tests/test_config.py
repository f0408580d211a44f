"""Config: defaults < recipe < flags; the shipped seed recipes hold exactly the seeds' settings."""
import dataclasses
import json

import pytest

from dtrain.config import Config, config_from_dict, list_recipes, load_recipe
from dtrain.settings import build_config
from dtrain.errors import UserError


def test_seed_resnet18_recipe_is_the_write_up():
    c = build_config(["--recipe", "seed-resnet18"])
    assert (c.arch, c.epochs, c.batch_size, c.optimizer, c.lr, c.momentum, c.weight_decay) == \
        ("resnet18", 250, 128, "sgd", 0.1, 0.9, 5e-4)
    assert (c.scheduler, c.plateau_monitor, c.plateau_patience, c.plateau_factor) == ("plateau", "val_loss", 10, 0.5)
    assert (c.crop_padding, c.pad_mode, c.hflip, c.cutout_holes, c.cutout_length) == (4, "constant", True, 1, 16)


def test_seed_googlenet_recipe_is_the_write_up():
    c = build_config(["--recipe", "seed-googlenet"])
    assert (c.arch, c.epochs, c.batch_size, c.optimizer, c.lr, c.scheduler) == ("googlenet", 100, 128, "sgd", 0.1, "cosine")
    assert (c.crop_padding, c.pad_mode, c.hflip, c.cutout_holes) == (4, "reflect", True, 0)


def test_arch_alone_takes_its_default_recipe_and_flags_override_it():
    c = build_config(["--arch", "googlenet", "--epochs", "3", "--no-hflip"])
    assert c.recipe == "seed-googlenet" and c.pad_mode == "reflect"
    assert c.epochs == 3 and c.hflip is False
    c = build_config(["--arch", "cnn"])
    assert c.recipe is None and c.arch == "cnn"


def test_recipe_file_and_its_errors(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('arch = "cnn"\nlr = 1\nmilestones = [2, 4]\n')
    c = build_config(["--recipe", str(f), "--batch-size", "64"])
    assert (c.arch, c.lr, c.milestones, c.batch_size) == ("cnn", 1.0, [2, 4], 64)
    f.write_text('arch = "cnn"\nlearning_rate = 1\n')
    with pytest.raises(UserError, match="unknown settings learning_rate"):
        build_config(["--recipe", str(f)])
    f.write_text('scheduler = "sometimes"\n')
    with pytest.raises(UserError, match="scheduler must be one of"):
        build_config(["--recipe", str(f)])
    with pytest.raises(UserError, match="seed-resnet18"):
        build_config(["--recipe", "no-such-recipe"])
    f.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match="not valid TOML"):
        build_config(["--recipe", str(f)])
    f.write_text('arch = "cnn"\nsweep = ["seed=0,1"]\n')
    with pytest.raises(UserError, match="belong on the command line"):
        build_config(["--recipe", str(f)])


def test_every_shipped_recipe_loads():
    for name in list_recipes():
        assert isinstance(load_recipe(name), dict)
        build_config(["--recipe", name])


def test_config_round_trips_through_json():
    c = build_config(["--arch", "cnn", "--milestones", "3", "5"])
    assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert isinstance(Config(), Config)


def test_a_runs_config_json_re_runs_to_the_same_settings(tmp_path):
    c = build_config(["--arch", "googlenet", "--epochs", "3", "--no-hflip", "--milestones", "2", "4", "--seed", "5",
                      "--output-dir", str(tmp_path / "first"), "--resume", "auto", "--grad-clip", "1"])
    saved = tmp_path / "first" / "config.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps(c.to_dict(), indent=2))  # as dtrain/main.py writes it
    again = build_config(["--recipe", str(saved)])
    assert again.recipe == str(saved) and again.output_dir is None and again.resume is None
    assert dataclasses.replace(again, recipe=c.recipe, output_dir=c.output_dir, resume=c.resume) == c
    other_seed = build_config(["--recipe", str(saved), "--seed", "1"])
    assert other_seed.seed == 1 and dataclasses.replace(other_seed, seed=5) == again


def test_a_broken_config_json_is_a_clear_error(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"arch": "cnn", ')
    with pytest.raises(UserError, match="not valid JSON"):
        build_config(["--recipe", str(f)])
    f.write_text('["cnn"]')
    with pytest.raises(UserError, match="not a run's config.json"):
        build_config(["--recipe", str(f)])
    f.write_text('{"arch": "cnn", "learning_rate": 0.1}')
    with pytest.raises(UserError, match="unknown settings learning_rate"):
        build_config(["--recipe", str(f)])
    f.write_text('{"arch": "cnn", "epochs": "many"}')
    with pytest.raises(UserError, match="epochs must be of type int"):
        build_config(["--recipe", str(f)])
