"""User-facing errors. Each carries a one-line message that names the file, record or
field at fault; the CLI prints it as ``error: <message>`` and exits with status 2."""


class EditdecayError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""


class ModelLoadError(EditdecayError):
    """A model or tokenizer could not be found or loaded."""


class UnsupportedArchitectureError(EditdecayError):
    """The model's ``config.model_type`` has no registered :class:`ArchSpec`."""


class DataError(EditdecayError):
    """A data file is missing or malformed (the message names file, record and field)."""
