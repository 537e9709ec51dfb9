"""HTTP service for an exported model: FastAPI on ONNX Runtime, no torch at serve time.

Why: clinicians send PNG/JPG, DICOM or NIfTI files and want probabilities back. The service reuses
``lib.imageio`` (the same ``preprocess`` as training) and the export folder written by ``lib.export``.
Safety rules: it never opens a path sent by a client (uploads only), caps upload size (413), detects the
type by content (415, also for ambiguous polyglot files), answers malformed files with 400 and our own message,
never logs or returns patient-identifying DICOM tags or element values (nor client file names), and binds to
127.0.0.1 unless told otherwise. Decoding runs under ``SERVICE_LIMITS``: what a file declares (pixels, voxels,
inflated bytes) is checked before it is decoded (413 when over), so one accepted upload costs about 0.5 GB at
most, and at most ``max_decodes`` uploads are decoded at once. No upload can cause a 500: an unexpected decoder
failure is a 400 naming only the error class.

Run: ``python -m lib.serve --model outputs/runs/<run>/export/<name>`` then open http://127.0.0.1:8000/.
``--segmenter <segmentation export>`` adds ``POST /segment`` (mask PNG), torch-free as well.
One-off: ``python -m lib.serve --model <dir> --predict image.dcm series_folder/`` prints probabilities as JSON
lines (``lib.serve.predict_proba(path)`` in Python); a bad file gets an ``error`` line (and a row in
``--skipped``) and the batch goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lib import imageio
from lib.io import DEFAULT_LIMITS, DataError, DataTooLargeError, DecodeLimits, SkippedCases, UnsupportedFormatError

log = logging.getLogger("lib.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 20.0
Upload = Annotated[UploadFile, File(description="PNG, JPG, DICOM or NIfTI image")]
UPLOAD_NAME = "upload"  # what errors call an uploaded file: the client's file name may identify a patient
# What one upload may declare: 25 M pixels per image (13 M for colour), 40 M values per volume, 256 MiB inflated.
# The largest accepted uploads peak at about 0.5 GB above the service's baseline (tests/test_hostile_decoders.py
# measures it); larger CT volumes are scored with --predict, under the library limits.
SERVICE_LIMITS = DecodeLimits(max_pixels=25_000_000, max_voxels=40_000_000, max_bytes=256 << 20)
DEFAULT_MAX_DECODES = 2  # uploads decoded at the same time; the others wait (memory = this x one upload)


@dataclass
class Predictor:
    """An export folder loaded for inference: ONNX session + labels + preprocessing spec."""

    model_dir: Path
    threads: int = 1
    limits: DecodeLimits | None = None  # decoding limits (None: the library defaults, for local files)
    display_names: Sequence[str] | None = None  # shown instead of labels.json's names, e.g. "WITH TUMOR"
    metadata: dict = field(init=False)
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.model_dir = Path(self.model_dir)
        meta_path, labels_path, onnx_path = (self.model_dir / n for n in ("metadata.json", "labels.json",
                                                                            "model.onnx"))
        for p in (meta_path, labels_path, onnx_path):
            if not p.is_file():
                raise DataError(p, "export file missing (run lib.export / notebook 07 first)")
        try:
            self.metadata = json.loads(meta_path.read_text())
            labels = json.loads(labels_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(meta_path, f"invalid JSON ({exc})") from exc
        self.labels = [labels[str(i)] for i in range(len(labels))]
        if self.display_names:
            names = [str(n) for n in self.display_names]
            if len(names) != len(self.labels) or len(set(names)) != len(names):
                raise ValueError(f"display names {names} must be {len(self.labels)} distinct names, one per output "
                                 f"{self.labels}")
            self.labels = names
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.spec = dict(self.metadata.get("preprocessing") or {})

    def predict_arrays(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed batch ``(N, *input_shape)`` -> probabilities ``(N, n_labels)``."""
        return self.session.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def predict_source(self, src: str | Path | bytes, name: str | None = None) -> dict:
        """One image (bytes, or a LOCAL path: a file or a DICOM series folder) -> probabilities, top label, input.

        Paths come from the command line or from the export's own sample, never from an HTTP client.
        """
        t0 = time.perf_counter()
        x, info = self.prepare(src, name)
        return self.result(x, info, t0)

    def result(self, x: np.ndarray, info: dict, t0: float) -> dict:
        """Probabilities for one preprocessed input, with the input's type/shape/modality and the latency."""
        probs = self.predict_arrays(x[None])[0]
        top = int(np.argmax(probs))
        return {"probabilities": {k: float(p) for k, p in zip(self.labels, probs, strict=True)},
                "prediction": [float(p) for p in probs],  # in output order (/labels), as list-based clients read it
                "label": self.labels[top], "probability": float(probs[top]),
                "input": {"type": info["type"], "shape": info["shape"],
                          **({"modality": info["dicom"].get("Modality", "?")} if "dicom" in info else {})},
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def prepare(self, src: str | Path | bytes, name: str | None = None) -> tuple[np.ndarray, dict]:
        """Decode (under ``self.limits``) and preprocess one image: the network input and the image's info."""
        with imageio.use_limits(self.limits or imageio.current_limits()):
            if isinstance(src, str | Path) and Path(src).is_dir():
                vol = imageio.read_dicom_series(src)
                image = imageio.nifti_to_slices(np.asarray(vol.dataobj, dtype=np.float32), vol.affine)
                del vol
                info = {"type": "dicom-series", "shape": list(image.shape)}
            else:
                image, info = imageio.read_image_with_meta(src, frame=self.spec.get("frame"), name=name)
            return imageio.preprocess(image, self.spec, name=name or UPLOAD_NAME), info

    def sample_path(self) -> Path | None:
        sample = (self.metadata.get("sample") or {}).get("file")
        return self.model_dir / Path(sample).name if sample else None


def latest_export(root: str | Path | None = None) -> Path:
    """The most recently written export folder under ``outputs/`` (runs and scratch), for a default model."""
    from lib import config

    root = Path(root) if root else config.OUTPUTS
    found = sorted(root.glob("**/export/*/metadata.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DataError(root, "no export found (run notebook 07 or lib.export first, or pass model_dir)")
    return found[-1].parent


_PREDICTORS: dict[Path, Predictor] = {}


def predict_proba(path: str | Path, model_dir: str | Path | None = None) -> dict[str, float]:
    """Probabilities per label for one image of any supported type: PNG/JPG/TIFF/BMP, DICOM (file or series
    folder), NIfTI. ``model_dir`` defaults to the newest export under ``outputs/``; loaded models are reused."""
    key = Path(model_dir).resolve() if model_dir else latest_export()
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor(key)
    return _PREDICTORS[key].predict_source(Path(path))["probabilities"]


# ----------------------------------------------------------------------------- app

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mednb classifier</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}table{border-collapse:collapse}
td,th{padding:.2em .8em;border-bottom:1px solid #ccc}.bar{background:#4a7;height:.8em}</style></head>
<body><h1>Image classifier</h1>
<p>Model <b id="model"></b>. Upload a PNG, JPG, DICOM or NIfTI file; it is scored in memory and not stored.</p>
<form id="form"><input type="file" id="file" name="file" required> <button id="submit" type="submit">Predict</button>
</form><p id="status"></p>
<table id="result" hidden><thead><tr><th>label</th><th>probability</th><th></th></tr></thead><tbody></tbody></table>
<script>
fetch('metadata').then(r => r.json()).then(m => {
  document.getElementById('model').textContent = (m.model_name || '?') + ' x' + (m.n_models || 1); });
document.getElementById('form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const status = document.getElementById('status'), table = document.getElementById('result');
  const body = new FormData(); body.append('file', document.getElementById('file').files[0]);
  status.textContent = 'scoring...'; table.hidden = true;
  const r = await fetch('predict', {method: 'POST', body});
  const out = await r.json();
  if (!r.ok) { status.textContent = 'Error ' + r.status + ': ' + out.detail; return; }
  status.textContent = 'Top label: ' + out.label + ' (' + out.probability.toFixed(3) + ')';
  const tbody = table.querySelector('tbody'); tbody.replaceChildren();
  for (const [label, p] of Object.entries(out.probabilities)) {
    const tr = tbody.insertRow(); tr.className = 'prob';
    tr.insertCell().textContent = label; tr.insertCell().textContent = p.toFixed(4);
    const bar = document.createElement('div'); bar.className = 'bar'; bar.style.width = (p * 10) + 'em';
    tr.insertCell().appendChild(bar);
  }
  table.hidden = false;
});
</script></body></html>
"""


def decode_error(exc: BaseException, what: str = "use") -> HTTPException:
    """The HTTP answer for a file that could not be decoded: 413 too large, 415 not a type we read, else 400.

    Only our own problem text (never an element value) is returned and logged; an unexpected exception is
    named by its class alone, since library messages can quote file contents.
    """
    if isinstance(exc, DataError):
        status = 413 if isinstance(exc, DataTooLargeError) else 415 if isinstance(exc, UnsupportedFormatError) else 400
        log.info("rejected upload (%d): %s", status, exc.problem[:300])
        return HTTPException(status, f"cannot {what} this image: {exc.problem}")
    if isinstance(exc, MemoryError):
        log.warning("upload needed more memory than available (MemoryError)")
        return HTTPException(413, f"cannot {what} this image: too large to decode in the memory available")
    log.warning("upload could not be decoded (%s)", type(exc).__name__)
    return HTTPException(400, f"cannot {what} this image: the file could not be decoded ({type(exc).__name__})")


def create_app(model_dir: str | Path | None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, threads: int = 1,
               segmenter_dir: str | Path | None = None, limits: DecodeLimits | None = None,
               max_decodes: int = DEFAULT_MAX_DECODES, wait_s: float = 60.0,
               display_names: Sequence[str] | None = None):
    """The FastAPI app; a model that fails to load leaves the app up with ``/health`` saying why.

    ``segmenter_dir`` (optional) adds a segmentation export for ``POST /segment``. ``limits`` (default
    ``SERVICE_LIMITS``) caps what an upload may declare; ``max_decodes`` uploads are decoded at once, others
    wait up to ``wait_s`` seconds (then 503), so memory stays bounded under concurrent uploads.
    ``display_names`` replace the export's label names in every response (one per output, in output order).
    """
    limits = limits or SERVICE_LIMITS
    max_bytes = int(max_upload_mb * 1024 * 1024)
    max_body = max_bytes + 64 * 1024  # multipart headers and boundaries on top of the file itself
    slots = threading.BoundedSemaphore(max(int(max_decodes), 1))
    state: dict[str, Any] = {"predictor": None, "error": None}
    try:
        state["predictor"] = (Predictor(Path(model_dir), threads=threads, limits=limits, display_names=display_names)
                              if model_dir else None)
        if model_dir is None:
            state["error"] = "no model directory given"
    except (DataError, OSError, ValueError, RuntimeError) as exc:
        state["error"] = str(exc)
        log.error("model not loaded: %s", exc)
    seg: dict[str, Any] = {"session": None, "meta": None,
                           "error": None if segmenter_dir else "no segmentation model (start with --segmenter)"}
    if segmenter_dir:
        try:
            from lib.segmentation import infer  # the training preprocessing, without torch

            seg["session"], seg["meta"] = infer.load_segmenter(Path(segmenter_dir))
        except (DataError, OSError, ValueError, RuntimeError) as exc:
            seg["error"] = str(exc)
            log.error("segmentation model not loaded: %s", exc)
    quiet_pydicom_warnings()
    lock = threading.Lock()
    stats = {"requests": 0}

    # max_body_size: FastAPI counts the bytes as they arrive, so chunked uploads without Content-Length are
    # cut off at the cap too (413) instead of being spooled to disk in full by the multipart parser.
    app = FastAPI(title="mednb image classifier", version="1.0", max_body_size=max_body,
                  description="Probabilities per label for an uploaded PNG/JPG/DICOM/NIfTI image (ONNX Runtime).")

    @app.middleware("http")
    async def limit_and_harden(request: Request, call_next):
        """Refuse oversized bodies before they are parsed; no content sniffing by browsers."""
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > max_body:
            return JSONResponse({"detail": f"upload larger than {max_upload_mb:g} MB"}, status_code=413)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def predictor() -> Predictor:
        if state["predictor"] is None:
            raise HTTPException(503, f"model not loaded: {state['error']}")
        return state["predictor"]

    def read_upload(file: UploadFile) -> bytes:
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB")
        if not data:
            raise HTTPException(400, "empty upload")
        try:
            imageio.detect_type(data, UPLOAD_NAME)
        except UnsupportedFormatError as exc:  # decided by content, never by the client's name or type
            raise HTTPException(415, exc.problem) from exc
        except DataError as exc:
            raise decode_error(exc) from exc
        return data

    def take_slot() -> None:
        if not slots.acquire(timeout=wait_s):
            raise HTTPException(503, "the service is busy decoding other uploads; try again")

    def score(data: bytes) -> dict:
        p = predictor()
        take_slot()
        t0 = time.perf_counter()
        try:
            x, info = p.prepare(data, name=UPLOAD_NAME)
        except Exception as exc:  # no upload may cause a 500: every decoding failure is a 4xx
            raise decode_error(exc) from None
        finally:
            slots.release()
        out = p.result(x, info, t0)
        with lock:
            stats["requests"] += 1
        log.info("scored %s %s in %.1f ms", out["input"]["type"], out["input"]["shape"], out["latency_ms"])
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return _PAGE

    @app.get("/health")
    def health() -> dict:
        """Liveness plus whether the model is loaded."""
        return {"health": "ok", "model_loaded": state["predictor"] is not None,
                **({"error": state["error"]} if state["predictor"] is None else {}),
                "segmenter_loaded": seg["session"] is not None,
                "requests": stats["requests"], "torch_imported": "torch" in sys.modules}

    @app.get("/metadata")
    def metadata() -> dict:
        """Input structure, prediction structure, preprocessing, model and a sample prediction."""
        p = predictor()
        return {**p.metadata, "prediction": {"probabilities": {k: "float in [0, 1]" for k in p.labels},
                                             "prediction": "list of the probabilities in output order",
                                             "label": "top label", "probability": "its probability"},
                "max_upload_mb": max_upload_mb}

    @app.get("/labels")
    def labels() -> dict[str, str]:
        """Output index -> label name."""
        return {str(i): name for i, name in enumerate(predictor().labels)}

    @app.get("/label", include_in_schema=False)
    def label_alias() -> dict[str, str]:
        """``/labels`` under the name earlier clients call."""
        return labels()

    @app.post("/predict")
    def predict(file: Upload) -> dict:
        """Probabilities per label for the uploaded image."""
        return score(read_upload(file))

    @app.post("/predict/label")
    def predict_label(file: Upload) -> dict:
        """Only the top label and its probability."""
        out = score(read_upload(file))
        return {"label": out["label"], "probability": out["probability"]}

    @app.get("/predict/test")
    def predict_test() -> dict:
        """Prediction on the sample shipped with the export (a server-side file, never a client path)."""
        p = predictor()
        path = p.sample_path()
        if path is None or not path.is_file():
            raise HTTPException(404, "this export has no sample file")
        return {**p.predict_source(path.read_bytes(), name="sample"), "sample": path.name,
                "expected": (p.metadata.get("sample") or {}).get("torch_probabilities")}

    @app.post("/segment", responses={200: {"content": {"image/png": {}}, "description": "mask PNG (0/255)"}})
    def segment_upload(file: Upload, output: str = "png") -> Response:
        """Segmentation mask of an uploaded 2D image (PNG by default; ``?output=json`` for the area only).

        Headers ``X-Mask-Pixels`` / ``X-Mask-Area-mm2`` carry the area (mm^2 when the file states a spacing).
        """
        if seg["session"] is None:
            raise HTTPException(503, f"segmentation not available: {seg['error']}")
        if output not in ("png", "json"):
            raise HTTPException(400, "output must be png or json")
        data = read_upload(file)
        from lib.segmentation import infer

        take_slot()
        try:
            with imageio.use_limits(limits):
                mask, area = infer.segment_source(seg["session"], data, name=UPLOAD_NAME)
        except Exception as exc:  # no upload may cause a 500: every decoding failure is a 4xx
            raise decode_error(exc, "segment") from None
        finally:
            slots.release()
        log.info("segmented %s: %d pixels", list(mask.shape), area["pixels"])
        if output == "json":
            return JSONResponse({"shape": list(mask.shape), "area": area,
                                 "model": seg["meta"].get("model_name"), "threshold": seg["meta"].get("threshold")})
        headers = {"X-Mask-Pixels": str(area["pixels"]),
                   "X-Mask-Area-mm2": "" if area["mm2"] is None else f"{area['mm2']:.3f}"}
        return Response(infer.mask_png(mask), media_type="image/png", headers=headers)

    return app


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lib.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="export folder (model.onnx, labels.json, metadata.json); "
                    "with --predict it defaults to the newest export under outputs/")
    ap.add_argument("--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1: local only)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--segmenter", default=None, help="optional segmentation export (python -m lib.segmentation "
                    "export) for POST /segment")
    ap.add_argument("--predict", nargs="+", metavar="IMAGE", help="score these local files (or DICOM series "
                    "folders), print one JSON line each (an error line for a bad file, then go on), exit")
    ap.add_argument("--skipped", default=None, metavar="CSV", help="with --predict: write the files that could not "
                    "be scored (file, reason) to this CSV")
    ap.add_argument("--max-pixels", type=int, default=None, help="largest image/frame/slice (width x height) a "
                    f"file may declare (serving: {SERVICE_LIMITS.max_pixels:,}; --predict: "
                    f"{DEFAULT_LIMITS.max_pixels:,})")
    ap.add_argument("--max-voxels", type=int, default=None, help="most values one decoded array may hold "
                    f"(serving: {SERVICE_LIMITS.max_voxels:,}; --predict: {DEFAULT_LIMITS.max_voxels:,})")
    ap.add_argument("--max-decoded-mb", type=float, default=None, help="most bytes a file may inflate to or declare "
                    f"(serving: {SERVICE_LIMITS.max_bytes >> 20}; --predict: {DEFAULT_LIMITS.max_bytes >> 20})")
    ap.add_argument("--max-decodes", type=int, default=DEFAULT_MAX_DECODES, help="uploads decoded at the same time")
    ap.add_argument("--label-names", default=None, metavar="A,B", help="display names replacing the export's "
                    "labels, comma-separated in output order (e.g. 'WITHOUT TUMOR,WITH TUMOR')")
    args = ap.parse_args(argv)
    if args.model is None and not args.predict:
        ap.error("--model is required to serve")
    return args


def limits_from_args(args: argparse.Namespace, base: DecodeLimits) -> DecodeLimits:
    """``base`` with any ``--max-pixels/--max-voxels/--max-decoded-mb`` given on the command line."""
    return DecodeLimits(max_pixels=args.max_pixels or base.max_pixels, max_voxels=args.max_voxels or base.max_voxels,
                        max_bytes=int(args.max_decoded_mb * (1 << 20)) if args.max_decoded_mb else base.max_bytes)


def display_names(args: argparse.Namespace) -> list[str] | None:
    """``--label-names 'A,B'`` as a list (None when not given)."""
    return [n.strip() for n in args.label_names.split(",")] if args.label_names else None


def quiet_pydicom_warnings() -> None:
    """pydicom's validation warnings quote element values (names, dates): keep them out of logs and stderr."""
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def predict_files(pred: Predictor, paths: list[str], skipped: SkippedCases | None = None) -> int:
    """Score local files, one JSON line each; a file that fails gets an ``error`` line and the batch goes on.

    Returns how many files failed (each also recorded in ``skipped``).
    """
    skipped = SkippedCases() if skipped is None else skipped
    failed = 0
    for path in paths:
        try:
            out = {"file": path, **pred.predict_source(Path(path))}
        except Exception as exc:  # any failure is this file's, not the batch's
            problem = exc.problem if isinstance(exc, DataError) else f"could not be scored ({type(exc).__name__})"
            skipped.add(Path(path).name, problem, stage="predict", path=path)
            out, failed = {"file": path, "error": problem}, failed + 1
        print(json.dumps(out), flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_pydicom_warnings()
    if args.predict:
        pred = Predictor(Path(args.model) if args.model else latest_export(), threads=args.threads,
                         limits=limits_from_args(args, DEFAULT_LIMITS), display_names=display_names(args))
        skipped = SkippedCases()
        failed = predict_files(pred, args.predict, skipped)
        if failed:
            log.warning("%d of %d file(s) could not be scored", failed, len(args.predict))
        if args.skipped:
            skipped.save(args.skipped)
        return 1 if failed else 0
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the service is reachable from other machines", args.host)
    app = create_app(args.model, args.max_upload_mb, args.threads, segmenter_dir=args.segmenter,
                     limits=limits_from_args(args, SERVICE_LIMITS), max_decodes=args.max_decodes,
                     display_names=display_names(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
