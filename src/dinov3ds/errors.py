"""The one exception type a user can cause.

Anything raised as `UserError` is a problem with the user's input (a file, a config, a checkpoint) and
is printed by the CLI as a single line with exit code 2. Every other exception is a bug and may trace.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file or key and the fix."""


class DataWarning(UserWarning):
    """Data skipped on purpose (`data.on_bad_sample: warn`); shown by the CLI even when library warnings are not."""
