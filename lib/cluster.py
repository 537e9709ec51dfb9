"""Per-case work on the local process pool or on a Dask cluster, through one interface.

Why: a cohort of a few hundred studies crops in minutes on one machine; hundreds of thousands need many
machines. The stages keep one loop over cases and hand each case to :func:`imap`, which runs it where
``scheduler`` says:

* ``None``: this machine's process pool (``lib.resources``: one worker per granted core), in-process for a
  single worker;
* ``"local"``: a ``dask.distributed.LocalCluster`` started for the job (one single-threaded worker process
  per granted core) and closed after it;
* an address (``tcp://host:8786``) or a scheduler file (``scheduler.json``, as ``dask scheduler
  --scheduler-file`` writes on a shared file system): a running cluster; only the client is closed.

Each job is a module-level function and its arguments (pickled to the worker), and returns a small result.
The case's own outputs (crops, manifests) are written by the worker to the output folder, which on a
multi-machine cluster must be a shared file system; the per-case caches make a rerun skip finished cases,
so a job cut short by a queue limit continues where it stopped. At most ``window`` jobs are in flight at
once, so neither the scheduler nor this process ever holds the whole cohort. Results are identical
whatever runs them: every job is a pure function of its arguments.

Report labelling runs in chunks of reports (:func:`label_texts`), since one report takes well under a
millisecond and a task per report would cost more in scheduling than in work.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from lib import resources
from lib.io import SkippedCases

LOCAL = "local"
#: Address schemes of a running Dask scheduler.
SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")
#: Jobs in flight per worker: enough to keep every worker busy while results come back, small enough
#: that the scheduler and this process hold a bounded number of tasks whatever the cohort's size.
JOBS_PER_WORKER = 4
#: Reports per labelling task (a report labels in well under a millisecond).
LABEL_CHUNK = 2000
CONNECT_TIMEOUT_S = 30


def check_scheduler(scheduler: str | None) -> str | None:
    """``scheduler`` normalised (``None``, ``"local"``, an address or a scheduler file), or a ValueError.

    ``""`` and ``"none"`` (as a command line or YAML profile writes them) mean the local process pool.
    """
    if scheduler is None:
        return None
    if not isinstance(scheduler, str):
        raise ValueError(f"scheduler must be None, 'local', an address like tcp://host:8786 or a scheduler file, "
                         f"got {scheduler!r}")
    value = scheduler.strip()
    if value.lower() in ("", "none"):
        return None
    if value.lower() == LOCAL:
        return LOCAL
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in SCHEMES or not value.split("://", 1)[1]:
            raise ValueError(f"scheduler address {value!r}: expected {'|'.join(SCHEMES)}://host:port")
        return value
    if value.endswith(".json"):
        if not Path(value).is_file():
            raise ValueError(f"scheduler file {value!r} not found (dask scheduler --scheduler-file writes it)")
        return value
    raise ValueError(f"scheduler {value!r}: expected None, 'local', an address like tcp://host:8786 or a "
                     f"scheduler file (*.json)")


# ----------------------------------------------------------------------------- executors


class _InProcess:
    """Jobs one after the other in this process (one worker, or a single job)."""

    n_workers = 1

    def imap(self, fn: Callable, jobs: Iterator[tuple[int, tuple]], window: int) -> Iterator[tuple[int, Any]]:
        for i, args in jobs:
            yield i, fn(*args)


class _Pool:
    """A ``concurrent.futures`` process pool fed at most ``window`` jobs at a time."""

    def __init__(self, pool: Any, n_workers: int) -> None:
        self.pool, self.n_workers = pool, n_workers

    def imap(self, fn: Callable, jobs: Iterator[tuple[int, tuple]], window: int) -> Iterator[tuple[int, Any]]:
        pending: dict[Future, int] = {}
        for i, args in jobs:
            pending[self.pool.submit(fn, *args)] = i
            while len(pending) >= window:
                yield from self._finished(pending)
        while pending:
            yield from self._finished(pending)

    @staticmethod
    def _finished(pending: dict[Future, int]) -> Iterator[tuple[int, Any]]:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield pending.pop(fut), fut.result()


class _Dask:
    """A ``dask.distributed`` client: futures followed with ``as_completed``, at most ``window`` in flight."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.n_workers = max(1, len(client.scheduler_info().get("workers", {})))

    def imap(self, fn: Callable, jobs: Iterator[tuple[int, tuple]], window: int) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        position: dict[str, int] = {}

        def submit(i: int, args: tuple) -> Any:
            fut = self.client.submit(fn, *args, pure=False)  # a rerun must run again (its cache decides)
            position[fut.key] = i
            return fut

        first = [submit(i, args) for i, args in _take(jobs, window)]
        if not first:
            return
        done = as_completed(first, loop=self.client.loop)
        for fut in done:
            result = fut.result()  # raises the worker's exception here, with its traceback
            i = position.pop(fut.key)
            fut.release()  # the scheduler forgets the finished task: its memory stays bounded
            for j, args in _take(jobs, 1):
                done.add(submit(j, args))
            yield i, result


def _take(jobs: Iterator[tuple[int, tuple]], n: int) -> list[tuple[int, tuple]]:
    out = []
    for item in jobs:
        out.append(item)
        if len(out) >= n:
            break
    return out


