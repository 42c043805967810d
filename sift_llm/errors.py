"""The error type for bad input a user can fix: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """Bad input (a file, a line, a key, a value); the message says where and what was expected."""
