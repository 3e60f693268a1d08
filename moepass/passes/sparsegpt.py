"""SparseGPT (Frantar & Alistarh 2023): prune column block by column block, choosing in each block
the weights with the smallest W^2 / [H^-1]_jj^2 per row, and updating the remaining weights to
compensate through the inverse Hessian of the layer's inputs (OBS update). N:M masks are chosen every
m columns from the weights as updated so far (choosing a whole block's up front wastes most of the
compensation: 2.3x the output error on correlated inputs).
Dead input channels (zero Hessian diagonal) are zeroed. Experts with too few routed tokens use
H = I, which is magnitude pruning."""

from __future__ import annotations

import torch

from moepass.pruning import (
    CalibratedPruneConfig,
    check_groups,
    check_zeroes,
    mask_lowest,
    mask_lowest_count,
    prune_program,
    zeros_before,
)

from .base import TransformPass, TransformResult, register_pass

BLOCK = 128
DAMP = 0.01


def sparsegpt_prune(weight, stats, config: CalibratedPruneConfig, name: str):
    w = weight.detach().double().clone()
    cols = w.shape[1]
    h = stats.mean_hessian() if stats is not None else torch.eye(cols, dtype=torch.float64, device=w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    nm = config.nm()
    if nm is not None:
        check_groups(cols, config, name)
    check_zeroes(cols, config, name)
    block = BLOCK if nm is None else max(BLOCK // nm[1], 1) * nm[1]
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, h1 = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(w1)
        scale = torch.diag(h1).pow(2)
        if nm is None:  # the block's share of the row total: rounding each block alone loses zeros
            count = zeros_before(end, config.sparsity) - zeros_before(start, config.sparsity)
            mask = mask_lowest_count(w1.pow(2) / scale, count)
        else:
            mask = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:  # each group's mask from the weights updated so far
                group = slice(i, i + nm[1])
                mask[:, group] = mask_lowest(w1[:, group].pow(2) / scale[group], config, name)
            column = w1[:, i]
            pruned = torch.where(mask[:, i], torch.zeros_like(column), column)
            error = (column - pruned) / h1[i, i]
            w1[:, i:] -= error.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            w1[:, i] = pruned
            errors[:, i] = error
        w[:, start:end] = w1
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype)


@register_pass
class SparseGPTPass(TransformPass):
    name = "sparsegpt"
    config_class = CalibratedPruneConfig
    needs_calibration = True

    def run(self, program, context) -> TransformResult:
        return TransformResult(
            True,
            prune_program(
                program, context, self.config, sparsegpt_prune, needs_hessian=True, calibrated=True
            ),
        )
