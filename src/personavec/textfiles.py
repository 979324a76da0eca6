"""Text files a user names (prompt lists, question lists): read whole as UTF-8, and every way that can fail
(missing, a folder, unreadable, not UTF-8) is one line naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

from .errors import PersonavecError


def read_user_text(path: Path, what: str, error: type[PersonavecError] = PersonavecError) -> str:
    """The UTF-8 text of `path`; `what` names the file in the message ("prompt file"), `error` is the
    PersonavecError subclass to raise."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} '{path}' is a folder; pass a text file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise error(f"cannot read {what} '{path}' ({exc.strerror or type(exc).__name__}); check its "
                    "permissions") from None


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a user's text file, stripped (one prompt or question per line)."""
    return [line.strip() for line in read_user_text(path, what).splitlines() if line.strip()]
