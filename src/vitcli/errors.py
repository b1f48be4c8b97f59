"""The one project exception; the CLI turns it into a one-line message and exit code 1."""


class VitcliError(Exception):
    """A user-facing error: the message names the file, key or flag, the value and what is valid."""


def clip(text: str, limit: int = 80) -> str:
    """Text quoted in a message, cut to `limit` characters: a huge value never floods the one error line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object, limit: int = 80) -> str:
    """repr(value), clipped."""
    try:
        return clip(repr(value), limit)
    except ValueError:  # an int too long to print (Python's 4300-digit limit)
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def at_least(flag: str, value: int, minimum: int = 1) -> None:
    """The usual one-line error for a command-line number below its minimum."""
    if value < minimum:
        raise VitcliError(f"{flag} {value} must be at least {minimum}")
