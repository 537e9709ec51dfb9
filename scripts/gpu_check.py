"""GPU check: training throughput of the demo k-fold model and ONNX Runtime vs torch latency, on CUDA when present.

Prints measured figures only. ``scripts/gpu_check.sh`` runs it after the smoke pipeline; alone::

    python scripts/gpu_check.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib import config, export, kfold, models, train  # noqa: E402


def train_images_per_s(device: torch.device, params: dict, steps: int, batch: int) -> float:
    """Optimizer steps of the demo k-fold model on random inputs of the demo shape (AMP on CUDA, as ``fit``)."""
    shape = (params["n_slices"], params["image_size"], params["image_size"])
    model = models.create_model(params["model_name"], in_chans=shape[0], num_classes=1,
                                **params["model_kwargs"]).to(device)
    cfg = train.TrainConfig(lr=params["lr"], optimizer=params["optimizer"])
    opt = train.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    x = torch.rand(batch, *shape, device=device)
    y = (torch.rand(batch, 1, device=device) > 0.5).float()
    loss_fn = train.make_loss("binary")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    device = config.device("auto")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}); torch {torch.__version__}")
    params = kfold.stage_params("demo")
    ips = train_images_per_s(device, params, args.steps, args.batch)
    print(f"training ({params['model_name']} {params['model_kwargs']}, batch {args.batch}, "
          f"{params['n_slices']}x{params['image_size']}^2): {ips:.0f} studies/s "
          f"({ips * params['n_slices']:.0f} slice images/s)")
    shape = (params["n_slices"], params["image_size"], params["image_size"])
    model = models.create_model(params["model_name"], in_chans=shape[0], num_classes=1,
                                **params["model_kwargs"]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export.export_onnx(model, Path(tmp) / "model.onnx", shape)
        for batch in (1, 16):
            lat = export.latency(model, onnx_path, shape, batch=batch, n=30, threads=1)
            print(f"latency batch {batch} (CPU, 1 thread): torch {lat['torch_ms']:.2f} ms, ONNX Runtime "
                  f"{lat['onnx_ms']:.2f} ms, ratio {lat['speedup']:.2f}")
        if device.type == "cuda":
            x = torch.rand(16, *shape, device=device)
            gpu_model = model.to(device)
            with torch.inference_mode():
                for _ in range(5):
                    gpu_model(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(30):
                    gpu_model(x)
                torch.cuda.synchronize()
            print(f"latency batch 16 (torch on {name}): {(time.perf_counter() - t0) / 30 * 1000:.2f} ms")


if __name__ == "__main__":
    main()
