"""Errors and exit codes: what a user can act on, what is pcompiler's bug, and one line of each.

A leaf of the core: it imports nothing from pcompiler. Every error a user can act on is a
`CompileError` (what, where, how to fix); the CLI prints it as one `error: ...` line and exits
with its `exit_code`. An exception that is not a CompileError, raised inside a pass, is a bug in
pcompiler: the pass manager wraps it in `InternalError`, which names the pass (exit 1).
"""

from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_VERIFY = 0, 1, 2, 3
EXIT_EXPORT = 4  # the run finished, and an export it was asked for failed


def first_line(text: str) -> str:
    """The first non-empty line, stripped (torch errors often append notes on later lines), with
    the line after where it ends in a colon ("Error(s) in loading state_dict for X:")."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (a CompileError: just its line), cut to `limit` characters."""
    first = first_line(str(err))
    if not isinstance(err, CompileError):
        first = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


class CompileError(Exception):
    """An error a user can act on: what went wrong, where, and how to fix it (exit 2).

    `node` names the graph node when there is one; `hint` says how to fix it."""

    exit_code = EXIT_USER

    def __init__(self, message: str, node: str | None = None, hint: str | None = None):
        self.message, self.node, self.hint = message, node, hint
        text = message if node is None else f"at node '{node}': {message}"
        super().__init__(text if hint is None else f"{text} ({hint})")


class VerifyError(CompileError):
    """The slim model does not equal the original with the removed channels zeroed (exit 3)."""

    exit_code = EXIT_VERIFY


class PassError(CompileError):
    """A pass refused the Program (a CompileError inside it, or an unmet precondition): the
    cause's message with the pass named and what ran before; the cause's exit code."""

    def __init__(self, pass_name: str, cause: CompileError, before: list[str]):
        self.pass_name, self.cause, self.before = pass_name, cause, before
        ran = ", ".join(before) if before else "nothing"
        super().__init__(f"pass '{pass_name}' failed: {cause.message} [ran before: {ran}]",
                         node=cause.node, hint=cause.hint)
        self.exit_code = cause.exit_code


class InternalError(Exception):
    """A bug in pcompiler: an unexpected exception inside a pass, or a pass that broke its
    contract (exit 1). Names the pass; the cause is chained for the traceback."""

    exit_code = EXIT_BUG

    def __init__(self, pass_name: str, detail: str, before: list[str] | None = None):
        self.pass_name, self.detail = pass_name, detail
        ran = "" if before is None else f" [ran before: {', '.join(before) or 'nothing'}]"
        super().__init__(f"internal error in pass '{pass_name}': {detail}{ran}")
