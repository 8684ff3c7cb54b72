"""The one exception every reader in tessera.formats raises for a damaged or unsupported input."""


class FormatError(ValueError):
    """A checkpoint, tokenizer or config that can't be read; the message names the file and the problem."""
