"""How many cores this process may use: one answer for the pipeline, the notebooks and their worker processes.

The pipeline (``lib.pipeline``) runs independent notebooks at the same time and gives each one a share of the
machine's cores; it tells the notebook its share through the environment::

    MEDNB_CORES    the budget of the whole run (default: every core of the machine)
    MEDNB_THREADS  the cores granted to this stage (set by the pipeline for each notebook it runs)

Library code asks :func:`threads` how many threads it may run (``torch.set_num_threads``, BLAS) and
:func:`workers` how many worker processes it may start, so that the stages running side by side never ask
for more cores than the machine has. Outside the pipeline (a notebook opened by hand, a test) both fall back
to the whole budget.
"""

from __future__ import annotations

import contextlib
import os

#: Variables read by the thread pools of numpy/torch (OpenMP, MKL, OpenBLAS, numexpr) when they start.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _positive(name: str) -> int | None:
    """A positive integer from the environment, or None when unset or unusable (a typo must not crash a run)."""
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def machine_cores() -> int:
    """Cores this process may be scheduled on (CPU affinity where the OS reports it, else the core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not every OS exposes affinity
        return max(1, os.cpu_count() or 1)


def cores() -> int:
    """The core budget of the whole run: ``MEDNB_CORES`` when set, else every core of the machine."""
    return _positive("MEDNB_CORES") or machine_cores()


def threads() -> int:
    """Cores granted to the current stage: ``MEDNB_THREADS`` when the pipeline set it, else :func:`cores`."""
    return _positive("MEDNB_THREADS") or cores()


def workers(limit: int | None = None) -> int:
    """Worker processes a stage may run side by side: one per granted core, at most ``limit`` (e.g. the folds)."""
    n = threads()
    return max(1, min(n, limit) if limit else n)


def threads_per_worker(n_workers: int) -> int:
    """Threads each of ``n_workers`` processes may use so that together they stay within :func:`threads`."""
    return max(1, threads() // max(1, n_workers))


def thread_env(n: int) -> dict[str, str]:
    """Environment entries that cap a child process (and the libraries it loads) at ``n`` threads.

    Thread pools read these variables once, when the library loads, so they must be in the environment of a
    process before it starts: pass ``{**os.environ, **thread_env(n)}`` to a subprocess or worker.
    """
    n = max(1, int(n))
    return {**dict.fromkeys(THREAD_VARIABLES, str(n)), "MEDNB_THREADS": str(n)}


def pool_context(*preload: str):  # noqa: ANN201 (multiprocessing context)
    """Process-pool start method for per-case work: forkserver (never forks a notebook kernel's threads) with
    ``preload`` modules imported once, so workers start in milliseconds; spawn where forkserver is missing."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx



def worker_pool(n_jobs: int, *preload: str, n_workers: int | None = None):  # noqa: ANN201 (executor, threads)
    """(process pool, torch threads per worker) for ``n_jobs`` independent jobs: ``n_workers`` processes (default
    one per granted core), at most one per job; ``(None, 0)`` when a single worker would do (run in-process).
    The caller owns the pool (``with pool:``) and may share it between several batches of jobs."""
    from concurrent.futures import ProcessPoolExecutor

    n = workers(limit=n_jobs) if n_workers is None else max(1, min(n_workers, n_jobs))
    if n <= 1:
        return None, 0
    return ProcessPoolExecutor(n, mp_context=pool_context(*preload)), threads_per_worker(n)


def lower_priority() -> None:
    """Run this process (and everything it starts) at the lowest CPU priority, so it only takes cycles that no
    normal-priority process wants: nice 19 everywhere, and on Linux the SCHED_IDLE policy (never preempts a normal
    process when it wakes) and a lowered session autogroup (with autogroup scheduling, nice values only rank the
    processes of one session). All three are allowed without privileges; what a system lacks is skipped."""
    with contextlib.suppress(AttributeError, OSError):
        os.nice(19 - os.nice(0))
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
        f.write("19")

