"""slimfit_fx: memory-efficient fine-tuning (SlimFit) as torch.compile graph passes.

    cm = slimfit_fx.compile(model)      # then train exactly as before
    cm.slimfit.set_frozen(names); print(cm.slimfit.report())
"""
from .config import SlimFitConfig
from .errors import AlreadyCompiledError, CaptureError, SlimFitError
from .module import SlimFit, SlimFitModule, compile

__version__ = "0.1.0"

__all__ = [
    "AlreadyCompiledError",
    "CaptureError",
    "SlimFit",
    "SlimFitConfig",
    "SlimFitError",
    "SlimFitModule",
    "compile",
]
