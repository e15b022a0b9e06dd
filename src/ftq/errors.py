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
from ftq.stages.merge import MergeCheckError
from ftq.tracking_server import Unavailable as TrackingServerUnavailable
from ftq.training.model import QLoRAUnavailable


class UsageError(ValueError):
    """A command-line argument that cannot be used."""


USER_ERRORS = (DataError, RegistryError, TemplateError, ParamsError, SourceError, UsageError, QLoRAUnavailable, FileNotFoundError,
               MergeCheckError, BuildCheckError, LmEvalError, RegistryBusy, ChangedBuildError,
               TrackingServerUnavailable)
