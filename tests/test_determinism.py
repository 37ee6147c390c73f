"""Determinism across environments (issue 17.6): the products are bit-identical whatever the
number of OpenMP and Numba threads, the IFUs reduced at once (--workers) and whether the
low-memory path (IFU tables in scratch space, banded resampling) is used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from astropy.io import fits

from musetwilight.io.products import PRODUCT_TAGS

# the vignetting, dark and bad-pixel set of test_report / test_recipe: most code paths
OPTIONS = {"seed": 4, "vignetting": True, "dark": True, "badpix": True}
RUN = ("import sys; from musetwilight import recipe; "
       "recipe.run(sys.argv[1], None, sys.argv[2], workers=int(sys.argv[3]), low_memory=sys.argv[4] == 'low')")
CASES = {  # name: (threads, --workers, path)
    "one thread, one IFU at a time": (1, 1, "normal"),
    "3 threads, 3 IFUs at a time": (3, 3, "normal"),
    "low memory, one thread": (1, 1, "low"),
    "low memory, 3 threads, 2 IFUs at a time": (3, 2, "low"),
}
VOLATILE = {"DATE", "CHECKSUM"}  # written anew by every run (DATASUM's comment holds the time)


def _run(sof, out, threads: int, workers: int, path: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", RUN, str(sof), str(out), str(workers), path], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _content(directory):
    """Every HDU's data bytes and header cards (the volatile ones aside) of both products."""
    content = {}
    for tag in PRODUCT_TAGS:
        with fits.open(directory / f"{tag}.fits") as hdul:
            for hdu in hdul:
                cards = [(c.keyword, c.value, "" if c.keyword == "DATASUM" else c.comment) for c in hdu.header.cards
                         if c.keyword not in VOLATILE]
                content[(tag, hdu.name)] = (None if hdu.data is None else hdu.data.tobytes(), cards)
    return content


@pytest.mark.slow
def test_products_bit_identical_across_threads_workers_and_memory_paths(simulated_set, tmp_path):
    sof = simulated_set(**OPTIONS).sof
    results = {}
    for name, (threads, workers, path) in CASES.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        _run(sof, out, threads, workers, path)
        results[name] = _content(out)
    cli = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "musetwilight", "-q", "run", "--workers=2", f"--output-dir={cli}",
                           str(sof)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results["command line, default threads"] = _content(cli)
    first, *others = results
    assert len(results[first]) >= 10  # both products' HDUs, the vignetting extensions included
    for name in others:
        assert results[name].keys() == results[first].keys(), name
        for key, (data, cards) in results[first].items():
            assert results[name][key][0] == data, (name, key)
            assert results[name][key][1] == cards, (name, key)
