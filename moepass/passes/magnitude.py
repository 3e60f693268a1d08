"""Magnitude pruning: zero the smallest |W| in each output row (or in each group of m inputs for
N:M). No calibration; the baseline Wanda and SparseGPT must beat."""

from __future__ import annotations

from moepass.pruning import PruneConfig, magnitude_prune, prune_program

from .base import TransformPass, TransformResult, register_pass


@register_pass
class MagnitudePass(TransformPass):
    name = "magnitude"
    config_class = PruneConfig

    def run(self, program, context) -> TransformResult:
        def method(weight, stats, config, name):
            return magnitude_prune(weight, config, name)

        return TransformResult(
            True, prune_program(program, context, self.config, method, needs_hessian=False, calibrated=False)
        )
