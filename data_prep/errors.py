"""The one exception type data preparation raises for bad input or bad state."""


class PrepError(Exception):
    """A problem with the recipe, the input corpus or the output directory.

    The message names the problem (file, record, key) so the CLI can print it as-is.
    Raised before anything in the output directory is touched whenever possible.
    """
