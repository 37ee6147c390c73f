"""Failing workers (issue 17.4): a Dask worker process killed in the middle of a set makes
the set be retried or reported failed, never leaves partial products, and ``--resume``
then reduces exactly the sets that are missing.  The soak test kills workers at random
while 20 mini sets are reduced, within a time bound, and prints its figures."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from astropy.io import fits

from musetwilight.io import outdir, products
from musetwilight.io.frames import write_sof
from musetwilight.shells import batch

SEEDS = (11, 12, 13, 14)  # distinct mini sets; the soak's 20 sets are 5 SOFs of each
SOAK_SETS = 20
SOAK_BOUND_S = 240.0  # the whole soak, both passes included


@pytest.fixture(scope="module")
def base_sets(simulated_set):
    return [simulated_set(seed=seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def references(base_sets, tmp_path_factory):
    """DATAMD5 of both products of each base set, reduced serially."""
    root = tmp_path_factory.mktemp("worker_references")
    report = batch.run_batch([sim.sof for sim in base_sets], None, root)
    assert [o.status for o in report.outcomes] == ["ok"] * len(base_sets)
    return [{tag: fits.getval(path, "DATAMD5") for tag, path in products.complete_set(Path(o.output_dir)).items()}
            for o in report.outcomes]


def _sofs(base_sets, directory: Path, count: int) -> list[Path]:
    """``count`` SOFs, one directory each (``set07/twilight.sof``), cycling over the base sets."""
    sofs = []
    for number in range(count):
        frames = [line.rsplit(" ", 1) for line in base_sets[number % len(base_sets)].sof.read_text().splitlines()]
        (directory / f"set{number:02d}").mkdir(parents=True)
        sofs.append(write_sof(directory / f"set{number:02d}" / "twilight.sof", frames))
    return sofs


def _state(output_dir: Path) -> str:
    """'complete' (a verified set of one run), 'empty' (no product, no temporary file, no lock) or 'partial'."""
    names = sorted(p.name for p in output_dir.iterdir()) if output_dir.exists() else []
    if products.complete_set(output_dir) is not None and names == sorted(
            [products.RECORD_NAME, *(f"{tag}.fits" for tag in products.PRODUCT_TAGS)]):
        return "complete"
    return "empty" if not names else "partial"


class Killer(threading.Thread):
    """Kills (SIGKILL) a worker that is busy with a musetwilight task, at random moments."""

    def __init__(self, client, rng: random.Random, pause=(0.3, 1.5), limit: int | None = None):
        super().__init__(daemon=True)
        self.client, self.rng, self.pause, self.limit = client, rng, pause, limit
        self.stop = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.pause)):
            if self.limit is not None and self.kills >= self.limit:
                return
            try:
                busy = sorted(w for w, keys in self.client.processing().items()
                              if any(str(k).startswith("musetwilight-") for k in keys))
                if not busy:
                    continue
                target = self.rng.choice(busy)
                pid = self.client.run(os.getpid, workers=[target], wait=True)[target]
            except Exception:  # noqa: BLE001 - the worker went away meanwhile: try again later
                continue
            os.kill(pid, signal.SIGKILL)
            self.kills += 1


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install 'musetwilight[dask]')")
    with batch.dask_client(workers=2, threads_per_worker=1, dashboard_address=":0") as client:
        client.wait_for_workers(2, timeout=120)
        yield client


def test_worker_killed_in_the_middle_of_a_set_retries_it(base_sets, references, cluster, tmp_path):
    sofs = _sofs(base_sets, tmp_path / "sofs", 2)
    killer = Killer(cluster, random.Random(5), pause=(0.05, 0.1), limit=1)
    killer.start()
    try:
        report = batch.run_batch(sofs, None, tmp_path / "out", client=cluster, distribute_ifus=False)
    finally:
        killer.stop.set()
        killer.join(30)
    cluster.wait_for_workers(2, timeout=120)
    assert killer.kills == 1
    assert [o.status for o in report.outcomes] == ["ok", "ok"]  # the killed set ran again elsewhere
    for number, outcome in enumerate(report.outcomes):
        assert _state(Path(outcome.output_dir)) == "complete"
        assert {tag: fits.getval(path, "DATAMD5") for tag, path in outcome.paths.items()} == references[number]


def test_set_failing_on_every_worker_leaves_nothing_and_resume_completes_it(base_sets, references, tmp_path):
    """With no retries allowed, a killed set is reported failed with its directory empty."""
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import dask

    sofs = _sofs(base_sets, tmp_path / "sofs", 2)
    root = tmp_path / "out"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            batch.dask_client(workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        client.wait_for_workers(1, timeout=120)
        killer = Killer(client, random.Random(7), pause=(0.05, 0.1), limit=1)
        killer.start()
        try:
            report = batch.run_batch(sofs, None, root, client=client, distribute_ifus=False)
        finally:
            killer.stop.set()
            killer.join(30)
    assert killer.kills == 1
    failed = [o for o in report.outcomes if o.status == "failed"]
    assert len(failed) == 1 and "KilledWorker" in failed[0].error
    assert _state(Path(failed[0].output_dir)) == "empty"
    resumed = batch.run_batch(sofs, None, root, resume=True)
    assert sorted(o.name for o in resumed.outcomes if o.status == "ok") == [failed[0].name]
    assert all(_state(Path(o.output_dir)) == "complete" for o in resumed.outcomes)


@pytest.mark.slow
def test_soak_random_worker_kills_then_resume(base_sets, references, cluster, tmp_path):
    """20 sets on 2 workers with a busy worker killed every 1.5-4 s; then --resume without kills."""
    start = time.monotonic()
    sofs = _sofs(base_sets, tmp_path / "nights", SOAK_SETS)
    root = tmp_path / "reduced"
    killer = Killer(cluster, random.Random(2024), pause=(1.5, 4.0))
    killer.start()
    try:
        first = batch.run_batch(sofs, None, root, client=cluster)
    finally:
        killer.stop.set()
        killer.join(30)
    cluster.wait_for_workers(2, timeout=120)
    states = {o.name: _state(Path(o.output_dir)) for o in first.outcomes}
    assert "partial" not in states.values(), states
    assert all(states[o.name] == "complete" for o in first.outcomes if o.status == "ok")
    missing = sorted(name for name, state in states.items() if state != "complete")
    resumed = batch.run_batch(sofs, None, root, client=cluster, resume=True)
    assert sorted(o.name for o in resumed.outcomes if o.status == "ok") == missing
    assert sorted(o.name for o in resumed.outcomes if o.status == "skipped") == sorted(set(states) - set(missing))
    verified = 0
    for number, outcome in enumerate(resumed.outcomes):
        found = products.complete_set(Path(outcome.output_dir))
        assert found is not None, outcome
        for tag, path in found.items():
            assert products.verify_product(path) is None
            assert fits.getval(path, "DATAMD5") == references[number % len(SEEDS)][tag]
            verified += 1
        assert not (Path(outcome.output_dir) / outdir.LOCK_NAME).exists()
    seconds = time.monotonic() - start
    figures = {"sets_submitted": len(sofs), "worker_kills_survived": killer.kills,
               "sets_reduced_first_pass": sum(o.status == "ok" for o in first.outcomes),
               "sets_failed_first_pass": sum(o.status == "failed" for o in first.outcomes),
               "sets_reduced_on_resume": len(missing), "products_verified": verified, "seconds": round(seconds, 1)}
    print("soak:", json.dumps(figures))
    assert killer.kills >= 3 and verified == 2 * SOAK_SETS
    assert seconds < SOAK_BOUND_S


def test_a_cluster_without_workers_fails_the_sets_instead_of_waiting(base_sets, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    monkeypatch.setattr(batch, "WATCH_S", 0.2)
    sofs = _sofs(base_sets, tmp_path / "sofs", 3)
    start = time.monotonic()
    with distributed.LocalCluster(n_workers=0, dashboard_address=":0") as empty, distributed.Client(empty) as client:
        report = batch.run_batch(sofs, None, tmp_path / "out", client=client, max_in_flight=1, no_worker_timeout=1.0)
    assert time.monotonic() - start < 60
    assert [o.status for o in report.outcomes] == ["failed"] * 3
    assert all(o.error == "NoWorkers: the Dask cluster has had no worker for 1 s" for o in report.outcomes)
    assert not (tmp_path / "out").exists()
