"""Memory caps: the budget a run may use (explicit cap, cgroup, ulimit, Dask worker), the plan
that fits it (fewer IFUs at once, tables on disk, smaller tiles) or a refusal before any work,
and products that do not depend on the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from astropy.io import fits

from musetwilight import memory, recipe
from musetwilight.errors import MemoryLimitError, ParameterError
from musetwilight.memory import MARGIN, MemoryBudget, MemoryNeeds, plan_memory

SRC = str(Path(__file__).parents[1] / "src")
FULL = MemoryNeeds(pixels=4112 * 4096, exposures=3, table_rows=(12_000_000,) * 24, cube_voxels=17 * 300 * 300,
                   base=130 << 20)
GB = 10**9


@pytest.fixture(scope="module")
def six_ifus(simulated_set):
    return simulated_set(seed=11, ifus=[1, 2, 3, 4, 5, 6])


def _md5s(result) -> dict[str, str]:
    return {tag: fits.getval(path, "DATAMD5") for tag, path in result.paths.items()}


def test_sizes_parse_as_dask_writes_them():
    assert memory.parse_size("4G") == 4 * GB
    assert memory.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert memory.parse_size("800 MB") == 800 * 10**6
    assert memory.parse_size("2kib") == 2048
    assert memory.parse_size("123") == 123
    assert memory.parse_size(5e8) == 500_000_000
    for bad in ("abc", "-1G", "0", "4X", "5i", ""):
        with pytest.raises(ParameterError, match="memory size"):
            memory.parse_size(bad)


def _estimates(plan, needs):
    return (needs.ifu_stage(plan.workers, plan.low_memory), needs.resample_stage(plan.rows_per_tile),
            needs.smooth_stage())


@pytest.mark.parametrize("gigabytes", [8, 3, 2.5, 2, 1.8, 1.6])
def test_plan_keeps_as_much_of_what_was_asked_as_fits(gigabytes):
    budget = MemoryBudget(int(gigabytes * GB), "test")
    plan = plan_memory(FULL, budget, 2, True, 8_000_000)
    assert all(e * MARGIN <= budget.limit for e in _estimates(plan, FULL))
    assert plan.estimate == max(_estimates(plan, FULL))
    # nothing given up that would have fitted: one more worker or a twice larger tile does not fit
    if plan.workers < 2:
        assert FULL.ifu_stage(plan.workers + 1, True) * MARGIN > budget.limit
    if plan.rows_per_tile < 8_000_000:
        assert FULL.resample_stage(plan.rows_per_tile * 2) * MARGIN > budget.limit
    unlimited = plan_memory(FULL, None, 2, True, 8_000_000)
    assert (unlimited.workers, unlimited.low_memory, unlimited.rows_per_tile) == (2, True, 8_000_000)


def test_less_memory_never_gives_more_workers_or_larger_tiles():
    plans = [plan_memory(FULL, MemoryBudget(int(g * GB), "test"), 4, True, 8_000_000)
             for g in (6, 4, 3, 2.4, 2, 1.8, 1.6, 1.55)]
    assert [p.workers for p in plans] == sorted((p.workers for p in plans), reverse=True)
    assert [p.rows_per_tile for p in plans] == sorted((p.rows_per_tile for p in plans), reverse=True)
    assert plans[0].workers == 4 and plans[-1].workers == 1 and plans[-1].rows_per_tile < 8_000_000


def test_too_little_memory_is_refused_with_what_is_needed():
    with pytest.raises(MemoryLimitError) as info:
        plan_memory(FULL, MemoryBudget(GB, "cgroup memory.max of /sys/fs/cgroup/x"), 2, True, 8_000_000)
    least = max(FULL.ifu_stage(1, True), FULL.resample_stage(memory.MIN_ROWS_PER_TILE), FULL.smooth_stage())
    assert str(info.value) == (f"not enough memory for this set: about {memory.space.format_bytes(least * MARGIN)} "
                               "needed even reducing one IFU at a time with the IFU tables on disk, 1.0 GB available "
                               "(cgroup memory.max of /sys/fs/cgroup/x)")
    assert isinstance(info.value, MemoryError)


def test_tables_go_to_disk_when_only_that_fits():
    in_memory = max(FULL.ifu_stage(1, False), FULL.resample_stage(None))
    budget = MemoryBudget(int(2.2 * GB), "test")
    assert in_memory * MARGIN > budget.limit
    plan = plan_memory(FULL, budget, 2, False, 8_000_000, flexible_path=True)
    assert plan.low_memory and plan.rows_per_tile is not None
    with pytest.raises(MemoryLimitError):  # the in-memory path asked for explicitly is kept, or refused
        plan_memory(FULL, budget, 2, False, 8_000_000, flexible_path=False)


def test_cgroup_limits_are_read_less_what_others_hold(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/jobs/job7\n")
    (tmp_path / "fs" / "jobs" / "job7").mkdir(parents=True)
    (tmp_path / "fs" / "jobs" / "job7" / "memory.max").write_text("max\n")
    (tmp_path / "fs" / "jobs" / "memory.max").write_text("4000000000\n")
    (tmp_path / "fs" / "jobs" / "memory.stat").write_text("anon 1500000000\nfile 900000000\n")
    budget = memory.cgroup_budget(500_000_000, proc, tmp_path / "fs")
    assert budget == MemoryBudget(3_000_000_000, f"cgroup memory.max of {tmp_path / 'fs' / 'jobs'}")
    proc.write_text("12:pids:/\n4:memory:/batch/slot3\n0::/\n")
    v1 = tmp_path / "fs" / "memory" / "batch" / "slot3"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert memory.cgroup_budget(0, proc, tmp_path / "fs") is None
    (v1 / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory.stat").write_text("cache 5\nrss 7\ntotal_rss 800000000\n")
    assert memory.cgroup_budget(300_000_000, proc, tmp_path / "fs") == MemoryBudget(
        1_500_000_000, f"cgroup memory.limit_in_bytes of {v1}")


def test_explicit_cap_and_variable_are_budgets():
    assert memory.memory_budget(123_000_000, {}) == MemoryBudget(123_000_000, "--max-memory")
    assert memory.memory_budget(None, {memory.MEMORY_ENV: "0.2G"}) == MemoryBudget(200_000_000,
                                                                                  "$MUSETWILIGHT_MAX_MEMORY")
    assert memory.memory_budget(150_000_000, {memory.MEMORY_ENV: "0.1G"}).source == "--max-memory"


def test_cap_forces_the_low_memory_path_and_products_stay_identical(six_ifus, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "process_memory", lambda: {"rss": 200 << 20})  # a fixed base: exact estimates
    free = recipe.run(six_ifus.sof, None, tmp_path / "free", low_memory=None, workers=2)
    assert free.memory.low_memory is False and free.memory.workers == 2  # mini CCDs: tables in memory
    settings = recipe.make_settings()
    inputs = recipe.read_inputs(six_ifus.sof, settings)
    needs = memory.run_needs(inputs, settings, recipe.present_ifus(inputs), 200 << 20)
    low = max(needs.ifu_stage(2, True), needs.resample_stage(recipe.ROWS_PER_TILE), needs.smooth_stage())
    high = max(needs.ifu_stage(2, False), needs.resample_stage(None), needs.smooth_stage())
    assert high > low
    cap = int((low + high) / 2 * MARGIN)
    capped = recipe.run(six_ifus.sof, None, tmp_path / "capped", workers=2, max_memory=cap)
    assert capped.memory.low_memory is True and capped.memory.workers == 2
    assert capped.memory.budget == MemoryBudget(cap, "--max-memory")
    assert _md5s(capped) == _md5s(free)
    # (fewer IFUs at once and smaller tiles bind only at full size, where resampling no longer
    # dominates: the plan tests above; bit-identical products for any workers and tile size:
    # test_determinism.py and test_fluxscale.py's tiled resampling)


def test_estimate_bounds_the_measured_peak(six_ifus):
    recipe.run(six_ifus.sof, None, None)  # kernels compiled and loaded: the base is what stays
    result = recipe.run(six_ifus.sof, None, None, low_memory=True)
    measured = max(stage["peak_rss_mb"] for name, stage in result.stages.items() if name != "inputs") * 2**20
    assert measured <= result.memory.estimate


def test_refused_before_any_work_and_nothing_written(six_ifus, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "musetwilight", "run", "--max-memory=50M", f"--output-dir={out}",
                           str(six_ifus.sof)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 1
    assert "not enough memory for this set: about " in done.stderr
    assert "needed even reducing one IFU at a time with the IFU tables on disk, 50.0 MB available (--max-memory)" \
        in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
    done = subprocess.run([sys.executable, "-m", "musetwilight", "run", f"--output-dir={out}", str(six_ifus.sof)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, memory.MEMORY_ENV: "60MB"})
    assert done.returncode == 1 and "60.0 MB available ($MUSETWILIGHT_MAX_MEMORY)" in done.stderr
    assert not out.exists()


UNDER_ULIMIT = textwrap.dedent("""
    import json, resource, sys
    from musetwilight import memory, recipe
    from musetwilight.errors import MemoryLimitError
    headroom = int(sys.argv[2])
    vsize = memory.process_memory()["vsize"]
    resource.setrlimit(resource.RLIMIT_AS, (vsize + headroom, resource.RLIM_INFINITY))
    try:
        result = recipe.run(sys.argv[1], None, sys.argv[3])
    except MemoryLimitError as err:
        print(json.dumps({"refused": str(err)}))
    else:
        print(json.dumps({"plan": result.memory.describe(), "source": result.memory.budget.source,
                          "paths": {tag: str(path) for tag, path in result.paths.items()}}))
