"""Wanda: prune by |W_ij| * ||x_j|| (Sun et al. 2024) — weight magnitude times the norm of the input
channel over the calibration tokens, compared within each output row (or each m-group for N:M).
For a routed expert the norms come from the tokens routed to it only."""

from __future__ import annotations

from moepass.pruning import CalibratedPruneConfig, magnitude_prune, mask_lowest, prune_program

from .base import TransformPass, TransformResult, register_pass


def wanda_prune(weight, stats, config: CalibratedPruneConfig, name: str):
    if stats is None:  # no (or too few) calibration tokens: magnitude
        return magnitude_prune(weight, config, name)
    score = weight.abs().double() * stats.mean_squares().sqrt()
    return weight.masked_fill(mask_lowest(score, config, name), 0)


@register_pass
class WandaPass(TransformPass):
    name = "wanda"
    config_class = CalibratedPruneConfig
    needs_calibration = True

    def run(self, program, context) -> TransformResult:
        return TransformResult(
            True,
            prune_program(program, context, self.config, wanda_prune, needs_hessian=False, calibrated=True),
        )
