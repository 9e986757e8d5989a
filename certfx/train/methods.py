"""Imports every built-in training method so that it registers itself in ``METHODS``."""

from certfx.train import adversarial, crown_ibp, ibp, sabr, taps  # noqa: F401

try:
    from certfx.train import colt  # noqa: F401
except ImportError:  # pragma: no cover - until colt.py lands
    pass
