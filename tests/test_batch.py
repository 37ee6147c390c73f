"""Batch reduction: many sets, a failing one reported, and a Dask cluster giving the serial products."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from musetwilight.errors import ParameterError
from musetwilight.io.frames import write_sof
from musetwilight.io.products import PRODUCT_TAGS
from musetwilight.params import PARAMETERS, make_settings
from musetwilight.shells import batch, cli

SETS = {"alpha": {"seed": 1}, "beta": {"seed": 2, "illum": True}}
SETTINGS = make_settings({"crsigma": 40.0})
# written anew by every run: the product date, the checksum (its comment carries the time)
VOLATILE = {"DATE", "CHECKSUM"}


@pytest.fixture(scope="module")
def sofs(simulated_set, tmp_path_factory):
    """Two mini sets under distinct SOF names, then one whose SKYFLAT does not exist."""
    folder = tmp_path_factory.mktemp("batch_sofs")
    paths = []
    for name, options in SETS.items():
        frames = [line.split() for line in simulated_set(**options).sof.read_text().splitlines() if line.strip()]
        paths.append(write_sof(folder / f"{name}.sof", frames))
    paths.append(write_sof(folder / "broken.sof", [(folder / f"missing_{i}.fits", "SKYFLAT") for i in range(3)]
                           + [(p, t) for p, t in frames if t != "SKYFLAT"]))
    return paths


@pytest.fixture(scope="module")
def serial(sofs, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_serial")
    messages = []
    return root, batch.run_batch(sofs, SETTINGS, root, progress=messages.append), messages


@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install 'musetwilight[dask]')")
    with batch.dask_client(workers=2, threads_per_worker=1, dashboard_address=None) as client:
        client.wait_for_workers(2)
        yield client


@pytest.fixture(scope="module")
def distributed_run(sofs, dask_client, tmp_path_factory):
    from distributed import get_task_stream

    root = tmp_path_factory.mktemp("batch_dask")
    with get_task_stream(dask_client) as stream:
        report = batch.run_batch(sofs, SETTINGS, root, client=dask_client)
    return root, report, stream.data


def _cards(header):
    """Header cards that must agree between two runs (DATASUM's comment holds the time of writing)."""
    return [(c.keyword, c.value, "" if c.keyword == "DATASUM" else c.comment)
            for c in header.cards if c.keyword not in VOLATILE]


def _param_value(header, name):
    index = [p.name for p in PARAMETERS].index(name) + 1
    assert header[f"ESO PRO REC1 PARAM{index} NAME"] == name
    return header[f"ESO PRO REC1 PARAM{index} VALUE"]


def test_serial_batch_reduces_every_set_and_reports_the_failing_one(serial, sofs):
    root, report, messages = serial
    assert [o.name for o in report.outcomes] == ["alpha", "beta", "broken"]
    assert [o.status for o in report.outcomes] == ["ok", "ok", "failed"]
    assert report.exit_status == 1 and [o.name for o in report.failed] == ["broken"]
    broken = report.outcomes[2]
    assert "missing_0.fits" in broken.error and broken.error.startswith("InputError")
    assert "Traceback" in broken.details
    for name in SETS:
        for product in PRODUCT_TAGS:
            path = root / name / f"{product}.fits"
            header = fits.getheader(path)
            assert header["ESO PRO CATG"] == product
            assert float(_param_value(header, "crsigma")) == 40.0
    assert report.outcomes[0].skipped_ifus == list(range(4, 25))
    assert not (root / "broken").exists() or not any((root / "broken").glob("*.fits"))
    lines = report.summary().splitlines()
    assert lines[1].endswith("/alpha (IFUs absent 4-24)")
    assert lines[3].split()[:2] == ["broken", "failed"] and "missing_0.fits" in lines[3]
    assert lines[-1].startswith("3 sets: 2 reduced, 0 already done, 1 failed")
    assert any(m.startswith("alpha: IFU  1 reduced") for m in messages)
    assert sum("failed in" in m for m in messages) == 1


def test_serial_batch_does_not_import_dask(sofs, tmp_path):
    code = ("import sys; from musetwilight.shells import batch; "
            f"report = batch.run_batch([{str(sofs[2])!r}], None, {str(tmp_path)!r}); "
            "assert report.outcomes[0].status == 'failed', report.outcomes; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_settings_survive_pickling_for_the_workers():
    settings = make_settings({"crsigma": 40.0, "resample": "nearest", "lambdamin": 5500})
    restored = pickle.loads(pickle.dumps(settings))
    assert dict(restored) == dict(settings)
    assert restored.crsigma == 40.0 and restored.resample == "nearest"


def test_plan_names_each_set_after_its_path_below_the_common_root(tmp_path):
    nights, out = tmp_path / "nights", tmp_path / "out"
    jobs = batch.plan_jobs([nights / "2024-03-01" / "twilight.sof", nights / "2024-03-02" / "twilight.sof",
                            nights / "2024-03-02" / "late.sof"], out)
    assert [job.name for job in jobs] == ["2024-03-01/twilight", "2024-03-02/twilight", "2024-03-02/late"]
    assert jobs[0].output_dir == (out / "2024-03-01" / "twilight").resolve()
    assert [job.name for job in batch.plan_jobs([tmp_path / "a.sof", tmp_path / "b.sof"], out)] == ["a", "b"]
    assert batch.plan_jobs([tmp_path / "a" / "night.sof"], out)[0].output_dir == (out / "night").resolve()
    with pytest.raises(ParameterError, match="night.sof is given twice"):
        batch.plan_jobs([tmp_path / "night.sof", tmp_path / "night.sof"], out)
    with pytest.raises(ParameterError, match=r"night.SOF would both be reduced into .*/out/night"):
        batch.plan_jobs([tmp_path / "night.sof", tmp_path / "night.SOF"], out)


@pytest.fixture(scope="module")
def nights(simulated_set, tmp_path_factory):
    """The two good sets laid out one directory per night, each SOF named twilight.sof."""
    root = tmp_path_factory.mktemp("nights")
    paths = []
    for night, options in zip(("2024-03-01", "2024-03-02"), SETS.values()):
        (root / night).mkdir()
        frames = [line.split() for line in simulated_set(**options).sof.read_text().splitlines() if line.strip()]
        paths.append(write_sof(root / night / "twilight.sof", frames))
    return paths


def test_same_named_sofs_one_directory_per_night_on_dask(nights, serial, dask_client, tmp_path, capsys):
    serial_root, _, _ = serial
    root = tmp_path / "reduced"
    report = batch.run_batch(nights, SETTINGS, root, client=dask_client)
    assert [(o.name, o.status) for o in report.outcomes] == [("2024-03-01/twilight", "ok"),
                                                             ("2024-03-02/twilight", "ok")]
    for night, name in zip(("2024-03-01", "2024-03-02"), SETS):
        for product in PRODUCT_TAGS:
            assert fits.getheader(root / night / "twilight" / f"{product}.fits")["DATAMD5"] == \
                fits.getheader(serial_root / name / f"{product}.fits")["DATAMD5"]
    assert report.summary().splitlines()[1].startswith("2024-03-01/twilight  ok")
    summary = tmp_path / "summary.json"
    assert cli.main(["batch", *map(str, nights), "--output-root", str(root), "--resume", "--crsigma", "40",
                     "--summary-json", str(summary)]) == 0
    assert "2 sets: 0 reduced, 2 already done, 0 failed" in capsys.readouterr().out
    stored = json.loads(summary.read_text())["sets"]
    assert [(s["name"], s["status"]) for s in stored] == [("2024-03-01/twilight", "skipped"),
                                                          ("2024-03-02/twilight", "skipped")]


def test_dask_batch_reports_like_the_serial_one(serial, distributed_run):
    _, serial_report, _ = serial
    _, report, _ = distributed_run
    assert [(o.name, o.status, o.error) for o in report.outcomes] == \
        [(o.name, o.status, o.error) for o in serial_report.outcomes]
    assert report.exit_status == 1
    assert all(o.worker and o.worker.startswith("tcp://") for o in report.outcomes)


def test_dask_products_are_bit_identical_to_the_serial_ones(serial, distributed_run):
    serial_root, _, _ = serial
    dask_root, _, _ = distributed_run
    for name in SETS:
        for product in PRODUCT_TAGS:
            with fits.open(serial_root / name / f"{product}.fits") as ours, \
                    fits.open(dask_root / name / f"{product}.fits") as theirs:
                assert [h.name for h in ours] == [h.name for h in theirs]
                for a, b in zip(ours, theirs):
                    if a.data is None:
                        assert b.data is None
                    else:
                        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
                        assert a.data.tobytes() == b.data.tobytes(), (name, product, a.name)
                    assert _cards(a.header) == _cards(b.header), (name, product, a.name)
                assert len(ours[0].header["DATAMD5"]) == 32
                assert ours[0].header["DATAMD5"] == theirs[0].header["DATAMD5"]
                assert np.isfinite(ours["DATA"].data).any()


def test_dask_spreads_sets_and_their_ifus_over_both_workers(distributed_run, dask_client):
    _, report, tasks = distributed_run
    workers = set(dask_client.nthreads())
    set_tasks = [t for t in tasks if t["key"].startswith("musetwilight-set-")]
    ifu_tasks = [t for t in tasks if t["key"].startswith("musetwilight-ifu-")]
    assert len(set_tasks) == 3
    for name in SETS:
        mine = [t for t in ifu_tasks if t["key"].startswith(f"musetwilight-ifu-{name}-")]
        assert sorted(int(t["key"].rsplit("-", 2)[1]) for t in mine) == [1, 2, 3]  # the IFUs of the set only
    assert {t["worker"] for t in ifu_tasks} == workers
    assert not any(t["key"].startswith("musetwilight-ifu-broken-") for t in ifu_tasks)


def test_dask_without_ifu_tasks_keeps_each_set_in_one_task(serial, sofs, dask_client, tmp_path):
    from distributed import get_task_stream

    with get_task_stream(dask_client) as stream:
        report = batch.run_batch(sofs[:1], SETTINGS, tmp_path, client=dask_client, distribute_ifus=False)
    assert [o.status for o in report.outcomes] == ["ok"]
    assert [t["key"].split("-")[1] for t in stream.data] == ["set"]
    serial_root, _, _ = serial
    for product in PRODUCT_TAGS:
        assert fits.getheader(tmp_path / "alpha" / f"{product}.fits")["DATAMD5"] == \
            fits.getheader(serial_root / "alpha" / f"{product}.fits")["DATAMD5"]


def test_cli_resumes_finished_sets_and_fails_on_the_broken_one(serial, sofs, tmp_path, capsys):
    root, _, _ = serial
    summary = tmp_path / "summary.json"
    argv = ["batch", *map(str, sofs), "--output-root", str(root), "--resume", "--crsigma", "40",
            "--summary-json", str(summary)]
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*.fits")}
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "3 sets: 0 reduced, 2 already done, 1 failed" in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/*.fits")} == before
    stored = json.loads(summary.read_text())
    assert [s["status"] for s in stored["sets"]] == ["skipped", "skipped", "failed"]
    assert Path(stored["sets"][0]["output_dir"]) == (root / "alpha").resolve()
    assert cli.main(["batch", str(sofs[0]), "--output-root", str(root), "--resume"]) == 0
