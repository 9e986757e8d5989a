"""Verification: falsification by adversarial attacks (:mod:`certfx.verify.attacks`)."""

from certfx.verify.attacks import (AttackResult, BallAttackResult, Loss, Norm, PGDConfig,
                                   pgd_ball, pgd_property, recheck)

__all__ = ["AttackResult", "BallAttackResult", "Loss", "Norm", "PGDConfig", "pgd_ball",
           "pgd_property", "recheck"]
