"""musetwilight: the ESO MUSE ``muse_twilight`` recipe in Python.

Combines raw twilight sky flats into a data cube (DATACUBE_SKYFLAT) and derives
the smooth 3D illumination correction (TWILIGHT_CUBE), equal to ESO's pipeline.
"""

__version__ = "0.1.0"
PIPELINE_ID = f"musetwilight/{__version__}"
