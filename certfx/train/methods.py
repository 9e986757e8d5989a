"""Imports every built-in training method so that it registers itself in ``METHODS``."""

from certfx.train import (ace_entropy, adversarial, colt, crown_ibp, graddiv, ibp,  # noqa: F401
                          sabr, taps)
