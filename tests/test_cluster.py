"""Per-case work on a Dask cluster gives byte-identical outputs to the local run (lib.cluster)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lib import cluster, crop, reports

ROOT = Path(__file__).resolve().parents[1]


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise RuntimeError("case 3 is broken")
    return x


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (what a byte-for-byte comparison of two runs needs)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_scheduler_accepts_the_three_forms_and_names_a_bad_one(tmp_path):
    assert cluster.check_scheduler(None) is None
    assert cluster.check_scheduler("none") is None and cluster.check_scheduler("") is None
    assert cluster.check_scheduler("local") == "local"
    assert cluster.check_scheduler("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    sched = tmp_path / "scheduler.json"
    sched.write_text("{}")
    assert cluster.check_scheduler(str(sched)) == str(sched)
    with pytest.raises(ValueError, match="'dask-cluster'"):
        cluster.check_scheduler("dask-cluster")
    with pytest.raises(ValueError, match="http"):
        cluster.check_scheduler("http://host:8786")
    with pytest.raises(ValueError, match="not found"):
        cluster.check_scheduler(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("workers", [1, 2])
def test_run_keeps_input_order_and_window_bounds_a_generator(workers):
    squares = cluster.run_all(_square, [(i,) for i in range(9)], workers=workers, progress=False)
    assert squares == [i * i for i in range(9)]
    jobs = ((i,) for i in range(7))  # a generator: read lazily, window at a time
    got = dict(cluster.imap(_square, jobs, workers=workers, total=7, window=2, progress=False))
    assert got == {i: i * i for i in range(7)}


def test_a_failing_job_raises_its_own_error():
    with pytest.raises(RuntimeError, match="case 3 is broken"):
        cluster.run_all(_fail_on_three, [(i,) for i in range(5)], workers=2, progress=False)


def test_label_texts_in_chunks_equals_one_call(smoke_cohort):
    df, _ = reports.read_reports_csv(smoke_cohort / "reports.csv")
    df = df[df.lang == "en"].reset_index(drop=True)
    texts = [*df.text, None, "", 42]  # unusable texts are recorded, not fatal
    ids = [*df.study_id, "none", "empty", "number"]
    labels, evidence = reports.label_reports_with_evidence(texts, "abdominal-ct", "en", ids)
    got_labels, got_evidence, skipped = cluster.label_texts(texts, "abdominal-ct", "en", ids, chunk=7, workers=2,
                                                            progress=False)
    assert got_labels.to_csv() == labels.to_csv() and got_evidence.to_csv() == evidence.to_csv()
    assert got_labels.attrs["unusable"] == labels.attrs["unusable"]
    assert sorted(skipped.to_frame().case) == ["empty", "none", "number"]


def test_eda_statistics_are_the_same_in_process_and_in_a_pool(smoke_cohort):
    from lib import eda

    ds = eda.open_dataset(str(smoke_cohort))
    one = eda.case_statistics(ds, ["liver", "spleen"], workers=1)
    two = eda.case_statistics(ds, ["liver", "spleen"], workers=2)
    pd.testing.assert_frame_equal(one[0], two[0])
    pd.testing.assert_frame_equal(one[1].drop(columns="hu_sample"), two[1].drop(columns="hu_sample"))
    assert all((a == b).all() for a, b in zip(one[1].hu_sample, two[1].hu_sample, strict=True))
    assert len(one[0]) == len(ds.cases) and one[2].rows == two[2].rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):  # workers first, then the scheduler
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real ``dask scheduler`` and two single-threaded ``dask worker`` processes on 127.0.0.1."""
    pytest.importorskip("distributed")
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_dir = tmp_path_factory.mktemp("dask-logs")
    dask = [sys.executable, "-m", "dask"]
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(dask + args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))

    try:
        start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"])
        for i in range(2):
            start(f"worker{i}", ["worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                                 "--no-dashboard", "--local-directory", str(log_dir / f"w{i}"), "--name", f"w{i}"])
        deadline = time.monotonic() + 90
        while True:
            try:
                with Client(address, timeout=10, set_as_default=False) as client:
                    client.wait_for_workers(2, timeout=max(1, deadline - time.monotonic()))
                break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    logs = {f.name: f.read_text()[-2000:] for f in log_dir.glob("*.log")}
                    raise RuntimeError(f"dask cluster did not start: {logs}") from None
                time.sleep(0.5)
        yield address
    finally:
        _stop(procs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crop_on_a_running_dask_cluster_matches_the_local_run(tmp_path, smoke_cohort, dask_cluster):
    cases = crop.discover_cases(smoke_cohort)
    structures = ["liver", "spleen", "kidney_left"]
    # a broken case on the cluster must be skipped and recorded like locally
    bad = cases.head(1).assign(case_id="no_mask", mask=str(tmp_path / "missing_seg.nii.gz"))
    cases = pd.concat([cases, bad], ignore_index=True)
    local, local_skipped = crop.crop_cohort(cases, structures, tmp_path / "local", progress=False, workers=1)
    remote, remote_skipped = crop.crop_cohort(cases, structures, tmp_path / "remote", progress=False,
                                              scheduler=dask_cluster)
    assert remote.attrs["computed"] == len(cases)
    pd.testing.assert_frame_equal(local, remote)
    pd.testing.assert_frame_equal(local_skipped, remote_skipped)
    assert remote_skipped.case.tolist() == ["no_mask"]
    assert len(remote) == (len(cases) - 1) * len(structures)
    local_files, remote_files = _tree_bytes(tmp_path / "local"), _tree_bytes(tmp_path / "remote")
    assert local_files.keys() == remote_files.keys() and len(local_files) > len(remote)
    assert [k for k in local_files if local_files[k] != remote_files[k]] == []
    # idempotent: a second pass on the cluster reads every finished case from its cache
    again, _ = crop.crop_cohort(cases, structures, tmp_path / "remote", progress=False, scheduler=dask_cluster)
    local_again, _ = crop.crop_cohort(cases, structures, tmp_path / "local", progress=False, workers=1)
    assert again.attrs["computed"] == local_again.attrs["computed"] <= 1  # at most the broken case is retried
    assert _tree_bytes(tmp_path / "remote") == remote_files


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crop_on_a_local_cluster_matches_the_process_pool(tmp_path, smoke_cohort):
    pytest.importorskip("distributed")
    cases = crop.discover_cases(smoke_cohort).head(4)
    pool, _ = crop.crop_cohort(cases, ["liver"], tmp_path / "pool", mode="25d", progress=False, workers=2)
    dask, _ = crop.crop_cohort(cases, ["liver"], tmp_path / "dask", mode="25d", progress=False, workers=2,
                               scheduler="local")
    pd.testing.assert_frame_equal(pool, dask)
    assert _tree_bytes(tmp_path / "pool") == _tree_bytes(tmp_path / "dask")



@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_decodes_on_a_running_dask_cluster_like_locally(tmp_path, dask_cluster):
    import numpy as np
    import torch
    from PIL import Image

    from lib import kfold, models
    from lib.datasets import image_spec

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.manual_seed(0)
    meta = models.checkpoint_meta("test_resnet", 1, 3, "multiclass", ["x", "y", "z"],
                                  {"source": "images", **image_spec(1, 16)})
    ckpt = models.save_checkpoint(tmp_path / "best.pt", models.create_model("test_resnet", 1, 3), meta)
    local = kfold.predict([ckpt], folder, tmp_path / "local" / "p.csv")
    kfold._PREDICT_CACHE.clear()  # decode again, this time on the cluster
    remote = kfold.predict([ckpt], folder, tmp_path / "remote" / "p.csv", scheduler=dask_cluster)
    pd.testing.assert_frame_equal(local, remote)
    assert (tmp_path / "local" / "p.csv").read_bytes() == (tmp_path / "remote" / "p.csv").read_bytes()
    skipped = [(tmp_path / d / "skipped_predict.csv").read_bytes() for d in ("local", "remote")]
    assert skipped[0] == skipped[1] and b"broken.png" in skipped[0]
