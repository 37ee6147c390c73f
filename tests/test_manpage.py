"""The man page lists every parameter, input and product."""

from musetwilight.io.frames import TAG_RULES
from musetwilight.params import PARAMETERS
from musetwilight.shells import manpage


def test_man_page_lists_everything():
    text = manpage.render(show_hidden=True)
    for parameter in PARAMETERS:
        assert f"--{parameter.name}" in text
    for rule in TAG_RULES:
        assert rule.tag in text
    assert "DATACUBE_SKYFLAT" in text and "TWILIGHT_CUBE" in text
    assert "[drizzle]" in text.replace("\n", " ")


def test_hidden_parameters_only_on_request():
    text = manpage.render()
    assert "--vignsmooth" not in text and "--yorder" in text
