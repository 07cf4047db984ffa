"""The base of every error a user can fix: jobs print its one-line message and exit 2."""


class FactoryError(Exception):
    """Bad input, an unusable location or model, a run that cannot go on; the message is one line."""


class EvalError(FactoryError, ValueError):
    """Inputs that cannot be evaluated (Protocol-I or Protocol-II); the message is one line."""
