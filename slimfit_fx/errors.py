"""Exceptions slimfit_fx raises on its own behalf.

Bad arguments raise the builtin TypeError/ValueError/KeyError; these classes are
for failures of the compile pipeline itself, where the message says what broke.
"""


class SlimFitError(RuntimeError):
    """Base class for slimfit_fx failures that are not plain bad arguments."""


class CaptureError(SlimFitError):
    """torch.compile (dynamo) could not capture the model's forward as one graph."""


class AlreadyCompiledError(SlimFitError):
    """`slimfit_fx.compile` was called on a model it has already compiled."""
