"""`moepass.compress`: capture (if needed), calibrate, and run a recipe's passes."""

from __future__ import annotations

import logging

from torch import nn

from moepass.data import TokenSet, calibration_set, check_fits, check_source, window_length
from moepass.errors import MoepassError
from moepass.ir import MoEProgram, capture
from moepass.pass_manager import PassManager, PassReport
from moepass.recipes import Recipe, load_recipe

logger = logging.getLogger("moepass")


def compress(
    model_or_program: nn.Module | MoEProgram, recipe="paper-layer-drop", calibration=None, *, tokenizer=None
) -> MoEProgram:
    """Apply `recipe` to a transformers MoE model or a captured program; returns a new program.

    `calibration` is a TokenSet, or data `moepass.data` reads (default: the recipe's, usually the
    bundled validation split), tokenized with `tokenizer`. The input is never modified: a model is
    captured, a program is forked. The program's `report` holds per-pass times, memory, analyses.
    """
    recipe = load_recipe(recipe)
    if isinstance(model_or_program, MoEProgram):
        program = model_or_program.fork()
    else:
        program = capture(model_or_program)
    manager = PassManager(
        list(recipe.passes),
        scoring=recipe.scoring,
        calibration_mode=recipe.calibration.mode,
        batch_size=recipe.calibration.batch_size,
    )
    manager.refuse_early(program)  # before reading calibration data
    if needs_data(recipe):
        manager.calibration = _calibration_tokens(recipe, calibration, tokenizer, program)
    count = len(recipe.passes)
    logger.info("compress: recipe %s, %d pass%s", recipe.name, count, "" if count == 1 else "es")
    report = manager.run(program, refused_early=True)
    program.info.history.append({"recipe": recipe.to_dict(), "report": report.to_dict()})
    program.report = report
    return program


def needs_data(recipe: Recipe) -> bool:
    """Whether any pass reads calibration data (itself or through the analyses it needs)."""
    from moepass.passes import PASSES, TransformPass

    for name, config in recipe.passes:
        cls = PASSES[name]
        if not issubclass(cls, TransformPass) or cls.needs_calibration or cls(config).required_analyses():
            return True
    return False


def _calibration_tokens(recipe: Recipe, calibration, tokenizer, program: MoEProgram) -> TokenSet:
    positions = program.info.config.get("max_position_embeddings")
    if not isinstance(calibration, TokenSet):
        calibration = _tokenized(
            recipe, calibration, tokenizer, window_length(recipe.calibration.seq_len, positions)
        )
    check_fits(calibration, program.info.vocab_size, positions)
    return calibration


def _tokenized(recipe: Recipe, calibration, tokenizer, seq_len: int) -> TokenSet:
    spec = recipe.calibration
    if calibration is not None:  # token ids given where text belongs: say so, not "needs a tokenizer"
        check_source(calibration)
    if tokenizer is None:
        raise MoepassError(
            "compress needs a tokenizer to build calibration data from text (tokenizer=...), "
            "or a ready TokenSet as calibration="
        )
    return calibration_set(
        spec.data if calibration is None else calibration,
        tokenizer,
        samples=spec.samples,
        seq_len=seq_len,
        seed=spec.seed,
        text_key=spec.text_key,
    )


__all__ = ["PassReport", "compress"]
