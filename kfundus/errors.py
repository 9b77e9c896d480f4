"""Errors kfundus raises for bad input.

Every message names the file, row or option at fault and says what to do about it.
"""


class KfundusError(Exception):
    """Base class of the errors kfundus raises on purpose."""


class DataError(KfundusError, ValueError):
    """A dataset on disk does not match what its reader expects."""


class ConfigError(KfundusError, ValueError):
    """A configuration file or a ``--set`` override is wrong."""


class ExportError(KfundusError, RuntimeError):
    """A model cannot be exported, or its export does not reproduce the model."""
