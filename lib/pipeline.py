"""Run the numbered notebooks as a dependency graph with papermill and write one HTML report per run.

    python -m lib.pipeline --profile demo            # every notebook, demo parameters
    python -m lib.pipeline --profile smoke --only 00 01
    python -m lib.pipeline --profile demo --cores 8  # core budget (default: MEDNB_CORES, else every core)

Stages and their order: :data:`DAG` names, for each notebook number, the notebooks whose outputs it reads.
A stage starts once the stages it needs (among those chosen for this run) have finished, so independent
notebooks run side by side. ``--only`` runs just the chosen stages: their dependencies are not added (each
notebook computes the upstream artefacts it misses), but the chosen stages still start in graph order.

Cores: the run has a budget (``--cores``, ``MEDNB_CORES``, else every core) and each stage is granted cores out of
it (:data:`PREFERRED_CORES`: the stages with per-case or per-fold worker pools -- crop, k-fold, explanations,
segmentation -- take the whole budget, every other stage one core). The sum of granted cores never exceeds the
budget. Scheduling policy: ready stages start in critical-path order (the stage with the longest chain of stages
after it first: 01/02, then 04, then the rest; among 01/02 the one-core stage first); when the first ready stage
in that order does not fit in the free cores, nothing after it starts either, so the cores that free up go to it
(a stage wanting every core is never starved by one-core stages). Cores a running stage leaves idle (a fold pool
waiting on its slowest fold, a one-core stage beside a whole-budget one) are not wasted: a ready stage that no
other stage waits for (a leaf of the graph, e.g. 06 or 00) that cannot start yet starts in the *background*, at
the lowest CPU priority (:func:`lib.resources.lower_priority`), with its preferred cores, up to one background
stage per core of the budget, plus one. The operating system gives it only cycles that the normal stages do not
use, so it never slows the stages on the critical path; ``run.json`` marks it ``"background": true``. Among the
last stages of the graph the heavy ones go first (whole-budget stages, then the longest by the newest earlier run
of the profile), so 05 takes the cores 04 leaves and the light stages fill in beside it. Each stage runs
in its own process (``python -m lib.pipeline _stage``) whose environment carries its grant: ``MEDNB_THREADS``,
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` (see :mod:`lib.resources`, which library code reads). Inputs that
several stages would generate for themselves (the synthetic cohort) are made once before the stages start
(:data:`SHARED_INPUTS`), so that stages running side by side never write the same files.

Each run gets ``outputs/runs/<run-id>/`` (never reused: an existing folder is an error), with the executed
notebooks, figures and tables the notebooks write, ``logs/<stage>.log`` (everything a stage prints: progress
bars, logging, warnings, kernel messages), ``metrics.json`` (merged from every stage's ``**/metrics.json``),
``run.json`` and ``report.html`` (:mod:`lib.report`; ``outputs/runs/index.html`` compares every run and is
rewritten after each). ``run.json`` is written before the first stage starts and rewritten
atomically on every stage change: per stage the status (pending/running/ok/failed/killed), wall and CPU
seconds (the stage's whole process tree, kernel and workers included), cores granted and used, commit and
log; for the run the totals. When a stage fails, the failing cell and its error are printed, stages already
running finish, no new stage starts, and the report is still written.

The console shows one line per stage (redrawn in place on a terminal, printed on change otherwise), e.g.
``04_kfold  running  cells 7/15  elapsed 1:12  est 3:40``; the estimate is the stage's wall time in the newest
earlier run of the same profile that finished it.

    python -m lib.pipeline --profile demo --resume --run-id 20261123-101500-demo   # finish a run

``--resume`` finishes an existing run with the same profile and seed, whether it failed, was stopped (SIGTERM,
Ctrl-C), killed (SIGKILL) or lost a kernel: stages that finished are kept as they are; stages that were
running, failed or killed run again (the earlier notebook and log kept as ``<stem>.failed<k>.*``), then the
rest. SIGTERM/SIGINT stop a run cleanly: running stages are marked killed, their processes ended, ``run.json``
written, and the pipeline exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from lib import config, params, report, resources
from lib import overrides as study_params
from lib.io import write_json

#: Stage graph, by notebook number: the stages whose artefacts each stage reads.
DAG: dict[str, tuple[str, ...]] = {
    "00": (),
    "01": (),
    "02": (),
    "03": ("01", "02"),
    "04": ("01", "02"),
    "05": ("04",),
    "06": (),
    "07": ("04",),
}

#: matplotlib backend of every stage's kernel: figures go into the executed notebook.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

#: Cores a stage would like; ``None`` = the whole budget. Stages not listed take one core.
PREFERRED_CORES: dict[str, int | None] = {"02": None, "04": None, "05": None, "06": None}

#: Inputs that several stages generate for themselves when missing, as ``"module:function"`` (called with
#: ``profile, seed``) -> the stages that read them. Stages running side by side would otherwise generate the same
#: files at the same time, so when two or more of them are about to run on a budget of two or more cores the
#: pipeline calls the function once, in its own process, before any stage starts (a no-op when already on disk).
SHARED_INPUTS: dict[str, frozenset[str]] = {
    "lib.synth:ensure_cohort": frozenset({"00", "01", "02", "03", "04", "05"}),
}

#: Wall seconds assumed for a stage that no earlier run of the profile has timed (orders ready stages).
DEFAULT_ESTIMATE_S = 60.0

#: Seconds a stage's kernel may take to start: a background stage's kernel only gets idle cycles, and on a busy
#: machine importing torch and MONAI can take minutes.
KERNEL_START_TIMEOUT_S = 900

#: Seconds a stopped stage gets to shut its kernel down before its processes are killed.
STOP_GRACE_S = 10.0
#: Seconds between two progress lines of one stage when the console is not a terminal.
LOG_EVERY_S = 10.0

_REPO = Path(__file__).resolve().parents[1]  # where ``python -m lib.pipeline _stage`` runs
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_DONE = ("ok", "failed", "killed")


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally filtered by number prefix (``00``, ``01``...)."""
    found = sorted(config.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name[:2] in only]
    return found


