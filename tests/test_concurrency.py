"""The output directory (issues 16 and 17.3): checked before any work with errors that are
sentences, held by one run at a time (never a mix of two runs' products), a clear message
for the run that finds it taken, scratch space shared without collisions, and the record
that tells a complete set from a partial one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from astropy.io import fits

from musetwilight import recipe
from musetwilight.errors import BusyError, OutputError
from musetwilight.io import outdir, products
from musetwilight.shells import cli

TAGS = ("DATACUBE_SKYFLAT", "TWILIGHT_CUBE")


@pytest.fixture(scope="module")
def sets(simulated_set):
    """Two different mini sets."""
    return simulated_set(seed=1), simulated_set(seed=2, illum=True)


@pytest.fixture(scope="module")
def references(sets, tmp_path_factory):
    """DATAMD5 of both products of each set, from runs of their own."""
    digests = []
    for number, sim in enumerate(sets):
        result = recipe.run(sim.sof, None, tmp_path_factory.mktemp(f"reference{number}"))
        digests.append(tuple(fits.getval(result.paths[tag], "DATAMD5") for tag in TAGS))
    assert digests[0] != digests[1]
    return digests


def _digests(directory):
    return tuple(fits.getval(directory / f"{tag}.fits", "DATAMD5") for tag in TAGS)


def _listing(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


class _Paused:
    """A progress callback that holds its run at the resampling stage until released."""

    def __init__(self):
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self, message):
        if message.startswith("resampling"):
            self.reached.set()
            assert self.go.wait(120)


def test_second_run_into_a_held_directory_fails_at_once_and_the_first_completes(sets, references, tmp_path):
    out = tmp_path / "out"
    pause, outcome = _Paused(), {}

    def first():
        outcome["result"] = recipe.run(sets[0].sof, None, out, progress=pause)
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert pause.reached.wait(120)
        stages = []
        with pytest.raises(BusyError) as info:
            recipe.run(sets[1].sof, None, out, progress=stages.append)
        assert stages == []  # refused before any work
        assert str(info.value).startswith(f"{out}: another musetwilight run (process {os.getpid()} on ")
        assert str(info.value).endswith("is writing into this output directory; wait for it to finish or choose "
                                        "another output directory")
    finally:
        pause.go.set()
        thread.join(120)
    assert sorted(outcome["result"].paths) == list(TAGS)
    assert _digests(out) == references[0]
    assert products.complete_set(out) is not None
    assert _listing(out) == [products.RECORD_NAME, *(f"{tag}.fits" for tag in TAGS)]  # lock removed


def test_cli_names_the_process_holding_the_directory(sets, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={out}", str(sets[0].sof)]
    with outdir.claim(out):
        held = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert held.returncode == 1
    assert f"another musetwilight run (process {os.getpid()} on " in held.stderr and "Traceback" not in held.stderr
    assert _listing(out) == []
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0


def test_simultaneous_runs_of_two_sets_leave_one_whole_set(sets, references, tmp_path):
    """Four runs (two per set) started together: each wins or loses cleanly, and the products are one run's."""
    out = tmp_path / "out"
    runs = [subprocess.Popen([sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={out}",
                              str(sets[number % 2].sof)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for number in range(4)]
    finished = [(run.returncode, *run.communicate(timeout=300)) for run in runs]
    statuses = [run.returncode for run in runs]
    assert 0 in statuses and set(statuses) <= {0, 1}, finished
    for (_, _, err), run in zip(finished, runs):
        if run.returncode == 1:
            assert "is writing into this output directory" in err, err
    assert products.complete_set(out) is not None
    assert _digests(out) in references  # both products from the same run
    assert _listing(out) == [products.RECORD_NAME, *(f"{tag}.fits" for tag in TAGS)]


def test_two_sets_sharing_one_scratch_directory_do_not_collide(sets, references, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    both = threading.Barrier(2, timeout=120)
    seen, errors = [], []

    def at_resampling(message):
        if message.startswith("resampling"):
            both.wait()  # both runs have their tables in scratch now
            seen.append(sorted(p.name for p in scratch.iterdir()))
            both.wait()

    def reduce(number):
        try:
            recipe.run(sets[number].sof, None, tmp_path / f"out{number}", low_memory=True, scratch_dir=scratch,
                       progress=at_resampling, workers=1)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=reduce, args=(number,)) for number in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == []
    assert len(seen) == 2 and len(seen[0]) == 2 and seen[0] == seen[1]  # two private directories at once
    assert [_digests(tmp_path / f"out{number}") for number in (0, 1)] == references
    assert _listing(scratch) == []


# --------------------------------------------------------------------------- checked before any work


def test_output_directory_problems_are_sentences_before_any_work(sets, tmp_path, small_filesystem):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    read_only = small_filesystem("1M")
    small_filesystem.read_only(read_only)
    cases = {a_file: f"{a_file}: cannot be the output directory: a file of that name exists",
             a_file / "out": f"{a_file / 'out'}: cannot create the output directory: not a directory",
             read_only / "out": f"{read_only / 'out'}: cannot create the output directory: read-only file system",
             read_only: f"{read_only}: cannot write into the output directory: read-only file system"}
    for target, message in cases.items():
        stages = []
        with pytest.raises(OutputError) as info:
            recipe.run(sets[0].sof, None, target, progress=stages.append)
        assert str(info.value) == message and stages == []


def test_cli_path_errors_are_sentences(sets, tmp_path, small_filesystem, capsys):
    read_only = small_filesystem("1M")
    small_filesystem.read_only(read_only)
    assert cli.main(["run", f"--output-dir={read_only}", str(sets[0].sof)]) == 1
    assert cli.main(["run", f"--log-file={read_only / 'run.log'}", f"--output-dir={tmp_path}", str(sets[0].sof)]) == 1
    # after the products: a warning, and the run succeeds
    assert cli.main(["run", f"--output-dir={tmp_path}", f"--timings-json={read_only / 't.json'}",
                     str(sets[0].sof)]) == 0
    err = capsys.readouterr().err
    assert f"{read_only}: cannot write into the output directory: read-only file system" in err
    assert f"{read_only / 'run.log'}: cannot write the log file: read-only file system" in err
    assert f"timings not written (the products are): {read_only / 't.json'}: read-only file system" in err
    assert "[Errno" not in err


# --------------------------------------------------------------------------- what killed runs leave


def test_leftovers_of_a_killed_run_are_removed_by_the_next(sets, references, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    leftovers = [out / ".DATACUBE_SKYFLAT.fits.k1ll3d.tmp", out / f"{products.RECORD_NAME}.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a product")
    (out / "notes.tmp").write_text("the user's")
    recipe.run(sets[0].sof, None, out)
    assert not any(path.exists() for path in leftovers)
    assert (out / "notes.tmp").read_text() == "the user's"


def test_record_tells_a_complete_set_from_a_partial_or_damaged_one(sets, references, tmp_path):
    out = tmp_path / "out"
    recipe.run(sets[0].sof, None, out)
    found = products.complete_set(out)
    assert found == {tag: out / f"{tag}.fits" for tag in TAGS}
    assert all(products.verify_product(path) is None for path in found.values())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in _listing(out):
        (damaged / name).write_bytes((out / name).read_bytes())
    data = bytearray((damaged / "TWILIGHT_CUBE.fits").read_bytes())
    data[-100] ^= 0xFF  # one bit pattern in the last data block
    (damaged / "TWILIGHT_CUBE.fits").write_bytes(bytes(data))
    assert "Checksum verification failed" in products.verify_product(damaged / "TWILIGHT_CUBE.fits")
    assert products.complete_set(damaged) is None
    assert products.complete_set(damaged, verify=False) is not None  # sizes and DATAMD5 cards still agree
    (out / products.RECORD_NAME).unlink()  # as a run killed between its renames leaves it
    assert products.complete_set(out) is None
    recipe.run(sets[1].sof, None, out)  # a new run replaces the set whole
    assert _digests(out) == references[1] and products.complete_set(out) is not None
