"""Errors a user can fix: the CLI prints their message on one line and exits with code 2."""


class DifflabError(ValueError):
    """Bad input from the user (a path, a name, a file); the message says what is wrong and what to do."""


def flag(name: str) -> str:
    """The command-line flag of a setting, as error messages name it: image_tokens -> --image-tokens."""
    return "--" + name.replace("_", "-")
