"""Digest of every product of a fixed list of simulated runs: the safety net of a refactoring.

    python tools/product_digest.py --out digests.json          # before
    python tools/product_digest.py --check digests.json        # after: every digest must match

Each run simulates a mini set (fixed seed and options), reduces it with the given parameters,
and records a SHA-256 per product extension of its data bytes and of its header cards
(DATE, CHECKSUM, DATASUM and the pipeline version left out).  A refactoring that changes
no behaviour leaves every digest as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

KERNELS = ("nearest", "linear", "quadratic", "renka", "drizzle", "lanczos")
RUNS: list[tuple[str, dict, dict]] = [
    ("default", {}, {}),
    ("illum", {"illum": True}, {}),
    ("nfm", {"mode": "NFM-AO-N"}, {}),
    ("wfm-ao", {"mode": "WFM-AO-N"}, {}),
    ("vignetting", {"vignetting": True}, {}),
    ("all-options", {"illum": True, "dark": True, "badpix": True, "vignetting": True, "saturate": True}, {}),
    ("five-exposures-sigclip", {"nexp": 5, "seed": 4}, {"lsigma": 1.0, "hsigma": 1.5}),
    ("overscan-offset-fit", {"seed": 2}, {"overscan": "offset", "ovscreject": "fit"}),
    ("overscan-none-none", {"seed": 2}, {"overscan": "none", "ovscreject": "none"}),
    ("vpoly-options", {"seed": 2}, {"overscan": "vpoly:10,1.01,1.02", "ovscreject": "dcr:64,16,2,3.0"}),
    ("average-scale", {"dark": True}, {"combine": "average", "scale": True}),
    ("median", {}, {"combine": "median"}),
    ("minmax", {"nexp": 5}, {"combine": "minmax", "nlow": 1, "nhigh": 2, "nkeep": 2}),
    ("orders", {"vignetting": True}, {"xorder": 3, "yorder": 1, "vignsmooth": "gaussian", "vignxpar": 8}),
    ("vign-median", {"vignetting": True}, {"vignsmooth": "median", "vignmaskedges": 0.0}),
    ("nfm-gauss", {"mode": "NFM-AO-N", "seed": 3}, {"vignsmooth": "gaussian", "vignnfmmask": 18}),
    ("lambda", {}, {"lambdamin": 5500.0, "lambdamax": 8500.0, "dlambda": 100.0}),
] + [(f"{k}-{cr}", {"seed": 1}, {"resample": k, "crtype": cr})
     for k in KERNELS for cr in ("iraf", "mean", "median") if not (k == "lanczos" and cr == "iraf")] + [
    ("nearest-nocr", {"seed": 1}, {"resample": "nearest", "crsigma": 0.0}),
]
IGNORED_KEYS = {"DATE", "CHECKSUM", "DATASUM", "HIERARCH ESO PRO REC1 PIPE ID", "HIERARCH ESO PRO REC1 DRS ID"}


def hdu_digests(path: Path) -> dict[str, str]:
    out = {}
    with fits.open(path) as hdul:
        for index, hdu in enumerate(hdul):
            name = hdu.header.get("EXTNAME", f"HDU{index}")
            cards = [str(c) for c in hdu.header.cards
                     if c.keyword not in IGNORED_KEYS and not c.keyword.endswith(("PIPE ID", "DRS ID"))]
            out[f"{name}:header"] = hashlib.sha256("\n".join(cards).encode()).hexdigest()
            if hdu.data is not None:
                out[f"{name}:data"] = hashlib.sha256(np.ascontiguousarray(hdu.data).tobytes()).hexdigest()
    return out


def digest_all(selected: list[str] | None = None) -> dict[str, dict]:
    from musetwilight import recipe
    from musetwilight.tools.simulate import simulate_dataset

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options, params in RUNS:
            if selected and name not in selected:
                continue
            sim = simulate_dataset(Path(tmp) / f"set-{name}", **options)
            out = Path(tmp) / f"out-{name}"
            recipe.run(sim.sof, params, out, workers=2)
            results[name] = {p.name: hdu_digests(p) for p in sorted(out.glob("*.fits"))}
            print(f"{name}: {len(results[name])} products", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check", type=Path)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    results = digest_all(args.only)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.check:
        expected = json.loads(args.check.read_text())
        bad = []
        for run, products in results.items():
            for product, digests in products.items():
                for key, value in digests.items():
                    if expected.get(run, {}).get(product, {}).get(key) != value:
                        bad.append(f"{run} {product} {key}")
        print("\n".join(bad) if bad else "all digests match")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
