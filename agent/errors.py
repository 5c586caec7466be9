"""The one error base of meshagent, and how an error reaches a user.

Every error a user can cause or fix is a `MeshError`. Its message is one line that says what is at
fault and what to do; its `culprit` says who must act:

    request  the caller's input (a name, a label, a document, an unknown endpoint)
    node     the node's own configuration or machine (node config, cgroups, netns, the kernel)
    store    the cluster store (unreachable, corrupt, refused)

The API turns a MeshError into ``{"ok": false, "error": <line>, "culprit": ...}`` (agent/api.py);
the CLI prints ``Error: <line>`` and exits 1 (cli/main.py); `meshagent agent` prints it and exits
1 at start-up. Any other exception is a bug in meshagent: the API logs its traceback and answers
"internal error", the CLI lets Python print it. Exit code 2 is click's, for usage errors.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # an operational error: the message says why
EXIT_USAGE = 2  # click's usage errors


class MeshError(Exception):
    """An error with a one-line message for the user. Subclasses set `culprit`."""

    culprit = "request"

    def __str__(self) -> str:
        return one_line(super().__str__())


class UserError(MeshError):
    """The request must be fixed by whoever sent it; the message says how."""


def one_line(text: str) -> str:
    """``text`` as one line: its non-empty lines joined (a key with a line break, a YAML problem)."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    return " ".join(parts)
