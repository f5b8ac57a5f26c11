"""The reading-room web page and its API (``bonetumor serve``): see app.py."""

from bonetumor.serve.app import create_app

__all__ = ["create_app"]
