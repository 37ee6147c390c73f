"""The parameter declarations: validation, config files, and equality with ESO's recipe."""

import re
import subprocess

import numpy as np
import pytest

from musetwilight import params
from musetwilight.errors import ParameterError
from musetwilight.params import CrType, OverscanSpec, RejectSpec, Resample, VignSmooth, make_settings
from musetwilight.tools import eso


def test_defaults_are_complete_and_valid():
    settings = make_settings()
    assert len(settings) == 24
    assert settings.overscan == OverscanSpec("vpoly", 15, 1.00001, 1.00001, "vpoly")
    assert settings.ovscreject == RejectSpec("dcr", 128, 32, 3, 2.5, 5.0, "dcr")
    assert settings.resample is Resample.DRIZZLE and settings.crtype is CrType.MEDIAN
    assert settings.vignsmooth is VignSmooth.POLYFIT
    assert settings["muse.muse_twilight.crsigma"] == 50.0
    assert settings.scale is False and settings.vignnfmmask == 22


@pytest.mark.parametrize("name, value, expected", [
    ("xorder", "3", 3), ("crsigma", "-1", -1.0), ("scale", "TRUE", True), ("scale", "false", False),
    ("overscan", "vpoly:10,1.0001,1.0001", "vpoly:10,1.0001,1.0001"), ("ovscreject", "dcr:128,32,5", "dcr:128,32,5"),
    ("resample", "lanczos", "lanczos"), ("lambdamin", 4750, 4750.0),
])
def test_conversion(name, value, expected):
    value = make_settings({name: value})[name]
    assert (str(value) if isinstance(expected, str) else value) == expected


