"""Flags in the forms sweep agents and other tools write: --key=value, underscore names, booleans with values."""
import itertools

import pytest
import yaml

from dtrain.config import FIELDS, build_parser, flags_markdown
from dtrain.settings import build_config
from helpers import REPO


@pytest.mark.parametrize("argv, expected", [
    (["--hflip=false"], {"hflip": False}),
    (["--hflip=False", "--vflip=True"], {"hflip": False, "vflip": True}),
    (["--hflip=0", "--vflip=1", "--nesterov=yes", "--augment=yes"],
     {"hflip": False, "vflip": True, "nesterov": True, "augment": True}),
    (["--augment=no"], {"augment": False}),
    (["--hflip", "false"], {"hflip": False}),
    (["--no-hflip", "--vflip"], {"hflip": False, "vflip": True}),
    (["--batch_size=64", "--eval_batch_size", "256"], {"batch_size": 64, "eval_batch_size": 256}),
    (["--batch-size=64", "--lr=0.05", "--weight_decay=0.001"], {"batch_size": 64, "lr": 0.05, "weight_decay": 1e-3}),
    (["--channels_last=true", "--no_sync_bn", "--decay_norm_bias=False"],
     {"channels_last": True, "sync_bn": False, "decay_norm_bias": False}),
    (["--milestones=[3, 5]"], {"milestones": [3, 5]}),
    (["--milestones=3,5"], {"milestones": [3, 5]}),
    (["--milestones", "3", "5"], {"milestones": [3, 5]}),
    (["--wandb-tags", "a,b", "--wandb_notes=first try"], {"wandb_tags": ["a", "b"], "wandb_notes": "first try"}),
    (["--scheduler=onecycle", "-b", "32"], {"scheduler": "onecycle", "batch_size": 32}),
])
def test_agent_style_flags_parse_to_the_config(argv, expected):
    c = build_config(["--arch", "cnn", *argv])
    assert {k: getattr(c, k) for k in expected} == expected


@pytest.mark.parametrize("argv, message", [
    (["--hflip=maybe"], "--hflip must be true or false (or 1/0, yes/no, alternate), not 'maybe'"),
    (["--lr=none"], "invalid float value: 'none'"),      # none only for settings that are off unless set
    (["--no-hflip=true"], "--no-hflip takes no value"),
    (["--batch_size=many"], "invalid int value"),
    (["--milestones=3,x"], "invalid int value"),
    (["--scheduler=sometimes"], "invalid choice"),
])
def test_bad_flag_values_are_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_config(["--arch", "cnn", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_and_flags_table_show_one_spelling_per_flag():
    text = build_parser().format_help()
    assert "--batch-size" in text and "--batch_size" not in text
    assert "--vflip[=true|false], --no-vflip" in text
    assert "--hflip[=true|false|alternate], --no-hflip" in text
    assert "batch_size" not in flags_markdown().replace("`", " ").split()


SWEEP_YAML = REPO / "launch" / "wandb-sweep.yaml"


def test_wandb_sweep_example_runs_dtrain_with_the_agents_args_and_they_parse():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
    sweep = yaml.safe_load(SWEEP_YAML.read_text())
    params = sweep["parameters"]
    assert set(params) <= set(FIELDS), set(params) - set(FIELDS)
    command = create_sweep_command(sweep["command"])
    assert command[:2] == ["accelerate", "launch"] and "${args}" in command
    assert sweep["program"] == "dtrain/main.py" and (REPO / sweep["program"]).is_file()
    choices = {k: p["values"] if "values" in p else [p.get("value", p.get("min"))] for k, p in params.items()}
    for values in itertools.product(*choices.values()):
        trial = dict(zip(choices, values))
        # exactly what the agent substitutes for ${args}: ['--arch=resnet18', '--hflip=False', ...]
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.items()}})["args"]
        c = build_config(args)
        assert {k: getattr(c, k) for k in trial} == trial, args


def test_every_field_takes_its_underscore_spelling():
    p = build_parser()
    for f in FIELDS.values():
        if "_" in f.name:
            assert p._option_string_actions["--" + f.name].dest == f.name
