"""The checkpoint format (dtrain/checkpoint.py) and the engine's epoch meters, on real files."""
import pytest
import torch

from dtrain.checkpoint import MODEL_KEYS, VERSION, load_checkpoint, model_meta, save_checkpoint
from dtrain.settings import build_config
from dtrain.engine import EpochMeter
from dtrain.errors import UserError
from dtrain.report import Reporters


def meta():
    cfg = build_config(["--arch", "cnn"])
    return model_meta(cfg, {"norm": "batch", "aux_logits": False}, ["a", "b"], 3, 32, (0.5,) * 3, (0.25,) * 3)


def test_meta_holds_what_inference_needs_and_version_is_checked(tmp_path):
    m = meta()
    assert set(MODEL_KEYS) - {"model"} <= set(m) and m["num_classes"] == 2 and m["config"]["arch"] == "cnn"
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**m, "model": {"w": torch.ones(2)}})
    ck = load_checkpoint(path)
    assert ck["version"] == VERSION and ck["classes"] == ["a", "b"] and torch.equal(ck["model"]["w"], torch.ones(2))
    old = {k: v for k, v in ck.items() if k != "version"}             # written before versions: still loads
    torch.save(old, path)
    assert load_checkpoint(path)["arch"] == "cnn"
    torch.save({**old, "version": VERSION + 1}, path)
    with pytest.raises(UserError, match="newer dtrain"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [("version", "2"), ("arch", None), ("classes", None), ("classes", ["a"]),
                                        ("mean", [0.5]), ("std", "x"), ("num_classes", "2"), ("config", None),
                                        ("model", {"w": 1})])
def test_a_crafted_checkpoint_is_one_clear_error_naming_the_entry(tmp_path, key, value):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**meta(), "model": {"w": torch.ones(2)}})
    torch.save({**torch.load(path, weights_only=True), key: value}, path)
    with pytest.raises(UserError, match=f"{path}.*{key}"):
        load_checkpoint(path)


def test_epoch_meter_sums_and_round_trips():
    m = EpochMeter()
    m.add(torch.tensor(0.5), torch.tensor(3), 4)
    m.add(torch.tensor(1.0), torch.tensor(1), 2)
    m.add(torch.tensor(float("inf")), torch.tensor(2), 2, finite_only=True)   # a step fp16's scaler skipped
    m.add_skipped(torch.tensor(True))
    assert m.to_list() == [4.0, 4.0, 6.0, 1.0]
    assert m.count == 6 and m.mean_loss == pytest.approx(4 / 6) and m.accuracy == pytest.approx(4 / 6)
    assert m.skipped == 1
    n = EpochMeter()
    n.load(m.to_list())
    assert n.to_list() == m.to_list() and EpochMeter().mean_loss == 0.0
    n.load([4.0, 4.0, 6.0])  # a checkpoint written before the skipped count
    assert n.to_list() == [4.0, 4.0, 6.0, 0.0]


def test_a_misspelt_reporter_hook_is_an_error():
    seen = []

    class R:
        def epoch(self, row, evaluation=None):
            seen.append(row)

    reps = Reporters([R(), None])
    reps.epoch({"epoch": 1})
    reps.close()                                                       # a hook R lacks: nothing to do
    assert seen == [{"epoch": 1}]
    with pytest.raises(AttributeError, match="epohc"):
        reps.epohc({"epoch": 2})
