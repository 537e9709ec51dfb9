"""Export a trained model or a fold ensemble to ONNX, with the files the service needs, and check parity.

Why: the HTTP service must not depend on torch, and must apply exactly the preprocessing the model was
trained with. The export folder is self-describing: ``model.onnx`` (probabilities computed INSIDE the
graph, fold models averaged there, dynamic batch axis), ``labels.json`` (output column -> label name),
``metadata.json`` (input shape, preprocessing spec passed to ``lib.imageio.preprocess``, model, run id,
metrics, parity figure), a ``sample.*`` file the service can score at ``/predict/test``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lib import config
from lib.io import DataError, read_json, write_json

OPSET = 17
PARITY_TOL = 1e-4
SAMPLE_EXT = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp", "dicom": ".dcm", "nifti": ".nii.gz"}


class ProbabilityEnsemble(nn.Module):
    """Mean of the members' probabilities (sigmoid/softmax inside the graph), one column per label.

    Binary models (one logit) give two columns ``[1 - p, p]`` so every task serves the same way; segmentation
    models give the mean foreground probability map ``(N, 1, H, W)``.
    """

    def __init__(self, models: Sequence[nn.Module], task: str) -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "multilabel", "segmentation"):
            raise ValueError(f"export supports binary|multiclass|multilabel|segmentation models, got task {task!r}")
        self.members = nn.ModuleList(models)
        self.task = task

    def forward(self, x: Tensor) -> Tensor:
        probs = []
        for m in self.members:
            logits = m(x).float()
            probs.append(logits.softmax(1) if self.task == "multiclass" else logits.sigmoid())
        p = torch.stack(probs).mean(0)
        if self.task == "binary":
            p = torch.cat([1 - p[:, :1], p[:, :1]], 1)
        return p


def output_labels(meta: dict) -> list[str]:
    """Names of the exported output columns (binary: negative then positive class)."""
    names = list(meta.get("label_names") or [])
    task = meta.get("task", "binary")
    if task == "binary":
        classes = list((meta.get("preprocessing") or {}).get("classes") or [])
        pos = names[0] if names else (classes[1] if len(classes) == 2 else "positive")
        neg = classes[0] if len(classes) == 2 and classes[1] == pos else f"not {pos}"
        return [neg, pos]
    n = int(meta.get("num_classes", len(names)))
    return names if len(names) == n else [f"class_{k}" for k in range(n)]


def input_spec(meta: dict) -> dict:
    """The ``lib.imageio.preprocess`` spec from a checkpoint's ``preprocessing`` (channels filled from the model)."""
    spec = dict(meta.get("preprocessing") or {})
    spec.setdefault("channels", int(meta.get("in_chans", 1)))
    spec.setdefault("size", 128)
    if spec.get("source") == "crops":
        spec.setdefault("normalise", "none")  # crops are already windowed to [0, 1] by lib.crop
    return spec


def input_shape(spec: dict) -> list[int]:
    """Network input shape without the batch axis, as ``preprocess`` produces it."""
    size = spec["size"]
    h, w = (size, size) if np.isscalar(size) else size
    if spec.get("kind") == "3d":
        return [1, int(spec.get("n_slices", 8)), int(h), int(w)]
    return [int(spec["channels"]), int(h), int(w)]


def load_members(paths: Sequence[str | Path], builder=None) -> tuple[list[nn.Module], dict]:
    """Fold checkpoints -> models + the shared meta; folds must agree on the recipe (``builder``: as
    ``lib.models.load_checkpoint``'s)."""
    from lib.models import load_checkpoint

    if not paths:
        raise DataError("checkpoints", "no checkpoints given")
    models, metas = zip(*(load_checkpoint(p, builder=builder) for p in paths), strict=True)
    keys = ("model_name", "in_chans", "num_classes", "task", "label_names", "preprocessing")
    for p, m in zip(paths, metas, strict=True):
        diff = [k for k in keys if m.get(k) != metas[0].get(k)]
        if diff:
            raise DataError(p, f"checkpoint differs from {paths[0]} in {diff}: cannot ensemble")
    return list(models), dict(metas[0])


