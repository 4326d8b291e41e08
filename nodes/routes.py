"""The web panel's Stop button: POST /flux_dreambooth/stop {"node": "<id>"} ends that training
after its current step, with outputs, a checkpoint and final samples (ComfyUI's Cancel aborts).
And a heads-up when a training is queued while another runs: ComfyUI runs them one after the
other, never two loops on one GPU."""

from __future__ import annotations

from aiohttp import web

from .host import prompt_server, send_event
from .session import request_stop, running_runs


async def stop(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    node = body.get("node")
    return web.json_response({"stopping": request_stop(str(node) if node is not None else None)})


def on_prompt(json_data: dict) -> dict:
    running = running_runs()
    prompt = json_data.get("prompt") or {}
    if running and any(n.get("class_type") == "FluxDreamBoothTrain" for n in prompt.values() if isinstance(n, dict)):
        send_event("flux_dreambooth.queued", {
            "message": f"Training queued: it starts when the run {', '.join(running)} ends (Stop it to start "
                       "sooner)."})
    return json_data


def register() -> None:
    server = getattr(prompt_server(), "instance", None)
    if server is not None:  # no web server when ComfyUI's nodes are used from a script
        server.routes.post("/flux_dreambooth/stop")(stop)
        server.add_on_prompt_handler(on_prompt)