""")


def test_under_ulimit_v_the_run_fits_or_is_refused_at_once(six_ifus, tmp_path):
    """A real address-space limit (ulimit -v): a little room is refused with our message (not a
    MemoryError from deep inside NumPy), enough room reduces the set to the same products."""
    script = tmp_path / "under_ulimit.py"
    script.write_text(UNDER_ULIMIT)
    env = {**os.environ, "PYTHONPATH": SRC, "NUMBA_NUM_THREADS": "2"}

    def under(headroom: int, out: Path) -> dict:
        done = subprocess.run([sys.executable, str(script), str(six_ifus.sof), str(headroom), str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    tight = under(40 << 20, tmp_path / "tight")
    assert "available (address-space limit (ulimit -v))" in tight["refused"]
    assert not (tmp_path / "tight").exists()
    roomy = under(3 << 30, tmp_path / "roomy")
    assert roomy["source"] == "address-space limit (ulimit -v)"
    reference = recipe.run(six_ifus.sof, None, tmp_path / "reference")
    assert {tag: fits.getval(path, "DATAMD5") for tag, path in roomy["paths"].items()} == _md5s(reference)


def test_a_dask_workers_memory_limit_is_the_budget_inside_it():
    distributed = pytest.importorskip("distributed", reason="dask.distributed is an optional extra (.[dask])")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="1.5GB",
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        budget = client.submit(memory.memory_budget, None, {}).result(timeout=120)
    assert budget.limit == int(1.5e9 * memory.DASK_TERMINATE)
    assert budget.source.startswith("Dask worker tcp://") and budget.source.endswith(" memory limit")


def test_the_esorex_entry_point_takes_the_cap_from_the_environment(six_ifus, tmp_path):
    entry = "import sys; from musetwilight.shells.esorex import entry_point; sys.argv[0] = \"esorex\"; entry_point()"
    done = subprocess.run([sys.executable, "-c", entry, f"--output-dir={tmp_path}",
                           "muse_twilight", str(six_ifus.sof)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": SRC, memory.MEMORY_ENV: "70M"})
    assert done.returncode == 255  # EsoRex's status of a failed recipe
    assert "70.0 MB available ($MUSETWILIGHT_MAX_MEMORY)" in done.stdout + done.stderr
    assert not list(tmp_path.glob("*.fits"))
