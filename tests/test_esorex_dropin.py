"""musetwilight-esorex's option semantics, in-process and side by side with the real esorex 3.13.6
(exit statuses, messages, product names and signatures, products SOF layouts, config files)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits
from dropin import REAL_ESOREX, dropin_bin, env_with_path

from musetwilight.shells import esorex

NOTES_LIBS = "Libraries used: "


def run(argv, env=None, cwd=None):
    """``main`` in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        status = esorex.main(argv, {"HOME": "/nonexistent", "PATH": "/usr/bin", **(env or {})}, out, err)
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def test_double_format_as_esorex():
    assert [esorex.esorex_double(v) for v in (30.0, 5000.0, 250.0, 0.02, 5432.1, 1.2345e-05, 1e6)] == [
        "30.0", "5e+03", "250.0", "0.02", "5432.1", "1.2345e-05", "1e+06"]


def test_formed_output_dir_as_esorex():
    cwd = "/w/x1"
    assert [esorex.formed_dir(d, cwd) for d in (".", "./od", "../x1/od", "od/", "od//", "/abs/od/")] == [
        "/w/x1", "/w/x1/od", "/w/x1/../x1/od", "od", "od/", "/abs/od"]


def test_global_option_errors_and_bare_flags(tmp_path):
    status, out, err = run(["--foo", "muse_twilight", "x.sof"])
    assert status == 255 and out.startswith(esorex.BANNER) and NOTES_LIBS in out
    assert err.splitlines() == ["[ ERROR ] esorex: Command line parameter '--foo' not recognized",
                                "[ ERROR ] esorex: Unable to continue parsing command line options"]
    status, _, err = run(["--out=x", "muse_twilight"])  # ambiguous: output-dir, output-prefix, output-readonly
    assert status == 255 and "'--out=x' not recognized" in err
    status, _, err = run(["--no-checksum=yes", "muse_twilight"])
    assert status == 255 and "CPL error 'Type mismatch' occurred during the processing of the option " \
                             "'--no-checksum'" in err
    status, _, err = run(["--output-dir=missing", "muse_twilight", "x.sof"], cwd=tmp_path)
    assert status == 255 and "The argument to '--output-dir' [missing] is not a valid directory" in err
    status, out, _ = run(["--params", "-no-check", "--output-d=.", "--log-level=debug", "muse_twilight",
                          "--lambdami=5500", "--scale"])
    assert status == 0
    assert "  no-checksum           : TRUE\n" in out and "  log-level             : debug\n" in out
    assert "  lambdamin             : 5.5e+03\n" in out and "  scale                 : TRUE\n" in out


def test_recipe_option_errors(tmp_path):
    status, out, err = run(["muse_twilight", "--lambdamin=abc", "x.sof"], cwd=tmp_path)
    assert status == 255 and "CPL error 'Type mismatch' occurred during the processing of the option " \
                             "'--lambdamin'" in err
    assert "Check that the supplied value is of a suitable type" in out
    status, _, err = run(["muse_twilight", "--resample=foo"], cwd=tmp_path)
    assert status == 255 and "'Input data do not match'" in err
    status, _, err = run(["muse_twilight", "--bogus=1"], cwd=tmp_path)
    assert status == 255 and "Command line parameter '--bogus=1' not recognized" in err
    assert "Invocation command line was: esorex muse_twilight --bogus=1" in (tmp_path / "esorex.log").read_text()
    status, _, err = run(["muse_twilight", "nonexist.sof"], cwd=tmp_path)
    assert status == 9 and "Unable to open SOF file 'nonexist.sof'" in err
    rc = tmp_path / "bad.rc"
    rc.write_text("muse.muse_twilight.bogus=1\n")
    assert run([f"--recipe-config={rc}", "muse_twilight"], cwd=tmp_path)[0] == 250
    rc.write_text("no equals sign\n")
    assert run([f"--recipe-config={rc}", "muse_twilight"], cwd=tmp_path)[0] == 254
    status, _, err = run(["muse_twilight"], cwd=tmp_path)
    assert status == 255 and "No valid raw tag(s) found!" in err and "failed, status = -1" in err


