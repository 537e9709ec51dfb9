"""Pooled out-of-fold AUC against training epochs for notebook 04's model, both arms of the label-noise study.

Why: every epoch of the demo k-fold costs ten fold-epochs of CPU (five folds, two arms), so the demo profile trains
as few epochs as keep the report arm above its 0.90 floor; this script measures that choice on a finished run's
crops and labels. Each setting is one ``lib.kfold.ensure_kfold(..., name="epochs<E>", label_noise=True)`` run in
that run folder: the same folds, seed and model, only the number of epochs differs (a finished run is reused).

    python scripts/bench_epochs.py --run-dir outputs/runs/<id> --profile demo --epochs 8 10 12 \\
        [--json docs/results/kfold-epochs-demo.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import machine  # noqa: E402

from lib import config, kfold, results  # noqa: E402
from lib.io import write_json  # noqa: E402

COLUMNS = ["epochs", "report-label AUC", "its 95% CI", "truth-label AUC", "its 95% CI", "fold training s (both arms)"]


def measure(run_dir: Path, profile: str, seed: int, epochs: int) -> list:
    """One table row: both arms' pooled AUC against the truth, and the summed fold-training seconds."""
    out = kfold.ensure_kfold(run_dir, profile, seed, name=f"epochs{epochs}", label_noise=True, epochs=epochs)
    arms = [json.loads(p.read_text()) for p in (out / "metrics.json", out / "label_noise" / "truth" / "metrics.json")]
    ci = [[round(v, 3) for v in a["pooled"]["auc_ci"]] for a in arms]
    train_s = sum(a.get("timing_s", {}).get("train", 0.0) for a in arms)
    return [epochs, round(arms[0]["pooled"]["auc"], 3), ci[0], round(arms[1]["pooled"]["auc"], 3), ci[1],
            round(train_s, 1)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a finished pipeline run (its crops and report labels)")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--epochs", type=int, nargs="+", default=[8, 10, 12])
    ap.add_argument("--json", default=None, help="write a docs/results source here")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    rows = [measure(run_dir, args.profile, args.seed, e) for e in args.epochs]
    print(f"{'epochs':>6}  {'report AUC':>22}  {'truth AUC':>22}  {'train s':>8}")
    for e, r, rci, t, tci, s in rows:
        print(f"{e:>6}  {r:.3f} [{rci[0]:.3f}, {rci[1]:.3f}]  {t:.3f} [{tci[0]:.3f}, {tci[1]:.3f}]  {s:>8.1f}")
    if args.json:
        command = " ".join(["python scripts/bench_epochs.py", "--run-dir", f"outputs/runs/{run_dir.name}",
                            "--profile", args.profile, "--epochs", *map(str, args.epochs), "--json", args.json])
        write_json(args.json, {
            "title": f"k-fold epochs vs pooled out-of-fold AUC, {args.profile} profile",
            "command": command, "machine": machine(), "commit": results.git_commit(),
            "date": datetime.date.today().isoformat(),
            "notes": ["Notebook 04's model, folds and seed; only the number of epochs differs. Both arms are scored "
                      "against the generator's truth; the floor applies to the report-label arm. Fold training "
                      "seconds are summed over the ten folds of both arms (two worker processes, so wall time is "
                      "about half). The run folder holds the crops and report labels of a demo pipeline run."],
            "tables": [{"title": "pooled out-of-fold AUC by training epochs", "columns": COLUMNS, "rows": rows}]})


if __name__ == "__main__":
    main()
