"""Exit codes, and the one line each error becomes."""

from __future__ import annotations

from app.client import (
    APIError,
    Conflict,
    ImageQueueError,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unreachable,
)

EXIT_OK = 0
EXIT_FAILED = 1  # some image did not succeed, or the server could not be reached or kept refusing
EXIT_USAGE = 2  # the command itself was wrong: flags, token, a request the server refused, the folder
EXIT_INTERRUPTED = 130  # Ctrl+C (128 + SIGINT)


class CliError(Exception):
    """A failure to report as one line, and the exit code it means."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def explain(error: ImageQueueError) -> CliError:
    """The client's error as what a user reads and the exit code."""
    if isinstance(error, Unauthorized):
        return CliError(f"the server refused the token (401: {error.detail}); pass a valid one with --token "
                        "or IMAGEQUEUE_TOKEN (python -m app.cli token USER mints one for a local server)")
    if isinstance(error, InvalidRequest):
        return CliError(f"the server rejected the request ({error.status}): {error}")
    if isinstance(error, NotFound | Conflict):
        return CliError(f"{error.detail} ({error.status})")
    if isinstance(error, RateLimited):
        return CliError(f"the server is still refusing new work (429): {error.detail}", EXIT_FAILED)
    if isinstance(error, Unavailable):
        return CliError(f"the server is unavailable ({error.status}): {error.detail}", EXIT_FAILED)
    if isinstance(error, APIError):
        return CliError(f"the server answered {error.status}: {error}", EXIT_FAILED)
    if isinstance(error, Unreachable):
        return CliError(f"{error} (check --url or IMAGEQUEUE_URL)", EXIT_FAILED)
    return CliError(str(error), EXIT_FAILED)


def waiting(error: ImageQueueError, seconds: float) -> str:
    """What to say while the client waits out an answer or a lost connection."""
    if isinstance(error, RateLimited):
        return f"server busy (429): {error.detail}; waiting {seconds:.0f} s as it asks (Retry-After), then retrying"
    if isinstance(error, APIError):
        return f"server unavailable ({error.status}): {error.detail}; retrying in {seconds:.0f} s"
    return f"{error}; reconnecting in {seconds:.1f} s"