def test_other_recipes_go_to_the_real_esorex_or_get_its_error(tmp_path):
    status, out, err = run(["muse_bias"], env={"PATH": str(tmp_path)})
    assert status == 13 and "Unable to find recipe 'muse_bias'" in err
    if not Path(REAL_ESOREX).exists():
        pytest.skip("ESO's esorex is not installed: delegation not checked")
    bin_dir = dropin_bin(tmp_path / "bin")
    done = subprocess.run(["esorex", "--help", "muse_bias"], capture_output=True, text=True,
                          env=env_with_path(bin_dir))
    assert done.returncode == 0 and "Recipe: muse_bias -- Combine several separate bias images" in done.stdout


def test_config_layering_and_create_config(tmp_path):
    home = tmp_path / "home"
    (home / ".esorex").mkdir(parents=True)
    (home / ".esorex" / "esorex.rc").write_text("esorex.caller.output-prefix=homep\nesorex.caller.time=TRUE\n")
    (home / ".esorex" / "muse_twilight.rc").write_text("muse.muse_twilight.lambdamin=5100\n"
                                                       "muse.muse_twilight.xorder=3\n")
    cfg = tmp_path / "my.rc"
    cfg.write_text("esorex.caller.output-prefix=cfgp\nesorex.caller.log-dir=/tmp\n")
    rc = tmp_path / "r.rc"
    rc.write_text("muse.muse_twilight.lambdamin=5200\n")
    env = {"HOME": str(home), "ESOREX_OUTPUT_PREFIX": "envp"}
    _, out, _ = run([f"--config={cfg}", f"--recipe-config={rc}", "--params", "muse_twilight", "--lambdamin=5300"],
                    env=env)
    assert "  output-prefix         : envp\n" in out and "  log-dir               : /tmp\n" in out
    assert "  lambdamin             : 5.3e+03\n" in out and "  xorder                : 3\n" in out
    _, out, _ = run([f"--config={cfg}", "--params", "muse_twilight"], env={"HOME": str(home)})
    assert "  output-prefix         : cfgp\n" in out and "  time                  : TRUE\n" in out
    assert "  lambdamin             : 5.1e+03\n" in out
    target = tmp_path / "new.rc"
    target.write_text("old\n")
    status, out, _ = run([f"--create-config={target}", "muse_twilight", "--lambdamin=5500"], env={"HOME": str(home)},
                         cwd=tmp_path)
    assert status == 0 and (tmp_path / "new.rc.bak").read_text() == "old\n"
    text = target.read_text()
    assert text.startswith(f"# File: {target}\n#\n# Note: This configuration file has been automatically\n")
    assert "\n# --combine\n# Type of combination to use. <average | median | minmax | sigclip>\n" \
           "muse.muse_twilight.combine=sigclip\n" in text
    assert "muse.muse_twilight.lambdamin=5.5e+03\n" in text and "muse.muse_twilight.scale=FALSE\n" in text
    assert text.endswith("=22\n\n#\n# End of file\n") and text.count("muse.muse_twilight.") == 24
    status, _, _ = run([f"--create-config={tmp_path / 'c.json'}", "muse_twilight"], cwd=tmp_path)
    entries = json.loads((tmp_path / "c.json").read_text())
    assert [e["display_name"] for e in entries][:2] == ["overscan", "ovscreject"] and len(entries) == 24
    combine = next(e for e in entries if e["display_name"] == "combine")
    assert combine["partype"] == "enum" and combine["valenum"] == ["average", "median", "minmax", "sigclip"]
    assert next(e for e in entries if e["display_name"] == "ovscsigma")["value"] == 30