def export_onnx(model: nn.Module, path: str | Path, shape: Sequence[int], opset: int = OPSET,
                props: dict[str, str] | None = None) -> Path:
    """``torch.onnx.export`` (TorchScript exporter: no onnxscript needed) with a dynamic batch axis, checked.

    ``props`` are stored as the file's ``metadata_props`` (a recipe a reader needs besides the graph).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    dummy = torch.zeros(2, *shape)
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=["probabilities"],
                          dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    if props:
        onnx.helper.set_model_props(graph, dict(props))
        onnx.save(graph, str(path))
    return path


def ort_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session (``threads`` intra-op threads; the service and the benchmark share this)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(model: nn.Module, onnx_path: str | Path, x: np.ndarray) -> float:
    """Max |ONNX Runtime - torch| over the probabilities of batch ``x``."""
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
    out = ort_session(onnx_path).run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]
    return float(np.abs(out - ref).max())


def export_model(models: nn.Module | Sequence[nn.Module], meta: dict, out_dir: str | Path,
                 sample: str | Path | None = None, parity_inputs: np.ndarray | None = None,
                 run_id: str = "", metrics: dict | None = None, tol: float = PARITY_TOL,
                 extra: dict | None = None, sample_input=None, props: dict[str, str] | None = None) -> dict:
    """Write ``model.onnx``, ``labels.json``, ``metadata.json`` (+ ``sample.*``) and return the metadata.

    ``sample`` is a real image file (any type ``lib.imageio`` reads) copied as the service's test input;
    ``sample_input(path)`` turns it into a network input (default ``lib.imageio.load_input`` with the checkpoint's
    spec); ``parity_inputs`` (N, *input_shape) are preprocessed inputs for the ONNX vs torch check (random inputs
    in [0, 1] when None). ``props`` go into the ONNX file's metadata. Raises ``RuntimeError`` when parity
    exceeds ``tol``.
    """
    from lib import imageio

    members = [models] if isinstance(models, nn.Module) else list(models)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = input_spec(meta)
    shape = input_shape(spec)
    ens = ProbabilityEnsemble(members, meta.get("task", "binary")).eval()
    onnx_path = export_onnx(ens, out_dir / "model.onnx", shape, props=props)
    labels = output_labels(meta)
    sample_info = None
    if sample is not None:
        data = Path(sample).read_bytes()
        kind = imageio.sniff_type(data)
        if kind is None:
            raise DataError(sample, "sample is not an image type the service reads")
        target = out_dir / f"sample{SAMPLE_EXT[kind]}"
        shutil.copyfile(sample, target)
        x = (sample_input(target) if sample_input else imageio.load_input(target, spec))[None]
        if parity_inputs is None:
            parity_inputs = np.concatenate([x, np.random.default_rng(0).random((3, *shape), dtype=np.float32)])
        sample_info = {"file": target.name, "type": kind}
        if ens.task != "segmentation":
            with torch.no_grad():
                probs = ens(torch.from_numpy(x))[0].numpy()
            sample_info["torch_probabilities"] = dict(zip(labels, map(float, probs), strict=True))
    if parity_inputs is None:
        parity_inputs = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    max_diff = parity(ens, onnx_path, parity_inputs)
    if not max_diff <= tol:
        raise RuntimeError(f"ONNX Runtime vs torch max |diff| {max_diff:.3g} > {tol} ({onnx_path})")
    metadata = {
        "format": "mednb-onnx-1",
        "model_name": meta.get("model_name"), "task": meta.get("task"), "n_models": len(members),
        "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "input": {"name": "input", "shape": [None, *shape], "dtype": "float32", "channels": shape[0]},
        "output": _output_spec(meta.get("task"), labels, shape),
        "preprocessing": spec, "label_names": labels, "metrics": metrics or meta.get("metrics") or {},
        "parity": {"max_abs_diff": max_diff, "tolerance": tol, "n_inputs": int(len(parity_inputs))},
        "onnx": {"opset": OPSET, "file": onnx_path.name, "bytes": onnx_path.stat().st_size},
        "sample": sample_info, **(extra or {}),
    }
    write_json(out_dir / "labels.json", {str(i): name for i, name in enumerate(labels)}, indent=2)
    write_json(out_dir / "metadata.json", metadata, indent=2)
    return metadata


def _output_spec(task: str | None, labels: list[str], shape: Sequence[int]) -> dict:
    """What ``model.onnx``'s output holds, for ``metadata.json``."""
    if task == "segmentation":
        return {"name": "probabilities", "shape": [None, 1, *shape[1:]], "labels": labels,
                "meaning": "foreground probability map on the network grid (mean sigmoid over fold models)"}
    return {"name": "probabilities", "shape": [None, len(labels)], "labels": labels,
            "meaning": "mean over fold models of per-label probabilities"
            + (" (softmax, sums to 1)" if task == "multiclass" else
               " ([1-p, p] of one sigmoid)" if task == "binary" else " (independent sigmoids)")}


def export_checkpoints(paths: Sequence[str | Path], out_dir: str | Path, **kw: Any) -> dict:
    """Fold checkpoints (``.../fold<k>/best.pt``) -> one ONNX ensemble export (see ``export_model``)."""
    models, meta = load_members(paths)
    kw.setdefault("extra", {})
    kw["extra"] = {**kw["extra"], "checkpoints": [Path(p).parent.name + "/" + Path(p).name for p in paths]}
    return export_model(models, meta, out_dir, **kw)


