"""--sweep grids: the combinations in a documented order, one per --sweep-index or Slurm array task, each with
its own output dir and a shared W&B group; mistakes are one clear line."""
import json
import re

import pytest

from dtrain.settings import build_config
from dtrain.errors import UserError
from dtrain.main import run_output_dir
from dtrain.report.wandb import WandbSpec
from dtrain.sweep import combinations, listing
from helpers import run_here, tiny_run, train_here

GRID = ["--arch", "cnn", "--sweep", "lr=0.05,0.1", "--sweep", "hflip=true,false"]
NO_SLURM = ("SLURM_JOB_NAME", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    for k in NO_SLURM:
        monkeypatch.delenv(k, raising=False)


def test_a_2x2_grid_gives_its_4_combinations_in_order_with_4_output_dirs_and_one_group():
    configs = [build_config([*GRID, "--sweep-index", str(i)]) for i in range(4)]
    assert [(c.lr, c.hflip) for c in configs] == [(0.05, True), (0.05, False), (0.1, True), (0.1, False)]
    assert all(c.sweep == ["lr=0.05,0.1", "hflip=true,false"] and c.arch == "cnn" for c in configs)
    assert [c.sweep_index for c in configs] == [0, 1, 2, 3]
    dirs = [str(run_output_dir(c)) for c in configs]
    assert dirs == ["runs/cnn-lr0.05-hfliptrue", "runs/cnn-lr0.05-hflipfalse",
                    "runs/cnn-lr0.1-hfliptrue", "runs/cnn-lr0.1-hflipfalse"]
    inside = [str(run_output_dir(build_config([*GRID, "--sweep-index", str(i), "--output-dir", "exp"])))
              for i in range(4)]
    assert inside == ["exp/" + d.removeprefix("runs/") for d in dirs]  # --output-dir holds the sweep's folders
    groups = {WandbSpec.from_config(c).group for c in configs}
    assert len(groups) == 1 and None not in groups
    other = build_config(["--arch", "cnn", "--sweep", "lr=0.05,0.2", "--sweep-index", "0"])
    assert WandbSpec.from_config(other).group not in groups
    assert WandbSpec.from_config(build_config([*GRID, "--sweep-index", "0", "--wandb-group", "mine"])).group == "mine"


def test_values_take_their_settings_types():
    grid = combinations(["seed=0,1", "label_smoothing=0,0.1", "scheduler=cosine,none", "grad-clip=none,1"])
    assert grid[0] == {"seed": 0, "label_smoothing": 0.0, "scheduler": "cosine", "grad_clip": None}
    assert len(grid) == 16 and grid[-1] == {"seed": 1, "label_smoothing": 0.1, "scheduler": "none", "grad_clip": 1.0}
    assert type(grid[-1]["label_smoothing"]) is float and type(grid[-1]["seed"]) is int


def test_a_slurm_array_task_is_its_combination_in_the_jobs_folder_and_group(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NAME", "cifar")
    monkeypatch.setenv("SLURM_JOB_ID", "108")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "105")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    c = build_config(GRID)
    assert (c.sweep_index, c.lr, c.hflip) == (3, 0.1, False)
    assert str(run_output_dir(c)) == "runs/cifar-105_3"
    assert WandbSpec.from_config(c).group == "cifar-105"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # an array larger than the grid: the extra task fails
    with pytest.raises(UserError, match=r"--sweep-index 4 is past the end of the sweep: it has 4 combinations"):
        build_config(GRID)


def test_recipes_can_be_swept(tmp_path):
    for name, epochs in (("a", 1), ("b", 2)):
        (tmp_path / f"{name}.toml").write_text(f"epochs = {epochs}\nmilestones = [{epochs}, 5]\n")
    grid = f"recipe={tmp_path / 'a.toml'},{tmp_path / 'b.toml'}"
    c = build_config(["--arch", "cnn", "--sweep", grid, "--sweep-index", "1"])
    assert (c.epochs, c.milestones) == (2, [2, 5])


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "learning_rate=0.1,0.2", "--sweep-index", "0"], "'learning_rate' is not a setting"),
    (["--sweep", "lr=0.1,fast", "--sweep-index", "0"], "lr must be of type float, not 'fast'"),
    (["--sweep", "seed=0,1.5", "--sweep-index", "0"], "seed must be of type int"),
    (["--sweep", "hflip=true,maybe", "--sweep-index", "0"], "hflip must be true or false"),
    (["--sweep", "scheduler=cosine,sometimes", "--sweep-index", "0"], "scheduler must be one of"),
    (["--sweep", "lr", "--sweep-index", "0"], "write KEY=V1,V2"),
    (["--sweep", "seed=0,1", "--sweep", "seed=2", "--sweep-index", "0"], "seed is swept twice"),
    (["--sweep", "seed=0,1", "--sweep-index", "2"], "--sweep-index 2 is past the end of the sweep"),
    (["--sweep", "seed=0,1"], "--sweep-index N"),
    (["--sweep-index", "0"], "--sweep-index needs a grid"),
    (["--sweep", "seed=0,1", "--sweep-index", "0", "--seed", "3"], "--seed is given and also swept"),
    (["--sweep", "milestones=3,5", "--sweep-index", "0"], "milestones is a list setting"),
])
def test_sweep_mistakes_are_user_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_config(["--arch", "cnn", *argv])


