"""The one exception type users see.

Every bad input (missing path, unsupported architecture, corrupt file, edited
artifact) becomes a ``WorkbenchError`` whose message names the problem and the
fix in one line; the CLI prints it without a traceback.
"""


class WorkbenchError(Exception):
    """A problem with the user's input or files, explained in one line."""
