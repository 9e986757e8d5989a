"""Imports every built-in training method so that it registers itself in ``METHODS``."""

from certfx.train import (ace_entropy, adversarial, bcp, colt, crown_ibp, graddiv,  # noqa: F401
                          ibp, sabr, taps)