def test_sweep_list_prints_each_combination_and_the_array_to_submit(tmp_path, monkeypatch):
    assert listing(["lr=0.05,0.1", "hflip=true,false"]).splitlines() == [
        "0: lr=0.05 hflip=true", "1: lr=0.05 hflip=false", "2: lr=0.1 hflip=true", "3: lr=0.1 hflip=false",
        "4 combinations; submit them with: sbatch --array=0-3 ... (or run each with --sweep-index N)"]
    monkeypatch.chdir(tmp_path)
    r = train_here([*GRID, "--sweep", "seed=0,1,2", "--sweep-list"])
    assert "sbatch --array=0-11" in r.stdout and "11: lr=0.1 hflip=false seed=2" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_a_sweep_run_trains_its_combination_into_its_folder_and_re_runs_from_its_config_json(tmp_path, monkeypatch):
    args = tiny_run(None, "--epochs", "1", "--sweep", "seed=0,1", "--sweep", "lr=0.1")
    monkeypatch.chdir(tmp_path)                          # the default folder: runs/ in the working directory
    r = train_here([*args, "--sweep-index", "2"], status=None)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --sweep-index 2 is past")
    train_here([*args, "--sweep-index", "1"])
    saved = json.loads((tmp_path / "runs" / "cnn-seed1-lr0.1" / "config.json").read_text())
    assert (saved["seed"], saved["lr"], saved["sweep"], saved["sweep_index"]) == (1, 0.1, ["seed=0,1", "lr=0.1"], 1)
    again = build_config(["--recipe", str(tmp_path / "runs" / "cnn-seed1-lr0.1" / "config.json")]).to_dict()
    dropped = ("recipe", "output_dir", "resume", "sweep", "sweep_index")
    assert {k: v for k, v in again.items() if k not in dropped} == {k: v for k, v in saved.items() if k not in dropped}
    assert again["sweep"] == [] and again["sweep_index"] is None and again["output_dir"] is None


@pytest.mark.parametrize("spec, named", [
    ("lr=0.1,0.10", "0.1 and 0.10"),
    ("lr=0.05,1e-1,0.1", "1e-1 and 0.1"),
    ("hflip=true,1", "true and 1"),
    ("grad-clip=none,null", "none and null"),
    ("seed=3,03", "3 and 03"),
])
def test_sweep_values_equal_after_parsing_are_refused_naming_them(spec, named):
    """Two spellings of one value would be two combinations of one run, outside Slurm one folder (the second told
    to --resume auto the first's run)."""
    key = spec.partition("=")[0].replace("-", "_")
    for argv in (["--sweep-index", "0"], ["--sweep-index", "1"]):
        with pytest.raises(UserError) as e:
            build_config(["--arch", "cnn", "--sweep", spec, *argv])
        assert f"{named} are the same {key} (" in str(e.value) and str(e.value).endswith("give each value once")
    with pytest.raises(UserError, match=re.escape(named)):
        listing(["seed=0,1", spec])


