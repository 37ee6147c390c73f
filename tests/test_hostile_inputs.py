"""Hostile or unusual inputs (issue 17.5): headers announcing more data than the file or the
memory holds are refused before anything is allocated; an SOF under a path with spaces,
file names with non-ASCII characters, symbolic links and inputs on a read-only file
system all work (SOF entries themselves cannot hold spaces, as in EsoRex)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from astropy.io import fits

from musetwilight import recipe
from musetwilight.errors import InputError
from musetwilight.io import formats
from musetwilight.tools import eso

BLOCK = 2880


@pytest.fixture(scope="module")
def mini(simulated_set):
    return simulated_set(seed=1)


@pytest.fixture(scope="module")
def reference(mini, tmp_path_factory):
    """DATAMD5 of the mini set's products."""
    result = recipe.run(mini.sof, None, tmp_path_factory.mktemp("reference"))
    return {tag: fits.getval(path, "DATAMD5") for tag, path in result.paths.items()}


def _frames(sim) -> list[tuple[Path, str]]:
    return [(Path(path), tag) for path, tag in (line.rsplit(" ", 1) for line in sim.sof.read_text().splitlines())]


def _sof(path: Path, frames) -> Path:
    path.write_text("".join(f"{file} {tag}\n" for file, tag in frames))
    return path


def _card(key: str, value) -> bytes:
    return f"{key:<8}= {value!s:>20}".ljust(80).encode()


