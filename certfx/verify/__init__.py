"""Verification: adversarial attacks (:mod:`certfx.verify.attacks`), input splitting
(:mod:`certfx.verify.split`) and the cascade that runs them with the bound domains and the MILP
backend (:mod:`certfx.verify.cascade`)."""

from certfx.verify.attacks import (AttackResult, BallAttackResult, Loss, Norm, PGDConfig,
                                   pgd_ball, pgd_property, recheck)
from certfx.verify.cascade import (CascadeOptions, PropertyResult, Verdict, Verifier,
                                   combined_verdict)

__all__ = ["AttackResult", "BallAttackResult", "Loss", "Norm", "PGDConfig", "pgd_ball",
           "pgd_property", "recheck", "CascadeOptions", "PropertyResult", "Verdict", "Verifier",
           "combined_verdict"]
