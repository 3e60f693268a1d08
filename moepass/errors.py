"""Errors moepass raises for bad input. Each message names the offending thing and what to do."""


class MoepassError(Exception):
    """Base class of every error moepass raises on purpose."""


class UnsupportedModelError(MoepassError):
    """The model's class or family cannot be captured."""


class NotAnMoEModelError(UnsupportedModelError):
    """The model belongs to a supported family but has no MoE layer (a dense model)."""


class OpArgumentError(MoepassError, ValueError):
    """A canonical op called with tensors that do not fit together (dtype, shape, format)."""


class IRVerificationError(MoepassError):
    """A program violates an IR invariant (after capture or after a transform)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("IR verification failed:\n" + "\n".join(f"  - {p}" for p in problems))


class ArtifactError(MoepassError):
    """An artifact or another output cannot be written or read as asked."""
