"""Shipped middleboxes, one per module; importing this package registers them."""

from vmbox.functions import ratelimit, tokenbucket

__all__ = ["ratelimit", "tokenbucket"]
