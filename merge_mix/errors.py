"""The one exception type that means "the user gave us something wrong".

The CLI turns a `MergeMixError` into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class MergeMixError(Exception):
    """A user-facing error. The message is one line that names the culprit
    (file, field, tensor, domain) and, where it helps, what to do about it."""
