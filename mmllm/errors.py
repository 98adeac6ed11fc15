"""User-facing errors.

Anything a user can cause (a bad path, a malformed config, an inconsistent checkpoint) raises
an `MMLLMError` whose message names the problem in one line; the CLI prints that line instead
of a traceback.
"""


class MMLLMError(Exception):
    """A problem with the user's input, printed as one line by the CLI."""


class ConfigError(MMLLMError):
    """A YAML config or command-line override that does not fit its dataclass."""


class LayoutError(MMLLMError):
    """A vocabulary layout that is inconsistent, or ids that do not fit it."""


class CheckpointError(MMLLMError):
    """A checkpoint dir that is missing, partial, or disagrees with itself."""


class InputError(MMLLMError):
    """Model inputs that do not fit the model, such as ids outside the vocabulary."""


class MediaError(InputError):
    """A media file or array that cannot be read or does not fit: corrupt, truncated, wrong shape."""
