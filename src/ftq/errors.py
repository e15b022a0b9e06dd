"""Errors caused by the user's input (params, data, sources): reported as one clear message, no traceback."""

from ftq.data.errors import DataError
from ftq.data.registry import RegistryError
from ftq.data.tokenize import TemplateError
from ftq.evaluation.harness import LmEvalError
from ftq.params import ParamsError
from ftq.stages.base import SourceError
from ftq.quantize.check import BuildCheckError
from ftq.registry.lock import RegistryBusy
from ftq.registry.package import ChangedBuildError
from ftq.tracking_server import Unavailable as TrackingServerUnavailable


class UsageError(ValueError):
    """A command-line argument that cannot be used."""


# defined here rather than in the modules that raise them (ftq.stages.merge, ftq.training.model), which
# import torch: every command imports this module, and torch costs a stage that never uses it ~1.5 s
class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base + adapter (or produced NaN/Inf)."""


class QLoRAUnavailable(RuntimeError):
    """bitsandbytes cannot run 4-bit layers on this machine."""


USER_ERRORS = (DataError, RegistryError, TemplateError, ParamsError, SourceError, UsageError, QLoRAUnavailable, FileNotFoundError,
               MergeCheckError, BuildCheckError, LmEvalError, RegistryBusy, ChangedBuildError,
               TrackingServerUnavailable)
