"""SOF parsing and tag validation."""

from pathlib import Path

import pytest

from musetwilight.io.frames import InputError, make_frameset, parse_sof, validate_frameset, write_sof

CALIBS = ["MASTER_BIAS", "MASTER_FLAT", "TRACE_TABLE", "WAVECAL_TABLE", "GEOMETRY_TABLE"]


def _touch_set(tmp_path, tags):
    entries = []
    for number, tag in enumerate(tags):
        path = tmp_path / f"{tag.lower()}_{number}.fits"
        path.write_bytes(b"")
        entries.append((path, tag))
    return entries


def test_parse_sof_comments_and_relative_paths(tmp_path, monkeypatch):
    """As EsoRex: relative paths against the current directory (not the SOF's folder), '#'
    only at the start of a line, the group column and further words ignored."""
    (tmp_path / "raw").mkdir()
    sof = tmp_path / "sets" / "set.sof"
    sof.parent.mkdir()
    sof.write_text("# twilight set\n  # indented comment\nraw/a.fits SKYFLAT  # first\n\n"
                   "/abs/b.fits   MASTER_BIAS CALIB extra words\n\tc.fits\tMASTER_FLAT\n")
    monkeypatch.chdir(tmp_path)
    frames = parse_sof(sof)
    assert [f.tag for f in frames] == ["SKYFLAT", "MASTER_BIAS", "MASTER_FLAT"]
    assert frames.frames[0].path == Path("raw/a.fits")
    assert frames.frames[0].path.resolve() == tmp_path / "raw" / "a.fits"
    assert str(frames.frames[1].path) == "/abs/b.fits"
    assert frames.frames[0].group == "raw" and frames.frames[1].group == "calib"


def test_parse_sof_variables_several_files_and_ignored_tags(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MYSET", "/data/set")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    one, two = tmp_path / "raw.sof", tmp_path / "cal.sof"
    one.write_text("$MYSET/a.fits SKYFLAT\n${MYSET}/b.fits SKYFLAT\n$UNSET_VAR/c.fits SKYFLAT\n"
                   "~/d.fits SKYFLAT\n")
    two.write_text("/x/e.fits STD_FLUX_TABLE\n/x/f.fits\n/x/g.fits MASTER_BIAS\n")
    frames = parse_sof([one, two], unknown_tags="ignore")
    assert [str(f.path) for f in frames] == ["/data/set/a.fits", "/data/set/b.fits", "/c.fits", "~/d.fits",
                                             "/x/g.fits"]
    assert "cal.sof, line 1: frame /x/e.fits with tag 'STD_FLUX_TABLE' ignored" in caplog.text
    assert "cal.sof, line 2: frame /x/f.fits without a tag ignored" in caplog.text
    one.write_text("$(echo /x)/a.fits SKYFLAT\n")
    with pytest.raises(InputError, match=r"raw.sof, line 1: command substitution"):
        parse_sof(one)
    fits_file = tmp_path / "a.fits"
    fits_file.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with pytest.raises(InputError, match="is a FITS file, not a set-of-frames file"):
        parse_sof(fits_file)


def test_unknown_tag_names_line_and_file(tmp_path):
    sof = tmp_path / "set.sof"
    sof.write_text("a.fits SKYFLAT\nb.fits MASTER_SKY\n")
    with pytest.raises(InputError, match=r"set.sof, line 2: unknown tag 'MASTER_SKY'"):
        parse_sof(sof)


def test_malformed_and_empty_sof(tmp_path):
    sof = tmp_path / "set.sof"
    sof.write_text("justonepath\n")
    with pytest.raises(InputError, match="line 1: expected 'path TAG'"):
        parse_sof(sof)
    sof.write_text("# nothing\n")
    with pytest.raises(InputError, match="lists no files"):
        parse_sof(sof)
    with pytest.raises(InputError, match="cannot read the set-of-frames file"):
        parse_sof(tmp_path / "missing.sof")


def test_complete_set_validates(tmp_path):
    frames = make_frameset(_touch_set(tmp_path, ["SKYFLAT"] * 3 + CALIBS + ["BADPIX_TABLE"] * 2))
    validate_frameset(frames)
    assert len(frames.paths("SKYFLAT")) == 3 and frames.single("MASTER_DARK") is None


@pytest.mark.parametrize("tags, message", [
    (["SKYFLAT"] * 2 + CALIBS, "needs at least 3 SKYFLAT frames, found 2"),
    (["SKYFLAT"] * 3 + CALIBS[1:], "needs exactly 1 MASTER_BIAS frame, found 0"),
    (["SKYFLAT"] * 3 + CALIBS + ["ILLUM", "ILLUM"], "accepts at most 1 ILLUM frame, found 2"),
    (["SKYFLAT"] * 3 + CALIBS + ["MASTER_FLAT"], "accepts at most 1 MASTER_FLAT frame, found 2"),
])
def test_counts_are_checked(tmp_path, tags, message):
    with pytest.raises(InputError, match=message):
        validate_frameset(make_frameset(_touch_set(tmp_path, tags)))


def test_missing_file_is_named(tmp_path):
    entries = _touch_set(tmp_path, ["SKYFLAT"] * 3 + CALIBS)
    entries[1][0].unlink()
    with pytest.raises(InputError, match=rf"{entries[1][0]}: SKYFLAT file does not exist"):
        validate_frameset(make_frameset(entries))


def test_write_sof_round_trip(tmp_path):
    entries = _touch_set(tmp_path, ["SKYFLAT"] * 3 + CALIBS)
    frames = parse_sof(write_sof(tmp_path / "out.sof", entries))
    assert [(f.path, f.tag) for f in frames] == entries
