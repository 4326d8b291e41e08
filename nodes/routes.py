"""The web panel's Stop button: POST ids.ROUTE_STOP {"node": "<id>"} ends that training after its
current step, with outputs, a checkpoint and final samples (ComfyUI's Cancel aborts). And a
heads-up when a training is queued while another runs: ComfyUI runs them one after the other,
never two loops on one GPU."""

from __future__ import annotations

from aiohttp import web

from ..trainer.loop import job
from . import ids
from .host import events


async def stop(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    node = body.get("node")
    return web.json_response({"stopping": job.request_stop(str(node) if node is not None else None)})


def on_prompt(json_data: dict) -> dict:
    running = job.running_runs()
    prompt = json_data.get("prompt") or {}
    if running and any(n.get("class_type") == ids.TRAIN for n in prompt.values() if isinstance(n, dict)):
        events.send_event(ids.EVENT_QUEUED, {
            "message": f"Training queued: it starts when the run {', '.join(running)} ends (Stop it to start "
                       "sooner)."})
    return json_data


def register() -> None:
    events.register_routes(stop, on_prompt)
