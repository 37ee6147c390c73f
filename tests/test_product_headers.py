"""The products' keywords against ESO's (issue 16): the same names, FITS types and order in
every HDU, one DATE card, also for raw headers carrying keyword categories beyond the
simulator's; ``musetwilight compare`` reports any keyword-set difference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from astropy.io import fits

from musetwilight import recipe
from musetwilight.tools import compare, eso

# keyword categories of real raw headers (and some made up) in a raw primary header, in this order
EXTRA_CARDS = [("MYKEY", 1, "not an ESO keyword"), ("HIERARCH ESO OCS SGS AG FWHMX", 0.7, "x"),
               ("HIERARCH ESO ADA POSANG", 12.5, "x"), ("HIERARCH ESO GEN MOON RA", 10.25, "x"),
               ("HIERARCH ESO SEQ ARM", "blue", "x"), ("HIERARCH ESO AOS X", 3, "x"),
               ("HIERARCH ESO ZZZ A", True, "x"), ("HIERARCH ESO AAA B", 1.5, "x"),
               ("HIERARCH ESO TMP X", 1.5, "x"), ("HIERARCH ESO DEL FT", 2, "x"),
               ("HIERARCH ESO QC FOO", 1.5, "x"), ("HIERARCH ESO DRS FOO", 1.5, "x")]


def _keywords(header: fits.Header) -> list[tuple[str, str]]:
    return [(card.keyword, compare._value_type(card.value)) for card in header.cards
            if card.keyword not in compare.COMMENTARY_KEYS and not card.keyword.startswith(compare.OWN_KEY_PREFIXES)]


def _assert_same_keywords(eso_dir: Path, ours: dict[str, Path]) -> None:
    for name, path in ours.items():
        with fits.open(eso_dir / f"{name}.fits") as theirs, fits.open(path) as mine:
            assert [hdu.name for hdu in theirs] == [hdu.name for hdu in mine]
            for a, b in zip(theirs, mine):
                assert _keywords(a.header) == _keywords(b.header), (name, a.name)
    report = compare.compare_products(eso_dir, next(iter(ours.values())).parent,
                                      names=[f"{name}.fits" for name in ours])
    for comparison in report.files:
        assert [d.keyword for d in comparison.keyword_set_diffs if d.problem] == [], comparison.name
        assert comparison.keyword_order == [], comparison.name


def test_one_date_card_in_each_product(simulated_set, tmp_path):
    result = recipe.run(simulated_set(seed=1).sof, None, tmp_path)
    for path in result.paths.values():
        counts = Counter(fits.getheader(path).keys())
        assert counts["DATE"] == 1 and counts["DATAMD5"] == 1 and counts["PIPEFILE"] == 1, path


@pytest.mark.eso
def test_keywords_equal_esos(eso_twilight, simulated_set, tmp_path):
    theirs = eso_twilight({})
    assert theirs.returncode == 0, theirs.errors
    ours = recipe.run(simulated_set().sof, None, tmp_path).paths
    _assert_same_keywords(theirs.output_dir, ours)


@pytest.mark.eso
def test_keywords_equal_esos_for_richer_raw_headers(simulated_set, eso_installation, tmp_path):
    sim = simulated_set()
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for line in sim.sof.read_text().splitlines():
        path, tag = line.rsplit(" ", 1)
        copy = data / Path(path).name
        with fits.open(path) as hdul:
            if tag == "SKYFLAT":
                for card in EXTRA_CARDS:
                    hdul[0].header.insert(5, card)
                hdul[0].header["ZKEY"] = (2, "not an ESO keyword, at the end")
            hdul.writeto(copy)
        lines.append(f"{copy} {tag}\n")
    sof = data / "rich.sof"
    sof.write_text("".join(lines))
    theirs = eso.run_esorex("muse_twilight", sof, tmp_path / "eso")
    assert theirs.returncode == 0, theirs.errors
    ours = recipe.run(sof, None, tmp_path / "ours").paths
    _assert_same_keywords(theirs.output_dir, ours)
    header = fits.getheader(ours["TWILIGHT_CUBE"])
    assert header.index("ZKEY") < header.index("DATAMD5") < header.index("ESO OBS NAME") \
        < header.index("ESO GEN MOON RA") < header.index("ESO TEL AIRM START") < header.index("ESO PRO CATG") \
        < header.index("ESO OCS SGS AG FWHMX")  # as ESO orders them
