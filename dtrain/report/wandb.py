"""Weights & Biases, from the main process only (one W&B run per training run, not per process).

Mode: --wandb-mode, else $WANDB_MODE, else online when an API key is configured and offline when not
(wandb.init would otherwise stop at once with "No API key configured", or prompt). Offline runs go to
<output-dir>/wandb and are uploaded later with `wandb sync`.

Online start on a node without network (the usual cluster compute node): the W&B server is first asked for
any answer within PROBE_SECONDS (name lookup included), then wandb.init gets `init_timeout=INIT_TIMEOUT`.
When either fails the run logs offline instead, into a fresh local run (W&B keeps the failed start's id
busy), which `wandb sync` uploads later: at most PROBE_SECONDS are lost when the server cannot be reached,
PROBE_SECONDS + INIT_TIMEOUT when it answers but does not start the run. An offline run's finish waits on
nothing; an online run's waits at most FINISH_TIMEOUT for its last uploads (what is left, `wandb sync`
uploads).

The id of the run W&B started is written to <output-dir>/wandb_id once wandb.init returns, and a resumed or
requeued run continues that run. Under a W&B sweep agent ($WANDB_SWEEP_ID set) the agent picks the run: no
id is passed or resumed.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dtrain.epoch_row import CHARTED
from dtrain.files import make_folder, write_text
from dtrain.sweep import group_name

ID_FILE = "wandb_id"
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")   # what W&B accepts as a run id
PROBE_SECONDS = 10.0
INIT_TIMEOUT = 20.0
FINISH_TIMEOUT = 120.0


@dataclass(frozen=True)
class WandbSpec:
    """What the W&B run needs from the Config."""
    project: str = "dtrain"
    entity: str | None = None
    name: str | None = None
    mode: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    notes: str | None = None
    config: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "WandbSpec":
        return cls(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_name, cfg.wandb_mode,
                   cfg.wandb_group or group_name(cfg), tuple(cfg.wandb_tags), cfg.wandb_notes, cfg.to_dict())


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # the key `wandb login` stores in ~/.netrc
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
        return bool(read_netrc_auth(host=base_url()))
    except Exception:
        return False


def resolve_mode(requested: str | None) -> str:
    return requested or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


def server_unreachable(url: str, seconds: float) -> str | None:
    """Why `url` gives no HTTP answer within `seconds` (name lookup included), or None when it answers."""
    import requests
    failure = []

    def probe():
        try:
            requests.get(url, timeout=seconds).close()
        except requests.RequestException as e:
            failure.append(f"{url}: {type(e).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return f"{url} did not answer in {seconds:g} s"
    return failure[0] if failure else None


class WandbReporter:
    def __init__(self, spec: WandbSpec, output_dir: Path, say):
        import wandb
        self.wandb, self.say = wandb, say
        self.mode = resolve_mode(spec.mode)
        self.output_dir = Path(output_dir)
        make_folder(self.output_dir)
        kwargs = dict(project=spec.project, entity=spec.entity, name=spec.name or self.output_dir.name,
                      group=spec.group, tags=list(spec.tags) or None, notes=spec.notes,
                      dir=str(self.output_dir), config=spec.config)
        id_file = self.output_dir / ID_FILE
        if not os.environ.get("WANDB_SWEEP_ID"):
            kwargs.update(id=self._saved_id(id_file), resume="allow")
        self.run = self._init(kwargs)
        write_text(id_file, self.run.id)
        self.classes = None

    def _saved_id(self, id_file: Path) -> str | None:
        """The W&B run id an earlier attempt of this run wrote, or None: none yet, or a damaged file (empty
        after a kill or a full disk, not text, not an id), which is said and replaced by a new run's id."""
        if not id_file.exists():
            return None
        try:
            run_id = id_file.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            run_id = None
        if run_id is not None and RUN_ID.fullmatch(run_id):
            return run_id
        self.say(f"warning: {id_file} is damaged (not a W&B run id): this run logs to a new W&B run, whose id "
                 f"replaces it; the earlier W&B run keeps what it logged")
        return None

    def _init(self, kwargs: dict):
        wandb = self.wandb
        if self.mode == "online":
            failure = server_unreachable(base_url(), PROBE_SECONDS)
            if failure is None:
                try:
                    return wandb.init(mode="online", settings=wandb.Settings(
                        silent=True, init_timeout=INIT_TIMEOUT, finish_timeout=FINISH_TIMEOUT), **kwargs)
                except Exception as e:  # no key after all, server down or too slow
                    failure = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.say(f"W&B online start failed ({failure}); logging offline instead")
            self.mode = "offline"
            kwargs = {**kwargs, "id": secrets.token_hex(4), "resume": None}
        wandb.setup(settings=wandb.Settings(mode=self.mode))  # W&B's own analytics stay offline too
        return wandb.init(mode=self.mode, settings=wandb.Settings(silent=True), **kwargs)

    def start(self, cfg, info: dict) -> None:
        self.classes = info.get("classes")
        self.run.config.update({"world_size": info["world_size"], "parameters": info["parameters"]},
                               allow_val_change=True)
        if self.mode == "offline":
            self.say(f"W&B: offline run in {self.output_dir / 'wandb'} (no API key, --wandb-mode offline, or no "
                     f"W&B server); upload it later with: wandb sync {self.output_dir / 'wandb'}/offline-run-*")

    def step(self, step: int, metrics: dict) -> None:
        self.run.log({"train/loss": metrics["loss"], "train/lr": metrics["lr"],
                      "train/images_per_second": metrics["images_per_second"]}, step=step)

    def epoch(self, row: dict, evaluation=None) -> None:
        self.run.log({("epoch" if k == "epoch" else f"epoch/{k}"): row[k] for k in CHARTED if row.get(k) is not None},
                     step=row["step"])
        if row.get("val_acc") is not None:
            best = self.run.summary.get("best_acc")
            if best is None or row["val_acc"] > best:
                self.run.summary["best_acc"] = row["val_acc"]

    def end(self, summary: dict, evaluation=None) -> None:
        if evaluation is not None and self.classes and len(evaluation.targets):
            self.run.log({"confusion_matrix": self.wandb.plot.confusion_matrix(
                y_true=evaluation.targets.tolist(), preds=evaluation.preds.tolist(), class_names=self.classes)},
                step=summary["steps"])
        self.run.summary["steps"] = summary["steps"]

    def close(self) -> None:
        self.run.finish()
