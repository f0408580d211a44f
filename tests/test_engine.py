"""The engine: one process in this process (dtrain.main.main), and several through real processes:
`accelerate launch --multi_gpu --num_processes N dtrain/main.py` starts N CPU processes (gloo) here."""
import pytest
import torch

from dtrain.checkpoint import load_checkpoint
from dtrain.models import build_model
from helpers import launch, metrics, tiny_run, train, train_here


def tiny(cifar_dir, *more):
    """The tiny run on the generated CIFAR-10 folder, 5 steps an epoch, every step logged."""
    return tiny_run(None, "--eval-batch-size", "64", "--log-every", "1", *more, data=cifar_dir, batch=40)


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


@pytest.mark.process
def test_two_process_run_trains_checkpoints_once_and_resumes(cifar_dir, tmp_path):
    out = tmp_path / "run"
    r = train(tiny(cifar_dir, "--epochs", "1", "--output-dir", str(out)), nproc=2)
    assert "world size 2" in r.stdout
    assert r.stdout.count("done:") == 1                       # one console: the main process's
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    rows = metrics(out)
    assert [row["epoch"] for row in rows] == [1]
    assert rows[0]["train_samples"] == 200 and rows[0]["val_samples"] == 50
    assert rows[0]["step"] == 5                                # 200 images / global batch 40
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"], ck["batch_in_epoch"]) == (1, 5, 0)

    r = train(tiny(cifar_dir, "--epochs", "3", "--output-dir", str(out), "--resume", "auto"), nproc=2)
    assert "resumed from" in r.stdout and "at epoch 2, step 5" in r.stdout
    rows = metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert [row["step"] for row in rows] == [5, 10, 15]
    assert load_checkpoint(out / "last.pt")["step"] == 15


@pytest.mark.process
def test_one_and_two_processes_end_with_the_same_weights(cifar_dir, tmp_path):
    """Same global batch, no augmentation, no batch statistics: DDP on 2 processes is the 1-process run."""
    args = tiny(cifar_dir, "--norm", "group", "--no-augment", "--epochs", "2", "--lr", "0.05")
    train_here(args + ["--output-dir", str(tmp_path / "p1")])
    train(args + ["--output-dir", str(tmp_path / "p2")], nproc=2)
    w1, w2 = weights(tmp_path / "p1" / "last.pt"), weights(tmp_path / "p2" / "last.pt")
    assert_same_weights(w1, w2, atol=1e-5)
    # and training did move the weights away from the seeded initialisation (a test that cannot fail...)
    torch.manual_seed(0)
    init = build_model("cnn", 10, 3, 32, norm="group").state_dict()
    assert max((init[k].float() - w1[k].float()).abs().max().item() for k in w1) > 1e-3
    m1, m2 = metrics(tmp_path / "p1"), metrics(tmp_path / "p2")
    assert [r["lr"] for r in m1] == [r["lr"] for r in m2]
    assert m1[-1]["val_acc"] == pytest.approx(m2[-1]["val_acc"])


@pytest.mark.process
def test_gradient_accumulation_equals_the_full_batch(cifar_dir, tmp_path):
    """--grad-accum 2 on 2 processes (10 images per micro-batch) trains like 1 process with batch 40."""
    args = tiny(cifar_dir, "--norm", "group", "--no-augment", "--epochs", "1", "--lr", "0.05")
    train_here(args + ["--output-dir", str(tmp_path / "full")])
    r = train(args + ["--output-dir", str(tmp_path / "accum"), "--grad-accum", "2"], nproc=2)
    assert "10 per process x 2 accumulation" in r.stdout
    assert_same_weights(weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "accum" / "last.pt"), atol=1e-5)
    assert metrics(tmp_path / "accum")[-1]["step"] == 5


def test_googlenet_trains_with_auxiliary_classifiers(tmp_path):
    out = tmp_path / "g"
    train_here(tiny_run(out, "--aux-logits", "--eval-batch-size", "4", "--max-steps", "2", arch="googlenet", size=8,
                        batch=4))
    ck = load_checkpoint(out / "last.pt")
    assert ck["arch_args"]["aux_logits"] is True and any(k.startswith("aux1") for k in ck["model"])
    assert metrics(out)[-1]["step"] == 2


def evaluation_run(out, nproc: int) -> dict:
    """1,001 validation images, lr 0 and GroupNorm: the model stays the seeded initialisation, identical on any
    number of processes. The run's last metrics row."""
    args = tiny_run(out, "--norm", "group", "--lr", "0", "--max-steps", "1", "--eval-batch-size", "250", size=4004,
                    batch=12)
    if nproc == 1:
        train_here(args)
    else:
        train(args, nproc=nproc)
    return metrics(out)[-1]