@contextlib.contextmanager
def executor(scheduler: str | None = None, n_jobs: int | None = None, workers: int | None = None,
             preload: Sequence[str] = ()) -> Iterator[_InProcess | _Pool | _Dask]:
    """Where jobs run for the duration of a ``with`` block (see the module docstring for ``scheduler``).

    ``workers``: processes of the local pool or the LocalCluster (default: one per granted core, at most
    ``n_jobs``); ignored for a running cluster, whose size its owner decides. ``preload``: modules the local
    pool's workers import once at start.
    """
    scheduler = check_scheduler(scheduler)
    if scheduler is None:
        n = resources.workers(limit=n_jobs) if workers is None else max(1, min(workers, n_jobs or workers))
        if n <= 1 or (n_jobs is not None and n_jobs <= 1):
            yield _InProcess()
            return
        pool, _ = resources.worker_pool(n_jobs or n, *preload, n_workers=n)
        with pool:
            yield _Pool(pool, n)
        return
    from distributed import Client, LocalCluster

    if scheduler == LOCAL:
        n = resources.workers(limit=n_jobs) if workers is None else max(1, workers)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                          host="127.0.0.1", silence_logs=logging.ERROR,
                          env={**resources.thread_env(1), "PYTHONPATH": _pythonpath()}) as cluster, \
                Client(cluster) as client:
            yield _Dask(client)
        return
    kwargs = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {"address": scheduler}
    with Client(timeout=CONNECT_TIMEOUT_S, set_as_default=False, **kwargs) as client:
        yield _Dask(client)


def _pythonpath() -> str:
    """This process's import path for LocalCluster workers, so they import the same ``lib``."""
    root = str(Path(__file__).resolve().parents[1])
    parts = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return os.pathsep.join(parts)


def imap(fn: Callable, jobs: Iterable[tuple], *, scheduler: str | None = None, workers: int | None = None,
         total: int | None = None, window: int | None = None, desc: str = "", progress: bool = True,
         preload: Sequence[str] = ()) -> Iterator[tuple[int, Any]]:
    """``(position, fn(*job))`` for each job, in the order they finish, with a progress bar over the futures.

    ``jobs`` may be a generator (read lazily, ``window`` at a time: a cohort listing need not fit in memory);
    ``total`` sizes the bar and the local pool when ``jobs`` has no length.
    """
    total = len(jobs) if total is None and isinstance(jobs, Sequence) else total
    with executor(scheduler, n_jobs=total, workers=workers, preload=preload) as ex, \
            tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        size = window or JOBS_PER_WORKER * ex.n_workers
        for item in ex.imap(fn, enumerate(jobs), max(1, size)):
            bar.update()
            yield item


def run_all(fn: Callable, jobs: Sequence[tuple], **kwargs: Any) -> list[Any]:
    """``[fn(*job) for job in jobs]`` on the chosen scheduler (keyword arguments as :func:`imap`)."""
    out: list[Any] = [None] * len(jobs)
    for i, result in imap(fn, jobs, **kwargs):
        out[i] = result
    return out


# ----------------------------------------------------------------------------- report labels


def _label_chunk(texts: list, vocabulary: str, lang: str, ids: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    from lib.reports import label_reports_with_evidence

    return label_reports_with_evidence(texts, vocabulary, lang, ids)


def label_texts(texts: Sequence, vocabulary: str | Path, lang: str = "en", ids: Sequence | None = None, *,
                scheduler: str | None = None, chunk: int = LABEL_CHUNK, workers: int | None = None,
                progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, SkippedCases]:
    """``lib.reports.label_reports_with_evidence`` in chunks of ``chunk`` reports on ``scheduler``.

    Returns (labels, evidence, skipped), the same labels and evidence as one call on all texts (one row per
    text, in order), and the unusable texts as a skipped-case table (stage ``reports``).
    """
    texts = list(texts)
    ids = list(range(len(texts))) if ids is None else list(ids)
    if len(ids) != len(texts):
        raise ValueError(f"label_texts: {len(texts)} texts but {len(ids)} ids")
    jobs = [(texts[a:a + chunk], str(vocabulary), lang, ids[a:a + chunk]) for a in range(0, len(texts), chunk)]
    parts = run_all(_label_chunk, jobs or [([], str(vocabulary), lang, [])], scheduler=scheduler, workers=workers,
                desc="labels", progress=progress)
    return merge_label_parts(parts)


def merge_label_parts(parts: Sequence[tuple[pd.DataFrame, pd.DataFrame]]
                      ) -> tuple[pd.DataFrame, pd.DataFrame, SkippedCases]:
    """Concatenate per-chunk (labels, evidence) in chunk order; unusable rows become one skipped table."""
    unusable = [u for lab, _ in parts for u in lab.attrs.get("unusable", [])]
    frames = []
    for lab, _ in parts:
        lab = lab.copy()
        lab.attrs = {}
        frames.append(lab)
    labels = pd.concat(frames, ignore_index=True)
    labels.attrs["unusable"] = unusable
    evs = [ev for _, ev in parts if len(ev)] or [parts[0][1]]
    evidence = pd.concat(evs, ignore_index=True)
    skipped = SkippedCases([{"case": u["row"], "stage": u["stage"], "file": u["file"], "reason": u["reason"]}
                            for u in unusable])
    return labels, evidence, skipped
