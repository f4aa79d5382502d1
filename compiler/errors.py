"""User-facing errors: one message, a hint, and a documented exit code.

Every mistake a user can make ends in a subclass of `QCompileError`; the CLI prints
it without a traceback and exits with its code. Anything else is a bug (exit 1).
"""

from __future__ import annotations

# Exit codes (documented in README and `qcompile --help`).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_RECIPE = 4
EXIT_DATA = 5
EXIT_TARGET = 6
EXIT_OUTPUT = 7
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143   # SIGTERM (128 + SIGTERM)

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the log)",
    EXIT_USAGE: "bad command line",
    EXIT_MODEL: "the model cannot be read or is not valid ONNX",
    EXIT_RECIPE: "the recipe is invalid (unknown pass or key, wrong type, wrong order)",
    EXIT_DATA: "calibration or verification data does not match the model, or holds NaN/Inf",
    EXIT_TARGET: "the target cannot do what the recipe asks",
    EXIT_OUTPUT: "the output directory cannot be written, holds files that are not a compile's, or is in use",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing was written",
    EXIT_TERMINATED: "terminated (SIGTERM); nothing was written",
}


class QCompileError(Exception):
    """A user error: `str(err)` is the whole message; `hint` says what to do."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __reduce__(self):   # unpickled whole (hint and fields) in another process: calibration workers
        return _rebuild_error, (type(self), str(self), dict(self.__dict__))

    def render(self) -> str:
        text = str(self)
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


def _rebuild_error(cls, message: str, state: dict) -> QCompileError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class UsageError(QCompileError):
    exit_code = EXIT_USAGE


class ModelError(QCompileError):
    exit_code = EXIT_MODEL


class RecipeError(QCompileError):
    """A recipe problem, located by file, pass and key."""

    exit_code = EXIT_RECIPE

    def __init__(self, message: str, *, file: str | None = None, pass_name: str | None = None,
                 key: str | None = None, hint: str | None = None):
        where = []
        if file:
            where.append(str(file))
        if pass_name:
            where.append(f"pass '{pass_name}'")
        if key:
            where.append(f"key '{key}'")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message, hint)
        self.file, self.pass_name, self.key = file, pass_name, key


class DataError(QCompileError):
    exit_code = EXIT_DATA


class TargetError(QCompileError):
    exit_code = EXIT_TARGET


class OutputError(QCompileError):
    exit_code = EXIT_OUTPUT


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the CLI's handler so that staged output is
    discarded on the way out (like KeyboardInterrupt for Ctrl-C)."""
