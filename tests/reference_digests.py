"""Canonical digests shared by tools/make_references.py and tests/test_reference_products.py.

Nothing here imports musetwilight: the same code hashes ESO's files (when the references are
made) and our arrays (when they are checked).

Array digest (``array_digest``): SHA-256 of the array's values in a canonical byte form:
C order (row-major; for images numpy's ``[y, x]``, for pixel-table columns the rows in table
order, ESO's ``(nrow, 1)`` column images flattened), little-endian, float arrays as ``<f4``
(float32; other float widths are refused) with every NaN written as the quiet NaN 0x7FC00000,
integer arrays as the 4-byte pattern of ``<u4`` (so ESO's int32 DQ/origin columns and our uint32
ones hash alike).  Besides the digest: shape, kind and summary numbers for diagnosis (float: sum of finite values as
float64, min, max, number of NaN; integer: sum, min, max, number of non-zero values).

Input digest (``input_digest``): for every file of a SOF its tag, the SHA-256 of each HDU's
data section as stored in the file (``HDU.fileinfo()`` datLoc/datSpan: the raw FITS bytes,
padding included) and the SHA-256 of its header cards (``KEYWORD = repr(value)`` lines, without
DATE, CHECKSUM, DATASUM); and one SHA-256 over all of that.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from astropy.io import fits

VOLATILE_INPUT_KEYS = {"DATE", "CHECKSUM", "DATASUM"}
CANONICAL_NAN = np.uint32(0x7FC00000)


def canonical_bytes(array) -> bytes:
    """The canonical byte form of an array (see the module docstring)."""
    array = np.asarray(array).reshape(-1)  # C order
    if array.dtype.itemsize != 4:
        raise TypeError(f"canonical digests are defined for 4-byte arrays, not {array.dtype}")
    if array.dtype.kind == "f":
        values = array.astype("<f4")
        bits = values.view("<u4").copy()
        bits[np.isnan(values)] = CANONICAL_NAN
        return bits.tobytes()
    if array.dtype.kind in "iu":
        signed = array.dtype.kind == "i"
        return np.ascontiguousarray(array.astype("<i4" if signed else "<u4")).view("<u4").tobytes()
    raise TypeError(f"no canonical form for dtype {array.dtype}")


def _finite_or_none(value: float):
    return None if value is None or not math.isfinite(value) else float(value)


def array_digest(array) -> dict:
    """SHA-256 of the canonical bytes plus shape, kind and summary numbers."""
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == 1:  # ESO's pixel-table columns are (nrow, 1) images
        array = array.reshape(-1)
    out = {"sha256": hashlib.sha256(canonical_bytes(array)).hexdigest(), "shape": list(array.shape)}
    if array.dtype.kind == "f":
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        out.update(kind="float32", sum=float(finite.sum()),
                   min=_finite_or_none(finite.min()) if finite.size else None,
                   max=_finite_or_none(finite.max()) if finite.size else None,
                   nan=int(np.count_nonzero(np.isnan(values))))
    else:
        values = array.astype(np.int64) if array.dtype.kind == "i" else array.astype(np.uint32).astype(np.int64)
        out.update(kind="uint32", sum=int(values.sum()),
                   min=int(values.min()) if values.size else None,
                   max=int(values.max()) if values.size else None,
                   nonzero=int(np.count_nonzero(values)))
    return out


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header_digest(header: fits.Header) -> str:
    lines = [f"{card.keyword} = {card.value!r}" for card in header.cards
             if card.keyword not in VOLATILE_INPUT_KEYS]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def fits_file_digest(path) -> dict:
    """Per-HDU data and header digests of one FITS file (data as the raw stored bytes)."""
    hdus = []
    with fits.open(path, do_not_scale_image_data=True) as hdul, open(path, "rb") as raw:
        for index, hdu in enumerate(hdul):
            info = hdu.fileinfo()
            raw.seek(info["datLoc"])
            data = raw.read(info["datSpan"])
            hdus.append({"hdu": index, "extname": str(hdu.header.get("EXTNAME", "")),
                         "data_sha256": hashlib.sha256(data).hexdigest(),
                         "header_sha256": _header_digest(hdu.header)})
    return {"hdus": hdus}


def read_sof(sof) -> list[tuple[Path, str]]:
    """(path, tag) of every SOF line; relative paths are taken relative to the SOF's folder."""
    sof = Path(sof)
    entries = []
    for line in sof.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        path, tag = line.split()[:2]
        path = Path(path)
        entries.append((path if path.is_absolute() else sof.parent / path, tag))
    return entries


def input_digest(sof) -> dict:
    """Digest of the data (and headers) of every input file of a SOF, by file name."""
    files = {}
    for path, tag in read_sof(sof):
        files[path.name] = {"tag": tag, **fits_file_digest(path)}
    total = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": total, "files": files}


def input_differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable list of what differs between two input digests (empty if equal)."""
    if expected.get("sha256") == actual.get("sha256"):
        return []
    out = []
    names = sorted(set(expected["files"]) | set(actual["files"]))
    for name in names:
        e, a = expected["files"].get(name), actual["files"].get(name)
        if e is None or a is None:
            out.append(f"{name}: {'new file' if e is None else 'no longer written'}")
            continue
        if e["tag"] != a["tag"]:
            out.append(f"{name}: tag {e['tag']} -> {a['tag']}")
        if len(e["hdus"]) != len(a["hdus"]):
            out.append(f"{name}: {len(e['hdus'])} -> {len(a['hdus'])} HDUs")
            continue
        for he, ha in zip(e["hdus"], a["hdus"]):
            what = [part for part in ("data", "header") if he[f"{part}_sha256"] != ha[f"{part}_sha256"]]
            if what:
                out.append(f"{name}[{he['hdu']}{' ' + he['extname'] if he['extname'] else ''}]: "
                           f"{' and '.join(what)} changed")
    return out or ["the digests differ"]
