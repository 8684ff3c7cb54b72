"""Which device tessera runs on, and how much memory it has."""

from .device import KNOWN_DEVICES, Platform, current_platform, platform_for

__all__ = ["KNOWN_DEVICES", "Platform", "current_platform", "platform_for"]
