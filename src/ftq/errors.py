"""Errors caused by the user's input that no lighter module defines. The command line reports every user error
as one clear message, no traceback: its list (ftq.cli.user_errors) imports each where it is defined, so
that importing this module for one class does not import every stage."""


class UsageError(ValueError):
    """A command-line argument that cannot be used."""


# defined here rather than in the modules that raise them (ftq.stages.merge, ftq.training.model), which
# import torch: every command imports this module (ftq.cli.user_errors), and torch costs a stage that never uses it ~1.5 s
class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base + adapter (or produced NaN/Inf)."""


class QLoRAUnavailable(RuntimeError):
    """bitsandbytes cannot run 4-bit layers on this machine."""
