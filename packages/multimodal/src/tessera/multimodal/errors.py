"""The one exception for media a request can't use."""


class MediaError(ValueError):
    """An image, video or media URL that is refused or unreadable; the message names the source and
    the problem (a server answers it with a 400)."""
