"""SparseGPT (Frantar & Alistarh 2023): prune column block by column block, choosing in each block
the weights with the smallest W^2 / [H^-1]_jj^2 per row (every m columns for N:M), and updating the
remaining weights to compensate through the inverse Hessian of the layer's inputs (OBS update).
Dead input channels (zero Hessian diagonal) are zeroed. Experts with too few routed tokens use
H = I, which is magnitude pruning."""

from __future__ import annotations

import torch

from moepass.pruning import PruneConfig, mask_lowest, prune_program

from .base import TransformPass, TransformResult, register_pass

BLOCK = 128
DAMP = 0.01


def sparsegpt_prune(weight, stats, config: PruneConfig, name: str):
    w = weight.detach().double().clone()
    cols = w.shape[1]
    h = (
        (stats.hessian / max(stats.tokens, 1)).clone()
        if stats is not None
        else torch.eye(cols, dtype=torch.float64)
    )
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    nm = config.nm()
    block = BLOCK if nm is None else max(BLOCK // nm[1], 1) * nm[1]
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, h1 = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(w1)
        mask = mask_lowest(w1.pow(2) / torch.diag(h1).pow(2), config, name)
        for i in range(end - start):
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
    config_class = PruneConfig
    needs_calibration = True

    def run(self, program, context) -> TransformResult:
        return TransformResult(
            True,
            prune_program(
                program, context, self.config, sparsegpt_prune, needs_hessian=True, calibrated=True
            ),
        )
