"""The parameter declarations: validation, config files, and equality with ESO's recipe."""

import re
import subprocess

import pytest

from musetwilight.tools import eso
from musetwilight import params
from musetwilight.params import ParameterError, make_settings


def test_defaults_are_complete_and_valid():
    settings = make_settings()
    assert len(settings) == 24
    assert settings.overscan == "vpoly" and settings.ovscreject == "dcr"
    assert settings["muse.muse_twilight.crsigma"] == 50.0
    assert settings.scale is False and settings.vignnfmmask == 22


@pytest.mark.parametrize("name, value, expected", [
    ("xorder", "3", 3), ("crsigma", "-1", -1.0), ("scale", "TRUE", True), ("scale", "false", False),
    ("overscan", "vpoly:10,1.0001,1.0001", "vpoly:10,1.0001,1.0001"), ("ovscreject", "dcr:128,32,5", "dcr:128,32,5"),
    ("resample", "lanczos", "lanczos"), ("lambdamin", 4750, 4750.0),
])
def test_conversion(name, value, expected):
    assert make_settings({name: value})[name] == expected


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
    assert eso_values == {p.name: p.default for p in params.PARAMETERS}
    man = subprocess.run(["esorex", "--man-page", "muse_twilight"], capture_output=True, text=True).stdout
    visible = set(re.findall(r"^  --(\w+)\s+:", man, flags=re.M))
    assert visible == {p.name for p in params.PARAMETERS if not p.expert}
    for parameter in params.PARAMETERS:
        if parameter.choices:
            assert f"<{' | '.join(parameter.choices)}>" in re.sub(r"\s+", " ", man) or parameter.expert
