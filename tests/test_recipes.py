"""Every shipped recipe trains as shipped: its model, optimiser, schedule and augmentations take a step on
generated images of its dataset's shape and leave a last.pt that names the recipe."""
from __future__ import annotations

import pytest

from dtrain.checkpoint import load_checkpoint
from dtrain.config import list_recipes, load_recipe
from helpers import train_here

# a step of these takes 20-120 s on 2 shared cores (26-36 M parameters, or 272 layers)
BIG = {"wrn28-10", "cifar100-wrn28-10", "wrn28-10-swa", "pyramidnet272-shakedrop"}


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in BIG else r
                                    for r in list_recipes()])
def test_every_shipped_recipe_trains_a_step(recipe, tmp_path):
    out = tmp_path / "run"
    r = train_here(["--recipe", recipe, "--dataset", "fake", "--fake-size", "16", "--batch-size", "4",
                    "--eval-batch-size", "8", "--max-steps", "1", "--workers", "0", "--no-pretrained",
                    "--output-dir", out])
    assert r.result is not None and r.result["steps"] == 1, r.stdout[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["recipe"] == recipe
    assert ckpt["arch"] == load_recipe(recipe).get("arch", ckpt["arch"])
