"""What a user sees on the console and in the log file (issue 16): absent IFUs in one line,
progress over the IFUs present, a status line that never runs into the log lines,
verbosity options after the subcommand and independent of the log file, no silent
abbreviations, EsoRex's --create-config=TRUE, a failing --report only a warning, help
texts with their defaults."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from musetwilight.params import config_text
from musetwilight.shells import cli


@pytest.fixture(scope="module")
def mini(simulated_set):
    return simulated_set(seed=1)


def _musetwilight(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musetwilight", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_absent_ifus_are_one_line_and_progress_counts_the_ifus_present(mini, tmp_path):
    done = _musetwilight("run", f"--output-dir={tmp_path}", mini.sof)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert sum("not in this set" in line for line in lines) == 1
    assert any(line.endswith("[   INFO] musetwilight.recipe: IFUs 4-24 not in this set") for line in lines)
    assert "Calibrations could not be loaded" not in done.stderr and "[WARNING]" not in done.stderr
    progress = re.findall(r"IFU +(\d+) reduced \((\d+)/(\d+)\)", done.stderr)
    assert progress == [("1", "1", "3"), ("2", "2", "3"), ("3", "3", "3")]  # counted over the IFUs present
    assert "IFUs: reduced 1-3; absent (not in the set) 4-24\n" in done.stdout


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list[str]:
    """What a terminal shows for ``text`` (carriage return, erase to end of line, newline)."""
    lines, column = [""], 0
    for token in re.findall(r"\r|\n|\x1b\[K|[^\r\n\x1b]+", text):
        if token == "\r":
            column = 0
        elif token == "\n":
            lines.append("")
            column = 0
        elif token == "\x1b[K":
            lines[-1] = lines[-1][:column]
        else:
            lines[-1] = lines[-1][:column] + token + lines[-1][column + len(token):]
            column += len(token)
    return lines


def test_status_line_never_runs_into_log_lines():
    stream = _Terminal()
    console = cli.Console(stream)
    console.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    progress, other = logging.getLogger(cli.PROGRESS_LOGGER), logging.getLogger("musetwilight.recipe")
    for logger in (progress, other):
        logger.addHandler(console)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        progress.info("[    0.4 s] IFU  1 reduced (1/3)")
        other.warning("Basic processing failed for IFU  2: broken")
        progress.info("[    0.8 s] IFU  3 reduced (3/3)")
        other.info("a long message")
        console.finish()
    finally:
        for logger in (progress, other):
            logger.removeHandler(console)
            logger.propagate = True
    assert _screen(stream.getvalue()) == ["[WARNING] Basic processing failed for IFU  2: broken",
                                          "[INFO] a long message",
                                          "[    0.8 s] IFU  3 reduced (3/3)", ""]


def test_not_a_terminal_gets_progress_as_lines():
    stream = io.StringIO()
    console = cli.Console(stream)
    record = logging.LogRecord(cli.PROGRESS_LOGGER, logging.INFO, __file__, 1, "[ 0.1 s] IFU 1 reduced (1/1)",
                               None, None)
    console.emit(record)
    console.finish()
    assert stream.getvalue() == "[ 0.1 s] IFU 1 reduced (1/1)\n"


@pytest.mark.slow
def test_verbosity_after_the_subcommand_and_a_log_file_of_its_own(mini, tmp_path):
    log_file = tmp_path / "run.log"
    quiet = _musetwilight("run", "-q", f"--log-file={log_file}", "--log-level=debug", f"--output-dir={tmp_path}",
                          mini.sof)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert not re.search(r"\[ +(INFO|DEBUG)\]", quiet.stderr)  # -q: warnings and errors only
    logged = log_file.read_text()
    assert re.search(r"\[  DEBUG\] musetwilight.recipe: parameters: --overscan=vpoly ", logged)
    assert re.search(r"\[  DEBUG\] musetwilight.recipe: IFU 2: pixel table of \d+ rows", logged)
    assert "[   INFO] musetwilight.progress: [" in logged and "IFUs 4-24 not in this set" in logged
    verbose = _musetwilight("run", "-v", f"--log-file={log_file}", "--log-level=warning",
                            f"--output-dir={tmp_path}", mini.sof)
    assert "[  DEBUG] musetwilight.recipe: parameters:" in verbose.stderr
    assert log_file.read_text() == logged + ""  # appended nothing: no warning in this run
    assert "[  DEBUG]" not in _musetwilight("-v", "run", "-q", f"--output-dir={tmp_path}", mini.sof).stderr
    assert not re.search(r"\[ +(INFO|DEBUG)\]", _musetwilight("run", "--msg-level=warning", f"--output-dir={tmp_path}",
                                                                 mini.sof).stderr)
    assert "parameters:" in _musetwilight("--msg-level=debug", "run", f"--output-dir={tmp_path}", mini.sof).stderr


@pytest.mark.parametrize("option, hint", [("--resamp=nearest", "--resamp: did you mean --resample?"),
                                          ("--overscn=vpoly", "--overscn: did you mean --overscan?"),
                                          ("--output=x", "--output: did you mean --output-dir?")])
def test_abbreviations_are_refused_and_typos_get_a_suggestion(capsys, option, hint):
    with pytest.raises(SystemExit) as stop:
        cli.main(["run", option, "set.sof"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {option} ({hint})" in err


def test_create_config_true_writes_where_esorex_does(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--create-config=TRUE", "--xorder=3"]) == 0
    written = home / ".esorex" / "muse_twilight.rc"
    assert f"wrote {written}" in capsys.readouterr().out
    assert "muse.muse_twilight.xorder=3\n" in written.read_text()
    assert not (tmp_path / "TRUE").exists()
    assert cli.main(["run", "--create-config=mine.rc"]) == 0
    assert (tmp_path / "mine.rc").read_text() == config_text()


@pytest.mark.eso
def test_create_config_true_matches_esorex(tmp_path, eso_installation, monkeypatch):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for home in (ours, theirs):
        home.mkdir()
    subprocess.run([eso_installation, "--create-config=TRUE", "muse_twilight"], check=True, capture_output=True,
                   cwd=tmp_path, env={"HOME": str(theirs), "PATH": "/usr/bin:/bin"}, timeout=60)
    monkeypatch.setenv("HOME", str(ours))
    assert cli.main(["run", "--create-config=TRUE"]) == 0

    def settings(home: Path) -> list[str]:
        text = (home / ".esorex" / "muse_twilight.rc").read_text()
        return [line for line in text.splitlines() if line.startswith("muse.muse_twilight.")]
    assert settings(ours) == settings(theirs) and len(settings(ours)) == 24


def test_failing_report_after_the_products_is_a_warning(mini, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = _musetwilight("run", f"--output-dir={tmp_path / 'out'}", f"--report={blocker / 'qa'}", mini.sof)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"QA report not written (the products are): {blocker / 'qa'}: file exists" in done.stderr or \
        f"QA report not written (the products are): {blocker / 'qa'}: not a directory" in done.stderr
    assert "DATACUBE_SKYFLAT: " in done.stdout and "QA report:" not in done.stdout
    assert (tmp_path / "out" / "TWILIGHT_CUBE.fits").is_file()


@pytest.mark.parametrize("command, expected", [
    ("simulate", ["random seed [0]", "number of SKYFLAT exposures [3]", "mini (tests) or full (real size) [mini]",
                  "instrument mode [WFM-NOAO-N]"]),
    ("demo", ["output directory [musetwilight-demo]", "random seed of the simulation [1]",
              "size of the simulated set [mini]", "[OUT/report]"]),
    ("run", ["where products are written [.]", "--resample", "[drizzle]", "[$MUSETWILIGHT_SCRATCH_DIR, else $TMPDIR]"]),
])
def test_help_shows_the_defaults(capsys, command, expected):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in expected:
        assert fragment in text, fragment