@pytest.fixture(scope="module")
def one_process_evaluation(tmp_path_factory) -> tuple[dict, float, float]:
    """The 1-process evaluation run's metrics row, and the accuracy and loss of its saved model on the 1,001
    validation images computed here, in one batch, from the checkpoint and the data."""
    from dtrain.config import config_from_dict
    from dtrain.data import load_dataset
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.models import model_from_checkpoint
    out = tmp_path_factory.mktemp("evaluation") / "n1"
    row = evaluation_run(out, 1)
    ckpt = load_checkpoint(out / "last.pt")
    _, val = load_dataset(config_from_dict(ckpt["config"]))
    x = Pipeline(AugmentSpec(), ckpt["mean"], ckpt["std"], "cpu")(val.images.permute(0, 3, 1, 2))
    with torch.no_grad():
        logits = model_from_checkpoint(ckpt)(x)
    acc = (logits.argmax(1) == val.labels).float().mean().item()
    return row, acc, torch.nn.functional.cross_entropy(logits, val.labels).item()


@pytest.mark.parametrize("nproc", [1, *(pytest.param(n, marks=pytest.mark.process) for n in (2, 3))])
def test_evaluation_counts_every_image_once(one_process_evaluation, tmp_path, nproc):
    """1,001 validation images on 1, 2 and 3 processes: each counted once, the accuracy and loss of the
    (unchanged, seeded) model on all of them."""
    first, acc, loss = one_process_evaluation
    row = first if nproc == 1 else evaluation_run(tmp_path / f"n{nproc}", nproc)
    assert row["val_samples"] == 1001
    assert row["val_acc"] == pytest.approx(acc, abs=1e-9)
    assert row["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert row["val_acc"] == pytest.approx(first["val_acc"], abs=1e-9)
    assert row["val_loss"] == pytest.approx(first["val_loss"], rel=1e-4)


def test_resume_mid_epoch_matches_an_uninterrupted_run(cifar_dir, tmp_path):
    """Stop after 3 of the 5 steps of epoch 1 and resume: the same weights as never stopping.

    Skipping happens only in the epoch resumed into; augmentation draws are the same after resume.
    """
    args = tiny(cifar_dir, "--epochs", "2", "--scheduler", "none", "--cutout-holes", "1")
    train_here(args + ["--output-dir", str(tmp_path / "a")])
    train_here(args + ["--output-dir", str(tmp_path / "b"), "--max-steps", "3"])
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ck["epoch"], ck["step"], ck["batch_in_epoch"]) == (0, 3, 3)
    train_here(args + ["--output-dir", str(tmp_path / "b"), "--resume", "auto"])
    assert_same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"), atol=1e-6)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2]
    assert [r["train_samples"] for r in a] == [r["train_samples"] for r in b] == [200, 200]
    assert [r["step"] for r in b] == [5, 10]


@pytest.mark.process
def test_plateau_steps_once_per_epoch_on_two_processes(cifar_dir, tmp_path):
    """ReduceLROnPlateau-style: patience 0 on a metric that cannot improve halves the LR once per epoch."""
    out = tmp_path / "plateau"
    train(tiny(cifar_dir, "--epochs", "3", "--scheduler", "plateau", "--plateau-patience", "0",
               "--plateau-monitor", "val_acc", "--lr", "0", "--weight-decay", "0", "--output-dir", str(out)),
          nproc=2)
    # lr 0: the metric never improves after epoch 1, so epochs 2 and 3 each cut the (zero) LR: the
    # schedule's scale is what we can observe
    ck = load_checkpoint(out / "last.pt")
    assert ck["scheduler"]["scale"] == pytest.approx(0.25)



GATHER_PROBE = """
import torch
from dtrain.distributed import gather_samples, make_accelerator
acc = make_accelerator()
r = acc.process_index
# process 2 has no samples, so no idea of the logits' width
idx, v = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)) if r == 2 else (torch.tensor([5 - r]), torch.full((1, 4), float(r)))
index, values = gather_samples(acc, idx, v)
if acc.is_main_process:
    print("GATHERED", index.tolist(), values[:, 0].tolist(), tuple(values.shape))
acc.wait_for_everyone()
acc.end_training()  # shut the process group down, as the entry points do
"""


@pytest.mark.process
def test_gather_when_a_process_has_no_samples(tmp_path):
    """Fewer images than processes (2 on 3): the empty process must neither hang nor break the gather."""
    probe = tmp_path / "probe.py"
    probe.write_text(GATHER_PROBE)
    r = launch(str(probe), [], nproc=3, timeout=120)
    assert "GATHERED [4, 5] [1.0, 0.0] (2, 4)" in r.stdout
