"""Fold checkpoints of a segmentation run -> one ONNX graph, through the shared ``lib.export.export_model``.

The graph averages the fold models' sigmoid maps (``lib.export.ProbabilityEnsemble``); its input is the
preprocessed image ``(N, C, S, S)``. The recipe (``Preprocess``, channels, threshold) is also stored inside
``model.onnx``, so ``lib.segmentation.infer.load_segmenter`` needs that one file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lib import export
from lib.segmentation.data import read_chw
from lib.segmentation.infer import ONNX_META_KEY
from lib.segmentation.model import build_model
from lib.segmentation.preprocess import Preprocess, as_chw, preprocess_image


def sample_input(path: str | Path, meta: dict) -> np.ndarray:
    """A real image file as network input ``(C, S, S)`` by the checkpoint's recipe (what inference does)."""
    x, _ = preprocess_image(as_chw(read_chw(path), int(meta["in_chans"])), Preprocess.from_dict(meta["preprocessing"]))
    return x


def export_segmenter(checkpoint: str | Path | Sequence[str | Path], out_dir: str | Path,
                     sample: str | Path | None = None, tol: float = export.PARITY_TOL, n_parity: int = 4) -> dict:
    """Export a segmentation checkpoint (or fold checkpoints, averaged in the graph) to ``out_dir``.

    Writes ``model.onnx`` (input ``input`` (N, C, S, S) preprocessed, output ``probabilities`` (N, 1, S, S),
    dynamic batch), ``metadata.json``, ``labels.json`` and, when given, ``sample.<ext>`` (a real image, also
    used in the parity check with ``n_parity`` random inputs). Raises ``RuntimeError`` when ONNX Runtime and
    torch differ by more than ``tol``; returns the metadata.
    """
    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(p) for p in checkpoint]
    models, meta = export.load_members(paths, builder=build_model)
    size, chans = int(meta["preprocessing"]["size"]), int(meta["in_chans"])
    x = np.random.default_rng(0).random((n_parity, chans, size, size), dtype=np.float32)
    if sample is not None:
        x = np.concatenate([sample_input(sample, meta)[None], x])
    recipe = {"format": "mednb-onnx-1", "task": "segmentation", "model_name": meta["model_name"],
              "model_kwargs": meta.get("model_kwargs", {}), "in_chans": chans, "n_models": len(models),
              "label_names": meta.get("label_names", []), "preprocessing": meta["preprocessing"],
              "threshold": float(meta.get("threshold", 0.5))}
    return export.export_model(models, meta, out_dir, sample=sample, parity_inputs=x, tol=tol,
                               extra={"threshold": recipe["threshold"], "in_chans": chans,
                                      "checkpoints": [str(p) for p in paths]},
                               sample_input=lambda p: sample_input(p, meta),
                               props={ONNX_META_KEY: json.dumps(recipe, default=str)})
