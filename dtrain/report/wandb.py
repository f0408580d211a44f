"""Weights & Biases, from the main process only (one W&B run per training run, not per process).

Mode: --wandb-mode, else $WANDB_MODE, else online when an API key is configured and offline when not
(wandb.init would otherwise stop at once with "No API key configured", or prompt). Offline runs go to
<output-dir>/wandb and are uploaded later with `wandb sync`. The run id is kept in <output-dir>/wandb_id,
so a resumed or requeued run continues the same W&B run.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

ID_FILE = "wandb_id"


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # the key `wandb login` stores in ~/.netrc
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:
        return False


def resolve_mode(cfg) -> str:
    return cfg.wandb_mode or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


class WandbReporter:
    def __init__(self, cfg, output_dir: Path, say):
        import wandb
        self.wandb, self.say = wandb, say
        self.mode = resolve_mode(cfg)
        self.output_dir = Path(output_dir)
        id_file = self.output_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        kwargs = dict(project=cfg.wandb_project, entity=cfg.wandb_entity,
                      name=cfg.wandb_name or self.output_dir.name, id=run_id, resume="allow",
                      dir=str(self.output_dir), config=cfg.to_dict())
        try:
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(silent=True, init_timeout=60), **kwargs)
        except Exception as e:  # no key after all, no network, server down: keep training, log offline
            if self.mode != "online":
                raise
            say(f"W&B online start failed ({type(e).__name__}: {e}); logging offline instead")
            self.mode = "offline"
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        self.classes = None

    def start(self, cfg, info: dict) -> None:
        self.classes = info.get("classes")
        self.run.config.update({"world_size": info["world_size"], "parameters": info["parameters"]},
                               allow_val_change=True)
        if self.mode == "offline":
            self.say(f"W&B: offline run in {self.output_dir / 'wandb'} (no API key or --wandb-mode offline); "
                     f"upload it later with: wandb sync {self.output_dir / 'wandb'}/offline-run-*")

    def step(self, step: int, metrics: dict) -> None:
        self.run.log({"train/loss": metrics["loss"], "train/lr": metrics["lr"],
                      "train/images_per_second": metrics["images_per_second"]}, step=step)

    def epoch(self, row: dict, evaluation=None) -> None:
        self.run.log({("epoch" if k == "epoch" else f"epoch/{k}"): v for k, v in row.items()
                      if k != "step" and v is not None}, step=row["step"])
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
