"""dtrain/predict.py end to end: Kaggle submissions on 1 process (in this process, through its command-line
entry point) and 3 (real processes), the packed cache, bad inputs, labelled data, single images, and a
trained-then-predicted run on real CIFAR-10 images."""
from __future__ import annotations

import csv
import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, launch, predict_here, tiny_run, train_here
from helpers import SHARED_DATA as SHARED
from test_decode import write_16bit
from test_kaggle import CLASSES, image, write_kaggle, write_test
from test_rundir import start, stop

PREDICT = str(REPO / "dtrain" / "predict.py")
N_TEST = 1000

# a real `dtrain predict` (argv[2:]) held in its CSV write: it prints "writing", then waits for the file argv[1]
HELD_IN_WRITE = """
import sys, time
from pathlib import Path
import dtrain.predict as predict
go, write = Path(sys.argv[1]), predict.write_csv
def held(path, text):
    print("writing", flush=True)
    while not go.exists():
        time.sleep(0.05)
    write(path, text)
predict.write_csv = held
predict.main(sys.argv[2:])
"""


def predict(args: list, nproc: int = 1, check: bool = True, **kw):
    """dtrain/predict.py ARGS: in this process for one process, under accelerate launch for more; `check`: it
    must succeed."""
    if nproc == 1:
        return predict_here(args, status=0 if check else None)
    return launch(PREDICT, args, nproc, check=check, **kw)


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def kdir(tmp_path_factory) -> Path:
    """A Kaggle folder: 300 train images, 1,000 test images, sampleSubmission.csv (written as Kaggle's)."""
    return write_kaggle(tmp_path_factory.mktemp("kaggle") / "cifar-10", n_train=300, n_test=N_TEST)