def test_a_sweep_argv_with_one_value_twice_ends_in_one_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--arch", "cnn", "--dataset", "fake", "--epochs", "1", "--no-wandb", "--sweep", "lr=0.1,0.10"]
    for extra in (["--sweep-list"], ["--sweep-index", "1"]):
        r = run_here("main", [*args, *extra], status=2)
        assert r.stdout == "", r.stdout + r.stderr
        assert r.stderr == "error: --sweep 'lr=0.1,0.10': 0.1 and 0.10 are the same lr (0.1); give each value once\n"
    assert not (tmp_path / "runs").exists()


def test_values_that_would_name_one_folder_are_refused(tmp_path):
    for name in ("a-b.toml", "a/b.toml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("epochs = 1\n")
    with pytest.raises(UserError, match="a-b.toml and .*a/b.toml would write one output folder"):
        build_config(["--arch", "cnn", "--sweep", f"recipe={tmp_path / 'a-b.toml'},{tmp_path / 'a/b.toml'}",
                      "--sweep-index", "0"])


def test_a_negative_sweep_index_says_the_combinations_are_numbered_from_0():
    with pytest.raises(UserError) as e:
        build_config(["--arch", "cnn", "--sweep", "seed=0,1,2", "--sweep-index", "-1"])
    assert "past the end" not in str(e.value)
    assert str(e.value) == ("--sweep-index -1 is negative: the 3 combinations are numbered 0..2; "
                            "pass one of them (--sweep-list shows them)")


@pytest.mark.parametrize("task", ["3a", "-1", " 2", "1.0", "0x2"])
def test_a_slurm_array_task_id_that_is_not_an_index_is_named_in_the_message(monkeypatch, task):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
    with pytest.raises(UserError) as e:
        build_config(["--arch", "cnn", "--sweep", "seed=0,1,2"])
    assert str(e.value) == (f"$SLURM_ARRAY_TASK_ID is {task!r}, not an array task index (a whole number from 0): "
                            f"submit with sbatch --array=0-2, or pass --sweep-index N (0..2)")
    c = build_config(["--arch", "cnn", "--sweep", "seed=0,1,2", "--sweep-index", "1"])  # given: the variable unused
    assert (c.sweep_index, c.seed) == (1, 1)


def test_sweep_list_of_max_array_size_combinations_is_one_array():
    last = listing(["seed=" + ",".join(map(str, range(1001)))]).splitlines()[-1]
    assert last.startswith("1001 combinations; submit them with: sbatch --array=0-1000 ...")


def test_sweep_list_above_max_array_size_gives_chunks_within_it_and_each_chunk_runs_its_combinations(monkeypatch):
    """Slurm's default MaxArraySize (1001) allows array indices 0..1000 in one sbatch: 2,500 combinations go in
    chunks of 1000 tasks, each with its --sweep-offset; task T of a chunk is combination offset + T."""
    spec = ["seed=" + ",".join(map(str, range(2500)))]
    tail = listing(spec).splitlines()[2500:]
    assert tail[0] == ("2500 combinations: more than one Slurm array may hold (MaxArraySize, 1001 by default, allows "
                       "indices 0..1000 in one sbatch); submit them in 3 chunks:")
    assert tail[1:4] == ["  sbatch --array=0-999 ... --sweep-offset 0",
                         "  sbatch --array=0-999 ... --sweep-offset 1000",
                         "  sbatch --array=0-499 ... --sweep-offset 2000"]
    assert "--array=0-2499" in tail[4] and "MaxArraySize" in tail[4]
    argv = ["--arch", "cnn", "--sweep", spec[0]]
    for offset, task, seed in ((0, 0, 0), (1000, 999, 1999), (2000, 499, 2499)):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        c = build_config([*argv, "--sweep-offset", str(offset)])
        assert (c.sweep_index, c.seed, c.sweep_offset) == (seed, seed, offset)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "500")
    with pytest.raises(UserError, match=re.escape("--sweep-index 2500 (array task 500 + --sweep-offset 2000) is past "
                                                  "the end of the sweep: it has 2500 combinations (0..2499)")):
        build_config([*argv, "--sweep-offset", "2000"])
    with pytest.raises(UserError, match="--sweep-offset applies to Slurm array tasks"):
        build_config([*argv, "--sweep-offset", "1000", "--sweep-index", "3"])
