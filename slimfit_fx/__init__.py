"""slimfit_fx: memory-efficient fine-tuning (SlimFit) as torch.compile graph passes.

    cm = slimfit_fx.compile(model)      # then train exactly as before
    cm.slimfit.set_frozen(names); print(cm.slimfit.report())
"""
import logging as _logging
import os as _os

from .config import CompressionConfig, SlimFitConfig
from .errors import AlreadyCompiledError, CaptureError, SlimFitError
from .module import SlimFit, SlimFitModule, compile
from .policies import ILS, LISA, FreezePolicy, Manual, StepView

__version__ = "0.1.0"

# Silent unless asked: SLIMFIT_FX_LOG=info (or debug) prints what each pass did as
# regions are compiled; or configure the "slimfit_fx" logger yourself.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
if _os.environ.get("SLIMFIT_FX_LOG"):
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("[slimfit_fx] %(message)s"))
    _logging.getLogger(__name__).addHandler(_handler)
    _logging.getLogger(__name__).setLevel(_os.environ["SLIMFIT_FX_LOG"].upper())

__all__ = [
    "AlreadyCompiledError",
    "CaptureError",
    "CompressionConfig",
    "FreezePolicy",
    "ILS",
    "LISA",
    "Manual",
    "SlimFit",
    "SlimFitConfig",
    "SlimFitError",
    "SlimFitModule",
    "StepView",
    "compile",
]
