"""Talking to the user: websocket events to the browser, the pack's HTTP routes, progress bars."""

from __future__ import annotations

from typing import Callable

import comfy.utils

from ..ids import ROUTE_STOP


def send_event(event: str, data: dict) -> None:
    """A websocket message to every connected browser (safe from any thread)."""
    server = getattr(prompt_server(), "instance", None)
    if server is not None:
        server.send_sync(event, data)


def prompt_server():
    try:
        from server import PromptServer
    except ImportError:  # no web server in this process (a script or a test harness)
        return None
    return PromptServer


def register_routes(stop: Callable, on_prompt: Callable[[dict], dict]) -> None:
    """POST ROUTE_STOP → `stop(request)`; every queued prompt passes through `on_prompt`."""
    server = getattr(prompt_server(), "instance", None)
    if server is not None:  # no web server when ComfyUI's nodes are used from a script
        server.routes.post(ROUTE_STOP)(stop)
        server.add_on_prompt_handler(on_prompt)


def progress_bar(total: int):
    """ComfyUI's progress bar on the running node. Its updates also raise on Cancel: use it on the
    node's thread only."""
    return comfy.utils.ProgressBar(total)


def console_progress_enabled() -> bool:
    return comfy.utils.PROGRESS_BAR_ENABLED