def profile_parameters(notebook: Path, profile: str) -> dict:
    """Parameters papermill injects: ``notebooks/profiles/<stem>.yaml[profile]`` (missing file = defaults)."""
    path = config.PROFILES / f"{notebook.stem}.yaml"
    if not path.exists():
        return {}
    table = yaml.safe_load(path.read_text()) or {}
    if profile not in table:
        raise KeyError(f"{path}: no '{profile}' profile (has {sorted(table)})")
    return dict(table[profile] or {})


def check_profiles(chosen: list[Path], profile: str, overrides: dict[str, dict] | None = None) -> None:
    """Validate the profile parameters (with the study's ``overrides`` per stem, see :mod:`lib.overrides`) of every
    chosen notebook against its declared types (:mod:`lib.params`), so a bad profile file fails before any stage
    runs rather than midway."""
    for nb in chosen:
        if nb.stem in params.TYPES:
            path = config.PROFILES / f"{nb.stem}.yaml"
            values = {**profile_parameters(nb, profile), **(overrides or {}).get(nb.stem, {})}
            params.check_profile(nb.stem, values, f"{path} ({profile} profile)")


def run_path(run_id: str) -> Path:
    """The folder of ``run_id`` inside ``config.RUNS``; refuses ids that could name anything else.

    A run id becomes a folder name and appears in shell commands, so only ``[A-Za-z0-9][A-Za-z0-9._-]{0,99}``
    without ``..`` is accepted, and the resolved folder must be a direct child of the runs folder.
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 100, "
                         "starting with a letter or digit, no '..')")
    root = config.RUNS.resolve()
    path = (root / run_id).resolve()
    if path.parent != root:
        raise ValueError(f"invalid run id {run_id!r}: resolves outside {root}")
    return config.RUNS / run_id


def new_run_dir(profile: str, run_id: str | None = None) -> Path:
    """A fresh run folder; refuses to reuse one so no run overwrites another."""
    run_id = run_id if run_id is not None else f"{dt.datetime.now():%Y%m%d-%H%M%S}-{profile}"
    path = run_path(run_id)
    if path.exists():
        raise FileExistsError(f"run folder {path} already exists; runs never overwrite each other")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # fails if another run created it meanwhile
    return path


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def merge_metrics(run_dir: Path) -> dict:
    """Collect every stage's ``metrics.json`` below ``run_dir`` into one mapping keyed by folder."""
    merged = {}
    for path in sorted(run_dir.rglob("metrics.json")):
        if path.parent == run_dir:
            continue
        merged[str(path.parent.relative_to(run_dir))] = json.loads(path.read_text())
    write_json(run_dir / "metrics.json", merged)
    return merged


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else ""




def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- the graph

def stage_key(notebook: Path | str) -> str:
    """The stage a notebook is: its two-digit number prefix."""
    return Path(notebook).name[:2]


def dependencies(key: str, chosen: set[str]) -> set[str]:
    """Stages among ``chosen`` that must finish before ``key`` starts.

    A notebook missing from :data:`DAG` waits for every lower-numbered chosen stage (the safe order a new
    notebook had before it was placed in the graph).
    """
    if key in DAG:
        return set(DAG[key]) & chosen
    return {k for k in chosen if k < key}


