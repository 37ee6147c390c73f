"""Batch reduction of many twilight sets, serially or on a Dask cluster.

Each SOF is reduced with :func:`musetwilight.recipe.run` into ``<output_root>/<name>/``, the name
being the SOF's path relative to the common root of all SOFs, without its suffix;
a set that fails is recorded with its error and the batch goes on.  With a
``distributed.Client`` every set becomes one Dask task, and inside it the 24 per-IFU
stages become Dask tasks of their own (through the recipe's ``mapper`` hook), so one
large set also spreads over the cluster.  Dask is optional and imported only on the
Dask path.

Every set is reduced with the same settings and without the environment overrides
($MUSE_TWILIGHT_SKIP names one cube, $MUSE_TWILIGHT_SCALES one set's scales, and a
worker's environment is not the submitter's); the scratch directory is the worker's
own ($MUSETWILIGHT_SCRATCH_DIR or $TMPDIR) unless one is given.  The TWILIGHT_CUBE model
(``illum_model``, else the submitter's $MUSETWILIGHT_ILLUM_MODEL, else ESO's) is the same for
every set too.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from ..errors import ParameterError
from ..instrument import ifu_ranges
from ..io import outdir
from ..io.products import PRODUCTS, complete_set
from ..io.space import SCRATCH_ENV
from ..memory import MEMORY_ENV
from ..params import IllumModel, Settings, make_settings

log = logging.getLogger("musetwilight.batch")

DASK_HINT = "the Dask options need dask.distributed: pip install 'musetwilight[dask]'"
WATCH_S = 5.0  # how often a waiting batch looks whether the cluster still has workers
NO_WORKER_TIMEOUT_S = 300.0  # the pending sets fail after this long without any worker
# a local cluster's nannies restart killed workers themselves; Dask's default (15 s) would
# also retire a worker that happens to be restarting 15 s after an earlier death
LOCAL_LOST_WORKER_TIMEOUT = "1 day"



@dataclass(frozen=True)
class SetJob:
    """One twilight set of a batch: its SOF (absolute), its output directory, where its
    scratch files go (None: the worker's $MUSETWILIGHT_SCRATCH_DIR or $TMPDIR) and the most
    memory its reduction may use in bytes (None: the worker's $MUSETWILIGHT_MAX_MEMORY, its
    cgroup or Dask memory limit, what the machine has) and the TWILIGHT_CUBE model."""

    name: str
    sof: Path
    output_dir: Path
    scratch_dir: Path | None = None
    max_memory: int | None = None
    illum_model: IllumModel = IllumModel.ESO


@dataclass
class SetOutcome:
    """How one set went: ``status`` is ``ok``, ``failed`` or ``skipped`` (products already there)."""

    name: str
    sof: str
    output_dir: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    details: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    skipped_ifus: list[int] = field(default_factory=list)
    failed_ifus: list[int] = field(default_factory=list)
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class BatchReport:
    """Outcomes of all sets, in the order the SOFs were given."""

    outcomes: list[SetOutcome]
    seconds: float = 0.0

    @property
    def failed(self) -> list[SetOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        """A plain-text table (set, status, time, products or error), then the totals."""
        width = max([len(o.name) for o in self.outcomes] + [3])
        lines = [f"{'set':<{width}}  {'status':<7}  {'time':>8}  products / error"]
        for o in self.outcomes:
            if o.status == "failed":
                detail = o.error or ""
            else:
                detail = o.output_dir
                absent = [ifu for ifu in o.skipped_ifus if ifu not in o.failed_ifus]
                kinds = [f"{what} {ifu_ranges(ifus)}" for what, ifus in (("absent", absent), ("failed", o.failed_ifus))
                         if ifus]
                if kinds:
                    detail += f" (IFUs {'; '.join(kinds)})"
            lines.append(f"{o.name:<{width}}  {o.status:<7}  {o.seconds:7.1f}s  {detail}")
        done = sum(o.status == "ok" for o in self.outcomes)
        skipped = sum(o.status == "skipped" for o in self.outcomes)
        lines.append(f"{len(self.outcomes)} sets: {done} reduced, {skipped} already done, "
                     f"{len(self.failed)} failed ({self.seconds:.1f} s)")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"seconds": self.seconds, "sets": [asdict(o) for o in self.outcomes]}, indent=2)


def plan_jobs(sofs: Iterable[str | Path], output_root: str | Path,
              scratch_dir: str | Path | None = None, max_memory: int | None = None,
              illum_model: str | IllumModel | None = None) -> list[SetJob]:
    """One job per SOF, named after the SOF's path relative to the common root of all SOFs
    (without its suffix) and writing into ``<output_root>/<name>``.

    ``nights/2024-03-01/twilight.sof`` and ``nights/2024-03-02/twilight.sof`` become
    ``2024-03-01/twilight`` and ``2024-03-02/twilight``; SOFs in one directory keep their stem.
    The same SOF twice, or two SOFs differing only in their suffix, are an error.
    ``illum_model`` None is $MUSETWILIGHT_ILLUM_MODEL here, else ESO's model.
    """
    from ..recipe import ILLUM_MODEL_ENV

    model = (IllumModel.parse(illum_model, "illum_model") if illum_model is not None
             else IllumModel.parse(os.environ.get(ILLUM_MODEL_ENV) or None, f"${ILLUM_MODEL_ENV}"))
    root = Path(output_root).expanduser().resolve()
    paths = [Path(os.path.abspath(Path(sof).expanduser())) for sof in sofs]
    if not paths:
        return []
    common = Path(os.path.commonpath([p.parent for p in paths]))
    jobs: list[SetJob] = []
    seen: dict[str, Path] = {}
    for path in paths:
        name = (path.parent.relative_to(common) / path.stem).as_posix()
        if name in seen:
            what = "is given twice" if seen[name] == path else f"and {path} would both be reduced into {root / name}"
            raise ParameterError(f"{seen[name]} {what}: give each set once, under a distinct name")
        seen[name] = path
        jobs.append(SetJob(name, path, root / name, Path(scratch_dir) if scratch_dir else None, max_memory, model))
    return jobs


def products_present(job: SetJob) -> bool:
    """Whether the set's output directory holds a complete, intact set of products of one run."""
    return complete_set(job.output_dir) is not None


def clear_partial(job: SetJob) -> None:
    """Leave a failed set's output directory with a complete set of products or none: remove
    the temporary files of killed attempts and products no record certifies (a run killed
    between its renames); nothing is done while another run holds the directory."""
    if not job.output_dir.is_dir():
        return
    try:
        with outdir.claim(job.output_dir):  # claiming removes the temporary files
            if complete_set(job.output_dir) is None:
                for product in PRODUCTS:
                    (job.output_dir / product.file_name).unlink(missing_ok=True)
    except OSError as err:
        log.debug("%s: leftovers not cleared: %s", job.output_dir, err)


def reduce_set(job: SetJob, settings: Settings, *, workers: int | None = None,
               mapper: Callable | None = None, progress: Callable[[str], None] | None = None) -> SetOutcome:
    """Reduce one set with :func:`recipe.run`; any exception becomes a failed outcome (never raised)."""
    from .. import recipe

    start = time.perf_counter()
    outcome = SetOutcome(job.name, str(job.sof), str(job.output_dir), "ok")
    try:
        environ = {name: os.environ[name] for name in (SCRATCH_ENV, MEMORY_ENV) if name in os.environ}
        result = recipe.run(job.sof, settings, job.output_dir, workers=workers, environ=environ,
                            scratch_dir=job.scratch_dir, max_memory=job.max_memory, progress=progress,
                            mapper=mapper, illum_model=job.illum_model)
        outcome.paths = {name: str(path) for name, path in result.paths.items()}
        outcome.skipped_ifus = sorted(result.skipped_ifus)
        outcome.failed_ifus = result.ifus("failed")
    except Exception as err:  # noqa: BLE001 - the batch reports every set's failure and goes on
        outcome.status = "failed"
        outcome.error = f"{type(err).__name__}: {err}"
        outcome.details = traceback.format_exc()
    outcome.seconds = time.perf_counter() - start
    return outcome


def run_batch(sofs: Iterable[str | Path], settings: Settings | None = None, output_root: str | Path = ".",
              *, client=None, workers: int | None = None, distribute_ifus: bool = True,
              resume: bool = False, max_in_flight: int | None = None,
              progress: Callable[[str], None] | None = None, scratch_dir: str | Path | None = None,
              max_memory: int | None = None, no_worker_timeout: float = NO_WORKER_TIMEOUT_S,
              illum_model: str | IllumModel | None = None) -> BatchReport:
    """Reduce every SOF into ``<output_root>/<name>/`` (:func:`plan_jobs`) and report each set's outcome.

    Without ``client`` the sets run one after the other in this process (``workers``
    threads for the IFUs, as :func:`recipe.run`); Dask is not imported.  With a
    ``distributed.Client`` each set is a Dask task and, if ``distribute_ifus``, its
    per-IFU stages are Dask tasks too; at most ``max_in_flight`` sets (default: the
    cluster's threads) are in progress at once.  ``resume`` leaves sets whose
    output directory already holds a complete set of products (:func:`products_present`)
    alone.  A set that fails (a worker killed more often than Dask retries it included)
    leaves no partial product: :func:`clear_partial`; after ``no_worker_timeout`` seconds
    without any worker the pending sets fail.  ``scratch_dir`` is where the sets' scratch
    files go (default: each worker's own), ``max_memory`` the most memory one set's reduction
    may use (bytes; :mod:`musetwilight.memory`), ``illum_model`` the TWILIGHT_CUBE model of
    every set (None: $MUSETWILIGHT_ILLUM_MODEL of this process, else ESO's).
    """
    settings = settings if settings is not None else make_settings()
    jobs = plan_jobs(sofs, output_root, scratch_dir, max_memory, illum_model)
    start = time.perf_counter()
    outcomes: dict[str, SetOutcome] = {}
    todo = []
    for job in jobs:
        if resume and products_present(job):
            outcomes[job.name] = SetOutcome(job.name, str(job.sof), str(job.output_dir), "skipped",
                                            paths={p.tag: str(job.output_dir / p.file_name) for p in PRODUCTS})
        else:
            todo.append(job)
    say = progress or (lambda message: None)
    if client is None:
        for number, job in enumerate(todo, start=1):
            say(f"[{number}/{len(todo)}] {job.name}: reducing {job.sof}")
            ifu_progress = (lambda m, name=job.name: progress(f"{name}: {m}")) if progress else None
            outcome = reduce_set(job, settings, workers=workers, progress=ifu_progress)
            outcomes[job.name] = outcome
            say(_done_message(number, len(todo), outcome))
    else:
        outcomes_on_dask = _run_on_dask(client, todo, settings, distribute_ifus, max_in_flight, no_worker_timeout)
        for number, outcome in enumerate(outcomes_on_dask, start=1):
            outcomes[outcome.name] = outcome
            say(_done_message(number, len(todo), outcome))
    report = BatchReport([outcomes[job.name] for job in jobs], time.perf_counter() - start)
    for job in jobs:
        if not outcomes[job.name].ok:
            clear_partial(job)
            log.error("%s failed: %s", job.name, outcomes[job.name].error)
    return report


def _done_message(number: int, total: int, outcome: SetOutcome) -> str:
    where = f" on {outcome.worker}" if outcome.worker else ""
    text = outcome.error if outcome.status == "failed" else outcome.output_dir
    return f"[{number}/{total}] {outcome.name}: {outcome.status} in {outcome.seconds:.1f} s{where} ({text})"


# --------------------------------------------------------------------------- Dask


class DaskMapper:
    """The recipe's per-IFU ``mapper`` on a Dask cluster: one task per IFU, results in order.

    Called inside a Dask task (a set), it secedes from the worker's thread pool while it
    waits, so the waiting set holds no thread the IFU tasks need, and rejoins afterwards.
    Usable directly too: ``recipe.run(sof, settings, out, mapper=DaskMapper(client))``.
    """

    def __init__(self, client, label: str = "set", priority: int = 1):
        self.client = client
        self.label = label
        self.priority = priority

    def __call__(self, function: Callable, items: Iterable[int]) -> Iterator:
        items = list(items)
        token = uuid.uuid4().hex[:8]
        keys = [f"musetwilight-ifu-{self.label}-{item:02d}-{token}" for item in items]
        futures = self.client.map(function, items, key=keys, pure=False, priority=self.priority)
        return self._results(futures)

    def _results(self, futures) -> Iterator:
        from distributed import rejoin, secede

        waiting = deque(futures)
        seceded = _in_dask_task()
        if seceded:
            secede()
        try:
            while waiting:
                future = waiting.popleft()
                result = future.result()
                future.release()  # the caller holds the result: do not pin a second copy on the cluster
                yield result
        finally:
            if waiting:
                self.client.cancel(list(waiting))
            if seceded:
                rejoin()


def _in_dask_task() -> bool:
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def _dask_set_task(job: SetJob, settings: Settings, distribute_ifus: bool) -> SetOutcome:
    """One set, run on a Dask worker."""
    from distributed import get_client, get_worker

    mapper = DaskMapper(get_client(), job.name) if distribute_ifus else None
    outcome = reduce_set(job, settings, mapper=mapper)
    outcome.worker = get_worker().address
    return outcome


def _run_on_dask(client, jobs: Sequence[SetJob], settings: Settings, distribute_ifus: bool,
                 max_in_flight: int | None, no_worker_timeout: float = NO_WORKER_TIMEOUT_S) -> Iterator[SetOutcome]:
    """Submit the sets (a bounded number at a time) and yield their outcomes as they finish.

    A set whose workers died more often than Dask retries it fails (KilledWorker); when the
    cluster has had no worker at all for ``no_worker_timeout`` seconds the sets still
    pending fail too, instead of waiting for ever.
    """
    from distributed import wait

    if not jobs:
        return
    limit = max_in_flight or max(1, sum(client.nthreads().values()))
    token = uuid.uuid4().hex[:8]
    pending = iter(jobs)
    in_flight: dict[str, tuple[SetJob, float, object]] = {}

    def submit(job: SetJob) -> None:
        future = client.submit(_dask_set_task, job, settings, distribute_ifus, pure=False,
                               key=f"musetwilight-set-{job.name}-{token}")
        in_flight[future.key] = (job, time.perf_counter(), future)

    def failed(job: SetJob, submitted: float, error: str) -> SetOutcome:
        return SetOutcome(job.name, str(job.sof), str(job.output_dir), "failed",
                          seconds=time.perf_counter() - submitted, error=error)

    for job in islice(pending, limit):
        submit(job)
    no_workers_since: float | None = None
    try:
        while in_flight:
            try:
                done = wait([future for _, _, future in in_flight.values()], timeout=WATCH_S,
                            return_when="FIRST_COMPLETED").done
            except TimeoutError:
                done = set()
            if not done:
                if client.scheduler_info().get("workers"):
                    no_workers_since = None
                    continue
                no_workers_since = no_workers_since or time.monotonic()
                if time.monotonic() - no_workers_since < no_worker_timeout:
                    continue
                lost = list(in_flight.values()) + [(job, time.perf_counter(), None) for job in pending]
                in_flight.clear()
                client.cancel([future for _, _, future in lost if future is not None])
                for job, submitted, _ in lost:
                    yield failed(job, submitted, f"NoWorkers: the Dask cluster has had no worker for "
                                                 f"{no_worker_timeout:.0f} s")
                return
            for future in done:
                job, submitted, _ = in_flight.pop(future.key)
                try:
                    outcome = future.result()
                except Exception as err:  # noqa: BLE001 - e.g. a worker died: the set failed, the batch goes on
                    outcome = failed(job, submitted, f"{type(err).__name__}: {err}")
                future.release()
                following = next(pending, None)
                if following is not None:
                    submit(following)
                yield outcome
    finally:
        if in_flight:
            client.cancel([future for _, _, future in in_flight.values()])


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
                processes: bool = True, log_level: int | None = None, **cluster_options):
    """A ``distributed.Client``: connected to ``scheduler`` or to a new LocalCluster of ``workers``.

    The local cluster (if any) is closed on exit; its workers, restarted by their nannies
    when they die, are never retired for having died (LOCAL_LOST_WORKER_TIMEOUT).
    ``log_level`` sets Dask's own loggers.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise ImportError(DASK_HINT) from err
    if log_level is not None:
        logging.getLogger("distributed").setLevel(log_level)
        cluster_options.setdefault("silence_logs", log_level)
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    import dask

    with dask.config.set({"distributed.deploy.lost-worker-timeout": LOCAL_LOST_WORKER_TIMEOUT}), \
            LocalCluster(n_workers=workers or 1, threads_per_worker=threads_per_worker, processes=processes,
                         **cluster_options) as cluster, Client(cluster) as client:
        yield client