@pytest.mark.parametrize("name, value, message", [
    ("xorder", "two", "xorder: 'two' is not an integer"),
    ("xorder", 2.5, "not an integer"),
    ("resample", "cubic", "not one of nearest, linear, quadratic, renka, drizzle, lanczos"),
    ("overscan", "poly", "not valid (none, offset or vpoly"),
    ("ovscreject", "sigma", "not valid"),
    ("crsigma", "nan", "not a finite number"),
    ("scale", "maybe", "not a boolean"),
    ("dlambda", 0, "must be positive"),
    ("nlow", -1, "must not be negative"),
    ("nosuch", 1, "unknown parameter 'nosuch'"),
])
def test_invalid_values_are_named(name, value, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        make_settings({name: value})


def test_lambda_range_cross_check():
    with pytest.raises(ParameterError, match=r"lambdamax \(5000.0\) must be larger than lambdamin \(5000.0\)"):
        make_settings({"lambdamax": 5000})


def test_none_means_default_and_replace():
    settings = make_settings({"xorder": None, "yorder": 4})
    assert settings.xorder == 2 and settings.yorder == 4
    assert settings.replace(yorder=1).yorder == 1
    assert settings.non_default() == {"yorder": 4}


def test_config_round_trip(tmp_path):
    settings = make_settings({"resample": "nearest", "scale": True, "lambdamax": 8800})
    path = tmp_path / "twilight.rc"
    path.write_text(params.config_text(settings))
    assert make_settings(params.read_config(str(path))) == settings


def test_config_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.rc"
    path.write_text("# comment\nmuse.muse_twilight.xorder=abc\n")
    with pytest.raises(ParameterError, match=r"bad.rc, line 2: parameter xorder"):
        params.read_config(str(path))


@pytest.mark.eso
@pytest.mark.skipif(eso.esorex_path() is None, reason="ESO's esorex is not installed")
def test_declarations_equal_esorex(tmp_path):
    """Names, order, defaults and expert flags equal those of ESO's installed muse_twilight."""
    rc = tmp_path / "eso.rc"
    subprocess.run(["esorex", f"--create-config={rc}", "muse_twilight"], check=True,
                   capture_output=True, cwd=tmp_path)
    eso_values = params.read_config(str(rc))
    assert list(eso_values) == [p.name for p in params.PARAMETERS]
    assert eso_values == {p.name: p.default_value for p in params.PARAMETERS}
    man = subprocess.run(["esorex", "--man-page", "muse_twilight"], capture_output=True, text=True).stdout
    visible = set(re.findall(r"^  --(\w+)\s+:", man, flags=re.M))
    assert visible == {p.name for p in params.PARAMETERS if not p.expert}
    for parameter in params.PARAMETERS:
        if parameter.choices:
            assert f"<{' | '.join(parameter.alternatives)}>" in re.sub(r"\s+", " ", man) or parameter.expert


# Every kind of value the former pattern checks let through ("vpoly(:n(,n){0,2})?",
# "(dcr|fit)(:n(,n)*)?" with n any run of digits, signs, dots and exponents): each one is
# either parsed into its typed value here, or refused here with the reason, never later.
OVERSCAN_VALUES = {
    "none": ("none", 15, 1.00001, 1.00001), "offset": ("offset", 15, 1.00001, 1.00001),
    "vpoly": ("vpoly", 15, 1.00001, 1.00001), "vpoly:10": ("vpoly", 10, 1.00001, 1.00001),
    "vpoly:0": ("vpoly", 0, 1.00001, 1.00001), "vpoly:5,1.01": ("vpoly", 5, 1.01, 1.00001),
    "vpoly:5,1.01,1.02": ("vpoly", 5, 1.01, 1.02), "vpoly:12,2e0,1.5E0": ("vpoly", 12, 2.0, 1.5),
    "vpoly:2.5": "vpoly order '2.5' is not a non-negative integer",
    "vpoly:-3": "vpoly order '-3' is not a non-negative integer",
    "vpoly:1e1": "vpoly order '1e1' is not a non-negative integer",
    "vpoly:300": "vpoly order 300 is larger than 255",
    "vpoly:15,0.5": "frms and fchisq must be larger than 1",
    "vpoly:15,1.01,1.0": "frms and fchisq must be larger than 1",
    "vpoly:15,+-.": "vpoly frms '+-.' is not a number",
    "vpoly:": "takes 1 to 3 comma-separated values",
}
REJECT_VALUES = {
    "none": ("none", 128, 32, 3, 2.5, 5.0), "dcr": ("dcr", 128, 32, 3, 2.5, 5.0),
    "dcr:64": ("dcr", 64, 32, 3, 2.5, 5.0), "dcr:64,16,2,3.0": ("dcr", 64, 16, 2, 3.0, 5.0),
    "dcr:64,16,2,3.3": ("dcr", 64, 16, 2, float(np.float32(3.3)), 5.0),
    "fit": ("fit", 128, 32, 3, 2.5, 5.0), "fit:4": ("fit", 128, 32, 3, 2.5, 4.0),
    "fit:3.3": ("fit", 128, 32, 3, 2.5, float(np.float32(3.3))),
    "dcr:1.5": "dcr x box '1.5' is not a non-negative integer",
    "dcr:128,32,-1": "dcr passes '-1' is not a non-negative integer",
    "dcr:1,2,3,4,5": "takes 1 to 4 comma-separated values",
    "fit:1,2": "takes 1 to 1 comma-separated values",
    "fit:x": "fit sigma 'x' is not a number",
    "fit:e": "fit sigma 'e' is not a number",
}


@pytest.mark.parametrize("text", sorted(OVERSCAN_VALUES))
def test_overscan_text_is_parsed_once_into_its_spec(text):
    expected = OVERSCAN_VALUES[text]
    if isinstance(expected, str):
        with pytest.raises(ParameterError, match=re.escape(expected)):
            make_settings({"overscan": text})
        return
    spec = make_settings({"overscan": text}).overscan
    assert (spec.method, spec.order, spec.frms, spec.fchisq) == expected
    assert str(spec) == text  # what the products record, as ESO


@pytest.mark.parametrize("text", sorted(REJECT_VALUES))
def test_ovscreject_text_is_parsed_once_into_its_spec(text):
    expected = REJECT_VALUES[text]
    if isinstance(expected, str):
        with pytest.raises(ParameterError, match=re.escape(expected)):
            make_settings({"ovscreject": text})
        return
    spec = make_settings({"ovscreject": text}).ovscreject
    assert (spec.method, spec.xbox, spec.ybox, spec.npass, spec.threshold, spec.sigma) == expected
    assert str(spec) == text


def test_enumerations_carry_the_kernel_codes():
    assert [r.code for r in Resample] == [0, 1, 2, 3, 4, 5]
    assert [c.code for c in CrType] == [0, 1, 2]
    assert make_settings({"resample": "renka"}).resample is Resample.RENKA


def test_settings_pickle_and_config_keep_the_text(tmp_path):
    import pickle

    settings = make_settings({"overscan": "vpoly:5,1.01", "ovscreject": "fit:3.3", "vignsmooth": "median"})
    assert pickle.loads(pickle.dumps(settings)) == settings
    path = tmp_path / "twilight.rc"
    path.write_text(params.config_text(settings))
    text = path.read_text()
    assert "muse.muse_twilight.overscan=vpoly:5,1.01\n" in text and "ovscreject=fit:3.3\n" in text
    assert make_settings(params.read_config(str(path))) == settings


def test_cli_values_reach_the_kernels_typed_without_reparsing(simulated_set, tmp_path, monkeypatch):
    """--overscan, --vignsmooth and --crsigma are parsed once (make_settings) and arrive at the
    stages as OverscanSpec, VignSmooth and float; the kernels get the numbers they need."""
    from musetwilight.core import basicproc, resample, smooth
    from musetwilight.shells import cli

    seen = {}
    vpoly, vignetted, crreject = basicproc.vpoly_correct, smooth._smooth_vignetted, resample._crreject

    def spy_vpoly(data, dq, layout, spec, ignore, sigma):
        seen["overscan"] = spec
        return vpoly(data, dq, layout, spec, ignore, sigma)

    def spy_vignetted(wdiv, bad, is_wfm, method, xpar, ypar, warnings):
        seen["vignsmooth"] = (method, xpar, ypar)
        return vignetted(wdiv, bad, is_wfm, method, xpar, ypar, warnings)

    def spy_crreject(offsets, data, stat, dq, nx, ny, nz, crtype, sigma, *rest):
        seen["crreject"] = (crtype, sigma)
        return crreject(offsets, data, stat, dq, nx, ny, nz, crtype, sigma, *rest)

    monkeypatch.setattr(basicproc, "vpoly_correct", spy_vpoly)
    monkeypatch.setattr(smooth, "_smooth_vignetted", spy_vignetted)
    monkeypatch.setattr(resample, "_crreject", spy_crreject)
    sim = simulated_set(vignetting=True)
    code = cli.main(["run", "--overscan=vpoly:10,1.01", "--vignsmooth=median", "--vignxpar=3",
                     "--crsigma=20", "--crtype=mean", f"--output-dir={tmp_path}", str(sim.sof)])
    assert code == 0
    assert seen["overscan"] == OverscanSpec("vpoly", 10, 1.01, 1.00001, "vpoly:10,1.01")
    assert seen["vignsmooth"] == (VignSmooth.MEDIAN, 3, -1) and type(seen["vignsmooth"][1]) is int
    assert seen["crreject"] == (CrType.MEAN.code, 20.0) and type(seen["crreject"][1]) is float


# esorex 3.13.6's --create-config output for --lambdamin=VALUE (probed once; the rule of format_value)
ESOREX_REALS = {5000.0: "5e+03", 5500.0: "5.5e+03", 12345.0: "12345.0", 250.0: "250.0", 1000.0: "1e+03",
                100.0: "100.0", 99.0: "99.0", 1e6: "1e+06", 0.5: "0.5", 3.0: "3.0", 1234.5: "1234.5",
                0.001: "0.001", 1e-5: "1e-05", 9000.5: "9000.5", 1500.0: "1.5e+03", 123456.0: "123456.0",
                3.14159265358979: "3.14159265358979", 7e10: "7e+10", 0.02: "0.02"}


def test_values_are_written_as_esorex_writes_them():
    assert {value: params.format_value(value) for value in ESOREX_REALS} == ESOREX_REALS
    assert (params.format_value(True), params.format_value(False), params.format_value(3)) == ("TRUE", "FALSE", "3")