def _ranks() -> dict[str, int]:
    """Critical-path rank of every stage in :data:`DAG`: the length of the longest chain it starts."""
    after: dict[str, set[str]] = {k: set() for k in DAG}
    for key, needs in DAG.items():
        for need in needs:
            after.setdefault(need, set()).add(key)
    memo: dict[str, int] = {}

    def rank(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key in seen:
            raise ValueError(f"pipeline.DAG has a cycle through {key}")
        if key not in memo:
            memo[key] = 1 + max((rank(k, seen | {key}) for k in after.get(key, ())), default=0)
        return memo[key]

    return {k: rank(k) for k in after}


def _chain_estimates(stages: list[_Stage]) -> dict[str, float]:
    """Estimated wall seconds of the longest chain of this run's stages that each stage starts (itself included);
    a stage without an earlier timing counts :data:`DEFAULT_ESTIMATE_S`."""
    after: dict[str, list[str]] = {s.key: [] for s in stages}
    for s in stages:
        for need in s.needs:
            after.setdefault(need, []).append(s.key)
    own = {s.key: s.estimate or DEFAULT_ESTIMATE_S for s in stages}
    memo: dict[str, float] = {}

    def chain(key: str) -> float:
        if key not in memo:
            memo[key] = own.get(key, 0.0) + max((chain(k) for k in after.get(key, ())), default=0.0)
        return memo[key]

    return {s.key: chain(s.key) for s in stages}


def preferred_cores(key: str, budget: int) -> int:
    """Cores stage ``key`` is granted out of ``budget`` (never more than the budget)."""
    want = PREFERRED_CORES.get(key, 1)
    return budget if want is None else max(1, min(int(want), budget))


# ------------------------------------------------------------------------------------------------ processes

def _tree(pid: int) -> list[Any]:
    """psutil handles of ``pid`` and its descendants (empty when psutil is missing or the process is gone)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_cpu(procs: list[Any]) -> float:
    """CPU seconds of live processes plus the children each one has already reaped (no double counting)."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except Exception:  # noqa: BLE001 - a process may exit while it is sampled
            continue
        total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return total


def _signal_all(procs: list[Any], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.send_signal(sig)


def _same_process(pid: int | None, created: float | None) -> Any:
    """The psutil handle of ``pid`` if it is still the process started at ``created`` (pids get reused)."""
    if not pid or created is None:
        return None
    try:
        import psutil

        proc = psutil.Process(int(pid))
        return proc if abs(proc.create_time() - float(created)) < 1.0 else None
    except Exception:  # noqa: BLE001 - gone, no psutil, or no access: nothing of ours to stop
        return None


def _created(pid: int) -> float | None:
    procs = _tree(pid)
    try:
        return procs[0].create_time() if procs else None
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------- console

def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Console:
    """Stage lines a person can watch: redrawn in place on a terminal, printed on change (throttled) otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        try:
            self.tty = self.stream.isatty() and os.environ.get("TERM", "") != "dumb"
        except (AttributeError, ValueError):
            self.tty = False
        self.drawn = 0
        self.last_draw = 0.0
        self.printed: dict[str, tuple[str, float, str]] = {}  # stage -> (status, when, progress text)

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((120, 20)).columns - 1)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def message(self, text: str, err: bool = False) -> None:
        """A line that stays (kept stages, failures, the report path), printed above the live block."""
        self._clear()
        self.stream.flush()
        print(text, file=sys.stderr if err else self.stream, flush=True)
        self.last_draw = 0.0

    def update(self, stages: list[_Stage], now: float, force: bool = False) -> None:
        if self.tty:
            if not force and now - self.last_draw < 0.5:
                return
            self._clear()
            width = self._width()
            self.stream.write("".join(f"\x1b[2K{s.line(now)[:width]}\n" for s in stages))
            self.stream.flush()
            self.drawn, self.last_draw = len(stages), now
            return
        for s in stages:
            before = self.printed.get(s.name)
            progress = s.progress_text()
            changed = before is None or before[0] != s.status
            if s.status == "pending" and not changed:
                continue
            due = before is not None and s.status == "running" and (
                (progress != before[2] and now - before[1] >= LOG_EVERY_S) or now - before[1] >= 6 * LOG_EVERY_S)
            if changed or due:
                if s.status == "pending" and before is None:
                    self.printed[s.name] = (s.status, now, progress)
                    continue  # the plan line lists pending stages once
                print(f"[pipeline] {s.line(now)}", file=self.stream, flush=True)
                self.printed[s.name] = (s.status, now, progress)

    def close(self, stages: list[_Stage], now: float) -> None:
        if self.tty:
            self.update(stages, now, force=True)
            self.drawn = 0


# --------------------------------------------------------------------------------------------------- stages

@dataclass
class _Stage:
    """One notebook of this invocation: its run.json entry plus the state of its process."""

    notebook: Path
    key: str
    entry: dict
    needs: set[str]
    want: int
    rank: int
    estimate: float | None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    wall: float | None = None
    procs: list[Any] = field(default_factory=list)
    cpu_seen: float = 0.0
    cpu_sampled: tuple[float, float] = (0.0, 0.0)
    cores_now: float | None = None
    cells: tuple[int, int] | None = None
    waiting: str = ""
    stop_sent: float | None = None
    background: bool = False

    @property
    def name(self) -> str:
        return self.notebook.stem

    @property
    def status(self) -> str:
        return self.entry["status"]

    def progress_text(self) -> str:
        return f"cells {self.cells[0]}/{self.cells[1]}" if self.cells else ""

    def line(self, now: float) -> str:
        est = f"  est {_clock(self.estimate)}" if self.estimate else ""
        head = f"{self.name:<24} {self.status:<8}"
        if self.status == "pending":
            return f"{head} {self.waiting}{est}".rstrip()
        if self.status == "running":
            use = f" (using {self.cores_now:.1f})" if self.cores_now is not None else ""
            bg = ", background" if self.background else ""
            return (f"{head} {self.progress_text() or 'starting'}  elapsed {_clock(now - self.started)}{est}"
                    f"  cores {self.entry['cores_granted']}{use}{bg}")
        e = self.entry
        cells = f"{self.progress_text()}  " if self.cells else ""
        return (f"{head} {cells}wall {_clock(e.get('wall_s'))}  cpu {_clock(e.get('cpu_s'))}  "
                f"cores used {_num(e.get('cores_used'), '.2f')} of {e.get('cores_granted')}")


def _previous_walls(profile: str, exclude: Path) -> dict[str, float]:
    """Wall seconds per notebook from the newest earlier runs of ``profile`` that finished it."""
    infos = []
    for path in config.RUNS.glob("*/run.json"):
        if path.parent.resolve() == exclude.resolve():
            continue
        info = _read_json(path)
        if info and info.get("profile") == profile:
            infos.append(info)
    walls: dict[str, float] = {}
    for info in sorted(infos, key=lambda i: str(i.get("started", "")), reverse=True):
        for s in info.get("stages", []):
            wall = s.get("wall_s", s.get("seconds"))
            if s.get("status") == "ok" and isinstance(wall, int | float):
                walls.setdefault(s["notebook"], float(wall))
    return walls


def _resume_dir(profile: str, run_id: str | None, seed: int) -> tuple[Path, dict]:
    """The run folder to continue and its ``run.json``; refuses another profile or seed (that is a new run)."""
    if run_id is None:
        raise ValueError("--resume needs the run id to continue")
    run_dir = run_path(run_id)
    path = run_dir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run to resume")
    info = json.loads(path.read_text())
    if (info.get("profile"), info.get("seed")) != (profile, seed):
        raise ValueError(f"{run_dir.name} was run with profile {info.get('profile')!r} and seed {info.get('seed')}; "
                         f"resuming with {profile!r} / {seed} would mix two runs: start a new one")
    for attempt in info.get("attempts", []):
        if (attempt.get("status") == "running" and attempt.get("pid") != os.getpid()
                and _same_process(attempt.get("pid"), attempt.get("pid_created"))):
            raise RuntimeError(f"run {run_dir.name} is still running (pipeline pid {attempt['pid']})")
    return run_dir, info


def _finished(info: dict) -> set[str]:
    """Notebooks whose last attempt in this run succeeded."""
    last = {s["notebook"]: s["status"] for s in info.get("stages", []) if s.get("status") != "pending"}
    return {nb for nb, status in last.items() if status == "ok"}


def _stop_leftovers(info: dict) -> None:
    """End stage processes an abruptly killed pipeline left behind, and mark those stages killed."""
    for entry in info.get("stages", []):
        if entry.get("status") != "running":
            continue
        proc = _same_process(entry.get("pid"), entry.get("pid_created"))
        if proc is not None:
            procs = _tree(proc.pid)
            _signal_all(procs, signal.SIGTERM)
            with contextlib.suppress(Exception):
                import psutil

                _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
                _signal_all(alive, signal.SIGKILL)
        entry["status"] = "killed"


def _keep_earlier(path: Path, stem: str, suffix: str) -> None:
    """An earlier attempt's file (notebook, log) is kept beside the new one as ``<stem>.failed<k><suffix>``."""
    if path.exists():
        k = len(list(path.parent.glob(f"{stem}.failed*{suffix}"))) + 1
        path.rename(path.with_name(f"{stem}.failed{k}{suffix}"))


def _totals(info: dict) -> None:
    """Run-level wall, CPU (stages plus the pipeline process itself) and cores used."""
    wall = sum(a.get("wall_s") or 0.0 for a in info.get("attempts", []))
    cpu = sum(s.get("cpu_s") or 0.0 for s in info.get("stages", []))
    cpu += sum(a.get("runner_cpu_s") or 0.0 for a in info.get("attempts", []))
    cpu += sum(p.get("cpu_s") or 0.0 for p in info.get("prepared", []))
    info["wall_s"], info["cpu_s"] = round(wall, 1), round(cpu, 1)
    info["cores_used"] = round(cpu / wall, 2) if wall > 0 else None


class _Stop:
    """SIGTERM/SIGINT received: the scheduler stops its stages; a second signal kills them at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.force = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.force = True
        self.signum = signum


def _compile_package() -> None:
    """Write the package's bytecode once, before the stages start: every stage kernel and worker process imports
    ``lib``, and where ``PYTHONDONTWRITEBYTECODE`` is set each would compile it again (about a second of CPU
    each). Nothing happens when the checkout is read-only or the bytecode is current."""
    import compileall

    with contextlib.suppress(OSError):
        compileall.compile_dir(_REPO / "lib", quiet=2, workers=1)


def run(profile: str = "demo", only: list[str] | None = None, run_id: str | None = None,
        seed: int = config.DEFAULT_SEED, kernel: str = "python3", resume: bool = False,
        cores: int | None = None, console: TextIO | None = None, overrides: dict[str, dict] | None = None) -> Path:
    """Execute the notebooks into a new run folder (or finish ``run_id`` with ``resume``) as a graph of stages.

    ``overrides``: study parameters per notebook stem (:func:`lib.overrides.study_overrides`), injected over the
    profile's, recorded in ``run.json`` (run-level and per stage) and reused by ``resume``.
    ``cores`` is the core budget (default :func:`lib.resources.cores`). Raises ``SystemExit`` after writing
    ``run.json`` and the report when a stage failed, and after writing ``run.json`` when stopped by a signal.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    budget = max(1, int(cores or resources.cores()))
    _compile_package()
    attempt = {"commit": _git_commit(), "started": dt.datetime.now().isoformat(timespec="seconds"),
               "status": "running", "cores": budget, "pid": os.getpid(), "pid_created": _created(os.getpid())}
    if resume:
        run_dir, info = _resume_dir(profile, run_id, seed)
        only = only or info.get("only")
        if overrides is not None and overrides != info.get("overrides", {}):
            raise ValueError(f"{run_dir.name} was run with parameters {info.get('overrides', {})}; resuming with "
                             f"{overrides} would mix two runs: start a new one")
        overrides = info.get("overrides", {})
        check_profiles(notebooks(only), profile, overrides)
        _stop_leftovers(info)
        info["stages"] = [s for s in info.get("stages", []) if s.get("status") not in ("pending", "skipped")]
        info.setdefault("attempts", []).append(attempt)
    else:
        overrides = overrides or {}
        check_profiles(notebooks(only), profile, overrides)
        run_dir = new_run_dir(profile, run_id)
        info = {"profile": profile, "seed": seed, "only": only, "overrides": overrides, "commit": attempt["commit"],
                "python": platform.python_version(), "started": attempt["started"], "cores": budget,
                "status": "running", "attempts": [attempt], "stages": []}
    run_json = run_dir / "run.json"

    def save() -> None:
        attempt["wall_s"] = round(time.perf_counter() - t0, 1)
        attempt["runner_cpu_s"] = round(time.process_time() - cpu0, 2)
        _totals(info)
        write_json(run_json, info)

    save()  # run.json exists before any stage starts
    nb_dir, log_dir = run_dir / "notebooks", run_dir / "logs"
    nb_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    out = _Console(console)

    done_before = _finished(info)
    chosen = notebooks(only)
    chosen_keys = {stage_key(nb) for nb in chosen}
    ranks = _ranks()
    walls = _previous_walls(profile, run_dir)
    stages: list[_Stage] = []
    skipped: set[str] = set()
    for nb in chosen:
        reason = study_params.not_applicable(nb.stem, {**profile_parameters(nb, profile), **overrides.get(nb.stem, {})},
                                             overrides)
        if reason:  # recorded, not run; stages that read its outputs compute what they need themselves
            out.message(f"[pipeline] {nb.name} skipped: {reason}")
            info["stages"].append({"notebook": nb.name, "stage": stage_key(nb), "status": "skipped", "reason": reason})
            skipped.add(stage_key(nb))
            continue
        if nb.name in done_before:
            out.message(f"[pipeline] {nb.name} finished in an earlier attempt: kept")
            continue
        key = stage_key(nb)
        entry = {"notebook": nb.name, "stage": key, "status": "pending", "commit": attempt["commit"],
                 "attempt": 1 + sum(s["notebook"] == nb.name for s in info["stages"]),
                 "log": f"logs/{nb.stem}.log", "cores_granted": None, "wall_s": None, "cpu_s": None,
                 "cores_used": None}
        if overrides.get(nb.stem):
            entry["overrides"] = overrides[nb.stem]
        info["stages"].append(entry)
        stages.append(_Stage(nb, key, entry, dependencies(key, chosen_keys), preferred_cores(key, budget),
                             ranks.get(key, 0), walls.get(nb.name)))
    # critical path first; among stages that others wait for, the smaller grants first, so one-core stages start
    # side by side instead of each waiting alone for a whole-budget stage to finish; among the last stages of the
    # graph, the heavy ones first (whole-budget, then the longest by earlier timings), the light ones fill in
    chains = _chain_estimates(stages)
    stages.sort(key=lambda s: (-s.rank, s.want if s.rank > 1 else -s.want, -chains[s.key], s.key, s.notebook.name))
    done_keys = {stage_key(n) for n in done_before} | skipped
    if stages:
        plan = ", ".join(f"{s.key}{'<' + '+'.join(sorted(s.needs)) if s.needs else ''}" for s in stages)
        out.message(f"[pipeline] {run_dir.name}: {len(stages)} stage(s) on {budget} core(s) ({profile}): {plan}")
    save()

    stop = _Stop()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, stop)
    failures: list[_Stage] = []
    try:
        _prepare(stages, budget, profile, seed, run_dir, stop, info, out, save)
        _schedule(stages, done_keys, budget, run_dir, kernel, profile, seed, stop, failures, out, save)
    finally:
        for stage in stages:  # an unexpected error in the runner: no stage is left running unrecorded
            if stage.status == "running":
                _terminate(stage, force=True)
                _reap(stage, blocking=True)
                stage.entry["status"] = "killed"
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        out.close(stages, time.perf_counter())
        attempt["finished"] = info["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        attempt["status"] = ("killed" if stop.signum or any(s.status == "killed" for s in stages) else
                             "failed" if failures or any(s.status != "ok" for s in stages) else "ok")
        info["status"] = attempt["status"]
        save()

    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        out.message(f"[pipeline] run {run_dir.name} stopped by {name}; finish it with "
                    f"--resume --run-id {run_dir.name}", err=True)
        raise SystemExit(128 + stop.signum)
    merge_metrics(run_dir)
    executed = sorted({nb_dir / name for name in done_before} |
                      {nb_dir / s.notebook.name for s in stages if s.status != "pending"})
    report_path = report.write_report(run_dir, [p for p in executed if p.exists()])
    report.write_index(run_dir.parent)
    out.message(f"[pipeline] report: {report_path}")
    if failures:
        first = failures[0]
        err = first.entry.get("error") or {}
        raise SystemExit(f"run {run_dir.name} failed at {first.notebook.name}: {err.get('ename')}: "
                         f"{err.get('evalue')}; finish it with --resume --run-id {run_dir.name} once fixed")
    if any(s.status != "ok" for s in stages):
        raise SystemExit(f"run {run_dir.name} has stages that did not run; finish it with "
                         f"--resume --run-id {run_dir.name}")
    return run_dir


def _schedule(stages: list[_Stage], done_keys: set[str], budget: int, run_dir: Path, kernel: str, profile: str,
              seed: int, stop: _Stop, failures: list[_Stage], out: _Console, save: Any) -> None:
    """Start ready stages within the core budget, follow them, and record every change in run.json."""
    free = budget
    ok_keys = set(done_keys)
    last_sample = 0.0
    while True:
        now = time.perf_counter()
        running = [s for s in stages if s.status == "running"]
        if stop.signum is not None:
            for s in running:
                if s.stop_sent is None or stop.force or now - s.stop_sent > STOP_GRACE_S:
                    _terminate(s, force=s.stop_sent is not None)
                    s.stop_sent = s.stop_sent or now
        if now - last_sample >= 2.0:  # live CPU of each stage's process tree
            for s in running:
                _sample(s, now)
            last_sample = now
        changed = False
        for s in running:
            if _reap(s, blocking=False):
                _finish(s, run_dir, stop.signum is not None, out)
                free += 0 if s.background else s.entry["cores_granted"]
                if s.status == "ok":
                    ok_keys.add(s.key)
                elif s.status == "failed":
                    failures.append(s)
                changed = True
        pending = [s for s in stages if s.status == "pending"]
        if stop.signum is None and not failures:
            for s in pending:
                waits = sorted(k for k in s.needs if k not in ok_keys)
                s.waiting = f"waits for {', '.join(waits)}" if waits else ""
            for s in pending:  # critical-path order; the first ready stage that does not fit holds the rest
                if s.waiting:
                    continue
                if s.want > free:
                    s.waiting = f"ready, waits for {s.want} free core(s)"
                    break
                _launch(s, s.want, run_dir, kernel, profile, seed)
                free -= s.want
                changed = True
            changed |= _backfill(stages, budget, run_dir, kernel, profile, seed)
        running = [s for s in stages if s.status == "running"]
        if changed:
            save()
        for s in running:
            _read_progress(s, run_dir)
        out.update(stages, time.perf_counter(), force=changed)
        if not running and (stop.signum is not None or failures or not pending
                            or all(s.waiting.startswith("waits for") for s in pending)):
            return
        time.sleep(0.25)


def _backfill(stages: list[_Stage], budget: int, run_dir: Path, kernel: str, profile: str, seed: int) -> bool:
    """Start ready leaf stages that could not start normally in the background (lowest priority), in scheduling
    order, while fewer than ``budget`` background stages run. Returns whether one started."""
    if budget < 2:
        return False
    needed = {k for s in stages if s.status in ("pending", "running") for k in s.needs}
    slots = budget + 1 - sum(s.status == "running" and s.background for s in stages)
    started = False
    for s in stages:
        if slots <= 0:
            break
        if s.status != "pending" or s.waiting.startswith("waits for") or s.key in needed:
            continue
        s.background = True
        s.entry["background"] = True
        s.waiting = ""
        _launch(s, s.want, run_dir, kernel, profile, seed)
        slots -= 1
        started = True
    return started


def _prepare(stages: list[_Stage], budget: int, profile: str, seed: int, run_dir: Path, stop: _Stop, info: dict,
             out: _Console, save: Any) -> None:
    """Make the :data:`SHARED_INPUTS` that two or more stages of this run would otherwise generate concurrently.

    Runs in its own process (output to ``logs/prepare.log``, wall and CPU in ``run.json`` under ``prepared``).
    A failure is reported and the run goes on: each stage still generates what it misses.
    """
    if budget < 2 or stop.signum is not None:
        return
    for target, readers in SHARED_INPUTS.items():
        if sum(s.key in readers for s in stages) < 2:
            continue
        out.message(f"[pipeline] preparing {target}({profile!r}, {seed}) once for the stages that share it")
        t0 = time.perf_counter()
        code = (f"import importlib; m, f = {target!r}.split(':'); "
                f"getattr(importlib.import_module(m), f)({profile!r}, {seed!r})")
        with open(run_dir / "logs" / "prepare.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=_REPO, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **resources.thread_env(budget)})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if stop.signum is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL if stop.force else signal.SIGTERM)
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        entry = {"target": target, "status": "ok" if proc.returncode == 0 else "failed",
                 "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                 "cores_granted": budget, "log": "logs/prepare.log"}
        info.setdefault("prepared", []).append(entry)
        save()
        if entry["status"] != "ok" and stop.signum is None:
            out.message(f"[pipeline] preparing {target} failed (exit code {proc.returncode}, see "
                        f"{run_dir / entry['log']}); the stages will generate it themselves", err=True)


def _stage_files(run_dir: Path, stem: str) -> dict[str, Path]:
    logs = run_dir / "logs"
    return {"spec": logs / f".{stem}.stage.json", "progress": logs / f".{stem}.progress.json",
            "result": logs / f".{stem}.result.json", "log": logs / f"{stem}.log"}


def _stage_command(spec: Path) -> list[str]:
    """The command of a stage process: this module's ``_stage`` entry point with the stage's spec file."""
    return [sys.executable, "-m", "lib.pipeline", "_stage", str(spec)]


def _launch(stage: _Stage, cores: int, run_dir: Path, kernel: str, profile: str, seed: int) -> None:
    """Start the stage's own process with its core grant in the environment."""
    nb, stem = stage.notebook, stage.notebook.stem
    files = _stage_files(run_dir, stem)
    out_nb = run_dir / "notebooks" / nb.name
    _keep_earlier(out_nb, stem, ".ipynb")
    _keep_earlier(files["log"], stem, ".log")
    for key in ("progress", "result"):
        files[key].unlink(missing_ok=True)
    values = {**profile_parameters(nb, profile), **stage.entry.get("overrides", {}), "profile": profile, "seed": seed,
              "run_dir": str(run_dir)}
    write_json(files["spec"], {"notebook": str(nb), "output": str(out_nb), "parameters": values, "kernel": kernel,
                               "cwd": str(config.NOTEBOOKS), "progress": str(files["progress"]),
                               "result": str(files["result"]), "parent": os.getpid(),
                               "background": stage.background})
    env = {**os.environ, **resources.thread_env(cores), "PYTHONUNBUFFERED": "1"}
    with open(files["log"], "ab") as log:
        stage.proc = subprocess.Popen(_stage_command(files["spec"]), cwd=_REPO, env=env, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stage.started = time.perf_counter()
    stage.procs = _tree(stage.proc.pid)
    stage.entry.update(status="running", cores_granted=cores, pid=stage.proc.pid,
                       pid_created=_created(stage.proc.pid),
                       started=dt.datetime.now().isoformat(timespec="milliseconds"), started_unix=time.time())


def _sample(stage: _Stage, now: float) -> None:
    """Refresh the stage's process list and its live CPU use (for the console and for killed stages)."""
    if stage.proc is None:
        return
    procs = _tree(stage.proc.pid)
    if procs:
        stage.procs = procs
    cpu = _tree_cpu(stage.procs)
    if cpu:
        then, cpu_then = stage.cpu_sampled
        if then:
            stage.cores_now = max(0.0, (cpu - cpu_then) / max(now - then, 1e-6))
        stage.cpu_sampled = (now, cpu)
        stage.cpu_seen = max(stage.cpu_seen, cpu)


def _terminate(stage: _Stage, force: bool) -> None:
    """SIGTERM the stage process (it shuts its kernel down); with ``force`` SIGKILL its whole process tree."""
    if stage.proc is None:
        return
    if force:
        procs = _tree(stage.proc.pid) or stage.procs
        _signal_all(procs, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(stage.proc.pid, signal.SIGKILL)
    else:
        stage.procs = _tree(stage.proc.pid) or stage.procs
        with contextlib.suppress(ProcessLookupError):
            os.kill(stage.proc.pid, signal.SIGTERM)


def _reap(stage: _Stage, blocking: bool) -> bool:
    """Collect the stage process once it exited; its rusage counts every descendant it waited for."""
    if stage.proc is None or stage.wall is not None:
        return False
    try:
        pid, status, usage = os.wait4(stage.proc.pid, 0 if blocking else os.WNOHANG)
    except ChildProcessError:
        pid, status, usage = stage.proc.pid, 0, None
    if pid == 0:
        return False
    stage.wall = time.perf_counter() - stage.started
    stage.proc.returncode = os.waitstatus_to_exitcode(status) if usage is not None else -1
    cpu = (usage.ru_utime + usage.ru_stime) if usage is not None else 0.0
    stage.entry["cpu_s"] = round(max(cpu, stage.cpu_seen), 2)
    return True


def _finish(stage: _Stage, run_dir: Path, stopping: bool, out: _Console) -> None:
    """Record a stage that ended: status from its result file (or how its process ended), times, cores."""
    files = _stage_files(run_dir, stage.notebook.stem)
    result = _read_json(files["result"]) or {}
    _read_progress(stage, run_dir)
    code = stage.proc.returncode if stage.proc is not None else None
    status = result.get("status")
    if status not in _DONE:
        status = "killed" if stopping or (code is not None and code < 0) else "failed"
        result.setdefault("ename", "StageProcessError")
        result.setdefault("evalue", f"stage process ended with code {code}; see {stage.entry['log']}")
    if stopping and status == "failed":
        status = "killed"
    wall = stage.wall or 0.0
    e = stage.entry
    e.update(status=status, wall_s=round(wall, 1), finished=dt.datetime.now().isoformat(timespec="milliseconds"),
             finished_unix=time.time(), exit_code=code)
    e["cores_used"] = round(e["cpu_s"] / wall, 2) if wall > 0 else None
    if stage.cells:
        e["cells_done"], e["cells_total"] = stage.cells
    e.pop("pid_created", None)
    for key in ("spec", "progress", "result"):  # what they said is now in run.json
        files[key].unlink(missing_ok=True)
    if status != "ok":
        e["error"] = {k: result.get(k) for k in ("cell", "ename", "evalue") if result.get(k) is not None}
    if status == "failed":
        where = f"in cell {result['cell']}" if result.get("cell") is not None else "outside a cell"
        source = f"\n{result['source']}" if result.get("source") else ""
        out.message(f"[pipeline] {stage.notebook.name} FAILED {where}:{source}\n{result.get('ename')}: "
                    f"{result.get('evalue')}\n[pipeline] log: {run_dir / e['log']}", err=True)
        if not stopping:
            out.message("[pipeline] no new stage starts; stages already running finish")


def _read_progress(stage: _Stage, run_dir: Path) -> None:
    progress = _read_json(_stage_files(run_dir, stage.notebook.stem)["progress"])
    if progress and isinstance(progress.get("total"), int):
        stage.cells = (int(progress.get("done", 0)), progress["total"])


# ------------------------------------------------------------------------------------- inside a stage process

class _Terminated(BaseException):
    """SIGTERM inside a stage process: unwinds papermill so that its kernel is shut down."""


_STAGE_STATE = {"terminated": False}  # set by the stage process's SIGTERM handler: the running cell did not finish


def _exit_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this process when the pipeline dies (even by SIGKILL), so no stage outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the pipeline died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _progress_engine(path: Path) -> type:
    """A papermill engine that writes ``{"done", "total"}`` code cells to ``path`` as each cell starts and ends."""
    from papermill.engines import NBClientEngine

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
            total = sum(c.cell_type == "code" for c in nb_man.nb.cells)
            state = {"done": 0}
            start, complete = nb_man.cell_start, nb_man.cell_complete

            def report(current: int | None) -> None:
                with contextlib.suppress(OSError):
                    write_json(path, {"done": state["done"], "total": total, "current": current, "at": time.time()})

            def cell_start(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                if cell.cell_type == "code":
                    report(state["done"] + 1)
                return start(cell, cell_index, **kw)

            def cell_complete(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                result = complete(cell, cell_index, **kw)
                finished = cell.metadata.get("papermill", {}).get("status") == "completed"
                if cell.cell_type == "code" and finished and not _STAGE_STATE["terminated"]:
                    state["done"] += 1
                    report(None)
                return result

            nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            report(None)
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    return ProgressEngine


def _end_children() -> None:
    """Stop and reap whatever this stage process started (its kernel and the kernel's workers)."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    _signal_all(children, signal.SIGTERM)
    _, alive = psutil.wait_procs(children, timeout=3)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=3)


def _run_stage(spec_path: str) -> int:
    """Execute one notebook (the body of a stage process); everything it prints goes to the stage log."""
    import logging

    spec = json.loads(Path(spec_path).read_text())
    _exit_with_parent(int(spec["parent"]))
    if spec.get("background"):  # only idle cycles: the kernel and its workers inherit the priority
        resources.lower_priority()

    def terminated(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the kernel shutdown must not be interrupted
        _STAGE_STATE["terminated"] = True
        raise _Terminated

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pipeline decides when a stage stops
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)
    import papermill as pm
    from papermill.engines import papermill_engines

    papermill_engines.register("mednb-progress", _progress_engine(Path(spec["progress"])))
    # the kernel draws inline, so the executed notebook (and report.html) carries its figures; a headless
    # MPLBACKEND such as Agg would leave every plt.show() empty
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    print(f"[stage] {spec['notebook']} -> {spec['output']} with {os.environ.get('MEDNB_THREADS')} core(s)",
          flush=True)
    result: dict[str, Any]
    try:
        pm.execute_notebook(spec["notebook"], spec["output"], parameters=spec["parameters"],
                            kernel_name=spec["kernel"], cwd=spec["cwd"], engine_name="mednb-progress",
                            progress_bar=False, log_output=True, request_save_on_cell_execute=True,
                            autosave_cell_every=30, start_timeout=KERNEL_START_TIMEOUT_S)
        result = {"status": "ok"}
    except pm.PapermillExecutionError as exc:
        result = {"status": "failed", "cell": exc.exec_count, "source": exc.source, "ename": exc.ename,
                  "evalue": exc.evalue}
    except _Terminated:
        result = {"status": "killed", "ename": "Terminated", "evalue": "stopped by the pipeline"}
    except Exception as exc:  # noqa: BLE001 - a dead kernel or a broken notebook is this stage's failure
        traceback.print_exc()
        result = {"status": "failed", "ename": type(exc).__name__, "evalue": str(exc)}
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _end_children()
    write_json(Path(spec["result"]), result)
    print(f"[stage] {result['status']}", flush=True)
    return {"ok": 0, "failed": 1}.get(result["status"], 128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stage"]:  # internal: one stage process, started by run()
        raise SystemExit(_run_stage(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="demo", choices=["smoke", "demo", "full"])
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 01")
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    ap.add_argument("--resume", action="store_true", help="finish the existing run --run-id (same profile and seed)")
    ap.add_argument("--cores", type=int, default=None,
                    help="core budget of the run (default: MEDNB_CORES, else every core of the machine)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(args.profile, args.only, args.run_id, args.seed, resume=args.resume, cores=args.cores)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"[pipeline] {exc}") from None


if __name__ == "__main__":
    main()
