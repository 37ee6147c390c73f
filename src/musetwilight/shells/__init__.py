"""The ways to run the recipe: the ``musetwilight`` command line (cli, all its argument
parsing), the EsoRex-compatible ``musetwilight-esorex`` (esorex), many sets at once (batch),
and the manual page (manpage).  The python-cpl facade is :mod:`musetwilight.cpl`."""
