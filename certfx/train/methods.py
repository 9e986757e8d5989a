"""Imports every built-in training method so that it registers itself in ``METHODS``."""

from certfx.train import ace_entropy, adversarial, colt, crown_ibp, ibp, sabr, taps  # noqa: F401
