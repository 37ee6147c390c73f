"""The README's QA-report screenshot (docs/qa-report.png): a simulated mini set with WFM
vignetting, reduced, its report written with the injected truth, the top of the page
shot in headless Chromium and stored with 256 colours (about 100 kB).

    python tools/report_screenshot.py [--out docs/qa-report.png] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from musetwilight import recipe
from musetwilight.tools.report import write_report
from musetwilight.tools.simulate import simulate_dataset

WINDOW = (1200, 1480)
TITLE = "musetwilight QA report: simulated mini set with WFM vignetting"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "qa-report.png")
    parser.add_argument("--work", type=Path, default=None, help="keep the set, products and report here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="musetwilight-screenshot-"))
    sim = simulate_dataset(work / "data", seed=4, vignetting=True, dark=True, badpix=True)
    result = recipe.run(sim.sof, None, work / "products")
    index = write_report(work / "report", result.datacube_skyflat, result.twilight_cube, truth=sim.truth_path,
                         title=TITLE, geometry=sim.files["GEOMETRY_TABLE"][0])
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("headless Chromium is needed (Debian: apt-get install chromium)")
    shot = work / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", f"--user-data-dir={work / 'profile'}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", index.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size / 1000:.0f} kB")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
