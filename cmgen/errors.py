"""Errors meant for users: one sentence naming the field and the fix; the CLI exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, path, checkpoint, flag), not a bug in cmgen."""
