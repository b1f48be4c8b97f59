"""The one project exception; the CLI turns it into a one-line message and exit code 1."""


class VitcliError(Exception):
    """A user-facing error: the message names the file, key or flag, the value and what is valid."""
