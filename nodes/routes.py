"""The web panel's Stop button: POST /flux_dreambooth/stop {"node": "<id>"} ends that training
after its current step, with outputs, a checkpoint and final samples (ComfyUI's Cancel aborts)."""

from __future__ import annotations

from aiohttp import web

from .host import prompt_server
from .session import request_stop


async def stop(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    node = body.get("node")
    return web.json_response({"stopping": request_stop(str(node) if node is not None else None)})


def register() -> None:
    server = getattr(prompt_server(), "instance", None)
    if server is not None:  # no web server when ComfyUI's nodes are used from a script
        server.routes.post("/flux_dreambooth/stop")(stop)
