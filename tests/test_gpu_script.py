"""bench/gpu.sh, the one prepared GPU call, and its Python side bench/gpu_checks.py: the --quick run on the CPU
writes a summary row for every part, the host-sync counter attributes syncs to steps and call sites, the
summary of a run cut short says so."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from helpers import reset_accelerate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.sh"
sys.path.insert(0, str(REPO / "bench"))
import gpu_checks  # noqa: E402

LABELS = ["a", "b", "c", "d", "d'", "e", "f", "e'", "g", "g'", "h"]


def table_rows(summary: str) -> list[list[str]]:
    """The cells of summary.md's table rows (header and rule left out)."""
    rows = []
    for line in summary.splitlines():
        if line.startswith("| ") and not line.startswith(("| part ", "| --- ")):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def part_log(out: Path, part: str | None) -> str:
    """A part's log from parts.tar.gz ("" where there is none)."""
    try:
        with tarfile.open(out / "parts.tar.gz") as t:
            return t.extractfile(f"stage/logs/{part}.log").read().decode(errors="replace")
    except (OSError, KeyError, AttributeError, tarfile.TarError):
        return ""


def test_shellcheck_accepts_gpu_sh():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("shellcheck is missing on CI: bash tests/cluster/install.sh installs it")
        pytest.skip("shellcheck not installed (bash tests/cluster/install.sh installs it)")
    r = subprocess.run(["shellcheck", "-x", str(SCRIPT)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n") and os.access(SCRIPT, os.X_OK)


@pytest.mark.process
@pytest.mark.slow
def test_quick_run_writes_a_summary_row_for_every_part(tmp_path):
    """`bash bench/gpu.sh --quick` on generated data: every part runs at toy size or says why not, $OUT holds
    no more files than the device tool brings back, and parts.tar.gz has every part's log."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_SH_WORK": str(work), "GPU_SH_DATA": "generate",
           "GPU_SH_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", str(SCRIPT), "--quick"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    rows = table_rows(summary)
    assert {row[0] for row in rows} >= set(LABELS), summary
    ids = {label: part for part, label, _ in gpu_checks.PARTS}
    for label, what, figures, command, seconds in rows:
        assert figures and not figures.startswith(("not run", "FAILED", "CUT", "cut:", "(no figures")), \
            f"row {label} ({what}): {figures}\n--- its log's end\n{part_log(out, ids.get(label))[-3000:]}"
        if not figures.startswith("skipped: "):
            assert command != "-" and seconds != "-", f"row {label} has figures but no command or time"
        else:
            assert len(figures) > len("skipped: ") + 10, f"row {label}: a skip without a reason"
    skipped = {row[0]: row[2] for row in rows if row[2].startswith("skipped")}
    assert "needs CUDA" in skipped["b"] and "needs CUDA" in skipped["g'"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"summary.md", "parts.tar.gz"}
    with tarfile.open(out / "parts.tar.gz") as t:
        names = set(t.getnames())
    for part, _, _ in gpu_checks.PARTS:
        assert f"stage/logs/{part}.log" in names, sorted(names)
    assert "./d-fp16/metrics.jsonl" in names and not any(n.endswith(".pt") for n in names)


def test_sync_counter_counts_each_warning_by_phase_and_site_and_passes_others_on():
    counter = gpu_checks.SyncCounter()
    shown = []

    def sync_here():
        warnings.warn(gpu_checks.SYNC_MESSAGE + " (Triggered internally at CUDAFunctions.cpp:1)", UserWarning)

    with warnings.catch_warnings():
        warnings.showwarning = lambda *a, **k: shown.append(str(a[0]))
        with counter.counting(cuda=False):
            counter.phase = "step 1"
            sync_here()
            sync_here()      # the same site twice: counted twice, not once (no "once per location" filter)
            counter.phase = "step 2"
            warnings.warn("something else", UserWarning)
            counter.phase = "step 3"
            sync_here()
    assert counter.per_phase() == {"step 1": 2, "step 3": 1}
    (site,) = counter.sites()
    assert site["count"] == 3 and site["phases"] == {"step 1": 2, "step 3": 1}
    assert site["site"].startswith("tests/test_gpu_script.py:")
    assert shown == ["something else"]


def test_train_syncs_puts_each_loss_read_in_its_step(tmp_path, monkeypatch):
    """On the CPU there is no sync debug mode: a Tensor.item that raises its warning stands in for it. dtrain's
    loop reads the loss at --log-every steps only, so those steps (and the epoch's end) hold every read."""
    import torch
    item = torch.Tensor.item

    def warning_item(self):
        warnings.warn(gpu_checks.SYNC_MESSAGE, UserWarning, stacklevel=2)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", warning_item)
    reset_accelerate()
    try:
        report = gpu_checks.train_syncs(["--recipe", "resnet18-fast", "--arch", "cnn", "--dataset", "fake",
                                         "--fake-size", "128", "-b", "16", "--eval-batch-size", "32",
                                         "--precision", "no", "--max-steps", "6", "--log-every", "3",
                                         "--workers", "0", "--no-wandb", "--no-plots",
                                         "--output-dir", str(tmp_path / "run")])
    finally:
        reset_accelerate()
    assert report["steps"] == 6 and report["log_steps"] == [3, 6] and report["skipped"]
    assert report["per_step"][3] >= 1 and report["per_step"][6] >= 1, report["per_step"]
    assert report["non_log_steps_with_syncs"] == {}, report["per_step"]
    assert any(p.startswith("epoch 1 end") for p in report["other_phases"])
    callers = {s["caller"].split(":")[0] for s in report["sites"]}
    assert "dtrain/engine.py" in callers, report["sites"]
    json.dumps(report)  # what gpu.sh writes


def test_summary_of_a_run_cut_short_says_what_was_cut_and_what_never_ran(tmp_path):
    stage = tmp_path / "stage"
    (stage / "logs").mkdir(parents=True)
    (stage / "logs" / "c-eager.log").write_text("step 1\nstep 2\n")
    gpu_checks.update_meta(stage, ["budget=520", "quick=false", "cuts=(f) has 1 seed"])
    (stage / "a-env.json").write_text(json.dumps({
        "cuda_available": True, "python": "3.12.3", "torch": "2.11.0", "cuda": "13.0", "cudnn": 91000,
        "cpu_cores": 16, "cpu": "x", "devices": [{"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                                                  "bf16": True}],
        "packages": {"accelerate": "1.15.0", "torchvision": "0.26.0", "triton": "3.6.0", "wandb": None}}))
    gpu_checks.write_status(stage, "a-env", 0, 4.2, 20, stage / "logs" / "a-env.log")
    gpu_checks.write_status(stage, "c-eager", 124, 60.3, 60, stage / "logs" / "c-eager.log")
    (stage / "c-eager.cmd").write_text("python bench/train.py --sections throughput\n")
    rows = {r["part"]: r for r in gpu_checks.summary(tmp_path, tmp_path / "summary.md")}
    assert "NVIDIA H200" in rows["a-env"]["figures"] and "wandb not installed" in rows["a-env"]["figures"]
    assert rows["c-eager"]["figures"].startswith("CUT at its 60 s cap (exit 124)")
    assert rows["h-profile"]["figures"].startswith("not run yet")
    text = (tmp_path / "summary.md").read_text()
    assert "(f) has 1 seed" in text
    assert len(table_rows(text)) == len(gpu_checks.PARTS)
