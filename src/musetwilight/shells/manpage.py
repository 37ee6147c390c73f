"""``musetwilight man``: the recipe's manual page, in the manner of ``esorex --man-page``."""

from __future__ import annotations

import textwrap

from .. import __version__
from ..io.frames import TAG_RULES
from ..io.products import PRODUCTS
from ..params import PARAMETERS, format_value

SYNOPSIS = ("Combine several twilight skyflats into one cube, compute correction factors for each "
            "IFU, and create a smooth 3D illumination correction.")

DESCRIPTION = (
    "Processing first handles each raw input image separately: it trims the raw data and records "
    "the overscan statistics, subtracts the bias (taking account of the overscan, if --overscan is "
    'not "none"), converts the images from adu to count, subtracts the dark, divides by the '
    "flat-field and combines all the exposures using input parameters. The input calibrations "
    "geometry table, trace table, and wavelength calibration table are used to assign 3D "
    "coordinates to each CCD-based pixel, thereby creating a pixel table from the master sky-flat. "
    "These pixel tables are then cut in wavelength using the --lambdamin and --lambdamax "
    "parameters. The integrated flux in each IFU is computed as the sum of the data in the pixel "
    "table, and saved in the header, to be used later as estimate for the relative throughput of "
    "each IFU. If an ILLUM exposure was given as input, it is then used to correct the relative "
    "illumination between all slices of one IFU. The pixel tables of all IFUs are then merged, "
    "using the integrated fluxes as inverse scaling factors, and a cube is reconstructed from the "
    "merged dataset. A white-light image is created from the cube; this skyflat cube is saved as "
    "DATACUBE_SKYFLAT. To construct a smooth 3D illumination correction, each plane of the cube "
    "is smoothed (5x7 median filter), normalized, fit with a 2D polynomial and normalized again. "
    "If a vignetting mask was given or NFM data is processed, the vignetted area near the field "
    "edge is modelled separately and multiplied onto each plane, normalizing each plane again. "
    "The result is saved as TWILIGHT_CUBE."
)


ILLUM_MODEL_HELP = (
    "--illum-model=eso|joint (musetwilight run, demo and batch; elsewhere, e.g. musetwilight-esorex or "
    "the python-cpl facade, the environment variable MUSETWILIGHT_ILLUM_MODEL; musetwilight only, not one "
    "of ESO's parameters, so it is in no configuration file and no product's parameter list; default eso): "
    "the model of TWILIGHT_CUBE. eso is ESO's, bit-compatible (each plane on its own: 5x7 median filter, "
    "2D polynomial of --xorder/--yorder, a separate vignetting fit). joint fits the whole cube at once, in "
    "log space: the illumination is smooth in wavelength (Legendre polynomials), the field is a global 2D "
    "polynomial plus terms of each IFU (level, x and y slopes; the recipe scales every IFU by its "
    "integrated flux, and each IFU has its own relay optics) and of each slicer stack (level, x slope), "
    "with the IFU and stack of each spaxel from GEOMETRY_TABLE; the vignetted area (VIGNETTING_MASK in "
    "WFM, the top --vignnfmmask rows in NFM) gets a smooth surface fitted together with the field; "
    "slice-to-slice efficiencies are fitted as random effects and left out (they are ILLUM's job); "
    "weights follow the photon noise and the measured structure; outliers and partly illuminated "
    "slice-edge spaxels do not enter the fit. The product keeps ESO's format (DATA planes of mean 1, the "
    "same extensions) and is applied by muse_scibasic unchanged; the primary header says MUSETWILIGHT "
    "ILLUM MODEL = 'joint'. The polynomial orders (xorder, yorder) and the vignetting smoothing "
    "parameters do not apply to it."
)


def render(show_hidden: bool = False, width: int = 80,
           synopsis: str = "musetwilight run [--<parameter>=<value> ...] [--output-dir DIR] sof") -> str:
    """The whole manual page as text (``synopsis``: the command line it shows)."""
    wrap = textwrap.TextWrapper(width=width, initial_indent="  ", subsequent_indent="  ")
    lines = [
        "NAME",
        f"  muse_twilight -- {SYNOPSIS}",
        "",
        "SYNOPSIS",
        f"  {synopsis}",
        "",
        "DESCRIPTION",
        wrap.fill(DESCRIPTION),
        "",
        '  Input frames for raw frame tag "SKYFLAT":',
        "",
        f"   {'Frame tag':<20} {'Type':<5} Req #Fr Description",
        f"   {'-' * 20} {'-' * 4} --- --- {'-' * 11}",
    ]
    for rule in TAG_RULES:
        required = "Y" if rule.minimum > 0 else "."
        count = f">={rule.minimum}" if rule.maximum is None and rule.minimum > 1 else (
            "" if rule.maximum is None else str(rule.maximum))
        lines.append(f"   {rule.tag:<20} {rule.group:<5} {required:>2}  {count:>3} {rule.description}")
    lines += ["", '  Product frames for raw frame tag "SKYFLAT":', "",
              f"   {'Frame tag':<20} {'Level':<8} Description", f"   {'-' * 20} {'-' * 8} {'-' * 11}"]
    for product in PRODUCTS:
        lines.append(f"   {product.tag:<20} {'final':<8} {product.description}")
    lines += ["", "OPTIONS", "  The following options are provided by this recipe.", ""]
    option_wrap = textwrap.TextWrapper(width=width, subsequent_indent=" " * 26)
    for parameter in PARAMETERS:
        if parameter.expert and not show_hidden:
            continue
        allowed = f" <{' | '.join(parameter.alternatives)}>" if parameter.choices else ""
        text = f"  --{parameter.name:<20}: {parameter.help}{allowed} [{format_value(parameter.default)}]"
        lines.append(option_wrap.fill(text))
    lines += ["", "  Options of musetwilight beyond ESO's recipe:", ""]
    lines.append(option_wrap.fill("  " + ILLUM_MODEL_HELP))
    lines += ["", "RELEASE", f"  musetwilight {__version__} (parameters of ESO muse_twilight 2.8.7)", ""]
    return "\n".join(lines)
