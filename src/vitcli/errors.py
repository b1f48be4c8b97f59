"""The one project exception; the CLI turns it into a one-line message and exit code 1."""


class VitcliError(Exception):
    """A user-facing error: the message names the file, key or flag, the value and what is valid."""


def shown(value: object, limit: int = 80) -> str:
    """repr(value) for a message, cut to `limit` characters: a huge value never floods the one error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
