"""Every failure a user can cause ends with a clear message, not a traceback or a silent fresh start."""
import pytest
import torch

from dtrain.checkpoint import load_checkpoint, save_checkpoint
from helpers import tiny_run, train, train_here


def base(data, out, *more):
    """One step of the tiny run on the CIFAR-10 folder `data`."""
    return tiny_run(out, "--max-steps", "1", *more, data=data, batch=40)


def fails(args, nproc=1, **kw):
    """stderr of a run that must fail: one process in this process, more through accelerate launch."""
    if nproc == 1:
        r = train_here(args, status=None)
    else:
        r = train(args, nproc=nproc, check=False, **kw)
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr.split("error:")[0] if nproc == 1 else True
    return r.stderr


def test_unknown_arch_lists_the_valid_names(cifar_dir, tmp_path):
    err = fails(base(cifar_dir, tmp_path / "run", "--arch", "resnet181"))
    assert "resnet181" in err and "resnet18" in err and "googlenet" in err and "cnn" in err


def test_missing_dataset_names_the_path(tmp_path):
    err = fails(base(tmp_path / "absent", tmp_path / "run"))
    assert str(tmp_path / "absent") in err and "cifar-10-batches-py" in err


@pytest.mark.process
def test_global_batch_must_divide_over_processes(cifar_dir, tmp_path):
    err = fails(base(cifar_dir, tmp_path / "run", "--batch-size", "41"), nproc=2)
    assert "--batch-size 41 is the global batch" in err


def test_sync_bn_on_cpu_is_a_clear_error(cifar_dir, tmp_path):
    err = fails(base(cifar_dir, tmp_path / "run", "--sync-bn"))
    assert "--sync-bn needs GPUs" in err and "Traceback" not in err


def test_resume_from_bad_files(cifar_dir, tmp_path):
    args = base(cifar_dir, tmp_path / "o")
    err = fails(args + ["--resume", str(tmp_path / "none.pt")])
    assert "does not exist" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert "cannot be read" in fails(args + ["--resume", str(tmp_path / "junk.pt")])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert "not a dtrain checkpoint" in fails(args + ["--resume", str(tmp_path / "foreign.pt")])
    # a real checkpoint cut short
    good = tmp_path / "good"
    train_here(base(cifar_dir, good))
    data = (good / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "cannot be read" in fails(args + ["--resume", str(tmp_path / "cut.pt")])
    # another arch's checkpoint
    err = fails(args + ["--resume", str(good / "last.pt"), "--arch", "mnist-cnn"])
    assert "holds a 'cnn' model" in err


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))
    torch.save({"format": "dtrain", "x": Payload()}, tmp_path / "evil.pt")
    from dtrain.errors import UserError
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pt")


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    state = {"arch": "cnn", "arch_args": {}, "num_classes": 1, "in_channels": 1, "image_size": 8, "classes": ["a"],
             "mean": [0.5], "std": [0.5], "model": {"w": torch.ones(2)}}
    save_checkpoint(path, {**state, "step": 1})

    def dies_half_way(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # a kill in the middle of writing
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**state, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left behind