# ----------------------------------------------------------------------------- stage 07: export a k-fold run


def oof_metrics(run_dir: str | Path, name: str) -> dict:
    """The pooled out-of-fold scores of stage 04 (``kfold/<name>/metrics.json``), scalars only, for metadata."""
    from lib import kfold

    try:
        summary = kfold.load_result(Path(run_dir) / "kfold" / name).summary
    except DataError:  # checkpoints given without their k-fold run
        return {}
    pooled = summary.get("pooled", {})
    keep = {k: v for k, v in pooled.items() if isinstance(v, int | float | str | type(None))}
    return {"source": f"kfold/{name}/metrics.json", "pooled_oof": keep,
            "fold_mean": summary.get("fold_mean", {}), "fold_sd": summary.get("fold_sd", {}),
            "n_dev": summary.get("n_dev"), "n_splits": summary.get("n_splits")}


def crop_inputs(run_dir: str | Path, spec: dict, n: int = 8) -> tuple[np.ndarray, list[Path]]:
    """Up to ``n`` real network inputs made by the TRAINING code (``lib.datasets``) from ``run_dir/crops``."""
    import pandas as pd

    from lib.datasets import crop_to_input, read_crop

    crops = Path(run_dir) / "crops"
    index_path = crops / "index.csv"
    if not index_path.exists():
        raise DataError(index_path, "crop index not found (run notebook 02 / lib.crop.ensure_crops first)")
    index = pd.read_csv(index_path)
    index = index[index["path"].astype(str).str.endswith(".npz")]
    if "mode" in index:
        index = index[index["mode"] == "bbox"]
    if spec.get("organ") and "organ" in index:
        index = index[index["organ"] == spec["organ"]]
    xs, paths = [], []
    for rel in index["path"].head(n):
        image, mask = read_crop(crops / rel)
        xs.append(crop_to_input(image, mask, spec.get("kind", "slab"), int(spec.get("n_slices", 8)),
                                int(spec.get("size", 64)), spec.get("mask_mode", "none")))
        paths.append(crops / rel)
    if not xs:
        raise DataError(index_path, f"no npz crops for organ {spec.get('organ')!r}")
    return np.stack(xs), paths


def image_source(run_dir: str | Path, name: str) -> Path:
    """The image folder a k-fold run of an image model trained on (its ``params.json`` dataset)."""
    from lib import kfold

    params_path = Path(run_dir) / "kfold" / name / kfold.PARAMS_FILE
    if not params_path.exists():
        raise DataError(params_path, "no k-fold parameters: cannot tell which images the models were trained on")
    return kfold.predict_source(str(read_json(params_path).get("dataset")), run_dir)


def image_inputs(run_dir: str | Path, name: str, spec: dict, n: int = 8) -> tuple[np.ndarray, list[Path]]:
    """Up to ``n`` real inputs of an image model, spread over its training folder (every class), read by
    ``lib.imageio.load_input`` -- the function the training dataset and the service both use."""
    from lib import imageio, splits

    source = image_source(run_dir, name)
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in splits.IMAGE_SUFFIXES)
    if not files:
        raise DataError(source, "no image files")
    picks = [files[i] for i in dict.fromkeys(np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int))]
    xs, paths = [], []
    for path in picks:
        try:
            xs.append(imageio.load_input(path, spec))
            paths.append(path)
        except DataError:
            continue  # an unreadable file is not a parity input; the dataset skipped it in training too
    if not xs:
        raise DataError(source, f"none of {len(picks)} sampled images could be read")
    return np.stack(xs), paths


def parity_inputs(run_dir: str | Path, name: str, spec: dict, n: int = 8) -> tuple[np.ndarray, list[Path]]:
    """Real inputs for the ONNX vs torch check: organ crops for crop models, training images for image models."""
    return crop_inputs(run_dir, spec, n) if spec.get("source") == "crops" else image_inputs(run_dir, name, spec, n)


def crop_as_nifti(crop_path: str | Path, out_path: str | Path, spec: dict | None = None) -> Path:
    """A training crop ``(S, H, W)`` written as a NIfTI that ``lib.imageio.read_image`` returns unchanged.

    Why: a crop model is served on organ crops; the export ships one as ``sample.nii.gz`` so ``/predict/test``
    and the parity check use a real file through the real reader. The affine is
    the crop's own (LPS voxel axes), which ``imageio.nifti_to_slices`` maps back to ``(S, H, W)``.
    """
    import nibabel as nib

    from lib.datasets import read_crop

    image, mask = read_crop(crop_path)
    if mask is not None and (spec or {}).get("mask_mode") == "multiply":
        image = image * (mask > 0)
    with np.load(crop_path) as z:  # lib.crop: affine maps (w, h, s) -> RAS mm; spacing in (S, H, W) order
        affine = np.asarray(z["affine"], np.float64) if "affine" in z.files else None
        spacing = [float(v) for v in z["spacing"]] if "spacing" in z.files else [1.0, 1.0, 1.0]
    if affine is None or affine.shape != (4, 4):
        sz, sy, sx = spacing[:3]
        affine = np.diag([-sx, -sy, sz, 1.0])  # LPS voxel axes
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0), np.float32), affine), str(out_path))
    return out_path