def test_run_product_options_in_process(simulated_set, tmp_path):
    """--no-checksum/--no-datamd5 combinations, prefix, --output-readonly, products SOF text layout,
    --suppress-link=FALSE, --log-level=off."""
    sim = simulated_set()
    (tmp_path / "od").mkdir()
    status, out, err = run(["--suppress-prefix=FALSE", "--output-prefix=pre", "--output-dir=od",
                            "--products-sof=p.sof", "--no-checksum", "--no-datamd5", "--output-readonly",
                            "--suppress-link=FALSE", f"--link-dir={tmp_path}", "--time", "--log-level=off",
                            "muse_twilight", str(sim.sof)], cwd=tmp_path)
    assert status == 0, err
    assert (tmp_path / "p.sof").read_bytes() == b"od/pre_0000.fits     DATACUBE_SKYFLAT\nod/pre_0001.fits     " \
                                                b"TWILIGHT_CUBE"
    assert "Created product od/pre_0000.fits\n" in out and "2 products created" in out
    assert "Calculating product checksums" not in out and "Recipe operation(s) took" in out
    assert "Total size of 3 raw input frames  = " in out and "MB/sec \n" in out
    for name, catg in (("pre_0000.fits", "DATACUBE_SKYFLAT"), ("pre_0001.fits", "TWILIGHT_CUBE")):
        path = tmp_path / "od" / name
        assert path.stat().st_mode & 0o777 == 0o444
        assert os.readlink(tmp_path / name) == f"od/{name}"
        with fits.open(path) as hdul:
            assert hdul[0].header["DATAMD5"] == "Not computed" and hdul[0].header["PIPEFILE"] == f"{catg}.fits"
            assert not any("CHECKSUM" in h.header or "DATASUM" in h.header for h in hdul)
    assert not (tmp_path / "esorex.log").exists()
    status, out, _ = run(["--no-datamd5", "--output-dir=od", "muse_twilight", str(sim.sof)], cwd=tmp_path)
    assert status == 0 and "Created product od/DATACUBE_SKYFLAT.fits" in out
    with fits.open(tmp_path / "od" / "DATACUBE_SKYFLAT.fits") as hdul:
        assert "DATAMD5" not in hdul[0].header and all("CHECKSUM" in h.header for h in hdul)


@pytest.mark.eso
@pytest.mark.parametrize("argv", [
    ["--version"], ["--foo", "muse_twilight"], ["--no-checksum=yes", "muse_twilight"], ["--output-dir=nodir",
    "muse_twilight"], ["muse_twilight", "--lambdamin=abc"], ["muse_twilight", "--resample=foo"],
    ["muse_twilight", "--bogus=1"], ["muse_twilight", "nonexist.sof"], ["muse_twilight"],
    ["--log-dir=nodir", "muse_twilight"], ["--recipe-config=nofile.rc", "muse_twilight"]])
def test_exit_status_and_streams_as_esorex(argv, tmp_path):
    """The same exit status as esorex, the same error lines (times aside) on stderr only."""
    results = {}
    for side, exe in (("eso", REAL_ESOREX), ("ours", str(dropin_bin(tmp_path / "bin") / "esorex"))):
        folder = tmp_path / side
        folder.mkdir()
        results[side] = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=folder,
                                       env=env_with_path(tmp_path / "bin", HOME=str(tmp_path)))
    eso, ours = results["eso"], results["ours"]
    assert ours.returncode == eso.returncode
    assert ours.stdout.splitlines()[:2] == eso.stdout.splitlines()[:2]

    def errors(text):
        return [line[9:] if line[:2].isdigit() else line for line in text.splitlines()
                if "[ ERROR ]" in line and "muse_twilight:" not in line and "Dumping" not in line]
    if argv != ["muse_twilight"]:
        assert errors(ours.stderr) == errors(eso.stderr)
    else:
        assert "No valid raw tag(s) found!" in ours.stderr and "No valid raw tag(s) found!" in eso.stderr
        assert errors(ours.stderr)[-1] == errors(eso.stderr)[-1]
    assert ("[ ERROR ]" in ours.stdout) is False


@pytest.mark.eso
@pytest.mark.parametrize("flags", [[], ["--no-checksum"], ["--no-datamd5"], ["--no-checksum", "--no-datamd5"],
                                   ["--suppress-prefix=FALSE", "--products-sof=p.json"],
                                   ["--output-dir=./od", "--suppress-prefix=FALSE", "--output-prefix=pre.x",
                                    "--products-sof=p.sof"]])
