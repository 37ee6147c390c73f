"""QA report of one muse_twilight run: PNG plots and one self-contained HTML page.

``write_report(report_dir, datacube_skyflat, twilight_cube, truth=None)`` draws
the white-light images of both products and the residual of the smooth model
against the median-smoothed data, the smooth-fit and vignetting diagnostics
(white_global_fit, white_div_global, vign_fit, white_cor), the per-IFU relative
flux (QC TWILIGHTn INTFLUX over the reference IFU's), the plane means and the
fitted surfaces versus wavelength, and the QC keywords.  Field images are
stretched about 1 over the field's valid spaxels (:func:`centred_limits`), with
labelled colour bars and, given the GEOMETRY_TABLE, the IFU outlines.  With the
simulator's truth it also compares what the run recovered with what was
injected: per-IFU throughput, field illumination (their difference inside and
outside the vignetted zone) and twilight spectrum.
The page links its PNGs relatively, so the report directory can be moved or
served as a whole; ``summary.json`` holds the numbers shown on the page.

Matplotlib (the ``plots`` extra) is imported only here, through its
object-oriented API with the Agg renderer: no pyplot state, no display needed.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

from .. import __version__
from ..errors import MuseTwilightError
from ..instrument import IFU_HALF_HEIGHT, SLICES_PER_STACK, ifu_ranges, is_nfm
from ..io.products import DATACUBE_SKYFLAT, ILLUM_MODEL_KEY, TWILIGHT_CUBE

DEFAULT_TITLE = "musetwilight QA report"
QC_RE = re.compile(r"^ESO QC TWILIGHT(\d+) (.+)$")
INTFLUX_RE = re.compile(r"^ESO QC TWILIGHT(\d+) INTFLUX$")
SKYFLUX_RE = re.compile(r"^ESO DRS MUSE FLAT FLUX SKY(\d+)$")
DIAGNOSTIC_TITLES = {
    "white_global_fit": "TWILIGHT_CUBE white_global_fit:\npolynomial fit of the white image",
    "white_div_global": "TWILIGHT_CUBE white_div_global:\nwhite image / global fit",
    "white_div_global_excl_edges": "TWILIGHT_CUBE white_div_global_excl_edges:\nwhite / fit, strong edges masked",
    "vign_fit": "TWILIGHT_CUBE vign_fit:\nfit of the vignetted area",
    "white_cor": "TWILIGHT_CUBE white_cor:\nwhite / fit corrected by vign_fit",
}
DIAGNOSTIC_LABELS = {"white_global_fit": "global fit (mean 1)", "white_div_global": "white / global fit",
                     "white_div_global_excl_edges": "white / global fit", "vign_fit": "vignetting fit",
                     "white_cor": "corrected white / global fit"}
BORDER = 3  # spaxels dropped at the field border for the "interior" statistics


class ReportError(RuntimeError):
    """The report cannot be made (Matplotlib missing, unreadable product)."""


def _figure_class():
    """Matplotlib's Figure (Agg renders PNGs without a display), or a clear error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("the QA report needs Matplotlib (a dependency of musetwilight): "
                          "pip install matplotlib") from None
    return Figure


# --------------------------------------------------------------------------------------------
# products in memory


@dataclass
class _Products:
    """What the report reads from the two products (None where a product or extension is absent)."""

    sky_primary: fits.Header | None
    sky_cube: np.ndarray | None
    sky_white: np.ndarray | None
    twi_primary: fits.Header
    twi_cube: np.ndarray
    wcs: fits.Header
    images: dict[str, np.ndarray] = field(default_factory=dict)  # TWILIGHT_CUBE 2D extensions
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # their DQ (True = bad)
    failed: list[str] = field(default_factory=list)  # extensions present but empty (failed fit)

    @property
    def wavelengths(self) -> np.ndarray:
        """Plane wavelengths [Angstrom] from CRVAL3/CRPIX3/CD3_3 (or CDELT3)."""
        h = self.wcs
        step = h.get("CD3_3", h.get("CDELT3", 1.0))
        k = np.arange(self.twi_cube.shape[0]) + 1.0
        return h.get("CRVAL3", 1.0) + (k - h.get("CRPIX3", 1.0)) * step

    def extent(self) -> list[float]:
        """imshow extent in the cube's spatial WCS (geometry-table pixels)."""
        h = self.wcs
        ny, nx = self.twi_cube.shape[1:]
        dx, dy = h.get("CD1_1", h.get("CDELT1", 1.0)), h.get("CD2_2", h.get("CDELT2", 1.0))
        x0 = h.get("CRVAL1", 1.0) + (1.0 - h.get("CRPIX1", 1.0)) * dx
        y0 = h.get("CRVAL2", 1.0) + (1.0 - h.get("CRPIX2", 1.0)) * dy
        return [x0 - dx / 2, x0 + (nx - 0.5) * dx, y0 - dy / 2, y0 + (ny - 0.5) * dy]

    def spaxel_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) world coordinates of every spaxel centre, each (ny, nx)."""
        h = self.wcs
        ny, nx = self.twi_cube.shape[1:]
        j, i = np.mgrid[1:ny + 1, 1:nx + 1].astype(float)
        x = h.get("CRVAL1", 1.0) + (i - h.get("CRPIX1", 1.0)) * h.get("CD1_1", h.get("CDELT1", 1.0))
        y = h.get("CRVAL2", 1.0) + (j - h.get("CRPIX2", 1.0)) * h.get("CD2_2", h.get("CDELT2", 1.0))
        return x, y

    def field_mask(self) -> np.ndarray:
        """Spaxels of the field: finite in the DATACUBE_SKYFLAT white image (all without it)."""
        if self.sky_white is not None:
            return np.isfinite(self.sky_white) & (self.sky_white != 0)
        return np.ones(self.twi_cube.shape[1:], bool)


def _open(product, name: str) -> tuple[fits.HDUList | None, bool]:
    """(HDUList, opened_here) of a product given in memory or as a path (None stays None)."""
    if product is None or isinstance(product, fits.HDUList):
        return product, False
    path = Path(product)
    try:
        return fits.open(path, memmap=False), True
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read {name}: {err}") from None


def _hdu(hdul: fits.HDUList, name: str):
    try:
        return hdul[name]
    except KeyError:
        return None


def _load(sky: fits.HDUList | None, twi: fits.HDUList) -> _Products:
    data = _hdu(twi, "DATA")
    if data is None or data.data is None or np.ndim(data.data) != 3:
        raise ReportError("TWILIGHT_CUBE has no 3D DATA extension")
    sky_cube = sky_white = sky_primary = None
    if sky is not None:
        sky_data = _hdu(sky, "DATA")
        if sky_data is None or sky_data.data is None or np.ndim(sky_data.data) != 3:
            raise ReportError("DATACUBE_SKYFLAT has no 3D DATA extension")
        sky_primary = sky[0].header
        sky_cube = np.asarray(sky_data.data, dtype=np.float32)
        white = _hdu(sky, "white")
        if white is not None and white.data is not None:
            sky_white = np.asarray(white.data, dtype=np.float32)
        else:
            with _quiet_nanmean():
                sky_white = np.nanmean(sky_cube, axis=0)
    products = _Products(sky_primary, sky_cube, sky_white, twi[0].header,
                         np.asarray(data.data, dtype=np.float32), data.header)
    for name in DIAGNOSTIC_TITLES:
        hdu = _hdu(twi, name)
        if hdu is None:
            continue
        if hdu.data is None or np.size(hdu.data) == 0:
            products.failed.append(name)
            continue
        products.images[name] = np.asarray(hdu.data, dtype=np.float32)
        dq = _hdu(twi, name + "_DQ")
        if dq is not None and dq.data is not None and np.shape(dq.data) == np.shape(hdu.data):
            products.masks[name] = np.asarray(dq.data) != 0
    return products


@contextmanager
def _quiet_nanmean():
    """Silence numpy's 'Mean of empty slice' for all-NaN spaxels or planes (they stay NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# --------------------------------------------------------------------------------------------
# numbers


def _intflux(products: _Products) -> dict[int, float]:
    """Per-IFU integrated flux: QC TWILIGHTn INTFLUX, else DRS MUSE FLAT FLUX SKYn."""
    for header, pattern in ((products.sky_primary, INTFLUX_RE), (products.twi_primary, INTFLUX_RE),
                            (products.sky_primary, SKYFLUX_RE), (products.twi_primary, SKYFLUX_RE)):
        if header is None:
            continue
        flux = {int(m.group(1)): float(header[key]) for key in header
                if (m := pattern.match(key)) and _is_number(header[key])}
        if flux:
            return dict(sorted(flux.items()))
    return {}


def _nfm(products: _Products) -> bool:
    primary = products.sky_primary if products.sky_primary is not None else products.twi_primary
    return is_nfm(primary.get("ESO INS MODE"))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _stats(ratio: np.ndarray) -> dict[str, float | int]:
    """rms and max |deviation| from 1 of a ratio (finite values), and how many."""
    return _difference_stats(np.asarray(ratio, dtype=float) - 1.0)


def _difference_stats(difference: np.ndarray) -> dict[str, float | int]:
    """rms and max |value| of a difference (finite values), and how many."""
    values = difference[np.isfinite(difference)]
    if values.size == 0:
        return {"n": 0, "rms": math.nan, "max_abs": math.nan}
    return {"n": int(values.size), "rms": float(np.sqrt(np.mean(values * values))),
            "max_abs": float(np.max(np.abs(values)))}