def export_run(run_dir: str | Path, name: str | None = None, checkpoints: Sequence[str | Path] | None = None,
               profile: str = "smoke", seed: int = config.DEFAULT_SEED, n_parity: int = 8,
               out_dir: str | Path | None = None, sample: str | Path | None = None,
               parity_inputs: np.ndarray | None = None) -> dict:
    """Stage 07: the fold ensemble of ``run_dir/kfold/<name>`` -> ``run_dir/export/<name>`` (see ``export_model``).

    Crop models get real parity inputs from ``run_dir/crops`` built by the training code, and the first of
    them as ``sample.nii.gz``; image models get images of the folder their k-fold run trained on
    (:func:`image_inputs`), the first as the sample, unless the caller passes ``sample``/``parity_inputs``.
    """
    run_dir = Path(run_dir)
    from lib import kfold

    paths, name = kfold.find_run(run_dir, name, checkpoints, profile, seed)
    members, meta = load_members(paths)
    spec = input_spec(meta)
    out_dir = Path(out_dir) if out_dir else run_dir / "export" / name
    extra: dict[str, Any] = {
        "checkpoints": [str(Path(p).relative_to(run_dir)) if Path(p).is_relative_to(run_dir) else str(p)
                        for p in paths], "kfold_name": name, "profile": profile, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        if spec.get("source") == "crops" and sample is None:
            from lib.crop import CropParams

            x, crop_paths = crop_inputs(run_dir, spec, n_parity)
            sample = crop_as_nifti(crop_paths[0], Path(tmp) / "sample.nii.gz", spec)
            parity_inputs = x if parity_inputs is None else parity_inputs
            extra["parity_files"] = [str(p.relative_to(run_dir)) for p in crop_paths]
            extra["expected_input"] = ("an organ crop (S, H, W) already windowed to [0, 1] as lib.crop writes it "
                                       "(NIfTI, or DICOM/PNG of such a crop); not a whole CT")
            extra["crop_defaults"] = {k: v for k, v in CropParams().as_json().items()
                                      if k in ("mode", "size", "fit", "margin_mm", "window")}
            extra["crop_defaults"]["window_level_width"] = list(window_of_name(extra["crop_defaults"]["window"]))
        elif sample is None:  # an image model: a training image is the sample, training images check parity
            x, image_paths = image_inputs(run_dir, name, spec, n_parity)
            sample = image_paths[0]
            parity_inputs = x if parity_inputs is None else parity_inputs
            extra["parity_files"] = [str(p) for p in image_paths]
        return export_model(members, meta, out_dir, sample=sample, parity_inputs=parity_inputs,
                            run_id=run_dir.name, metrics=oof_metrics(run_dir, name) or meta.get("metrics"),
                            extra=extra)


def window_of_name(window: str | Sequence[float]) -> tuple[float, float]:
    """(level, width) of a window preset or pair (``lib.imageio.resolve_window``), for metadata."""
    from lib.imageio import resolve_window

    return resolve_window(window) or (float("nan"), float("nan"))


def latency(model: nn.Module, onnx_path: str | Path, shape: Sequence[int], batch: int = 1, n: int = 50,
            warmup: int = 5, threads: int = 1) -> dict:
    """Median latency (ms) of torch eager vs ONNX Runtime on the same input, both with ``threads`` threads."""
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.eval()
        xt = torch.from_numpy(x)

        def run_torch() -> None:
            with torch.inference_mode():
                model(xt)

        sess = ort_session(onnx_path, threads)
        torch_ms = _median_ms(run_torch, n, warmup)
        ort_ms = _median_ms(lambda: sess.run(None, {"input": x}), n, warmup)
    finally:
        torch.set_num_threads(prev)
    return {"batch": batch, "threads": threads, "torch_ms": torch_ms, "onnx_ms": ort_ms,
            "speedup": torch_ms / ort_ms}


def _median_ms(fn, n: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


if __name__ == "__main__":  # python -m lib.export: the same command as ``mednb export``
    import sys

    from lib.cli import main

    raise SystemExit(main(["export", *sys.argv[1:]]))
