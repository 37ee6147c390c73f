"""The QA report: a real report of a simulated mini run, synthetic products with a known
truth, and the page opened in headless Chromium (skipped only where Chromium is absent)."""

from __future__ import annotations

import builtins
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits

from musetwilight import recipe
from musetwilight.params import make_settings
from musetwilight.tools import report

# shared with test_recipe's "vignetting" set, so the session builds it once
OPTIONS = {"seed": 4, "vignetting": True, "dark": True, "badpix": True}
IMG_RE = re.compile(r'<img\s[^>]*src="([^"]+)"')
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--allow-file-access-from-files", "--virtual-time-budget=10000"]
# written into a copy of the page: per <img>, load state, natural size and pixel variance
IMAGE_CHECK = """
<script>
window.addEventListener('load', () => {
  const out = [];
  for (const img of document.images) {
    let variance = -1, error = '';
    try {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let s = 0, s2 = 0;
      const n = d.length / 4;
      for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2]; s += v; s2 += v * v; }
      variance = s2 / n - (s / n) * (s / n);
    } catch (e) { error = String(e); }
    out.push({src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth,
              height: img.naturalHeight, variance: variance, error: error});
  }
  const pre = document.createElement('pre');
  pre.id = 'imagecheck';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.fixture(scope="module")
def matplotlib_image():
    pytest.importorskip("matplotlib", reason="the QA report needs Matplotlib")
    import matplotlib.image

    return matplotlib.image


@pytest.fixture(scope="module")
def real_report(simulated_set, tmp_path_factory, matplotlib_image):
    """A report of our own run of a simulated mini set with WFM vignetting, and the set."""
    sim = simulated_set(**OPTIONS)
    result = recipe.run(sim.sof, make_settings(), None)
    index = report.write_report(tmp_path_factory.mktemp("report"), result.datacube_skyflat,
                                result.twilight_cube, truth=sim.truth(), title="mini <vignetting>",
                                geometry=sim.files["GEOMETRY_TABLE"][0])
    return index, sim, result


def _pngs_decode_with_content(directory, image_module):
    pngs = sorted(directory.glob("*.png"))
    for png in pngs:
        pixels = image_module.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, png
        assert float(pixels[..., :3].var()) > 1e-4, f"{png.name} is blank"
    return pngs


def test_real_report_files_and_page(real_report, matplotlib_image):
    index, sim, result = real_report
    assert index.name == "index.html" and index.is_file()
    pngs = _pngs_decode_with_content(index.parent, matplotlib_image)
    page = index.read_text()
    linked = IMG_RE.findall(page)
    assert sorted(linked) == sorted(p.name for p in pngs)  # every PNG on the page, no dangling link
    assert {"white_images.png", "residual.png", "intflux.png", "plane_means.png", "twilight_planes.png",
            "global_fit.png", "vignetting.png", "truth_throughput.png", "truth_illumination.png"} <= set(linked)
    assert not any("/" in link or ":" in link for link in linked)  # relative, self-contained

    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["reference_ifu"] == 1
    assert set(summary["intflux"]) == {str(i) for i in sim.ifus}
    keywords = [key for hdul in (result.datacube_skyflat, result.twilight_cube) for key in hdul[0].header
                if key.startswith(("ESO QC TWILIGHT", "ESO DRS MUSE FLAT FLUX"))]
    assert len(keywords) > 25 * len(sim.ifus)
    assert all(f'<td class="text">{key}</td>' in page for key in keywords)
    for ifu, flux in summary["intflux"].items():
        assert f'<td class="num">{flux:.10g}</td>' in page, ifu
    assert "<title>mini &lt;vignetting&gt;</title>" in page


def test_real_report_recovers_the_injected_truth(real_report):
    index, sim, result = real_report
    truth = sim.truth()
    summary = json.loads((index.parent / "summary.json").read_text())
    throughput = summary["throughput"]
    assert throughput["ifus"] == [i for i in sim.ifus if i != 1]
    expected = [truth["ifus"][str(i)]["throughput"] / truth["ifus"]["1"]["throughput"] for i in throughput["ifus"]]
    assert throughput["injected"] == pytest.approx(expected)
    # INTFLUX also integrates the illumination and the lamp vignetting of each footprint: a few per cent
    assert throughput["rms"] < 0.08
    illumination = summary["illumination"]
    assert "vignetting" in illumination["expected"]
    assert illumination["interior"]["n"] > 200
    assert illumination["interior"]["rms"] < 0.04  # the smooth fit follows the injected field
    assert summary["spectrum"]["rms"] < 0.02  # the plane means follow the twilight spectrum
    page = index.read_text()
    assert f"{illumination['interior']['rms']:.10g}" in page
    numbers = report.compare_with_truth(result.datacube_skyflat, result.twilight_cube, sim.truth_path)
    assert numbers == {key: summary[key] for key in ("throughput", "illumination", "spectrum")}


def _panels(png):
    """The panels a report PNG describes in its metadata (see report._Plotter)."""
    from PIL import Image

    with Image.open(png) as image:
        return json.loads(image.text["Panels"])


def test_every_panel_has_data_labelled_axes_a_labelled_colour_bar_and_a_clear_legend(real_report):
    index, _, _ = real_report
    pngs = sorted(index.parent.glob("*.png"))
    images = 0
    for png in pngs:
        panels = _panels(png)
        bars = {panel["panel"]: panel["label"] for panel in panels if panel["kind"] == "colorbar"}
        for panel in panels:
            if panel["kind"] in ("image", "plot"):
                assert panel["title"] and panel["xlabel"] and panel["ylabel"], (png.name, panel)
            if panel["kind"] == "image":
                images += 1
                assert panel["data_fraction"] > 0.1 and panel["data_spread"] > 0, (png.name, panel)
                assert bars.get(panel["title"]) or bars.get("TWILIGHT_CUBE planes"), (png.name, panel["title"])
                assert panel["ifu_outlines"] == 3, (png.name, panel["title"])  # IFUs 1-3 outlined
            if panel["kind"] == "plot":
                assert panel["curves"] >= 1, (png.name, panel)
            assert not panel.get("legend_overlaps_data", False), (png.name, panel)
        assert all(label for label in bars.values()), png.name
    assert images >= 15
    titles = [p["title"] for png in pngs for p in _panels(png) if p["kind"] == "image"]
    # self-contained titles: each names what it shows, none refers to another panel
    assert all(re.search(r"DATACUBE_SKYFLAT|TWILIGHT_CUBE|[Ii]njected|[Rr]ecovered", t) for t in titles), titles
    assert not any(t.lower().startswith(("same", "as ")) or "same," in t for t in titles)


def test_field_images_are_stretched_about_one_over_valid_spaxels(real_report):
    index, _, result = real_report
    white, twilight = [p for p in _panels(index.parent / "white_images.png") if p["kind"] == "image"]
    for panel in (white, twilight):
        low, high = panel["limits"]
        assert low + high == pytest.approx(2.0)  # centred on 1
    sky = result.datacube_skyflat["white"].data
    values = sky[np.isfinite(sky)] / np.nanmedian(sky)
    half = white["limits"][1] - 1
    assert half < 0.5 * np.max(np.abs(values - 1))  # the slice gaps (-40 %) do not set the stretch
    assert 0.005 < np.mean(np.abs(values - 1) > half) < 0.2  # a few spaxels (gaps, edges) saturate


def test_centred_limits_ignore_gaps():
    rng = np.random.default_rng(3)
    field = 1 + 0.01 * rng.standard_normal(10_000)
    field[:800] = 0.6  # 8 % of the spaxels in slice gaps
    low, high = report.centred_limits(field)
    assert (low + high) / 2 == pytest.approx(1.0)
    assert 0.02 < high - 1 < 0.04  # the 99th percentile of the 1 % scatter, not the 40 % gaps
    assert report.centred_limits(np.array([np.nan])) == (0.95, 1.05)
    assert report.centred_limits(np.full(10, 2.0), centre=0.0) == (-2.0, 2.0)


def test_ifu_outlines_from_the_geometry(real_report):
    _, sim, _ = real_report
    outlines = report.footprints(sim.files["GEOMETRY_TABLE"][0], [1, 3])
    assert [f.ifu for f in outlines] == [1, 3]
    first = outlines[0]
    assert len(first.stacks) == 4 and len(first.slices) == 48
    x0, x1, y0, y1 = first.box
    assert y1 - y0 == pytest.approx(12.0, abs=0.1)  # 12 slice rows of one spaxel
    assert all(x0 <= s[0] and s[1] <= x1 and y0 <= s[2] and s[3] <= y1 for s in first.slices)
    assert report.footprints(None, [1]) == []


def test_residual_and_recovered_minus_injected_inside_and_outside_the_vignetted_zone(real_report):
    index, _, _ = real_report
    summary = json.loads((index.parent / "summary.json").read_text())
    residual = summary["residual"]
    assert 0.002 < residual["rms"] < 0.05 and len(residual["rms_per_plane"]) == 17
    difference = summary["illumination"]["difference"]
    inside, outside = difference["vignetted"], difference["unvignetted"]
    assert inside["n"] > 50 and outside["n"] > 500
    assert inside["rms"] < 0.06 and outside["rms"] < 0.04
    page = index.read_text()
    assert f"{inside['rms']:.10g}" in page and f"{outside['rms']:.10g}" in page and f"{residual['rms']:.10g}" in page
    assert "recovered - injected, vignetted spaxels" in page


def test_no_empty_table_rows(real_report):
    index, _, _ = real_report
    page = index.read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    assert len(rows) > 30
    for row in rows:
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
        assert any(cell.strip() for cell in cells[1:]), row
    assert "IFUs not in the set</td><td class=\"text\">4-24</td>" in page
    for table in re.findall(r"<tbody>(.*?)</tbody>", page, re.S):
        cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
        for column in range(1, len(cells[0])):
            assert any(row[column].strip() for row in cells), table[:200]  # no column empty in every row


def test_joint_run_report_shows_the_fit_both_models_and_the_floor(simulated_set, tmp_path, matplotlib_image):
    """A --illum-model=joint run of a slice-stack family without ILLUM, as `demo` reports it: what
    the model fitted (per-IFU and per-stack terms, its components) and both models and the floor
    of an ideal model against the injected truth, in the table, the figure and summary.json."""
    sim = simulated_set(seed=4, family="stack")
    joint = recipe.run(sim.sof, None, tmp_path / "joint", workers=2, illum_model="joint")
    eso_run = recipe.run(sim.sof, make_settings(), None, skip_cube=joint.paths["DATACUBE_SKYFLAT"],
                         illum_model="eso")
    index = report.write_report(tmp_path / "report", joint.datacube_skyflat, joint.twilight_cube,
                                truth=sim.truth(), fit=joint.illumination_fit,
                                alternatives={"eso": eso_run.twilight_cube}, geometry=sim.files["GEOMETRY_TABLE"][0])
    page = index.read_text()
    assert "Joint illumination model: what it fitted" in page and "TWILIGHT_CUBE models versus the truth" in page
    linked = set(IMG_RE.findall(page))
    assert {"joint_components.png", "models_vs_truth.png"} <= linked
    _pngs_decode_with_content(index.parent, matplotlib_image)
    for ifu in sim.ifus:  # one row of per-IFU terms each, with the four stack levels
        assert re.search(rf'<tr><td class="num">{ifu}</td>(<td class="num">[^<]+</td>){{8}}</tr>', page), ifu
    summary = json.loads((index.parent / "summary.json").read_text())
    vs = summary["models_vs_truth"]
    assert list(vs) == ["joint", "eso", report.FLOOR_COLUMN]
    assert f"<th>{report.FLOOR_COLUMN}</th>" in page
    field = {name: vs[name]["field"]["rms"] for name in vs}
    assert field["joint"] < field["eso"]
    assert 0 < field[report.FLOOR_COLUMN] < field["eso"]
    assert summary["joint_fit"]["lambda_order"] == joint.illumination_fit.lambda_order


# ----------------------------------------------------------------------------------------------
# synthetic products with an exactly known truth


def _synthetic(nx=30, ny=24, nz=5, offset=(0.0, 0.0), with_vign=True, failed_vign=False):
    """DATACUBE_SKYFLAT/TWILIGHT_CUBE HDULists whose smooth field equals a given truth map."""
    crval1, crval2 = -15.0, -12.0
    y, x = np.mgrid[0:ny, 0:nx]
    xpos, ypos = crval1 + x, crval2 + y
    illum = 1.0 + 0.05 * xpos / 15 - 0.03 * ypos / 12 + 0.02 * (xpos / 15) ** 2
    lam = 5000.0 + 1000.0 * np.arange(nz)
    spectrum = (lam / 6000.0) ** -2
    cube = (spectrum[:, None, None] * illum[None] * 1000.0).astype(np.float32)
    wcs = fits.Header()
    for key, value in (("CTYPE1", "PIXEL"), ("CRPIX1", 1.0), ("CRVAL1", crval1), ("CD1_1", 1.0),
                       ("CTYPE2", "PIXEL"), ("CRPIX2", 1.0), ("CRVAL2", crval2), ("CD2_2", 1.0),
                       ("CTYPE3", "AWAV"), ("CRPIX3", 1.0), ("CRVAL3", 5000.0), ("CD3_3", 1000.0)):
        wcs[key] = value
    throughput = {1: 1.0, 2: 0.95, 3: 1.04}
    primary = fits.Header()
    primary["OBJECT"] = "synthetic"
    primary["HIERARCH ESO INS MODE"] = "WFM-NOAO-N"
    for ifu, t in throughput.items():
        primary[f"HIERARCH ESO QC TWILIGHT{ifu} MASTER MEAN"] = 100.0 * t
        primary[f"HIERARCH ESO QC TWILIGHT{ifu} INTFLUX"] = 1e9 * t
    for ifu, t in throughput.items():
        primary[f"HIERARCH ESO DRS MUSE FLAT FLUX SKY{ifu}"] = 1e9 * t
    sky = fits.HDUList([fits.PrimaryHDU(header=primary), fits.ImageHDU(cube, wcs, name="DATA"),
                        fits.ImageHDU(np.ones_like(cube), wcs, name="STAT"),
                        fits.ImageHDU(cube.mean(axis=0), name="white")])
    twi_primary = fits.Header([c for c in primary.cards if not c.keyword.startswith("ESO QC")])
    norm = (illum / illum.mean()).astype(np.float32)
    hdus = [fits.PrimaryHDU(header=twi_primary), fits.ImageHDU(np.repeat(norm[None], nz, axis=0), wcs, name="DATA"),
            fits.ImageHDU(norm, name="white_global_fit"), fits.ImageHDU(np.ones_like(norm), name="white_div_global"),
            fits.ImageHDU(np.zeros(norm.shape, np.int32), name="white_div_global_DQ")]
    if failed_vign:
        hdus.append(fits.ImageHDU(None, name="vign_fit"))
    elif with_vign:
        hdus += [fits.ImageHDU(norm, name="vign_fit"), fits.ImageHDU((x < 5).astype(np.int32), name="vign_fit_DQ"),
                 fits.ImageHDU(np.ones_like(norm), name="white_cor")]
    twi = fits.HDUList(hdus)
    # the truth on a grid shifted against the cube's (resampled by the report)
    gx0, gy0 = crval1 + offset[0], crval2 + offset[1]
    gy, gx = np.mgrid[0:ny + 2, 0:nx + 2]
    tx, ty = gx0 - 1 + gx, gy0 - 1 + gy
    truth_illum = 1.0 + 0.05 * tx / 15 - 0.03 * ty / 12 + 0.02 * (tx / 15) ** 2
    truth = {"cube_grid": {"crval1": gx0 - 1, "crval2": gy0 - 1, "cdelt": 1.0, "nx": nx + 2, "ny": ny + 2},
             "field_illumination": {"map": truth_illum.tolist()},
             "vignetting": {"model": None, "map": np.ones_like(truth_illum).tolist()},
             "twilight_spectrum": {"lambda": lam.tolist(), "value": (3.0 * spectrum).tolist()},
             "ifus": {str(i): {"throughput": 0.9 * t} for i, t in throughput.items()}}
    return sky, twi, truth


def test_synthetic_truth_is_recovered_exactly():
    sky, twi, truth = _synthetic()
    numbers = report.compare_with_truth(sky, twi, truth)
    assert numbers["throughput"]["ifus"] == [2, 3]
    assert numbers["throughput"]["recovered"] == pytest.approx([0.95, 1.04], rel=1e-6)
    assert numbers["throughput"]["rms"] < 1e-6
    assert numbers["illumination"]["field"]["n"] == 30 * 24
    assert numbers["illumination"]["field"]["rms"] < 1e-5  # truth grid mapped onto the cube grid
    assert numbers["illumination"]["expected"] == "injected field illumination"
    difference = numbers["illumination"]["difference"]  # zone: where vign_fit applies (its DQ is 0)
    assert difference["vignetted"]["n"] == 25 * 24 and difference["unvignetted"]["n"] == 5 * 24
    assert difference["vignetted"]["rms"] < 1e-6 and difference["unvignetted"]["rms"] < 1e-6
    assert numbers["spectrum"]["rms"] < 1e-5


def test_wrong_truth_shows_up():
    """A truth that does not match the products gives large deviations (the numbers are not cosmetic)."""
    sky, twi, truth = _synthetic()
    truth["ifus"]["2"]["throughput"] *= 1.1
    truth["field_illumination"]["map"] = (np.array(truth["field_illumination"]["map"]) ** 3).tolist()
    truth["vignetting"] = {"model": {"kind": "corner"},
                           "map": np.full_like(np.array(truth["field_illumination"]["map"]), 0.8).tolist()}
    truth["twilight_spectrum"]["value"] = np.linspace(1.0, 2.0, 5).tolist()
    numbers = report.compare_with_truth(sky, twi, truth)
    assert numbers["throughput"]["max_abs"] == pytest.approx(1 - 1 / 1.1, rel=1e-6)
    assert numbers["illumination"]["field"]["rms"] > 0.02
    assert "vignetting" in numbers["illumination"]["expected"]
    assert numbers["spectrum"]["rms"] > 0.1


def test_paths_without_skyflat_and_failed_vignetting_fit(tmp_path, matplotlib_image):
    _, twi, _ = _synthetic(failed_vign=True)
    path = tmp_path / "TWILIGHT_CUBE.fits"
    twi.writeto(path)
    index = report.write_report(tmp_path / "qa", None, path)
    page = index.read_text()
    assert "The vignetting fit failed" in page
    assert "vignetting.png" not in page
    assert "not given" in page  # no DATACUBE_SKYFLAT
    # the flux falls back to DRS MUSE FLAT FLUX SKYn (TWILIGHT_CUBE has no QC TWILIGHT keywords)
    summary = json.loads((tmp_path / "qa" / "summary.json").read_text())
    assert summary["intflux"] == {"1": 1e9, "2": 0.95e9, "3": 1.04e9}
    assert sorted(IMG_RE.findall(page)) == sorted(p.name for p in (tmp_path / "qa").glob("*.png"))


def test_unreadable_product_is_named(tmp_path):
    bad = tmp_path / "TWILIGHT_CUBE.fits"
    bad.write_text("not FITS")
    with pytest.raises(report.ReportError, match="TWILIGHT_CUBE"):
        report.write_report(tmp_path / "qa", None, bad)


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    sky, twi, truth = _synthetic()
    with pytest.raises(report.ReportError, match=r"needs Matplotlib .*pip install matplotlib"):
        report.write_report(tmp_path / "qa", sky, twi)
    assert not (tmp_path / "qa").exists()
    assert report.compare_with_truth(sky, twi, truth)["throughput"]["rms"] < 1e-6  # numbers need no plots


# ----------------------------------------------------------------------------------------------
# the page in a real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_images_load_in_headless_chromium(real_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    index, _, _ = real_report
    page = index.read_text()
    check = index.parent / "_imagecheck.html"  # beside the page: the same relative links
    check.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"))
    try:
        done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                               "--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        check.unlink()
    found = re.search(r'<pre id="imagecheck">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no image check in Chromium's DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    images = json.loads(html.unescape(found.group(1)))
    assert sorted(i["src"] for i in images) == sorted(IMG_RE.findall(page))
    assert len(images) >= 9
    for image in images:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
        assert image["error"] == "" and image["variance"] > 0, image
