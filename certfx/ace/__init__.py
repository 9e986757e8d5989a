"""ACE, certify-or-predict (paper 000): composition (:func:`certfx.passes.insert_ace`),
end-to-end certification (:mod:`~certfx.ace.certify`), threshold sweeps
(:mod:`~certfx.ace.sweep`) and selection training (:mod:`~certfx.ace.train`)."""

from certfx.ace.certify import AceAccuracy, AceRecords, collect
from certfx.ace.sweep import default_thresholds, plot, sweep, write_csv

__all__ = ["AceAccuracy", "AceRecords", "collect", "default_thresholds", "sweep", "write_csv",
           "plot"]
