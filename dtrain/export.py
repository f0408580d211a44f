"""A trained model out of dtrain: safetensors weights with dtrain's metadata, or an ONNX graph.

    dtrain export runs/x/best.pt --format safetensors --output model.safetensors
    dtrain export runs/x/best.pt --format onnx --output model.onnx
    python -m dtrain.export runs/x/best.pt --format onnx

safetensors: the checkpoint's deployable weights (its "model" entry: the EMA weights where the run kept
them) and, in the file's metadata (strings), the format marker and each of arch, arch_args, num_classes,
in_channels, image_size, classes, mean, std and config as JSON (dtrain.checkpoint writes and reads that
format: prediction works the same from either file).

ONNX: input "images", float32 NCHW in [0, 1] (torchvision's ToTensor convention) with a dynamic batch
axis; the dataset normalisation is inside the graph; output "logits". At export onnxruntime runs the graph
on a batch and its logits are compared with the torch model's: above TOLERANCE (absolute, scaled by the
largest logit when that exceeds 1) it is an error and nothing is written. Needs the `export` extra.

An existing output is not replaced unless --force is given; every file is written to a temporary name
first and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import torch

from dtrain.checkpoint import load_checkpoint, safetensors_bytes
from dtrain.errors import UserError, run_command
from dtrain.files import write_bytes
from dtrain.models import model_from_checkpoint

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx"}
TOLERANCE = 1e-3
INSTALL_HINT = 'ONNX export needs onnx, onnxscript and onnxruntime: pip install -e ".[export]"'


# ---- ONNX ---------------------------------------------------------------------------------------------

class Normalized(torch.nn.Module):
    """images in [0, 1] -> the model's logits, the dataset normalisation first."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images):
        return self.model((images - self.mean) / self.std)


def onnx_modules():
    """(onnxruntime) when the export extra is installed; a UserError saying how to install it otherwise."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return onnxruntime


def onnx_session(path: str | os.PathLike):
    """An onnxruntime session for an exported model (CPU)."""
    return onnx_modules().InferenceSession(str(path), providers=["CPUExecutionProvider"])


def write_onnx(ckpt: dict, path: Path, batch: int = 8) -> float:
    """Export the checkpoint's model to ONNX at `path` and check it with onnxruntime; the max abs
    difference of the logits against torch's. Nothing is written when the check fails."""
    onnx_modules()
    size, channels = int(ckpt["image_size"]), int(ckpt["in_channels"])
    wrapped = Normalized(model_from_checkpoint(ckpt), ckpt["mean"], ckpt["std"]).eval()
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_file = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapped, (x,), input_names=["images"], output_names=["logits"],
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                                        dynamo=True, external_data=False, verbose=False)
        program.save(str(tmp_file), external_data=False)
        x_check = torch.rand(batch + 1, channels, size, size, generator=torch.Generator().manual_seed(1))
        got = onnx_session(tmp_file).run(["logits"], {"images": x_check.numpy()})[0]
        with torch.no_grad():
            want = wrapped(x_check).numpy()
        diff = float(abs(got - want).max())
        limit = TOLERANCE * max(1.0, float(abs(want).max()))
        if not diff <= limit:
            raise UserError(f"the ONNX model's logits differ from the torch model's by {diff:.3g} (more than "
                            f"{limit:.3g}); {ckpt['arch']!r} does not export faithfully, nothing written")
        os.replace(tmp_file, path)
    return diff


# ---- the command --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain export",
        description="Export a trained model: safetensors weights with dtrain's metadata (dtrain predict reads "
                    "them like the checkpoint), or ONNX for deployment (float32 NCHW images in [0, 1], "
                    "normalisation inside, logits out).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a best.pt or last.pt written by training")
    p.add_argument("--format", required=True, help="safetensors or onnx")
    p.add_argument("--output", help="file to write (default: CHECKPOINT with the format's suffix)")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    return p


def output_path(args) -> Path:
    if args.format not in FORMATS:
        raise UserError(f"unknown --format {args.format!r}: give one of {', '.join(FORMATS)}")
    path = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(FORMATS[args.format])
    if path.resolve() == Path(args.checkpoint).resolve():
        raise UserError(f"--output {path} is the checkpoint itself: give another file name")
    if path.is_dir():
        example = path / ("model" + FORMATS[args.format])
        raise UserError(f"--output {path} is a folder: give a file name, e.g. {example}")
    if path.exists() and not args.force:
        raise UserError(f"{path} exists: give another --output, or --force to replace it")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {parent} is not a writable folder")
    return path


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    path = output_path(args)
    if args.format == "onnx":
        onnx_modules()
    ckpt = load_checkpoint(args.checkpoint)
    result = {"output": str(path), "format": args.format}
    try:
        if args.format == "safetensors":
            data = safetensors_bytes(ckpt)
            write_bytes(path, data, remedy="pass another --output")
            print(f"wrote {path} ({len(data) / 2**20:,.1f} MiB): {ckpt['arch']} weights with dtrain's metadata; "
                  f"dtrain predict --checkpoint {path} uses it like {args.checkpoint}")
        else:
            diff = write_onnx(ckpt, path)
            result["max_abs_diff"] = diff
            print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB): input 'images' float32 "
                  f"[batch, {ckpt['in_channels']}, {ckpt['image_size']}, {ckpt['image_size']}] in [0, 1], "
                  f"output 'logits' [batch, {ckpt['num_classes']}]; onnxruntime vs torch: max abs difference "
                  f"{diff:.3g}")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return result


def main(argv=None) -> None:
    run_command(run, argv)


if __name__ == "__main__":
    main()