def _normalised(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    good = mask & np.isfinite(image)
    mean = float(np.mean(image[good])) if good.any() else math.nan
    return image / mean


def _interior(mask: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``mask`` shrunk by ``border`` spaxels (the field edges, where spaxels are partly covered)."""
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, np.ones((2 * border + 1, 2 * border + 1), bool), border_value=0)


def _truth_on_grid(truth: dict, products: _Products, key: str) -> np.ndarray | None:
    """A truth map (on ``truth['cube_grid']``, 1 pixel steps) interpolated onto the cube's spaxels."""
    from scipy.interpolate import RegularGridInterpolator

    grid, block = truth.get("cube_grid"), truth.get(key) or {}
    values = block.get("map")
    if grid is None or values is None:
        return None
    values = np.asarray(values, dtype=float)
    step = float(grid.get("cdelt", 1.0))
    xs = grid["crval1"] + step * np.arange(values.shape[1])
    ys = grid["crval2"] + step * np.arange(values.shape[0])
    x, y = products.spaxel_coords()
    interp = RegularGridInterpolator((ys, xs), values, bounds_error=False, fill_value=None)
    return interp(np.column_stack([y.ravel(), x.ravel()])).reshape(x.shape)


def expected_illumination(truth: dict, products: _Products) -> tuple[np.ndarray | None, str]:
    """The smooth field the TWILIGHT_CUBE should recover, on the cube grid, and how it was built.

    The sky exposures carry the field illumination (and, in NFM, the vignetting at
    the top of the field); WFM vignetting sits in the lamp flats, so flat-fielding
    divides it out of the sky and the twilight cube holds its inverse.
    """
    illum = _truth_on_grid(truth, products, "field_illumination")
    if illum is None:
        return None, "truth has no field illumination map"
    vign = _truth_on_grid(truth, products, "vignetting")
    model = (truth.get("vignetting") or {}).get("model") or {}
    kind = model.get("kind")
    if vign is None or not kind:
        return illum, "injected field illumination"
    if kind == "corner":
        return illum / vign, "injected field illumination / lamp-flat vignetting (divided in by the flat-field)"
    return illum * vign, "injected field illumination x sky vignetting"


def model_residual(products: _Products) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """How well TWILIGHT_CUBE follows the data it was fitted to: each DATACUBE_SKYFLAT plane
    median-smoothed as ESO smooths it (:func:`~musetwilight.core.smooth.median_smoothed`),
    divided by the TWILIGHT_CUBE plane normalised over the same spaxels, minus 1.  Returns
    (the mean residual over the planes, the rms of each plane, the spaxels with a residual),
    None without DATACUBE_SKYFLAT."""
    from ..core.smooth import median_smoothed, white_light_mask

    if products.sky_cube is None or products.sky_white is None:
        return None
    white_bad = white_light_mask(products.sky_white)
    planes = []
    for data, model in zip(products.sky_cube, products.twi_cube):
        smooth, bad = median_smoothed(data, white_bad)
        bad = bad | ~np.isfinite(model) | ~np.isfinite(smooth)
        if bad.all():
            planes.append(np.full(model.shape, np.nan))
            continue
        ratio = smooth / (model / float(np.mean(model[~bad])))
        planes.append(np.where(bad, np.nan, ratio - 1.0))
    residual = np.stack(planes)
    with _quiet_nanmean():
        mean = np.nanmean(residual, axis=0)
        rms = np.sqrt(np.nanmean(residual * residual, axis=(1, 2)))
    return mean, rms, np.isfinite(mean) & products.field_mask()


def vignetted_zone(truth: dict | None, products: _Products) -> np.ndarray | None:
    """Spaxels of the vignetted zone: where the injected vignetting takes more than 0.1 % (truth),
    else where TWILIGHT_CUBE's vignetting fit applies (vign_fit's DQ); None without either."""
    if truth:
        vign = _truth_on_grid(truth, products, "vignetting")
        if vign is not None and ((truth.get("vignetting") or {}).get("model") or {}).get("kind"):
            return vign < 0.999
    if "vign_fit" in products.masks:
        return ~products.masks["vign_fit"]
    return None


# --------------------------------------------------------------------------------------------
# plots


@dataclass
class _Plot:
    file: str
    title: str
    caption: str


@dataclass(frozen=True)
class Footprint:
    """Where an IFU lies in the field (cube WCS, geometry-table pixels): its outline, the
    outlines of its four slice stacks and of its 48 slices, each (x0, x1, y0, y1)."""

    ifu: int
    box: tuple[float, float, float, float]
    stacks: tuple[tuple[float, float, float, float], ...]
    slices: tuple[tuple[float, float, float, float], ...]


def footprints(geometry, ifus) -> list[Footprint]:
    """The footprints of ``ifus`` from a GEOMETRY_TABLE (a table or a path): each slice spans
    x +- width/2 and y +- 1/2 around its centre, stacks are slices SliceSky 1-12, 13-24, ..."""
    if geometry is None:
        return []
    if not hasattr(geometry, "colnames"):
        from ..io.formats import read_geometry_table

        geometry = read_geometry_table(geometry)
    columns = {name: np.asarray(geometry[name]) for name in ("SubField", "SliceSky", "x", "y", "width")}
    out = []
    for ifu in sorted(ifus):
        rows = columns["SubField"] == ifu
        if not rows.any():
            continue
        x, y, half = columns["x"][rows], columns["y"][rows], columns["width"][rows] / 2
        slices = np.column_stack([x - half, x + half, y - 0.5, y + 0.5])
        stack_of = (columns["SliceSky"][rows] - 1) // 12

        def bounds(boxes: np.ndarray) -> tuple[float, float, float, float]:
            return (float(boxes[:, 0].min()), float(boxes[:, 1].max()), float(boxes[:, 2].min()),
                    float(boxes[:, 3].max()))
        stacks = tuple(bounds(slices[stack_of == k]) for k in np.unique(stack_of))
        out.append(Footprint(ifu, bounds(slices), stacks, tuple(bounds(box[None]) for box in slices)))
    return out


def centred_limits(values: np.ndarray, centre: float = 1.0, percentile: float = 99.0,
                   clip: float | None = 5.0) -> tuple[float, float]:
    """Colour limits centre -+ h: h is the ``percentile`` of |value - centre| over the valid
    values, those within ``clip`` robust sigmas (1.4826 MAD) of the median (all finite ones
    for ``clip=None``), so that slice gaps and edges do not set the stretch and the
    per-cent structure stays visible."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return centre - 0.05, centre + 0.05
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    if clip is not None and sigma > 0:
        values = values[np.abs(values - median) <= clip * sigma]
    half = float(np.percentile(np.abs(values - centre), percentile))
    half = max(half, 1e-4 * max(abs(centre), 1.0))
    return centre - half, centre + half


class _Plotter:
    """Writes one PNG per figure into the report directory; each PNG carries in its metadata
    ("Panels", JSON) every panel's title, axis labels, colour-bar label, legend placement
    and how much of its image holds data (what the tests check)."""

    def __init__(self, directory: Path, products: _Products, outlines: list[Footprint] | None = None):
        self.dir = directory
        self.p = products
        self.outlines = outlines or []
        self.Figure = _figure_class()
        self.plots: list[_Plot] = []
        self._colorbars: dict[int, str] = {}  # id(colour-bar axes) -> title of its panel

    def save(self, fig, file: str, title: str, caption: str) -> _Plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig).draw()  # lay out first: the legend and axes positions are final
        metadata = {"Title": title, "Panels": json.dumps(self._panels(fig)), "Software": f"musetwilight {__version__}"}
        fig.savefig(self.dir / file, dpi=100, metadata=metadata)
        plot = _Plot(file, title, caption)
        self.plots.append(plot)
        return plot

    def _panels(self, fig) -> list[dict]:
        panels = []
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if id(ax) in self._colorbars:
                panels.append({"kind": "colorbar", "panel": self._colorbars[id(ax)],
                               "label": ax.get_ylabel() or ax.get_xlabel()})
                continue
            info = {"kind": "image" if ax.images else "plot", "title": ax.get_title(), "xlabel": ax.get_xlabel(),
                    "ylabel": ax.get_ylabel()}
            if ax.images:
                data: np.ma.MaskedArray = np.ma.masked_invalid(np.ma.asarray(ax.images[0].get_array(), dtype=float))
                info["data_fraction"] = float(data.count() / data.size) if data.size else 0.0
                info["data_spread"] = float(data.std()) if data.count() else 0.0
                info["limits"] = [float(v) for v in ax.images[0].get_clim()]
                info["ifu_outlines"] = sum(text.get_text().startswith("IFU ") for text in ax.texts)
            else:
                lines = [line for line in ax.get_lines() if np.isfinite(np.asarray(line.get_ydata(), float)).any()]
                info["curves"] = len(lines) + len(ax.patches) + len(ax.collections)
            legend = ax.get_legend()
            if legend is not None:
                info["legend_overlaps_data"] = bool(legend.get_window_extent(renderer).overlaps(
                    ax.get_window_extent(renderer)))
            panels.append(info)
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            panels.append({"kind": "figure legend", "legend_overlaps_data": any(
                box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)})
        return panels

    def image(self, ax, image, title: str, label: str, mask=None, limits=None, centre: float = 1.0,
              clip: float | None = 5.0, cmap: str = "RdBu_r", colorbar: bool = True, contour=None):
        """One field image in the cube WCS: masked spaxels grey, the stretch centred on ``centre``
        (:func:`centred_limits` with ``clip``) unless ``limits`` are given, a colour bar labelled
        ``label``, the IFU outlines on top and, given, a contour of a boolean zone (e.g. the
        vignetted one)."""
        import matplotlib as mpl

        data = np.ma.masked_invalid(np.asarray(image, dtype=float))
        if mask is not None:
            data = np.ma.masked_where(mask, data)
        if limits is None:
            limits = centred_limits(data.compressed(), centre, clip=clip)
        vmin, vmax = limits
        if not vmax > vmin:
            vmin, vmax = vmin - 0.5 * max(abs(vmin), 1e-6), vmax + 0.5 * max(abs(vmax), 1e-6)
        colours = mpl.colormaps[cmap].with_extremes(bad="0.55")
        ny, nx = data.shape
        aspect = "equal" if 0.4 <= ny / nx <= 2.5 else "auto"  # NFM sets with far-apart IFUs are thin
        extent = self.p.extent()
        art = ax.imshow(data, origin="lower", extent=extent, cmap=colours, vmin=vmin, vmax=vmax,
                        interpolation="nearest", aspect=aspect)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x [spaxel]", fontsize=8)
        ax.set_ylabel("y [spaxel]", fontsize=8)
        ax.tick_params(labelsize=7)
        self._draw_outlines(ax, ny)
        if contour is not None and np.any(contour) and not np.all(contour):
            x, y = self.p.spaxel_coords()
            ax.contour(x, y, np.asarray(contour, float), levels=[0.5], colors="k", linewidths=1.2, linestyles="--")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        if colorbar:
            self.colorbar(ax, art, label, title)
        return art

    def colorbar(self, ax, art, label: str, title: str):
        bar = ax.figure.colorbar(art, ax=ax, shrink=0.85, extend="both")
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
        self._colorbars[id(bar.ax)] = title
        return bar

    def _draw_outlines(self, ax, ny: int) -> None:
        """IFU outlines (labelled), their slice stacks and, where a spaxel row is at least ~5 screen
        pixels high (up to 72 rows), the single slices."""
        from matplotlib.patches import Rectangle

        slices_resolved = ny <= 72
        for footprint in self.outlines:
            if slices_resolved:
                for x0, x1, y0, y1 in footprint.slices:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.25, ec="0.3", alpha=0.35))
            for x0, x1, y0, y1 in footprint.stacks:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, ec="0.2"))
            x0, x1, y0, y1 = footprint.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.3, ec="k"))
            ax.text(x0 + 0.5, y1 - 0.4, f"IFU {footprint.ifu}", fontsize=6, va="top", ha="left",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})

    def panel_width(self, height: float, colorbar: bool = True) -> float:
        """Figure inches one field panel of a figure ``height`` inches high takes (the image's
        aspect, room for labels and, with ``colorbar``, its colour bar right beside it)."""
        ny, nx = self.p.twi_cube.shape[1:]
        aspect = ny / nx if 0.4 <= ny / nx <= 2.5 else 1.0
        return min(7.0, max(2.5, (height - 1.2) / aspect)) + 0.8 + (1.0 if colorbar else 0.0)

    @property
    def outline_note(self) -> str:
        return (" Black frames: the IFUs (labelled) with their slice stacks"
                + (" and slices" if self.outlines and self.p.twi_cube.shape[1] <= 72 else "") + "."
                if self.outlines else "")

    # ---- the figures --------------------------------------------------------------------------
    def white_images(self):
        p = self.p
        panels = []
        mask = ~p.field_mask()
        if p.sky_white is not None:
            white = p.sky_white / np.nanmedian(np.where(mask, np.nan, p.sky_white))
            panels.append((white, "DATACUBE_SKYFLAT white-light image / field median", "white / field median"))
        with _quiet_nanmean():
            twilight = np.nanmean(p.twi_cube, axis=0)
        panels.append((twilight, "TWILIGHT_CUBE averaged over wavelength", "TWILIGHT_CUBE (mean of planes)"))
        fig = self.Figure(figsize=(self.panel_width(4.6) * len(panels), 4.6), layout="constrained")
        for ax, (image, title, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            self.image(ax, image, title, label, mask=mask)
        return self.save(fig, "white_images.png", "White-light images",
                         ("Left: the white-light image of DATACUBE_SKYFLAT divided by its median over the "
                          "field. Right: the smooth TWILIGHT_CUBE averaged over wavelength." if len(panels) == 2
                          else "The smooth TWILIGHT_CUBE averaged over wavelength (no DATACUBE_SKYFLAT given).")
                         + " Both stretched symmetrically about 1 over the field's valid spaxels, so the "
                           "per-cent structure shows; dark grey: no data." + self.outline_note)

    def residual_images(self, residual: np.ndarray, per_plane: np.ndarray, field: np.ndarray):
        width = self.panel_width(4.6)
        fig = self.Figure(figsize=(width + 5.5, 4.6), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[width, 5.5])
        self.image(ax1, 100 * residual, "Residual of the model:\nmedian-smoothed DATACUBE_SKYFLAT / TWILIGHT_CUBE - 1",
                   "residual [%]", mask=~field, centre=0.0)
        lam = self.p.wavelengths
        ax2.plot(lam, 100 * per_plane, "o-", ms=3, color="tab:red")
        ax2.axhline(0, color="0.3", lw=0.8)
        ax2.set_xlabel("wavelength [Angstrom]", fontsize=8)
        ax2.set_ylabel("rms of the residual over the field [%]", fontsize=8)
        ax2.set_title("Residual rms of each plane:\nmedian-smoothed DATACUBE_SKYFLAT / TWILIGHT_CUBE - 1", fontsize=9)
        ax2.tick_params(labelsize=7)
        return self.save(fig, "residual.png", "Residual of the smooth model",
                         "Each DATACUBE_SKYFLAT plane median-smoothed (5x7 spaxels, as ESO smooths it before "
                         "the polynomial fit) and normalised, divided by the TWILIGHT_CUBE plane; left the "
                         "mean over the planes, right the rms per plane. What the polynomial cannot follow "
                         "(steps between IFUs, the vignetted edge) shows here." + self.outline_note)

    def fit_images(self):
        names = [n for n in ("white_global_fit", "white_div_global") if n in self.p.images]
        if not names:
            return None
        fig = self.Figure(figsize=(max(4.6, self.panel_width(4.6)) * len(names), 4.6), layout="constrained")
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            self.image(ax, self.p.images[name], DIAGNOSTIC_TITLES[name], DIAGNOSTIC_LABELS[name],
                       self.p.masks.get(name))
        return self.save(fig, "global_fit.png", "Global fit of the white-light image",
                         "The polynomial fit of the white-light image and the white image divided by it "
                         "(dark grey: flagged in the DQ extension), stretched about 1." + self.outline_note)

    def vignetting_images(self, zone: np.ndarray | None):
        names = [n for n in ("white_div_global_excl_edges", "vign_fit", "white_cor") if n in self.p.images]
        if "vign_fit" not in names and "white_cor" not in names:
            return None
        fig = self.Figure(figsize=(max(4.6, self.panel_width(4.6)) * len(names), 4.6), layout="constrained")
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            self.image(ax, self.p.images[name], DIAGNOSTIC_TITLES[name], DIAGNOSTIC_LABELS[name],
                       self.p.masks.get(name), contour=zone)
        return self.save(fig, "vignetting.png", "Vignetting fit",
                         "The vignetted area's fit (vign_fit) and the white image corrected for it "
                         "(white_cor), stretched about 1; dark grey: flagged in the DQ extension"
                         + ("; dashed: the vignetted zone" if zone is not None and np.any(zone) else "") + "."
                         + self.outline_note)

    def intflux(self, flux: dict[int, float], reference: int, truth_ratio: dict[int, float] | None):
        ifus = sorted(flux)
        ratio = [flux[i] / flux[reference] for i in ifus]
        fig = self.Figure(figsize=(max(5.0, 0.45 * len(ifus) + 2.5), 4.0), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(ifus))
        width = 0.4 if truth_ratio else 0.7
        ax.bar(x - (width / 2 if truth_ratio else 0), ratio, width, label="recovered INTFLUX / reference",
               color="tab:blue")
        if truth_ratio:
            ax.bar(x + width / 2, [truth_ratio.get(i, np.nan) for i in ifus], width,
                   label="injected throughput / reference", color="tab:orange")
            fig.legend(fontsize=8, loc="outside lower center", ncols=2)
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_xticks(x, [str(i) for i in ifus], fontsize=8)
        ax.set_xlabel("IFU")
        ax.set_ylabel(f"integrated flux / IFU {reference}'s")
        values = np.array(ratio + (list(truth_ratio.values()) if truth_ratio else []), float)
        values = values[np.isfinite(values)]
        lo, hi = (values.min(), values.max()) if values.size else (0.9, 1.1)
        pad = max(0.02, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_title(f"Per-IFU flux (QC TWILIGHTn INTFLUX) relative to IFU {reference}", fontsize=10)
        return self.save(fig, "intflux.png", "Per-IFU relative flux",
                         f"Integrated flux of each IFU (ESO QC TWILIGHTn INTFLUX) relative to the flux "
                         f"reference IFU {reference}; each IFU's data are divided by this ratio before "
                         "the cube is built.")

    def plane_means(self, spectrum: np.ndarray | None):
        p = self.p
        lam = p.wavelengths
        nplots = 2 if p.sky_cube is not None else 1
        fig = self.Figure(figsize=(8.5, 3.2 * nplots), layout="constrained")
        axes = fig.subplots(nplots, 1, squeeze=False)[:, 0]
        outside = {"fontsize": 8, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}
        if p.sky_cube is not None:
            ax = axes[0]
            with _quiet_nanmean():
                means = np.nanmean(p.sky_cube, axis=(1, 2))
                medians = np.nanmedian(p.sky_cube, axis=(1, 2))
            ax.plot(lam, means, "o-", ms=3, label="plane mean")
            ax.plot(lam, medians, "s--", ms=3, label="plane median")
            if spectrum is not None:
                ax.plot(lam, spectrum, "k:", label="injected twilight\nspectrum (scaled)")
            ax.set_ylabel("DATACUBE_SKYFLAT [count]")
            ax.set_xlabel("wavelength [Angstrom]")
            ax.legend(**outside)
            ax.set_title("DATACUBE_SKYFLAT: mean and median of each plane", fontsize=10)
        ax = axes[-1]
        cube = p.twi_cube.reshape(p.twi_cube.shape[0], -1)
        with _quiet_nanmean():
            pct = np.nanpercentile(cube, [0, 5, 50, 95, 100], axis=1)
            mean = np.nanmean(cube, axis=1)
        ax.fill_between(lam, pct[0], pct[4], color="tab:blue", alpha=0.15, label="min..max")
        ax.fill_between(lam, pct[1], pct[3], color="tab:blue", alpha=0.35, label="5..95 %")
        ax.plot(lam, pct[2], color="tab:blue", label="median")
        ax.plot(lam, mean, "k--", lw=0.8, label="mean")
        ax.set_ylabel("TWILIGHT_CUBE")
        ax.set_xlabel("wavelength [Angstrom]")
        ax.legend(**outside)
        ax.set_title("TWILIGHT_CUBE: spread of each fitted plane over the field", fontsize=10)
        return self.save(fig, "plane_means.png", "Plane statistics versus wavelength",
                         "Top: mean and median of each DATACUBE_SKYFLAT plane. Bottom: spread of each "
                         "smooth TWILIGHT_CUBE plane over the field (each plane is normalised to mean 1)."
                         if nplots == 2 else "Spread of each smooth TWILIGHT_CUBE plane over the field.")

    def twilight_planes(self):
        p = self.p
        nz = p.twi_cube.shape[0]
        picks = sorted(set(np.linspace(0, nz - 1, min(4, nz)).round().astype(int)))
        mask = ~p.field_mask()
        limits = centred_limits(np.where(mask, np.nan, p.twi_cube[picks]))
        fig = self.Figure(figsize=(max(3.6, self.panel_width(4.2, colorbar=False)) * len(picks) + 1.0, 4.2),
                          layout="constrained")
        lam = p.wavelengths
        axes = fig.subplots(1, len(picks), squeeze=False)[0]
        for ax, k in zip(axes, picks):
            art = self.image(ax, p.twi_cube[k], f"TWILIGHT_CUBE plane {k + 1} ({lam[k]:.0f} Angstrom)", "",
                             mask=mask, limits=limits, colorbar=False)
        self.colorbar(axes[-1], art, "TWILIGHT_CUBE (plane mean 1), all panels", "TWILIGHT_CUBE planes")
        return self.save(fig, "twilight_planes.png", "Fitted surfaces at a few wavelengths",
                         "TWILIGHT_CUBE planes (smooth polynomial fits, normalised to mean 1) on one colour "
                         "scale, stretched about 1." + self.outline_note)

    def truth_throughput(self, ifus, recovered, injected):
        fig = self.Figure(figsize=(9.5, 3.9), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(injected, recovered, "o", label="IFUs")
        for i, x, y in zip(ifus, injected, recovered):
            ax1.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        values = np.concatenate([injected, recovered])
        lo, hi = float(values.min()), float(values.max())
        pad = max(0.01, 0.1 * (hi - lo))
        ax1.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k:", lw=0.8, label="1:1")
        ax1.set_xlabel("injected throughput / reference")
        ax1.set_ylabel("recovered INTFLUX / reference")
        ax1.set_title("Per-IFU flux: recovered against injected", fontsize=10)
        fig.legend(*ax1.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)
        positions = np.arange(len(ifus))
        ax2.bar(positions, np.asarray(recovered) / np.asarray(injected) - 1.0, color="tab:purple")
        ax2.set_xticks(positions, [str(i) for i in ifus])
        ax2.axhline(0.0, color="0.3", lw=0.8)
        ax2.set_xlabel("IFU")
        ax2.set_ylabel("recovered / injected - 1")
        ax2.set_title("Per-IFU flux: recovered / injected - 1", fontsize=10)
        ax2.tick_params(axis="x", labelsize=7)
        return self.save(fig, "truth_throughput.png", "Recovered versus injected IFU throughput",
                         "INTFLUX ratios against the injected IFU throughput ratios. INTFLUX integrates the "
                         "flat-fielded sky over an IFU's footprint, so it also carries the field "
                         "illumination, the inverse of any lamp-flat vignetting and the slice efficiencies "
                         "averaged over that footprint: per-cent differences from the bare throughput "
                         "are expected.")

    def truth_illumination(self, recovered, expected, mask, how, zone, numbers):
        fig = self.Figure(figsize=(3 * max(4.6, self.panel_width(4.6)), 4.6), layout="constrained")
        ax1, ax2, ax3 = fig.subplots(1, 3)
        limits = centred_limits(np.concatenate([recovered[mask], expected[mask]]))
        self.image(ax1, recovered, "Recovered: TWILIGHT_CUBE white / field mean", "recovered / field mean", ~mask,
                   limits, contour=zone)
        self.image(ax2, expected, "Injected illumination / field mean", "injected / field mean", ~mask, limits,
                   contour=zone)
        self.image(ax3, 100 * (recovered - expected), "Recovered - injected illumination", "difference [%]",
                   ~mask, centre=0.0, clip=None, contour=zone)  # the whole range: the errors are the point
        inside, outside = numbers.get("vignetted"), numbers["unvignetted"]
        rms = f"rms {100 * outside['rms']:.2f} % outside the vignetted zone" + (
            f", {100 * inside['rms']:.2f} % inside (dashed)" if inside else "")
        return self.save(fig, "truth_illumination.png", "Recovered versus injected field illumination",
                         f"The TWILIGHT_CUBE averaged over wavelength against the {how}, both normalised to "
                         f"mean 1 over the field (dark grey: outside the field), and their difference: {rms}. "
                         "ESO's per-IFU flux scaling by INTFLUX removes each IFU's mean illumination, so "
                         "steps between IFUs in the difference are expected." + self.outline_note)


# --------------------------------------------------------------------------------------------
# page


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(value) else f"{value:.10g}"
    return str(value)


def _cell(value) -> str:
    numeric = _is_number(value)
    return f'<td class="{"num" if numeric else "text"}">{html.escape(_fmt(value))}</td>'


def _table(header: list[str] | None, rows: list[list], cls: str = "") -> str:
    """An HTML table (without a head row for ``header=None``); rows with nothing after their
    first cell and columns empty in every row are left out."""
    rows = [row for row in rows if any(value not in ("", None) for value in row[1:])]
    width = len(header) if header else max((len(row) for row in rows), default=0)
    keep = [0] + [k for k in range(1, width) if any(k < len(row) and row[k] not in ("", None) for row in rows)] \
        if rows else list(range(width))
    rows = [[row[k] for k in keep if k < len(row)] for row in rows]
    header = [header[k] for k in keep] if header else None
    head = ("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>"
            if header else "")
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}">{head}<tbody>{body}</tbody></table></div>'


def _qc_cards(products: _Products) -> list[tuple[str, str, object, str]]:
    """(product, keyword, value, comment) of every QC TWILIGHT and DRS MUSE FLAT FLUX keyword."""
    cards = []
    for product, header in ((DATACUBE_SKYFLAT.tag, products.sky_primary), (TWILIGHT_CUBE.tag, products.twi_primary)):
        if header is None:
            continue
        for card in header.cards:
            if card.keyword.startswith(("ESO QC TWILIGHT", "ESO DRS MUSE FLAT FLUX")):
                cards.append((product, card.keyword, card.value, card.comment))
    return cards


def _qc_pivot(cards) -> tuple[list[str], list[list]]:
    """QC TWILIGHT keywords as a table: one row per IFU, one column per quantity."""
    columns: list[str] = []
    rows: dict[int, dict[str, object]] = {}
    for _product, key, value, _ in cards:
        m = QC_RE.match(key)
        if not m:
            continue
        ifu, quantity = int(m.group(1)), m.group(2)
        if quantity not in columns:
            columns.append(quantity)
        rows.setdefault(ifu, {}).setdefault(quantity, value)
    return ["IFU", *columns], [[ifu, *(rows[ifu].get(c, "") for c in columns)] for ifu in sorted(rows)]


def _figure_html(plot: _Plot) -> str:
    return (f'<figure><img src="{html.escape(plot.file)}" alt="{html.escape(plot.title)}">'
            f"<figcaption><b>{html.escape(plot.title)}.</b> {html.escape(plot.caption)}</figcaption></figure>")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;
     padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444;max-width:70em}
table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ccc;padding:.15em .5em;white-space:nowrap}
th{background:#f0f0f0;text-align:left}td.num{text-align:right}td.text{text-align:left}
.scroll{overflow-x:auto;max-width:100%}.note{color:#8a4b00}
"""


def _page(title: str, info: list[list], sections: list[tuple[str, str]]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = "".join(f"<h2>{html.escape(name)}</h2>\n{content}\n" for name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            f"<p>Made by musetwilight {html.escape(__version__)} on {stamp}.</p>\n"
            f"{_table(None, info, 'info')}\n{body}</body>\n</html>\n")


# --------------------------------------------------------------------------------------------
# the report


def _load_truth(truth) -> dict | None:
    if truth is None or isinstance(truth, dict):
        return truth
    path = Path(truth)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the simulation truth: {err}") from None


def _run_info(products: _Products, flux: dict[int, float], reference: int | None) -> list[list]:
    primary = products.sky_primary if products.sky_primary is not None else products.twi_primary
    nz, ny, nx = products.twi_cube.shape
    lam = products.wavelengths
    info = []
    for key, label in (("OBJECT", "object"), ("ESO INS MODE", "instrument mode"), ("DATE-OBS", "date of "
                       "observation"), ("ESO PRO REC1 PIPE ID", "pipeline")):
        if key in primary:
            info.append([label, primary[key]])
    info.append(["cube size (x, y, wavelength)", f"{nx} x {ny} x {nz}"])
    info.append(["wavelength range [Angstrom]", f"{lam[0]:.1f} .. {lam[-1]:.1f} in steps of "
                                                f"{(lam[1] - lam[0]) if nz > 1 else 0:.1f}"])
    if flux:
        info.append(["IFUs with INTFLUX", ", ".join(str(i) for i in flux)])
        info.append(["flux reference IFU", reference])
    skipped = primary.get("MUSETWILIGHT SKIPPED")
    if skipped:
        info.append(["IFUs whose reduction failed", _as_ranges(skipped)])
    absent = primary.get("MUSETWILIGHT ABSENT")
    if absent:
        info.append(["IFUs not in the set", _as_ranges(absent)])
    if products.failed:
        info.append(["empty extensions (failed fits)", ", ".join(products.failed)])
    if products.sky_primary is None:
        info.append(["DATACUBE_SKYFLAT", "not given (e.g. a run that started from an existing cube)"])
    return info


def _as_ranges(listed) -> str:
    """A header's comma-separated IFU list as ranges ("4-24"); as it is when it is no such list."""
    try:
        return ifu_ranges(int(i) for i in str(listed).split(","))
    except ValueError:
        return str(listed)


def _read_products(datacube_skyflat, twilight_cube) -> _Products:
    sky, sky_opened = _open(datacube_skyflat, DATACUBE_SKYFLAT.tag)
    twi, twi_opened = _open(twilight_cube, TWILIGHT_CUBE.tag)
    try:
        if twi is None:
            raise ReportError("the QA report needs a TWILIGHT_CUBE")
        return _load(sky, twi)
    finally:
        if sky_opened and sky is not None:
            sky.close()
        if twi_opened and twi is not None:
            twi.close()


def write_report(report_dir: str | os.PathLike, datacube_skyflat: fits.HDUList | str | os.PathLike | None,
                 twilight_cube: fits.HDUList | str | os.PathLike, truth: dict | str | os.PathLike | None = None,
                 title: str = DEFAULT_TITLE, geometry=None, *, fit=None,
                 alternatives: dict[str, fits.HDUList | str | os.PathLike] | None = None) -> Path:
    """Write the QA report (PNGs, ``summary.json`` and ``index.html``) into ``report_dir``.

    ``datacube_skyflat`` and ``twilight_cube`` are the products as HDULists or paths;
    ``datacube_skyflat`` may be None (a run that started from an existing cube).
    ``truth`` is the simulator's truth (dict or ``truth.json`` path): with it the page
    also compares the recovered throughput, illumination and spectrum with the injected
    ones (:func:`compare_with_truth`).  ``geometry`` (the run's GEOMETRY_TABLE, a path
    or a table) puts the outlines of the IFUs, slice stacks and slices on the field
    images.  ``fit`` is what ``--illum-model=joint`` fitted
    (:class:`musetwilight.core.illumination.JointFit`, ``RunResult.illumination_fit``): its
    per-IFU and per-stack terms and vignetting surface get a section; ``alternatives`` maps a
    model name to another TWILIGHT_CUBE of the same cube (e.g. ``{"eso": ...}`` for a joint
    run), compared side by side with the truth.  Returns the path of ``index.html``.  Raises
    :class:`ReportError` when Matplotlib is missing or a product cannot be read.
    """
    _figure_class()
    truth = _load_truth(truth)
    products = _read_products(datacube_skyflat, twilight_cube)
    try:
        outlines = footprints(geometry, _intflux(products))
    except MuseTwilightError as err:
        raise ReportError(f"cannot draw the IFU outlines: {err}") from None
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {name: _read_products(datacube_skyflat, cube) for name, cube in (alternatives or {}).items()}
    return _write(out, products, truth, title, outlines, fit, extra)


def compare_with_truth(datacube_skyflat: fits.HDUList | str | os.PathLike | None,
                       twilight_cube: fits.HDUList | str | os.PathLike,
                       truth: dict | str | os.PathLike) -> dict:
    """The report's recovered-versus-injected numbers (no plots, no Matplotlib needed).

    ``throughput``: INTFLUX ratios to the reference IFU against the injected throughput
    ratios; ``illumination``: the TWILIGHT_CUBE averaged over wavelength against the
    injected field (see :func:`expected_illumination`), over the whole field and over
    its interior renormalised; ``spectrum``: DATACUBE_SKYFLAT plane means against the
    injected twilight spectrum, scaled.  Each holds ``n``, ``rms`` and ``max_abs`` of
    ratio - 1; a part the inputs cannot support is left out.
    """
    products = _read_products(datacube_skyflat, twilight_cube)
    flux = _intflux(products)
    return _compare(products, _load_truth(truth), flux, min(flux) if flux else None).numbers


@dataclass
class _Comparison:
    """Recovered versus injected: the numbers (JSON-able) and the arrays the plots need."""

    numbers: dict = field(default_factory=dict)
    injected_ratio: dict[int, float] | None = None
    throughput: tuple | None = None  # (ifus, recovered, injected)
    illumination: tuple | None = None  # (recovered, expected, field mask, how, vignetted zone, difference stats)
    illumination_note: str = ""
    spectrum: np.ndarray | None = None  # injected spectrum scaled to the plane means


def _compare(products: _Products, truth: dict | None, flux: dict[int, float], reference: int | None) -> _Comparison:
    result = _Comparison()
    if not truth:
        return result
    throughput = {int(i): float(v["throughput"]) for i, v in (truth.get("ifus") or {}).items()
                  if isinstance(v, dict) and "throughput" in v}
    if flux and reference in throughput:
        result.injected_ratio = {i: t / throughput[reference] for i, t in throughput.items()}
        ifus = [i for i in flux if i in result.injected_ratio and i != reference]
        if _nfm(products) and 23 in flux and 24 in ifus:
            ifus.remove(24)  # ESO's INTFLUX of IFU 24 is IFU 23's in NFM: no measurement of IFU 24
            result.numbers["throughput_excluded"] = {"24": "NFM: ESO uses IFU 23's integrated flux for IFU 24"}
        if ifus:
            recovered = np.array([flux[i] / flux[reference] for i in ifus])
            injected = np.array([result.injected_ratio[i] for i in ifus])
            result.throughput = (ifus, recovered, injected)
            result.numbers["throughput"] = {**_stats(recovered / injected), "ifus": ifus,
                                            "recovered": recovered.tolist(), "injected": injected.tolist()}

    expected, how = expected_illumination(truth, products)
    result.illumination_note = how
    if expected is not None:
        mask = products.field_mask()
        with _quiet_nanmean():
            twi_white = np.nanmean(products.twi_cube, axis=0)
        recovered = _normalised(twi_white, mask)
        expected = _normalised(expected, mask)
        ratio = recovered / expected
        inner = _interior(mask)
        zone = vignetted_zone(truth, products)
        difference = recovered - expected
        outside = mask if zone is None else mask & ~zone
        split = {"unvignetted": _difference_stats(difference[outside]),
                 "vignetted": _difference_stats(difference[mask & zone]) if zone is not None and
                 (mask & zone).any() else None}
        result.illumination = (recovered, expected, mask, how, zone, split)
        result.numbers["illumination"] = {"field": _stats(ratio[mask]),
                                          "interior": _stats(ratio[inner] / np.nanmean(ratio[inner])),
                                          "difference": split, "expected": how, "border_spaxels": BORDER}

    block = truth.get("twilight_spectrum")
    if block and products.sky_cube is not None:
        injected = np.interp(products.wavelengths, block["lambda"], block["value"])
        with _quiet_nanmean():
            means = np.nanmean(products.sky_cube, axis=(1, 2))
        good = np.isfinite(means)
        if good.any():
            scale = float(np.sum(means[good] * injected[good]) / np.sum(injected[good] ** 2))
            result.spectrum = scale * injected
            result.numbers["spectrum"] = _stats(means[good] / result.spectrum[good])
    return result


def _write(out: Path, products: _Products, truth: dict | None, title: str, outlines: list[Footprint], fit=None,
           alternatives: dict[str, _Products] | None = None) -> Path:
    plotter = _Plotter(out, products, outlines)
    flux = _intflux(products)
    reference = min(flux) if flux else None
    comparison = _compare(products, truth, flux, reference)
    sections: list[tuple[str, str]] = []

    field_html = [_figure_html(plotter.white_images())]
    residual = model_residual(products)
    if residual is not None:
        mean, per_plane, good = residual
        stats = _difference_stats(mean[good])
        comparison.numbers["residual"] = {**stats, "rms_per_plane": per_plane.tolist()}
        field_html.append(_figure_html(plotter.residual_images(mean, per_plane, good)))
        field_html.append(_table(["residual of the smooth model", "N", "rms", "max |value|"],
                                 [["median-smoothed DATACUBE_SKYFLAT / TWILIGHT_CUBE - 1, mean over the planes",
                                   stats["n"], stats["rms"], stats["max_abs"]]]))
    sections.append(("The field: white-light images and the residual of the smooth model", "".join(field_html)))

    fit_html = [_figure_html(plot) for plot in (plotter.fit_images(),
                                                plotter.vignetting_images(vignetted_zone(truth, products)))
                if plot is not None]
    if "vign_fit" in products.failed:
        fit_html.append('<p class="note">The vignetting fit failed: vign_fit is empty.</p>')
    elif "vign_fit" not in products.images:
        fit_html.append("<p>No vignetting correction in this run (no VIGNETTING_MASK used).</p>")
    sections.append(("Smooth fit and vignetting", "".join(fit_html)))

    flux_html = []
    if flux and reference is not None:
        flux_html.append(_figure_html(plotter.intflux(flux, reference, comparison.injected_ratio)))
        flux_html.append(_table(["IFU", "INTFLUX", f"INTFLUX / IFU {reference}"],
                                [[i, v, v / flux[reference]] for i, v in flux.items()]))
        if _nfm(products) and 24 in flux:
            flux_html.append('<p class="note">NFM: ESO uses IFU 23\'s integrated flux for IFU 24.</p>')
    else:
        flux_html.append('<p class="note">No QC TWILIGHTn INTFLUX or DRS MUSE FLAT FLUX SKYn keywords found.</p>')
    sections.append(("Per-IFU relative flux", "".join(flux_html)))

    sections.append(("Versus wavelength", _figure_html(plotter.plane_means(comparison.spectrum))
                     + _figure_html(plotter.twilight_planes())))

    if truth:
        sections.append(("Simulation: recovered versus injected", _truth_section(plotter, comparison)))
    model_sections, model_numbers = _model_sections(plotter, products, truth, fit, alternatives or {})
    sections.extend(model_sections)

    cards = _qc_cards(products)
    header, rows = _qc_pivot(cards)
    qc_html = [f"<p>{len(cards)} keywords.</p>"]
    if rows:
        qc_html.append("<h3>ESO QC TWILIGHTn (one row per IFU)</h3>" + _table(header, rows, "qc"))
    other = [[product, key, value, comment] for product, key, value, comment in cards if not QC_RE.match(key)]
    if other:
        qc_html.append("<h3>ESO DRS MUSE FLAT FLUX</h3>" + _table(["product", "keyword", "value", "comment"], other))
    qc_html.append("<details><summary>All keywords as written</summary>"
                   + _table(["product", "keyword", "value", "comment"], [list(c) for c in cards]) + "</details>")
    sections.append(("QC keywords", "".join(qc_html)))

    summary = {"title": title, "intflux": {str(i): v for i, v in flux.items()}, "reference_ifu": reference,
               **comparison.numbers, **model_numbers, "plots": [p.file for p in plotter.plots]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    index = out / "index.html"
    index.write_text(_page(title, _run_info(products, flux, reference), sections), encoding="utf-8")
    return index


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _truth_section(plotter: _Plotter, comparison: _Comparison) -> str:
    parts, rows = [], []
    numbers = comparison.numbers
    if comparison.throughput is not None:
        parts.append(_figure_html(plotter.truth_throughput(*comparison.throughput)))
        s = numbers["throughput"]
        rows.append(["IFU throughput: INTFLUX ratio / injected ratio", s["n"], s["rms"], s["max_abs"]])
        for ifu, why in numbers.get("throughput_excluded", {}).items():
            parts.append(f'<p class="note">IFU {html.escape(ifu)} left out of the throughput comparison: '
                         f"{html.escape(why)}.</p>")
    if comparison.illumination is not None:
        parts.append(_figure_html(plotter.truth_illumination(*comparison.illumination)))
        field_stats, inner_stats = numbers["illumination"]["field"], numbers["illumination"]["interior"]
        rows.append(["field illumination: TWILIGHT white / injected (whole field)", field_stats["n"],
                     field_stats["rms"], field_stats["max_abs"]])
        rows.append([f"field illumination: TWILIGHT white / injected, {BORDER} spaxels from the edges, "
                     "renormalised", inner_stats["n"], inner_stats["rms"], inner_stats["max_abs"]])
        for zone, stats in numbers["illumination"]["difference"].items():
            if stats:
                rows.append([f"field illumination: recovered - injected, {zone} spaxels", stats["n"], stats["rms"],
                             stats["max_abs"]])
    else:
        parts.append(f'<p class="note">{html.escape(comparison.illumination_note)}.</p>')
    if "spectrum" in numbers:
        s = numbers["spectrum"]
        rows.append(["twilight spectrum: DATACUBE_SKYFLAT plane means / injected (scaled)", s["n"], s["rms"],
                     s["max_abs"]])
    if rows:
        parts.insert(0, _table(["comparison", "N", "rms of ratio - 1 (difference)", "max |ratio - 1| (|difference|)"],
                               rows))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# truth recovery of the 3D illumination model (both --illum-model choices, same definition)

#: Subsamples per spaxel in x where the expected field is averaged (stack edges fall inside spaxels).
EXPECTED_SUBSAMPLES = 32
#: Injected vignetting weaker than this (|V - 1|) does not count as the vignetted zone.
VIGNETTED_ZONE = 0.002


def _used_illum(header: fits.Header) -> bool:
    """Whether the reduction used an ILLUM exposure (a raw frame of that category in PRO REC1)."""
    return any(str(card.value).strip() == "ILLUM" for card in header.cards
               if re.match(r"^ESO PRO REC1 RAW\d+ CATG$", card.keyword))


def expected_twilight(truth: dict, header: fits.Header, wcs: fits.Header, shape: tuple[int, int, int],
                      used_illum: bool | None = None) -> dict:
    """The TWILIGHT_CUBE a perfect smooth model would make from a simulated set, on the cube grid.

    TWILIGHT_CUBE is what science pixel tables are divided by, so it must hold the relative
    sky-versus-lamp illumination: the injected sky field (with NFM edge vignetting) over the
    lamp field (WFM corner vignetting, divided in by the flat-field), per plane.  The recipe
    also divides every IFU by its integrated flux relative to the reference IFU (``ESO DRS
    MUSE FLAT FLUX SKYn``, which scibasic propagates so that the science merge restores the
    IFU levels), so within IFU n the cube holds that field times t_n g_n / FLUX_SKYn, with t_n
    the injected throughput and g_n its mean slice efficiency (1 / mean(1 / eff) after the
    ILLUM correction, which levels the slices).  That per-IFU factor is part of the expected
    cube: both models see it in the data and a global field alone cannot hold it.  The
    slice-to-slice efficiencies themselves are not (smooth models leave them to ILLUM).  The
    field is averaged over :data:`EXPECTED_SUBSAMPLES` positions across each spaxel in x
    (slice-stack edges fall inside spaxels); the overall level of each plane is arbitrary.

    ``header`` is a product primary header (FLUX SKY keywords, PRO REC1 raw frames), ``wcs``
    the cube's DATA header and ``shape`` (nz, ny, nx).  Returns a dict of arrays: ``cube``
    (expected, NaN outside the IFUs), ``excess`` (injected vignetting as the factor the cube
    carries, minus 1: 1/V - 1 in WFM, V - 1 in NFM), ``ifu`` (IFU of each spaxel, 0 none),
    ``ifu_boundary`` and ``stack_boundary`` (spaxels next to an IFU / slice-stack edge).
    """
    from .simulate import field_from_truth, slice_membership, truth_geometry

    nz, ny, nx = shape
    fm = field_from_truth(truth)
    geometry = truth_geometry(truth)
    if used_illum is None:
        used_illum = _used_illum(header)
    step = float(wcs.get("CD3_3", wcs.get("CDELT3", 1.0)))
    lam = float(wcs.get("CRVAL3", 1.0)) + (np.arange(nz) + 1.0 - float(wcs.get("CRPIX3", 1.0))) * step
    x0, y0 = _grid_origin(wcs)
    m = EXPECTED_SUBSAMPLES
    xs = x0 + np.arange(nx)[:, None] + (np.arange(m)[None, :] + 0.5) / m - 0.5  # (nx, m)
    X = np.broadcast_to(xs[None], (ny, nx, m))
    Y = np.broadcast_to((y0 + np.arange(ny))[:, None, None], (ny, nx, m))
    # each subsample takes the IFU and stack of the slice it falls on (none in the gaps)
    ifu_sub, stack_sub = slice_membership(geometry, x0, y0, nx, ny, m)
    weight = np.zeros(ifu_sub.shape)
    for n, entry in (truth.get("ifus") or {}).items():
        key = f"ESO DRS MUSE FLAT FLUX SKY{int(n)}"
        if key not in header:
            continue
        eff = np.asarray(entry["slice_efficiency"], float)
        g = 1.0 / np.mean(1.0 / eff) if used_illum else float(np.mean(eff))
        weight[ifu_sub == int(n)] = float(entry["throughput"]) * g / float(header[key])
    inside = (weight > 0) & (stack_sub >= 0)
    count = inside.sum(axis=2)
    lamp = fm.lamp(X, Y)
    vign = fm.vignetting(X, Y)
    kind = ((truth.get("vignetting") or {}).get("model") or {}).get("kind")
    factor = 1.0 / vign if kind == "corner" else (vign if kind == "top" else np.ones_like(vign))
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.where(count > 0, (np.where(inside, factor, 0).sum(axis=2)) / count, np.nan) - 1.0
        cube = np.full(shape, np.nan)
        for k in range(nz):
            sky = fm.sky(X, Y, lam[k], ifu_sub, stack_sub)
            value = np.where(inside, sky / lamp * weight, 0.0).sum(axis=2) / count
            cube[k] = np.where(count > 0, value, np.nan)
    ifu = np.where(count > 0, np.max(np.where(inside, ifu_sub, 0), axis=2), 0)
    ifu_boundary = np.zeros((ny, nx), bool)
    ifu_boundary[1:] |= (ifu[1:] != ifu[:-1]) & (ifu[1:] > 0) & (ifu[:-1] > 0)
    ifu_boundary[:-1] |= (ifu[1:] != ifu[:-1]) & (ifu[1:] > 0) & (ifu[:-1] > 0)
    stack_c = np.where(inside, stack_sub, -1)
    mixed = (stack_c.max(axis=2) != np.where(inside, stack_sub, 9).min(axis=2)) | (count < m)
    stack_boundary = mixed & (count > 0)
    stack_boundary[:, 1:] |= mixed[:, :-1] & (count[:, 1:] > 0)
    stack_boundary[:, :-1] |= mixed[:, 1:] & (count[:, :-1] > 0)
    return {"cube": cube, "excess": excess, "ifu": ifu, "ifu_boundary": ifu_boundary,
            "stack_boundary": stack_boundary, "used_illum": used_illum, "wavelengths": lam}


def _grid_origin(wcs: fits.Header) -> tuple[float, float]:
    """Field x and y (GEOMETRY_TABLE units) of spaxel (0, 0) of a cube's DATA header."""
    return (float(wcs.get("CRVAL1", 1.0)) + (1.0 - float(wcs.get("CRPIX1", 1.0))),
            float(wcs.get("CRVAL2", 1.0)) + (1.0 - float(wcs.get("CRPIX2", 1.0))))


def bayes_terms(design: np.ndarray, prior_precision: np.ndarray, observed: np.ndarray,
                noise_variance: float) -> np.ndarray:
    """Posterior mean of the terms c of ``observed`` = ``design`` c + e, e ~ N(0, ``noise_variance``),
    c ~ N(0, 1 / ``prior_precision``) (precision 0: a flat prior): the estimate with the least
    mean squared error a method can have when it knows the form of the field and its scatter."""
    normal = design.T @ design / noise_variance + np.diag(prior_precision)
    return np.linalg.solve(normal, design.T @ observed / noise_variance)


def confusion_floor(truth: dict, wcs: fits.Header, shape: tuple[int, int], used_illum: bool) -> np.ndarray:
    """Log error (ny, nx) of an ideal smooth model of a simulated set: the floor the data set.

    Without ILLUM the slice efficiencies stay in the data (:func:`expected_twilight` leaves
    them out), and the part of them that has the form of the family's per-IFU y slopes and
    per-stack levels is, in the data, the same thing as illumination of that form, at any
    signal-to-noise.  This is the error of the Bayes estimate (:func:`bayes_terms`: the least
    mean squared error among estimates linear in the data, the least of all for Gaussian
    scatter) of those terms from noise-free data, per IFU, knowing their form and scatter (the
    injected ones) and the efficiencies' scatter, which no real model knows.  The terms are
    those constant along each slice (``gy eta`` per IFU, ``s`` per stack; the IFU level is
    free, as the recipe's flux scaling makes it; x slopes are seen along every slice and
    chromatic terms are not confused, as a slice's efficiency is grey); the error is mapped
    onto the spaxels like :func:`expected_twilight`.  Zero with ILLUM (it levels the slices)
    and for families without per-IFU or per-stack terms.
    """
    from .simulate import slice_index_map, truth_geometry

    ny, nx = shape
    family = truth.get("family") or {}
    components = set(family.get("components") or ())
    if used_illum or not components & {"ifu", "stack"}:
        return np.zeros((ny, nx))
    geometry = truth_geometry(truth)
    ifu_terms = {int(k): v for k, v in (family.get("ifu_terms") or {}).items()}
    stack_terms = {int(k): v for k, v in (family.get("stack_terms") or {}).items()}
    scatter = {}
    if "ifu" in components:
        scatter["gy"] = float(np.mean([t["gy"] ** 2 for t in ifu_terms.values()]))
    if "stack" in components:
        scatter["s"] = float(np.mean([t["s"] ** 2 for terms in stack_terms.values() for t in terms]))
    per_ifu = []  # (IFU, its geometry rows, log slice efficiency relative to the IFU's mean)
    for n, entry in (truth.get("ifus") or {}).items():
        mine = np.nonzero(geometry["SubField"] == int(n))[0]
        eff = np.asarray(entry["slice_efficiency"], float)[geometry["SliceCCD"][mine] - 1]
        per_ifu.append((int(n), mine, np.log(eff) - np.log(np.mean(eff))))
    noise_variance = float(np.var(np.concatenate([e for _, _, e in per_ifu])))
    error = np.zeros(len(geometry))
    for n, mine, e in per_ifu:
        g = geometry[mine]
        stack = (g["SliceSky"] - 1) // SLICES_PER_STACK
        columns, precision, injected = [np.ones(len(g))], [0.0], [0.0]
        if "gy" in scatter:
            columns.append((g["y"] - g["y"].mean()) / IFU_HALF_HEIGHT)
            precision.append(1.0 / scatter["gy"])
            injected.append(ifu_terms[n]["gy"])
        if "s" in scatter:
            for k in range(4):
                columns.append((stack == k).astype(float))
                precision.append(1.0 / scatter["s"])
                injected.append(stack_terms[n][k]["s"])
        design, c = np.array(columns).T, np.array(injected)
        estimate = bayes_terms(design, np.array(precision), design @ c + e, noise_variance)
        error[mine] = design @ (estimate - c)
    x0, y0 = _grid_origin(wcs)
    index = slice_index_map(geometry, x0, y0, nx, ny, EXPECTED_SUBSAMPLES)
    inside = index >= 0
    count = inside.sum(axis=2)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, np.where(inside, error[np.where(inside, index, 0)], 0.0).sum(axis=2)
                        / np.maximum(count, 1), 0.0)


def floor_twilight(truth: dict, expected: dict, wcs: fits.Header) -> np.ndarray | None:
    """The expected cube (:func:`expected_twilight`) times the floor's error
    (:func:`confusion_floor`): the TWILIGHT_CUBE of an ideal smooth model; None where the floor is 0."""
    cube = expected["cube"]
    error = confusion_floor(truth, wcs, cube.shape[1:], bool(expected["used_illum"]))
    return cube * np.exp(error)[None] if error.any() else None


def _ratio_stats(dev: np.ndarray) -> dict[str, float | int]:
    dev = dev[np.isfinite(dev)]
    if dev.size == 0:
        return {"n": 0, "rms": math.nan, "max_abs": math.nan}
    return {"n": int(dev.size), "rms": float(np.sqrt(np.mean(dev * dev))), "max_abs": float(np.max(np.abs(dev)))}


def recovery_metrics(twilight: np.ndarray, expected: dict, field: np.ndarray) -> dict:
    """Recovered / injected - 1 of a TWILIGHT_CUBE against :func:`expected_twilight`.

    Per plane the ratio is normalised by its median over the unvignetted ``field`` spaxels
    (the level of a plane is arbitrary).  Regions: ``field`` (unvignetted field), ``vignetted``
    (injected |V - 1| > :data:`VIGNETTED_ZONE`), ``ifu_boundary`` and ``stack_boundary``
    (unvignetted spaxels next to an IFU or slice-stack edge); each with n, rms and max_abs,
    all planes pooled.  ``depth``: the injected vignetting excess averaged over the deep zone
    (|excess| >= half its maximum in the field), the recovered one (ratio x (1 + excess) - 1)
    and their difference ``error`` (recovered - injected), all as fractions.
    """
    exp = expected["cube"]
    field = field & np.all(np.isfinite(exp), axis=0)
    excess = expected["excess"]
    vign = field & (np.abs(excess) > VIGNETTED_ZONE)
    plain = field & ~vign
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.asarray(twilight, float) / exp
    norms = np.array([np.median(plane[plain]) if plain.any() else np.nan for plane in ratio])
    dev = ratio / norms[:, None, None] - 1.0
    out = {"field": _ratio_stats(dev[:, plain]),
           "vignetted": _ratio_stats(dev[:, vign]),
           "ifu_boundary": _ratio_stats(dev[:, plain & expected["ifu_boundary"]]),
           "stack_boundary": _ratio_stats(dev[:, plain & expected["stack_boundary"]])}
    if vign.any():
        peak = np.nanmax(np.abs(excess[vign]))
        deep = vign & (np.abs(excess) >= 0.5 * peak)
        injected = float(np.mean(excess[deep]))
        recovered = float(np.mean((dev[:, deep] + 1.0) * (1.0 + excess[deep]) - 1.0))
        out["depth"] = {"injected": injected, "recovered": recovered, "error": recovered - injected,
                        "peak_injected": float(excess[vign][np.argmax(np.abs(excess[vign]))]), "n": int(deep.sum())}
    return out


# --------------------------------------------------------------------------------------------
# the illumination model: what --illum-model=joint fitted, and both models against the truth


#: The column of the models-versus-truth table with the floor of an ideal smooth model.
FLOOR_COLUMN = "floor (ideal model)"


def _model_name(products: _Products) -> str:
    return str(products.twi_primary.get(ILLUM_MODEL_KEY, "eso")).strip() or "eso"


def _fit_section(plotter: _Plotter, fit, products: _Products, truth: dict | None) -> str:
    """Per-IFU and per-stack terms, the fitted components and the vignetting profile of a joint fit."""
    parts = [f"<p>Wavelength order {fit.lambda_order}; structure beyond the noise about the smooth model "
             f"{100 * fit.residual_rms:.3f} % per spaxel, slice-to-slice scatter (left to ILLUM, not in the "
             f"cube) {100 * fit.slice_sigma:.3f} %; {fit.rejected_spaxels} spaxels given zero weight, "
             f"{fit.clipped_voxels} voxels clipped.</p>"]
    if fit.ifu_terms:
        rows = []
        for ifu, t in sorted(fit.ifu_terms.items()):
            stacks = [fit.stack_terms.get((ifu, k), {}).get("level", math.nan) for k in range(4)]
            rows.append([ifu, 100 * t.get("level", math.nan), 100 * t.get("x_slope", math.nan),
                         100 * t.get("y_slope", math.nan), 100 * t.get("chroma", math.nan),
                         *(100 * v for v in stacks)])
        parts.append("<p>Per-IFU terms (log units, %): level (free: the recipe scales every IFU by its "
                     "integrated flux), slopes across the field (x) and over the IFU's 12 slice rows (y), "
                     "level change per unit of the wavelength coordinate (5000..9000 A -> -1..1), and the "
                     "level of each slice stack.</p>")
        parts.append(_table(["IFU", "level %", "x slope %", "y slope %", "chromatic %", "stack 1 %", "stack 2 %",
                             "stack 3 %", "stack 4 %"], rows))
    field = products.field_mask()
    panels = [(fit.global_field, "TWILIGHT_CUBE joint model:\nglobal field (wavelength mean)", "global field [log, %]"),
              (fit.ifu_stack, "TWILIGHT_CUBE joint model:\nper-IFU + per-stack terms", "IFU + stack terms [log, %]")]
    zone = fit.zone if fit.vignetting is not None else None
    if zone is not None:
        panels.append((np.where(zone, np.expm1(fit.vignetting), 0.0), "TWILIGHT_CUBE joint model:\nvignetting surface",
                       "vignetting factor - 1 [%]"))
    fig = plotter.Figure(figsize=(plotter.panel_width(4.6) * len(panels), 4.6), layout="constrained")
    for ax, (image, title, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        values = 100 * (image - np.nanmean(image[field])) if "vignetting" not in title else 100 * image
        plotter.image(ax, values, title, label, mask=~field, centre=0.0, contour=zone)
    parts.append(_figure_html(plotter.save(
        fig, "joint_components.png", "Joint model components",
        "The fitted global field and the per-IFU and per-stack terms (log units, about their field mean) and "
        "the vignetting surface (its factor - 1; 0 outside the zone" + ("; dashed: the vignetted zone" if zone
                                                                          is not None and zone.any() else "")
        + ")." + plotter.outline_note)))
    if zone is not None and zone.any():
        parts.append(_figure_html(_vignetting_profile(plotter, fit, products, truth)))
    return "".join(parts)


def _vignetting_profile(plotter: _Plotter, fit, products: _Products, truth: dict | None):
    """The fitted vignetting against the distance into the zone (and the injected one)."""
    from scipy.ndimage import distance_transform_edt

    zone = fit.zone
    depth_into = distance_transform_edt(zone)
    fig = plotter.Figure(figsize=(8.0, 3.8), layout="constrained")
    ax = fig.subplots()
    sel = zone & products.field_mask()
    ax.plot(depth_into[sel], np.expm1(fit.vignetting[sel]) * 100, ".", ms=2, color="tab:blue",
            label="fitted (joint)")
    injected = False
    if truth and products.sky_primary is not None:
        try:
            expected = expected_twilight(truth, products.sky_primary, products.wcs, products.twi_cube.shape)
        except (KeyError, ValueError):
            expected = None
        if expected is not None:
            ax.plot(depth_into[sel], expected["excess"][sel] * 100, ".", ms=2, color="tab:orange", label="injected")
            injected = True
    ax.set_xlabel("distance into the vignetted zone [spaxels]")
    ax.set_ylabel("vignetting factor - 1 [%]")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, markerscale=4)
    ax.set_title("TWILIGHT_CUBE joint model: vignetting profile", fontsize=10)
    return plotter.save(fig, "joint_vignetting_profile.png", "Vignetting profile",
                        "The fitted vignetting surface of every field spaxel in the zone against its distance "
                        "from the zone edge" + (", with the injected one." if injected else "."))


def _model_sections(plotter: _Plotter, products: _Products, truth: dict | None, fit,
                    alternatives: dict[str, _Products]) -> tuple[list[tuple[str, str]], dict]:
    sections, numbers = [], {}
    if fit is not None:
        sections.append(("Joint illumination model: what it fitted", _fit_section(plotter, fit, products, truth)))
        numbers["joint_fit"] = fit.summary()
    if not truth or products.sky_primary is None:
        return sections, numbers
    models = {_model_name(products): products, **alternatives}
    try:
        expected = expected_twilight(truth, products.sky_primary, products.wcs, products.twi_cube.shape)
    except (KeyError, ValueError) as err:
        sections.append(("TWILIGHT_CUBE models versus the truth",
                         f'<p class="note">No expected cube: {html.escape(str(err))}.</p>'))
        return sections, numbers
    field = products.field_mask()
    metrics = {name: recovery_metrics(p.twi_cube, expected, field) for name, p in models.items()}
    floor = floor_twilight(truth, expected, products.wcs)
    if floor is not None:  # no ILLUM: what an ideal smooth model would still get wrong
        metrics[FLOOR_COLUMN] = recovery_metrics(floor, expected, field)
    numbers["models_vs_truth"] = metrics
    names = list(metrics)
    rows = []
    for region, label in (("field", "unvignetted field"), ("vignetted", "vignetted zone"),
                          ("ifu_boundary", "IFU boundaries"), ("stack_boundary", "slice-stack boundaries")):
        if not any(metrics[n][region]["n"] for n in names):
            continue
        rows.append([f"{label}: rms %", *(100 * metrics[n][region]["rms"] for n in names)])
        rows.append([f"{label}: max %", *(100 * metrics[n][region]["max_abs"] for n in names)])
    if all("depth" in metrics[n] for n in names):
        rows.append(["vignetting excess injected %", *(100 * metrics[n]["depth"]["injected"] for n in names)])
        rows.append(["vignetting excess recovered %", *(100 * metrics[n]["depth"]["recovered"] for n in names)])
    parts = ["<p>Recovered / expected - 1 of each TWILIGHT_CUBE model, all planes, each plane normalised by its "
             "median over the unvignetted field. Expected: the injected sky-versus-lamp field times the "
             "recipe's per-IFU flux scaling (report.expected_twilight)."
             + (f" {FLOOR_COLUMN}: the error an ideal smooth model would still make, one that knew the "
                "injected form and scatter of the per-IFU and per-stack terms, on noise-free data: without "
                "ILLUM the slice efficiencies look like such terms (report.confusion_floor)."
                if FLOOR_COLUMN in metrics else "") + "</p>",
             _table(["", *names], rows)]
    maps = {}
    names = list(models)
    with _quiet_nanmean(), np.errstate(invalid="ignore", divide="ignore"):
        plain = field & (np.abs(expected["excess"]) <= VIGNETTED_ZONE) & np.isfinite(expected["cube"][0])
        for name in names:
            ratio = models[name].twi_cube / expected["cube"]
            norms = np.array([np.median(r[plain]) if plain.any() else np.nan for r in ratio])
            maps[name] = np.where(field, np.nanmean(ratio / norms[:, None, None], axis=0) - 1.0, np.nan) * 100
    finite = np.concatenate([m[np.isfinite(m)] for m in maps.values()])
    limit = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
    limit = max(limit, 1e-3)
    zone = field & (np.abs(expected["excess"]) > VIGNETTED_ZONE)
    fig = plotter.Figure(figsize=(plotter.panel_width(4.6) * len(names), 4.6), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        plotter.image(ax, maps[name], f"TWILIGHT_CUBE model {name}:\nrecovered / injected - 1",
                      "recovered / injected - 1 [%]", mask=~field, limits=(-limit, limit), contour=zone)
    parts.append(_figure_html(plotter.save(
        fig, "models_vs_truth.png", "TWILIGHT_CUBE models against the truth",
        "Wavelength mean of recovered / expected - 1 for each model, on one colour scale"
        + ("; dashed: the injected vignetted zone" if zone.any() else "") + "." + plotter.outline_note)))
    sections.append(("TWILIGHT_CUBE models versus the truth", "".join(parts)))
    return sections, numbers
