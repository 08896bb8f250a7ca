"""Placeholder: filled by the losses work."""
__all__ = []