@pytest.fixture(scope="module")
def checkpoint(kdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_here(tiny_run(out, "--val-split", 100, "--max-steps", 2, dataset="kaggle", data=kdir))
    return out / "last.pt"


@pytest.mark.process
def test_one_and_three_processes_write_identical_csvs(kdir, checkpoint, tmp_path):
    r = predict(["--checkpoint", checkpoint, "--data-dir", kdir, "--prepare", "--cache-dir", tmp_path / "c"])
    assert "prepared 1,000 images" in r.stdout and not list(tmp_path.glob("*.csv"))
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    common = ["--checkpoint", checkpoint, "--data-dir", kdir, "--cache-dir", tmp_path / "c", "--batch-size", 96]
    r1 = predict([*common, "--output", tmp_path / "one.csv"])
    assert "from cache" in r1.stdout
    r3 = predict([*common, "--output", tmp_path / "three.csv", "--no-cache", "--workers", 1], nproc=3)
    assert "from PNG files" in r3.stdout and "3 process(es)" in r3.stdout
    one = (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "three.csv").read_bytes() == one          # cache vs PNGs, 1 vs 3 processes
    table = rows(tmp_path / "one.csv")
    assert table[0] == ["id", "label"]
    assert [int(i) for i, _ in table[1:]] == list(range(1, N_TEST + 1))   # every id once, numeric order
    assert {label for _, label in table[1:]} <= set(CLASSES)
    # the layout of the folder's sampleSubmission.csv (written with Python's csv module, as Kaggle's):
    # header, ids column, separator, line ending
    sample = rows(kdir / "sampleSubmission.csv")
    assert table[0] == sample[0] and [r[0] for r in table] == [r[0] for r in sample]
    with open(kdir / "sampleSubmission.csv", "rb") as f:
        assert one.split(b"\n")[0] + b"\n" == f.readline()


def test_numeric_order_junk_and_the_sample_submission_format(kdir, checkpoint, tmp_path):
    root = tmp_path / "k12"
    write_test(root / "test", range(1, 13))
    for junk in (".DS_Store", "notes.txt"):
        (root / "test" / junk).write_text("not an image")
    sample = "".join(f"{i},cat\r\n" for i in range(1, 13))
    (root / "sampleSubmission.csv").write_bytes(("id,label\r\n" + sample).encode())   # what export.py writes
    predict(["--checkpoint", checkpoint, "--data-dir", root, "--output", tmp_path / "sub.csv"])
    text = (tmp_path / "sub.csv").read_bytes().decode()
    lines = text.split("\r\n")
    assert lines[0] == "id,label" and lines[-1] == "" and len(lines) == 14
    assert [line.split(",")[0] for line in lines[1:-1]] == [str(i) for i in range(1, 13)]   # not 1, 10, 11, 12, 2
    assert all(len(line.split(",")) == 2 and line.split(",")[1] in CLASSES for line in lines[1:-1])
    # the same layout as the sample, byte for byte, once the labels are set to the sample's
    assert "".join(f"{line.split(',')[0]},cat\r\n" for line in lines[1:-1]) == sample
    # without a sampleSubmission.csv beside the data: plain \n line ends
    (root / "sampleSubmission.csv").unlink()
    predict(["--checkpoint", checkpoint, "--data-dir", root, "--output", tmp_path / "sub2.csv", "--no-cache"])
    assert (tmp_path / "sub2.csv").read_bytes().decode() == text.replace("\r\n", "\n")


@pytest.mark.process
def test_corrupt_png_fails_naming_it_and_leaves_no_csv(checkpoint, tmp_path):
    root = tmp_path / "k"
    write_test(root / "test", range(1, 31))
    good = (root / "test" / "5.png").read_bytes()
    (root / "test" / "5.png").write_bytes(good[: len(good) // 2])       # truncated
    (root / "test" / "23.png").write_text("this is not a png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub.csv").write_text("previous submission\n")
    r = predict(["--checkpoint", checkpoint, "--data-dir", root, "--output", out / "sub.csv", "--force"], check=False)
    assert r.returncode != 0
    assert "5.png" in r.stderr and "23.png" in r.stderr and "Traceback" not in r.stderr
    assert (out / "sub.csv").read_text() == "previous submission\n"           # not clobbered
    assert [p.name for p in out.iterdir()] == ["sub.csv"]                      # no temp file left
    assert not list((root / ".dtrain-cache").glob("*.npy"))
    # decoded in the workers of 3 processes: the process that meets it stops, none hangs, the run fails
    (out / "sub.csv").unlink()
    r = predict(["--checkpoint", checkpoint, "--data-dir", root, "--output", out / "sub.csv", "--no-cache",
                 "--workers", 1, "--batch-size", 6], nproc=3, check=False, timeout=240)
    assert r.returncode != 0 and ("5.png" in r.stderr or "23.png" in r.stderr), r.stderr[-3000:]
    assert not list(out.iterdir())


def test_labelled_cifar10_split_prints_accuracy_and_writes_predictions(checkpoint, tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    y = rng.integers(0, 10, 40)
    x = np.stack([image(v, rng) for v in y]).transpose(0, 3, 1, 2).reshape(40, -1)
    for name, idx in (("data_batch_1", slice(0, 20)), ("test_batch", slice(20, 40))):
        with open(d / name, "wb") as f:
            pickle.dump({"data": x[idx], "labels": y[idx].tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    r = predict(["--checkpoint", checkpoint, "--dataset", "cifar10", "--data-dir", tmp_path / "cifar", "--split",
                 "test", "--output", tmp_path / "pred.csv"])
    per_class = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.split()[:1] and
                 line.split()[0] in CLASSES}
    assert set(per_class) == {CLASSES[v] for v in y[20:]}                 # a row per class present
    assert sum(int(v[0]) for v in per_class.values()) == 20
    table = rows(tmp_path / "pred.csv")
    assert table[0] == ["id", "label", "true_label"] and len(table) == 21
    assert [t for _, _, t in table[1:]] == [CLASSES[v] for v in y[20:]]
    correct = sum(p == t for _, p, t in table[1:])
    assert f"({correct:,} of 20)" in r.stdout
    # an earlier prediction is not replaced unless asked
    again = ["--checkpoint", checkpoint, "--dataset", "cifar10", "--data-dir", tmp_path / "cifar", "--output",
             tmp_path / "pred.csv"]
    before = (tmp_path / "pred.csv").read_bytes()
    r = predict(again, check=False)
    assert r.returncode == 2 and "pred.csv exists" in r.stderr and "--force" in r.stderr
    assert (tmp_path / "pred.csv").read_bytes() == before
    assert predict([*again, "--force"]).returncode == 0


def test_single_images_top5_grey_and_rgba(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(image(3, rng)).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(image(5, rng)).convert("RGBA").save(tmp_path / "rgba.png")
    r = predict(["--checkpoint", checkpoint, "--image", tmp_path / "grey.png", tmp_path / "rgba.png"])
    lines = r.stdout.splitlines()
    for name in ("grey.png", "rgba.png"):
        at = next(i for i, line in enumerate(lines) if line.endswith(name))
        top = [line.split() for line in lines[at + 1: at + 6]]
        assert all(len(t) == 2 and t[0].endswith("%") and t[1] in CLASSES for t in top)
        probs = [float(t[0][:-1]) for t in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    (tmp_path / "bad.png").write_bytes(b"nope")
    r = predict(["--checkpoint", checkpoint, "--image", tmp_path / "bad.png"], check=False)
    assert r.returncode != 0 and "bad.png" in r.stderr


def wait_until_writing(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line == "writing\n":
            return
    raise AssertionError(f"the first dtrain predict ended before writing: {proc.communicate()[1][-3000:]}")


@pytest.mark.process
def test_second_predict_writing_the_same_csv_is_refused_naming_the_first(checkpoint, tmp_path):
    twelve, thirty, csv_path = tmp_path / "k12", tmp_path / "k30", tmp_path / "sub.csv"
    write_test(twelve / "test", range(1, 13))
    write_test(thirty / "test", range(1, 31))
    first = start(["-c", HELD_IN_WRITE, tmp_path / "go", "--checkpoint", checkpoint, "--data-dir", twelve,
                   "--output", csv_path, "--no-cache"])
    try:
        wait_until_writing(first)
        r = predict(["--checkpoint", checkpoint, "--data-dir", thirty, "--output", csv_path, "--no-cache", "--force"],
                    check=False)
        assert r.returncode == 2, f"the second dtrain predict was not refused:\n{r.stdout[-2000:]}"
        holder = json.loads((tmp_path / "sub.csv.lock").read_text())
        assert holder["pid"] == first.pid and r.stderr.strip().splitlines() == [
            f"error: {csv_path} is being written by the dtrain predict started {holder['started']} on "
            f"{socket.gethostname()} (pid {first.pid}): wait for it, or pass another --output"]
        assert not csv_path.exists()                               # refused at once, before predicting
        (tmp_path / "go").touch()
        assert first.wait(timeout=120) == 0
    finally:
        stop(first)
    assert len(rows(csv_path)) == 13                               # the first's 12 rows, not the second's 30
    assert not (tmp_path / "sub.csv.lock").exists()


@pytest.mark.process
def test_csv_lock_left_by_kill_9_is_taken_over_and_said_so(checkpoint, tmp_path):
    data, csv_path = tmp_path / "k12", tmp_path / "sub.csv"
    write_test(data / "test", range(1, 13))
    first = start(["-c", HELD_IN_WRITE, tmp_path / "go", "--checkpoint", checkpoint, "--data-dir", data,
                   "--output", csv_path, "--no-cache"])
    try:
        wait_until_writing(first)
    finally:
        stop(first)                                                # kill -9 in the write: no chance to release
    assert (tmp_path / "sub.csv.lock").exists() and not csv_path.exists()
    r = predict(["--checkpoint", checkpoint, "--data-dir", data, "--output", csv_path, "--no-cache"])
    assert f"taking over the stale lock {csv_path}.lock of the dtrain predict started" in r.stdout
    assert f"(pid {first.pid}): its process {first.pid} is gone" in r.stdout
    assert len(rows(csv_path)) == 13 and not (tmp_path / "sub.csv.lock").exists()


def test_a_16bit_png_is_predicted_as_its_8bit_twin(checkpoint, tmp_path):
    """A 16-bit PNG is decoded by its full scale (value / 257), not clipped to nearly white."""
    grey = image(3, np.random.default_rng(4))[..., 0]
    write_16bit(tmp_path / "sixteen.png", grey.astype(np.uint16) * 257)
    Image.fromarray(grey).save(tmp_path / "eight.png")
    r = predict(["--checkpoint", checkpoint, "--image", tmp_path / "sixteen.png", tmp_path / "eight.png",
                 "--top-k", 10])
    lines = r.stdout.splitlines()
    at = {name: next(i for i, line in enumerate(lines) if line.endswith(name)) for name in ("sixteen.png", "eight.png")}
    assert lines[at["sixteen.png"] + 1: at["sixteen.png"] + 11] == lines[at["eight.png"] + 1: at["eight.png"] + 11]


def test_image_that_is_a_folder_or_missing_says_what_is_true(checkpoint, tmp_path):
    r = predict(["--checkpoint", checkpoint, "--image", tmp_path, tmp_path / "missing.png"], check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --image: {tmp_path} is a folder, not an image file: give its image files (--image {tmp_path}/*.png), "
        f"or predict a folder laid out as DIR/test/<class>/<image> with --dataset imagefolder --data-dir DIR; "
        f"{tmp_path / 'missing.png'} does not exist (check the path)"]


def test_bad_arguments(kdir, tmp_path):
    r = predict(["--data-dir", kdir], check=False)
    assert r.returncode == 2 and "--checkpoint is required" in r.stderr
    (tmp_path / "x.pt").write_bytes(b"garbage")
    r = predict(["--checkpoint", tmp_path / "x.pt", "--data-dir", kdir], check=False)
    assert r.returncode == 2 and "x.pt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.process
@pytest.mark.slow
def test_trained_then_predicted_on_real_images_beats_chance(tmp_path):
    if not (SHARED / "export.py").is_file():
        pytest.skip(f"real data not found at {SHARED}")
    root = tmp_path / "cifar-10"
    subprocess.run([sys.executable, str(SHARED / "export.py"), "kaggle", str(root), "--train", "5000", "--test",
                    "1000", "--total", "2000"], check=True, capture_output=True, timeout=300)
    # two epochs of adam on 4,800 images (about 40 s on one core; the tests run one worker per core)
    train_here(tiny_run(tmp_path / "run", "--val-split", 200, "--epochs", 2, "--optimizer", "adam", "--lr", 0.003,
                        "--weight-decay", 0, dataset="kaggle", data=root))
    predict(["--checkpoint", tmp_path / "run" / "last.pt", "--data-dir", root, "--output", tmp_path / "sub.csv"],
            nproc=2, timeout=300)
    ours = dict(rows(tmp_path / "sub.csv")[1:])
    answers = rows(tmp_path / "cifar-10_answers.csv")[1:]
    assert len(ours) == 2000 and len(answers) == 1000
    accuracy = sum(ours[i] == label for i, label in answers) / len(answers)
    print(f"submission accuracy on the 1,000 real test images: {accuracy:.1%}")
    assert accuracy > 0.30, f"{accuracy:.1%} on the 1,000 real test images"


def test_an_airbench_checkpoint_is_scored_with_its_runs_tta_unless_overridden(tmp_path):
    import torch
    from dtrain.checkpoint import load_checkpoint
    from dtrain.data.augment import AugmentSpec, Pipeline
    from dtrain.data.decode import decode_image
    from dtrain.inference import eval_logits
    from dtrain.models import model_from_checkpoint
    from dtrain.predict import run
    train_here(tiny_run(tmp_path / "run", "--max-steps", 2, "--eval-batch-size", 32, "--precision", "no",
                        arch="airbench"))
    ckpt_path = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["config"]["tta"] is True and ckpt["config"]["tta_shift"] == 1      # the airbench recipe's
    rng = np.random.default_rng(1)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(image(k, rng)).save(paths[-1])
    model = model_from_checkpoint(ckpt).eval()
    pipeline = Pipeline(AugmentSpec(), ckpt["mean"], ckpt["std"], "cpu")
    x = pipeline(torch.stack([torch.from_numpy(decode_image(p, 32, 3)) for p in paths]).permute(0, 3, 1, 2))

    def probs(*flags) -> torch.Tensor:
        got = run(["--checkpoint", str(ckpt_path), "--image", *map(str, paths), "--top-k", "10", *flags])["images"]
        names = list(ckpt["classes"])
        return torch.tensor([[dict(got[str(p)])[c] for c in names] for p in paths])

    with torch.no_grad():
        as_trained = eval_logits(model, x, tta=True, tta_shift=1).softmax(1)
        plain = model(x).float().softmax(1)
        mirror_only = eval_logits(model, x, tta=True).softmax(1)
    assert not torch.allclose(as_trained, plain, atol=1e-6) and not torch.allclose(as_trained, mirror_only, atol=1e-6)
    assert torch.allclose(probs(), as_trained, atol=1e-5)                      # no flags: the run's TTA
    assert torch.allclose(probs("--no-tta"), plain, atol=1e-5)
    assert torch.allclose(probs("--tta-shift", "0"), mirror_only, atol=1e-5)


@pytest.mark.process
def test_decode_workers_under_a_long_tmpdir_hand_their_images_back(checkpoint, tmp_path):
    """Workers hand batches back over Unix sockets in TMPDIR; a path past 107 bytes cannot be a socket. With
    a 100-character TMPDIR, both the PNG loader and the cache build finish instead of waiting forever."""
    root = tmp_path / "k"
    write_test(root / "test", range(1, 41))
    tmp = tmp_path / "t"
    tmp = tmp / ("x" * (100 - len(str(tmp)) - 1))
    tmp.mkdir(parents=True)
    for cache in ("--no-cache", "--cache"):
        out = tmp_path / f"sub{cache}.csv"
        launch(PREDICT, ["--checkpoint", checkpoint, "--data-dir", root, "--output", out, "--workers", 2,
                         "--batch-size", 8, cache], timeout=120, extra_env={"TMPDIR": tmp})
        assert len(rows(out)) == 41
    assert list(tmp.iterdir()) == []             # multiprocessing's folder went under /tmp, and is gone
