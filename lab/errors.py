"""The lab's one error: a one-line message that says what failed and what to do."""


class LabError(Exception):
    """The lab could not do what was asked; str() is one line for the user."""
