"""State-dict helpers."""

from __future__ import annotations

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_prefixes(state: dict) -> dict:
    """Remove leading DDP ('module.') and torch.compile ('_orig_mod.') prefixes from state-dict keys."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out