def _header(cards: list[bytes]) -> bytes:
    text = b"".join(cards) + b"END".ljust(80)
    return text.ljust(-(-len(text) // BLOCK) * BLOCK)


def _huge_raw(path: Path, naxis1: int, naxis2: int, sparse_data: bool) -> Path:
    """A raw exposure whose CHAN01 extension announces a naxis1 x naxis2 16-bit image; with
    ``sparse_data`` the file (sparse, nothing on disk) is as long as the header says."""
    primary = _header([_card("SIMPLE", "T"), _card("BITPIX", 8), _card("NAXIS", 0), _card("EXTEND", "T")])
    extension = _header([_card("XTENSION", "'IMAGE   '"), _card("BITPIX", 16), _card("NAXIS", 2),
                         _card("NAXIS1", naxis1), _card("NAXIS2", naxis2), _card("PCOUNT", 0), _card("GCOUNT", 1),
                         _card("EXTNAME", "'CHAN01  '")])
    with open(path, "wb") as handle:
        handle.write(primary + extension + b"\0" * BLOCK)
        if sparse_data:
            handle.truncate(len(primary) + len(extension) - (-2 * naxis1 * naxis2 // BLOCK) * BLOCK)
    return path


_LIMITED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), resource.RLIM_INFINITY))
    from musetwilight import recipe
    from musetwilight.errors import InputError
    try:
        recipe.run(sys.argv[1], None, None)
    except InputError as err:
        print(err)
        sys.exit(3)
""")


def test_header_announcing_more_than_the_file_holds(mini, tmp_path):
    """A 1.5 MB file whose CHAN01 claims 10^10 pixels: refused by a run limited to 3 GB of memory."""
    frames = _frames(mini)
    huge = _huge_raw(tmp_path / "SKYFLAT_huge.fits", 100_000, 100_000, sparse_data=False)
    frames[0] = (huge, "SKYFLAT")
    sof = _sof(tmp_path / "huge.sof", frames)
    done = subprocess.run([sys.executable, "-c", _LIMITED, str(sof), str(3 * 2 ** 30)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout.strip() == (f"SKYFLAT {huge}: truncated FITS file: HDU 1 needs 20000005760 bytes, "
                                   "the file has only 8640")  # 2 header blocks + 2e10 bytes


def test_header_announcing_more_than_the_memory_holds(mini, tmp_path):
    """A sparse file as long as its header says (2 TB): refused before anything is read or allocated."""
    try:
        huge = _huge_raw(tmp_path / "SKYFLAT_sparse.fits", 1_000_000, 1_000_000, sparse_data=True)
    except OSError as err:
        pytest.skip(f"this file system cannot hold a sparse 2 TB file: {err}")
    try:
        memory = formats.physical_memory() / 1e9
        message = (f"{huge}: HDU 1 announces 1000000 x 1000000 values of BITPIX 16 (2000.0 GB), more than the "
                   f"{memory:.1f} GB of memory of this machine")
        with pytest.raises(InputError) as info:
            formats.read_raw_ifu(huge, 1)
        assert str(info.value) == message
        frames = _frames(mini)
        frames[0] = (huge, "SKYFLAT")
        with pytest.raises(InputError) as info:
            recipe.run(_sof(tmp_path / "sparse.sof", frames), None, tmp_path / "out")
        assert str(info.value) == f"SKYFLAT {message}"
        assert not (tmp_path / "out").exists()
    finally:
        huge.unlink()


def test_spaces_non_ascii_names_and_symbolic_links(mini, reference, tmp_path, monkeypatch):
    folder = tmp_path / "my data" / "données"
    folder.mkdir(parents=True)
    frames = []
    for number, (path, tag) in enumerate(_frames(mini)):
        if number == 0:
            target = folder / "SKYFLÂT_0001.fits"  # a non-ASCII file name
            shutil.copy(path, target)
        elif number == 1:
            target = folder / "sky_link.fits"  # a symbolic link to the simulated file
            target.symlink_to(path)
        else:
            target = folder / path.name
            shutil.copy(path, target)
        frames.append((target.relative_to(tmp_path / "my data"), tag))  # relative: no spaces in the entries
    sof = _sof(tmp_path / "my data" / "twilight set.sof", frames)
    out = tmp_path / "out put"
    # relative entries are relative to the current directory, as in EsoRex
    done = subprocess.run([sys.executable, "-m", "musetwilight", "run", f"--output-dir={out}", str(sof)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path / "my data")
    assert done.returncode == 0, done.stderr[-2000:]
    header = fits.getheader(out / "DATACUBE_SKYFLAT.fits")
    assert header["ESO PRO REC1 RAW1 NAME"] == "SKYFL  T_0001.fits"  # as CFITSIO and ESO write it
    assert header["ESO PRO REC1 RAW2 NAME"] == "sky_link.fits"
    assert {tag: fits.getval(out / f"{tag}.fits", "DATAMD5") for tag in reference} == reference
    linked = tmp_path / "my data" / "linked.sof"  # the SOF itself a symbolic link
    linked.symlink_to(sof)
    monkeypatch.chdir(tmp_path / "my data")
    assert recipe.run(linked, None, None).twilight_cube[0].header["ESO PRO REC1 RAW1 NAME"] == "SKYFL  T_0001.fits"


@pytest.mark.eso
def test_non_ascii_file_name_recorded_as_eso_records_it(mini, eso_installation, tmp_path):
    frames = _frames(mini)
    renamed = tmp_path / "SKYFLÂT_0001.fits"
    shutil.copy(frames[0][0], renamed)
    frames[0] = (renamed, "SKYFLAT")
    sof = _sof(tmp_path / "non_ascii.sof", frames)
    theirs = eso.run_esorex("muse_twilight", sof, tmp_path / "eso")
    assert theirs.returncode == 0, theirs.errors
    ours = recipe.run(sof, None, tmp_path / "ours").paths
    for tag, path in ours.items():
        assert fits.getval(path, "ESO PRO REC1 RAW1 NAME") == fits.getval(theirs.product(f"{tag}.fits"),
                                                                          "ESO PRO REC1 RAW1 NAME")


def test_inputs_on_a_read_only_file_system(mini, reference, tmp_path, small_filesystem):
    mount = small_filesystem("20M")
    frames = []
    for path, tag in _frames(mini):
        shutil.copy(path, mount / path.name)
        frames.append((mount / path.name, tag))
    sof = _sof(mount / "twilight.sof", frames)
    small_filesystem.read_only(mount)
    with pytest.raises(OSError):
        (mount / "probe").write_text("x")
    result = recipe.run(sof, None, tmp_path / "out", low_memory=True)
    assert {tag: fits.getval(path, "DATAMD5") for tag, path in result.paths.items()} == reference