def test_product_signatures_names_and_products_sof_as_esorex(flags, simulated_set, tmp_path):
    sim = simulated_set()
    runs = {}
    for side, exe in (("eso", REAL_ESOREX), ("ours", str(dropin_bin(tmp_path / "bin") / "esorex"))):
        folder = tmp_path / side
        (folder / "od").mkdir(parents=True)
        done = subprocess.run([exe, *flags, "muse_twilight", str(sim.sof)], capture_output=True, text=True,
                              cwd=folder, env=env_with_path(tmp_path / "bin"))
        assert done.returncode == 0, done.stderr[-2000:]
        runs[side] = folder
    eso, ours = runs["eso"], runs["ours"]
    names = sorted(str(p.relative_to(eso)) for p in eso.rglob("*.fits"))
    assert names == sorted(str(p.relative_to(ours)) for p in ours.rglob("*.fits")) and len(names) == 2
    for name in names:
        with fits.open(eso / name) as a, fits.open(ours / name) as b:
            for ha, hb in zip(a, b):
                for key in ("CHECKSUM", "DATASUM", "PIPEFILE"):
                    assert (key in ha.header) == (key in hb.header), (name, key)
            assert ("DATAMD5" in a[0].header) == ("DATAMD5" in b[0].header)
            assert a[0].header["PIPEFILE"] == b[0].header["PIPEFILE"]
            if a[0].header.get("DATAMD5") in ("Not computed", None):
                assert b[0].header.get("DATAMD5") == a[0].header.get("DATAMD5")
    for listing in ("p.json", "p.sof"):
        if (eso / listing).exists():
            assert (ours / listing).read_text() == (eso / listing).read_text().replace(
                str(eso), str(ours)).replace(str(eso).replace("/", "\\/"), str(ours).replace("/", "\\/"))


def test_readme_lists_every_esorex_option():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for option in esorex.OPTIONS:
        assert f"| `--{option.name}` | {option.env or '-'} | {option.here} |" in readme, option.name


@pytest.mark.eso
@pytest.mark.parametrize("argv", [["--help", "muse_twilight"], ["--help", "--show-hidden", "muse_twilight"],
                                  ["--params", "--no-checksum", "muse_twilight", "--lambdamin=5432.1"]])
def test_help_and_params_texts_as_esorex(argv, tmp_path):
    """The texts are EsoRex's (its plugin-directory warning aside)."""
    texts = {}
    for side, exe in (("eso", REAL_ESOREX), ("ours", str(dropin_bin(tmp_path / "bin") / "esorex"))):
        done = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=tmp_path,
                              env=env_with_path(tmp_path / "bin", HOME=str(tmp_path)))
        assert done.returncode == 0
        texts[side] = [line for line in done.stdout.splitlines() if "Unable to open directory" not in line]
    assert texts["ours"] == texts["eso"]


@pytest.mark.eso
def test_create_config_files_as_esorex(tmp_path):
    """--create-config=x.rc and x.json for muse_twilight: EsoRex's files (name and date lines aside)."""
    files = {}
    for side, exe in (("eso", REAL_ESOREX), ("ours", str(dropin_bin(tmp_path / "bin") / "esorex"))):
        for suffix in ("rc", "json"):
            target = tmp_path / f"{side}.{suffix}"
            done = subprocess.run([exe, f"--create-config={target}", "muse_twilight", "--lambdamin=5432.1",
                                   "--scale"], capture_output=True, text=True, cwd=tmp_path,
                                  env=env_with_path(tmp_path / "bin", HOME=str(tmp_path)))
            assert done.returncode == 0 and f"Creating configuration file '{target}'" in done.stdout
            files[side, suffix] = [line for line in target.read_text().splitlines(keepends=True)
                                   if not line.startswith(("# File: ", "# Date: "))]
    assert files["ours", "rc"] == files["eso", "rc"]
    assert files["ours", "json"] == files["eso", "json"]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_taskset_affinity_limits_the_workers(simulated_set, tmp_path):
    """``taskset -c 0 esorex ...`` (as likwid-pin pins): one worker, as ESO's OpenMP team of one."""
    sim = simulated_set()
    bin_dir = dropin_bin(tmp_path / "bin")
    done = subprocess.run(["taskset", "-c", "0", "esorex", "muse_twilight", str(sim.sof)], capture_output=True,
                          text=True, cwd=tmp_path, env=env_with_path(bin_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "esorex.log").read_text()
    assert "2 products created" in log and "[tid=001]" not in log
