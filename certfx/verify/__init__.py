"""Verification: adversarial attacks (:mod:`certfx.verify.attacks` for properties,
:mod:`certfx.verify.ball_attacks` for data points), input splitting
(:mod:`certfx.verify.split`) and the cascade that runs them with the bound domains and the MILP
backend (:mod:`certfx.verify.cascade`)."""

from certfx.verify.attacks import AttackResult, Loss, Norm, PGDConfig, pgd_property, recheck
from certfx.verify.ball_attacks import BallAttackResult, pgd_ball
from certfx.verify.cascade import (CascadeOptions, PropertyResult, Verdict, Verifier,
                                   combined_verdict)

__all__ = ["AttackResult", "BallAttackResult", "Loss", "Norm", "PGDConfig", "pgd_ball",
           "pgd_property", "recheck", "CascadeOptions", "PropertyResult", "Verdict", "Verifier",
           "combined_verdict"]
