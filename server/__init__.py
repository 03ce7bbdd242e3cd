"""The OpenAI-compatible HTTP server: an aiohttp app factory over an EngineClient."""

from __future__ import annotations

from server.app import make_app

__all__ = ["make_app"]
