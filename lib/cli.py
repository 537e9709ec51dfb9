"""``mednb``: the command line of every stage (also ``python -m lib``).

    mednb label --cohort DIR --out RUN_DIR                  # report labels (notebook 01)
    mednb crop --input DIR --out DIR --organ liver --mode bbox --workers 4        # organ crops (notebook 02)
    mednb crop --imagedir CT/ --maskdir SEG/ --out DIR
    mednb crop --input DIR --out DIR --scheduler tcp://host:8786                  # the same on a Dask cluster
    mednb train --dataset brain-mri --out RUN_DIR --epochs 5                      # one classifier (notebook 03)
    mednb kfold train --dataset brain-mri --out RUN_DIR -p epochs=3               # k-fold run (notebook 04)
    mednb kfold predict --ckpt RUN/kfold/model/fold*/best.pt --input DIR --out preds.csv
    mednb evaluate --kfold RUN/kfold/model --out DIR  |  --weights best.pt --data DIR --out DIR
    mednb explain --profile smoke -p n_cases=8                                    # explanations (notebook 05)
    mednb export --run-dir RUN_DIR --out DIR                                      # ONNX export (notebook 07)
    mednb serve --model EXPORT_DIR                                                # HTTP service
    mednb segment predict --model best.pt --input DIR --out DIR                   # 2D segmentation
    mednb run --profile smoke -p dataset=brain-mri [--config study.yaml] [--only 00 03]   # the pipeline
    mednb results [--check]                     # docs/results.md from docs/results/*.json (or check they agree)

Every command calls the same ``lib`` functions as the notebooks; this module only parses options and reports.
A bad input (missing file, wrong type, unknown name) ends the command with one ``Error:`` line and exit code 2
or 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from lib import config

_EXPECTED = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError)


class _Group(click.Group):
    """A click group whose commands turn the library's input errors into one clear ``Error:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except _EXPECTED as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise click.ClickException(f"{type(exc).__name__}: {message}") from exc


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


def _pairs(values: Sequence[str]) -> dict[str, Any]:
    """``-p key=value`` options as a mapping, values parsed as YAML scalars (see :mod:`lib.overrides`)."""
    from lib import overrides

    return overrides.parse_assignments(values)


_PROFILE = click.option("--profile", type=click.Choice(["smoke", "demo", "full"]), default="smoke", show_default=True,
                        help="parameter set of the notebooks (and size of the synthetic cohort)")
_SEED = click.option("--seed", type=int, default=config.DEFAULT_SEED, show_default=True, help="one seed fixes all")


def _scheduler(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--scheduler`` checked before any work starts (``lib.cluster.check_scheduler``)."""
    from lib import cluster

    try:
        return cluster.check_scheduler(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


_SCHEDULER = click.option("--scheduler", "scheduler", default=None, metavar="none|local|tcp://HOST:PORT",
                          callback=_scheduler,
                          help="where the per-case work runs: none (this machine's process pool, default), local "
                               "(a Dask LocalCluster for this job), or a running Dask scheduler's address or "
                               "scheduler file; the outputs are the same")
_PARAM = click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
                      help="a stage parameter (repeatable); the value is read as YAML: 3, 1e-3, [a, b], null")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """Medical-imaging analysis: labels from reports, organ crops, training, k-fold, explanations, serving."""


# ------------------------------------------------------------------------------------------------------- label

@cli.command()
@click.option("--cohort", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder holding reports.csv (default: the synthetic cohort of --profile)")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for labels.csv, evidence.csv and skipped_reports.csv")
@click.option("--lang", type=click.Choice(["ja", "en", "auto"]), default="ja", show_default=True,
              help="language of the reports to label (auto: each row in its own language)")
@click.option("--vocabulary", default="abdominal-ct", show_default=True,
              help="lib/vocab/<name>.yaml or a path to your own vocabulary YAML")
@click.option("--force", is_flag=True, help="relabel even when the cached labels.csv is up to date")
@_SCHEDULER
@_PROFILE
@_SEED
def label(cohort: Path | None, run_dir: Path, lang: str, vocabulary: str, force: bool, scheduler: str | None,
          profile: str, seed: int) -> None:
    """Label free-text reports (positive / negative / uncertain per finding), as notebook 01 does."""
    from lib import reports, synth

    cohort_dir = synth.ensure_cohort(profile, seed) if cohort is None else cohort
    labels = reports.label_cohort(cohort_dir, lang, run_dir, vocabulary, force=force, scheduler=scheduler)
    click.echo(f"labelled {len(labels)} reports of {cohort_dir}: {run_dir / 'labels.csv'}")


# -------------------------------------------------------------------------------------------------------- crop

@cli.command()
@click.option("--input", "input_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="dataset folder, layout discovered: synthetic cohort, TotalSegmentator, nnU-Net/Decathlon, pairs")
@click.option("--imagedir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder of CT NIfTIs (with --maskdir)")
@click.option("--maskdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="masks named like the images: <case>.nii.gz (multilabel + class-map JSON) or <case>/ folders")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="crops folder (index.csv, one sub-folder per mode)")
@click.option("--organ", "organs", multiple=True, metavar="NAME",
              help="structure to crop (repeatable; default: liver spleen pancreas kidney_left kidney_right "
                   "gallbladder)")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["bbox", "seg", "25d"]),
              help="crop mode (repeatable; default bbox)")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="processes (default: one per core)")
@click.option("--layout", type=click.Choice(["auto", "synthetic", "nnunet", "totalseg-dataset", "pairs"]),
              default="auto", show_default=True, help="layout of --input")
@click.option("--image-glob", default="*.nii*", show_default=True, help="which image files to use")
@click.option("--margin-mm", type=float, default=10.0, show_default=True, help="margin around the organ box")
@click.option("--size", type=(int, int, int), default=(16, 64, 64), show_default=True,
              help="slices height width of the samples")
@click.option("--window", default="abdomen", show_default=True, help="HU window preset (abdomen, liver, bone...)")
@click.option("--nifti", is_flag=True, help="also write native-grid 3D NIfTI crops (bbox3d/)")
@_SCHEDULER
def crop(input_dir: Path | None, imagedir: Path | None, maskdir: Path | None, out_dir: Path, organs: tuple[str, ...],
         modes: tuple[str, ...], workers: int | None, layout: str, image_glob: str, margin_mm: float,
         size: tuple[int, int, int], window: str, nifti: bool, scheduler: str | None) -> None:
    """Crop organs out of CTs with their masks into training samples, as notebook 02 does."""
    from lib import crop as cr
    from lib.io import SkippedCases

    if (input_dir is None) == (imagedir is None and maskdir is None):
        raise click.UsageError("give either --input DIR or --imagedir DIR --maskdir DIR")
    if input_dir is None and (imagedir is None or maskdir is None):
        raise click.UsageError("--imagedir and --maskdir go together")
    if input_dir is not None:
        cases = cr.discover_cases(input_dir, layout, image_glob=image_glob)
    else:
        cases = cr.discover_dirs(imagedir, maskdir, image_glob=image_glob)
    if cases.empty:
        raise click.ClickException(f"no cases found in {input_dir or imagedir} ({len(cases.attrs['skipped'])} "
                                   "unusable files)")
    structures = list(organs) or list(cr.DEFAULT_STRUCTURES)
    passes = [{"mode": m, "margin_mm": margin_mm, "window": window, "size": tuple(size)} for m in modes or ["bbox"]]
    if nifti:
        passes.append({"mode": "bbox", "fmt": "nifti", "margin_mm": margin_mm})
    runs = cr.crop_passes(cases, structures, out_dir, passes, workers=workers, scheduler=scheduler)
    import pandas as pd

    skipped = pd.concat([r[1] for r in runs], ignore_index=True).drop_duplicates(["case", "file", "reason"])
    SkippedCases(skipped.to_dict("records")).save(out_dir / "skipped_crop.csv")
    n = sum(len(r[0]) for r in runs)
    click.echo(f"{n} crops of {len(cases)} cases in {out_dir}; {len(skipped)} skipped "
               f"(see {out_dir / 'skipped_crop.csv'})")
    for row in skipped.head(20).itertuples():
        click.echo(f"  skipped {row.case}: {row.reason}", err=True)


# ------------------------------------------------------------------------------------------------------- train

@cli.command()
@click.option("--dataset", default="synthetic-ct", show_default=True,
              help="synthetic-ct | brain-mri | cxr | a class-per-folder image folder | a CSV (path,label)")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="run folder; the model goes to <out>/train/<name>/")
@click.option("--name", default="model", show_default=True, help="sub-folder of <out>/train/")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="brain-mri / cxr: folder instead of the shared data")
@click.option("--model", "model_name", default="resnet10t", show_default=True,
              help="timm name, mil:<timm>, monai:<net>, or your own file: path/net.py:factory")
@click.option("--input-kind", type=click.Choice(["2d", "25d", "slab", "3d"]), default="slab", show_default=True)
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--optimizer", default="adamw", show_default=True,
              help="adamw | adam | sgd, or any torch.optim optimizer by name (RMSprop, NAdam...)")
@click.option("--loss", default="auto", show_default=True,
              help="auto | cross-entropy | bce | focal | label-smoothing")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="also keep epoch<N>.pt every N epochs (0: off)")
@click.option("--extend", is_flag=True, help="continue a finished run in --out to more --epochs")
@click.option("--scheduler", type=click.Choice(["cosine", "plateau", "none"]), default="cosine", show_default=True)
@click.option("--augment", default="light", show_default=True,
              help="preset none | light | medium | elastic, or flags joined by '+': "
                   "flip, rotate, brightness, contrast, sharpness, equalize, invert")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25,
              show_default=True)
@click.option("--label-source", type=click.Choice(["reports", "truth"]), default="reports", show_default=True,
              help="synthetic-ct: labels from reports or the ground truth")
@click.option("--organ", default=None, help="synthetic-ct: one organ's crops (default: all organs)")
@_PROFILE
@_SEED
def train(dataset: str, run_dir: Path, name: str, data_root: Path | None, model_name: str, input_kind: str,
          image_size: int, epochs: int, batch_size: int, lr: float, optimizer: str, loss: str, save_every: int,
          extend: bool, scheduler: str, augment: str, val_fraction: float, label_source: str, organ: str | None,
          profile: str, seed: int) -> None:
    """Train one classifier with a grouped hold-out split, as notebook 03 does.

    Re-running with the same --out and --name resumes only when every setting is the same; otherwise it stops
    and names the changed settings (use another --name for a new run, or --extend for more epochs)."""
    from lib import datasets
    from lib import train as tr

    config.seed_everything(seed)
    ds, group_col = datasets.build_dataset(dataset, run_dir, profile, seed, label_source, organ=organ,
                                          kind=input_kind, size=image_size, root=data_root)
    out_dir = run_dir / "train" / name
    ds.skipped.save(out_dir / "skipped_dataset.csv")
    tr_idx, va_idx = datasets.holdout_split(ds, group_col, val_fraction, seed)
    cfg = tr.TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, loss=loss, save_every=save_every, extend=extend,
                         scheduler=scheduler, seed=seed, monitor="macro_f1" if ds.task == "multiclass" else "auc",
                         resume=True)
    _, log = tr.train_classifier(ds, tr_idx, va_idx, out_dir, cfg, model_name, augment, batch_size)
    best = log.loc[log[cfg.monitor].idxmax()]
    click.echo(f"{len(ds)} samples ({len(tr_idx)} train / {len(va_idx)} val); best {cfg.monitor} "
               f"{best[cfg.monitor]:.3f} at epoch {int(best['epoch'])}: {out_dir / 'best.pt'}")


# ------------------------------------------------------------------------------------------------------- kfold

@cli.group(cls=_Group)
def kfold() -> None:
    """K-fold training, prediction with fold models, merging prediction CSVs."""


@kfold.command("train")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="run folder; the folds go to <out>/kfold/<name>/")
@click.option("--name", default="model", show_default=True)
@click.option("--dataset", default=None, help="synthetic-ct | brain-mri | cxr-3class (default: the profile's)")
@click.option("--force", is_flag=True, help="retrain even when a finished run with these parameters exists")
@_PARAM
@_PROFILE
@_SEED
def kfold_train(run_dir: Path, name: str, dataset: str | None, force: bool, params: tuple[str, ...], profile: str,
                seed: int) -> None:
    """Train k fold models and score them out of fold, as notebook 04 does (parameters: -p epochs=3 ...)."""
    from lib import kfold as kf
    from lib import overrides

    extra = _pairs(params)
    if dataset is not None:
        extra["dataset"] = dataset
    overrides.resolve(["04_kfold"], last=extra, source="-p")  # unknown names and wrong types, before training
    out = kf.ensure_kfold(run_dir, profile, seed, name, force=force, progress=True, **extra)
    pooled = kf.load_result(out).summary.get("pooled", {})
    click.echo(f"k-fold run in {out}; pooled out-of-fold " +
               ", ".join(f"{k} {pooled[k]:.3f}" for k in ("auc", "macro_f1", "accuracy")
                         if isinstance(pooled.get(k), float)))


@kfold.command("predict")
@click.option("--ckpt", "checkpoints", multiple=True, required=True, type=click.Path(dir_okay=False, exists=True),
              help="fold checkpoint (repeatable: an ensemble)")
@click.option("--input", "source", required=True, type=click.Path(exists=True), help="folder of images or crops")
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False), help="predictions CSV")
@click.option("--how", type=click.Choice(["mean", "mode"]), default="mean", show_default=True)
@click.option("--threshold", type=float, default=0.5, show_default=True)
@_SCHEDULER
def kfold_predict(checkpoints: tuple[str, ...], source: str, out_csv: str, how: str, threshold: float,
                  scheduler: str | None) -> None:
    """Predictions CSV for a folder of images or crops with one model or a fold ensemble (inputs decoded on
    --scheduler, the models run here)."""
    from lib import kfold as kf

    df = kf.predict(list(checkpoints), source, out_csv, how, threshold, scheduler=scheduler)
    click.echo(f"wrote {len(df)} rows to {out_csv}")


@kfold.command("merge")
@click.argument("csvs", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False))
@click.option("--how", type=click.Choice(["mean", "mode"]), default="mean", show_default=True)
@click.option("--key", default=None, help="id column (default: path)")
def kfold_merge(csvs: tuple[str, ...], out_csv: str, how: str, key: str | None) -> None:
    """Combine predictions CSVs by mean probability or majority vote."""
    from lib import kfold as kf

    df = kf.merge(list(csvs), how, key, out_csv=out_csv)
    click.echo(f"wrote {len(df)} rows to {out_csv}")


# ---------------------------------------------------------------------------------------------------- evaluate

@cli.command()
@click.option("--kfold", "kfold_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="a finished k-fold run folder (<run>/kfold/<name>)")
@click.option("--weights", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="a checkpoint (best.pt); repeatable: each scored, then their mean")
@click.option("--data", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="with --weights: class-per-folder images (<root>/[<split>/]<class>/<image>)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output folder (default with --kfold: <kfold>/evaluate)")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="binary decision threshold")
@click.option("--n-boot", type=click.IntRange(min=0), default=200, show_default=True, help="bootstrap resamples")
@_SCHEDULER
@_SEED
def evaluate(kfold_dir: Path | None, weights: tuple[Path, ...], data: Path | None, out_dir: Path | None,
             threshold: float | None, n_boot: int, scheduler: str | None, seed: int) -> None:
    """metrics.json, ROC, PR and confusion figures per fold (or model) and pooled (with --weights, the images
    are decoded on --scheduler)."""
    from lib import evaluate as ev

    if (kfold_dir is None) == (not weights):
        raise click.UsageError("give either --kfold DIR or --weights FILE --data DIR")
    if kfold_dir is not None and scheduler is not None:
        raise click.UsageError("--scheduler decodes the images of --weights/--data; --kfold reads the run's "
                               "out-of-fold table and has no per-case work to distribute")
    if kfold_dir is not None:
        scores = ev.evaluate_kfold(kfold_dir, out_dir, threshold, n_boot, seed)
        out = out_dir or kfold_dir / "evaluate"
        headline = scores["pooled"]
    else:
        if data is None or out_dir is None:
            raise click.UsageError("--weights needs --data DIR and --out DIR")
        scores = ev.evaluate_weights(list(weights), data, out_dir, 0.5 if threshold is None else threshold, n_boot,
                                     seed, scheduler=scheduler)
        out = out_dir
        headline = scores["models"]["ensemble" if len(weights) > 1 else "0"]
    shown = {k: round(v, 4) for k, v in headline.items() if k in ("n", "auc", "ap", "accuracy", "macro_f1")
             and isinstance(v, int | float)}
    click.echo(f"{', '.join(ev.OUTPUTS)} in {out}; " + ", ".join(f"{k} {v}" for k, v in shown.items()))


# ----------------------------------------------------------------------------------------------------- explain

@cli.command()
@_PROFILE
@_SEED
@_PARAM
@click.option("--run-id", default=None, help="run folder name under outputs/runs (default: time + profile)")
def explain(profile: str, seed: int, params: tuple[str, ...], run_id: str | None) -> None:
    """Saliency maps, deletion curves and randomisation checks of a k-fold ensemble (notebook 05 as a pipeline
    stage; -p kfold_name=... -p n_cases=8 ...)."""
    from lib import overrides, pipeline

    stems = [nb.stem for nb in pipeline.notebooks(["05"])]
    run_dir = pipeline.run(profile, ["05"], run_id, seed, overrides=overrides.study_overrides(stems, None, params))
    click.echo(f"explanations in {run_dir / 'explain'}")


# ------------------------------------------------------------------------------------------------------ export

@cli.command()
@click.option("--run-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="run folder holding kfold/<name>/")
@click.option("--name", "kfold_name", default=None, help="k-fold run under <run-dir>/kfold (default: the first)")
@click.option("--ckpt", "checkpoints", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="explicit fold checkpoints (repeatable; overrides --name)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="export folder (default: <run-dir>/export/<name>)")
@click.option("--sample", type=click.Path(dir_okay=False, exists=True), default=None,
              help="an input file shipped as the service's test sample (needed for image models)")
@click.option("--n-parity", type=click.IntRange(min=1), default=8, show_default=True)
@_PROFILE
@_SEED
def export(run_dir: Path, kfold_name: str | None, checkpoints: tuple[str, ...], out_dir: Path | None,
           sample: str | None, n_parity: int, profile: str, seed: int) -> None:
    """Export a fold ensemble to ONNX (model.onnx, labels.json, metadata.json) with a parity check."""
    from lib import export as ex

    meta = ex.export_run(run_dir, kfold_name, list(checkpoints) or None, profile, seed, n_parity, out_dir, sample)
    click.echo(f"exported {meta['n_models']} model(s) {meta['model_name']}: parity max |diff| "
               f"{meta['parity']['max_abs_diff']:.2e}")


# ------------------------------------------------------------------------------------------------------- serve

@cli.command()
@click.option("--model", default=None, help="export folder (model.onnx, labels.json, metadata.json)")
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address (127.0.0.1: local only)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="ONNX Runtime threads")
@click.option("--segmenter", default=None, help="optional segmentation export for POST /segment")
@click.option("--predict", "files", multiple=True, metavar="IMAGE",
              help="score this local file instead of serving (repeatable); one JSON line each")
@click.option("--skipped", default=None, metavar="CSV", help="with --predict: write unscorable files here")
@click.option("--label-names", default=None, metavar="A,B",
              help="display names in output order, comma-separated (e.g. 'WITHOUT TUMOR,WITH TUMOR')")
def serve(model: str | None, host: str, port: int, threads: int, segmenter: str | None, files: tuple[str, ...],
          skipped: str | None, label_names: str | None) -> None:
    """Serve an exported model over HTTP, or score local files with --predict."""
    from lib import serve as sv

    argv = ["--host", host, "--port", str(port), "--threads", str(threads)]
    argv += ["--model", model] if model else []
    argv += ["--segmenter", segmenter] if segmenter else []
    argv += ["--predict", *files] if files else []
    argv += ["--skipped", skipped] if skipped else []
    argv += ["--label-names", label_names] if label_names else []
    raise SystemExit(sv.main(argv))


# ----------------------------------------------------------------------------------------------------- segment

@cli.group(cls=_Group)
def segment() -> None:
    """2D segmentation: predict masks for a folder, export checkpoints to ONNX."""


@segment.command("predict")
@click.option("--model", required=True, type=click.Path(exists=True, path_type=Path),
              help="checkpoint (best.pt) or ONNX export folder")
@click.option("--input", "input_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="folder of images (PNG/JPG/TIFF/DICOM/NIfTI, searched recursively)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["auto", "png", "nifti"]), default="auto", show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="default: the validation threshold")
def segment_predict(model: Path, input_dir: Path, out_dir: Path, fmt: str, threshold: float | None) -> None:
    """Segment every image in a folder: masks, predictions.csv, skipped_segment.csv."""
    from lib.segmentation.infer import predict_folder

    table, skipped = predict_folder(model, input_dir, out_dir, fmt, threshold)
    click.echo(f"wrote {len(table)} masks to {out_dir}; skipped {len(skipped)}")
    for row in skipped.rows:
        click.echo(f"  skipped {row['case']}: {row['reason']}", err=True)


@segment.command("export")
@click.option("--model", "checkpoints", required=True, multiple=True, type=click.Path(dir_okay=False, exists=True,
                                                                                     path_type=Path),
              help="best.pt (repeatable: a fold ensemble)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--sample", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="an image copied as sample.* and used for parity")
@click.option("--tolerance", type=float, default=1e-4, show_default=True)
def segment_export(checkpoints: tuple[Path, ...], out_dir: Path, sample: Path | None, tolerance: float) -> None:
    """Export segmentation checkpoint(s) to ONNX and check parity with torch."""
    from lib.segmentation.onnx_export import export_segmenter

    meta = export_segmenter(list(checkpoints), out_dir, sample, tolerance)
    click.echo(f"wrote {out_dir / 'model.onnx'}; max |torch - onnxruntime| = {meta['parity']['max_abs_diff']:.2e}")


# --------------------------------------------------------------------------------------------------------- run

@cli.command()
@_PROFILE
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="study YAML: parameters for every stage that declares them; per-stage tables under 03:, 04:...")
@_PARAM
@click.option("--only", multiple=True, metavar="NN", help="notebook number to run (repeatable: --only 00 --only 03)")
@click.option("--run-id", default=None, help="run folder name under outputs/runs (default: time + profile)")
@_SEED
@click.option("--resume", is_flag=True, help="finish the run --run-id (same profile, seed and parameters)")
@click.option("--cores", type=click.IntRange(min=1), default=None, help="core budget (default: MEDNB_CORES or all)")
def run(profile: str, config_file: Path | None, params: tuple[str, ...], only: tuple[str, ...], run_id: str | None,
        seed: int, resume: bool, cores: int | None) -> None:
    """Run the notebooks as a pipeline with papermill into outputs/runs/<run-id>/ (run.json, report.html)."""
    from lib import overrides, pipeline

    chosen = list(only) or None
    stems = [nb.stem for nb in pipeline.notebooks(chosen)]
    if chosen and not stems:
        raise click.UsageError(f"--only {' '.join(only)}: no such notebook numbers")
    study = overrides.study_overrides(stems, config_file, params) if (config_file or params) else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = pipeline.run(profile, chosen, run_id, seed, resume=resume, cores=cores, overrides=study)
    click.echo(f"run folder {run_dir}")


# ----------------------------------------------------------------------------------------------------- results

@cli.command()
@click.option("--check", "check_only", is_flag=True,
              help="write nothing; exit 1 and name each disagreeing file when the Markdown and its sources differ")
@click.option("--sources", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="folder of *.json results sources (default: docs/results)")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the generated Markdown (default: docs/results.md)")
def results(check_only: bool, sources: Path | None, output: Path | None) -> None:
    """Regenerate docs/results.md from the measured figures in docs/results/*.json, or check that they agree."""
    from lib import results as rs

    sources, output = sources or rs.SOURCES, output or rs.OUTPUT
    if not check_only:
        click.echo(f"wrote {rs.write(sources, output)}")
        return
    problems = rs.check(sources, output)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"{output} disagrees with {sources}/*.json; run mednb results to regenerate it")
    click.echo(f"{output} matches {sources}/*.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mednb`` and ``python -m lib``: the exit code (0 ok, 1 failed, 2 bad usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="mednb", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except SystemExit as exc:  # the pipeline and the server end with SystemExit(code or message)
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
            return 1
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
