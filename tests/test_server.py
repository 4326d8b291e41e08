"""Host tests against a real ComfyUI server (subprocess on loopback) with the pack installed in its
custom_nodes: responsiveness while training, queued trainings, and the web panel in a real
browser (headless Chromium driving ComfyUI's own frontend). Needs COMFYUI_PATH; the browser test
also needs the `playwright` package and Chromium (Debian's `chromium`, or CHROMIUM_PATH)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from comfyui_host import COMFYUI_PATH, PACK_DIR, requires_host, train_prompt

pytestmark = requires_host

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).parent / "screenshots"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


class Server:
    """`python main.py` from COMFYUI_PATH, its base directory a temporary folder whose custom_nodes
    holds this checkout under an unusual name (the registry renames install folders)."""

    def __init__(self, base: Path):
        self.base = base
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "Flux-DreamBooth-Test-Install").symlink_to(PACK_DIR)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", str(base)],
            cwd=COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                self.get("/object_info/FluxDreamBoothTrain")
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start: see {base / 'server.log'}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "tests"})["prompt_id"]

    def wait_idle(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = self.get("/queue")
            if not q["queue_running"] and not q["queue_pending"]:
                return
            time.sleep(0.3)
        raise TimeoutError("the queue did not empty")

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Events:
    """The websocket, listened to on a thread; keeps every message."""

    def __init__(self, url: str):
        import aiohttp

        self.messages: list[tuple[str, dict]] = []
        self.ready = threading.Event()

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(url.replace("http", "ws") + "/ws?clientId=tests") as ws:
                    self.ready.set()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            data = json.loads(msg.data)
                            self.messages.append((data["type"], data.get("data") or {}))

        threading.Thread(target=lambda: asyncio.run(listen()), daemon=True).start()
        self.ready.wait(30)

    def of(self, kind: str) -> list[dict]:
        return [d for t, d in list(self.messages) if t == kind]

    def wait(self, predicate, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise TimeoutError("the expected websocket events did not arrive")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("comfyui-server"))
    yield s
    s.close()


def long_training(run_name: str, steps: int = 400) -> dict:
    prompt = train_prompt(steps=steps, run=["21", 0])
    prompt["21"] = {"class_type": "FluxDreamBoothRun", "inputs": {"run_name": run_name, "save_every_n_steps": 1000,
                                                                  "keep_last": 0, "resume_from": "",
                                                                  "plot_every_n_steps": 50}}
    return prompt


def test_server_answers_while_the_loop_runs(server):
    events = Events(server.url)
    server.queue(long_training("responsive"))
    events.wait(lambda: any(d["step"] >= 2 for d in events.of("flux_dreambooth.progress")))
    answered = {}
    for path in ("/queue", "/history", "/object_info", "/system_stats"):
        started = time.perf_counter()
        body = server.get(path)
        answered[path] = time.perf_counter() - started
        assert body is not None
    step_then = max(d["step"] for d in events.of("flux_dreambooth.progress"))
    events.wait(lambda: max(d["step"] for d in events.of("flux_dreambooth.progress")) >= step_then + 2)
    logging.getLogger(__name__).info("answer times while training: %s",
                                     {k: f"{v * 1000:.0f} ms" for k, v in answered.items()})
    assert max(answered.values()) < 5.0  # answered, not stuck behind the training loop
    assert server.post("/flux_dreambooth/stop", {})["stopping"] == 1
    server.wait_idle()
    assert events.of("flux_dreambooth.status")[-1]["state"] == "stopped"


def test_a_second_training_waits_for_the_first(server):
    events = Events(server.url)
    first, second = server.queue(long_training("first", 30)), server.queue(long_training("second", 30))
    events.wait(lambda: events.of("flux_dreambooth.progress"))
    assert [p[1] for p in server.get("/queue")["queue_pending"]] == [second]
    third = server.queue(long_training("third", 30))  # queued while "first" runs: the browser is told
    events.wait(lambda: events.of("flux_dreambooth.queued"))
    assert "first_001 ends" in events.of("flux_dreambooth.queued")[0]["message"]
    server.wait_idle()
    states = [(d["run"], d["state"]) for d in events.of("flux_dreambooth.status")]
    runs = ("first_001", "second_001", "third_001")
    assert states == [(run, state) for run in runs for state in ("training", "done")]
    assert len({first, second, third}) == 3


def quickstart_template(server, name: str = "flux_dreambooth_quickstart") -> dict:
    """A shipped workflow (a quickstart) as the Templates menu serves it."""
    templates = server.get("/api/workflow_templates")
    module = next(m for m, names in templates.items() if name in names)
    return server.get(f"/api/workflow_templates/{module}/{name}.json")


def open_workflow(p, server, workflow, errors: list):
    """Headless Chromium on ComfyUI's frontend with `workflow` loaded; uncaught errors thrown from
    this pack's scripts go into `errors` (ComfyUI's own are not ours to fix)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.on("pageerror", lambda e: errors.append(e.stack or str(e)) if "flux_dreambooth" in (e.stack or "")
            or "training_panel" in (e.stack or "") else None)
    page.goto(server.url)
    page.wait_for_function("window.app && window.app.graph && window.app.graph._nodes", timeout=90000)
    page.wait_for_timeout(2000)
    page.keyboard.press("Escape")
    page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
    page.wait_for_timeout(1000)
    page.keyboard.press("Escape")
    return browser, page


@pytest.mark.skipif(not CHROMIUM, reason="no Chromium (apt install chromium, or set CHROMIUM_PATH)")
def test_the_panel_in_a_real_browser(server):
    pytest.importorskip("playwright", reason="the playwright package drives the browser")
    from playwright.sync_api import sync_playwright

    workflow = quickstart_template(server)
    for node in workflow["nodes"]:  # long enough to watch, samples every 10 steps
        if node["type"] == "FluxDreamBoothTrain":
            node["widgets_values"][0] = 400
        if node["type"] == "FluxDreamBoothValidation":
            node["widgets_values"][6] = 10
    SCREENSHOTS.mkdir(exist_ok=True)
    version = server.get("/system_stats")["system"]["comfyui_version"]
    errors: list = []
    with sync_playwright() as p:
        browser, page = open_workflow(p, server, workflow, errors)
        train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "FluxDreamBoothTrain")
        page.evaluate(f"""() => {{ const n = app.graph.getNodeById({train_id});
            app.canvas.ds.scale = 1; app.canvas.ds.offset = [60 - n.pos[0], 40 - n.pos[1]];
            app.graph.setDirtyCanvas(true, true); }}""")
        page.get_by_role("button", name="Run").first.click()
        panel = f"app.graph.getNodeById({train_id}).fluxPanel"
        page.wait_for_function(f"{panel}.points.length >= 3", timeout=180000)  # the chart is drawing
        page.wait_for_function("[...document.querySelectorAll('.flux-dreambooth-sample')]"
                               ".some(i => i.complete && i.naturalWidth > 0 && i.title.startsWith('step 10'))",
                               timeout=180000)  # a sample rendered during training arrived
        page.wait_for_function("/step \\d+\\/400 .* s\\/step · ETA/.test("
                               "document.querySelector('.flux-dreambooth-status').textContent)", timeout=60000)
        page.click(".flux-dreambooth-stop")
        page.wait_for_function("/Stopped at step \\d+ · checkpoint step_/.test("
                               "document.querySelector('.flux-dreambooth-status').textContent)", timeout=120000)
        page.wait_for_timeout(1000)
        shot = SCREENSHOTS / f"panel_comfyui_{version}.png"
        page.screenshot(path=str(shot))
        status = page.text_content(".flux-dreambooth-status")
        browser.close()
    server.wait_idle()
    runs = sorted((server.base / "output" / "flux_dreambooth").glob("quickstart_*"))
    stopped_at = int(status.split("Stopped at step ")[1].split(" ")[0])
    assert (runs[-1] / "checkpoints" / f"step_{stopped_at:06d}" / "lora.safetensors").is_file()
    assert 10 <= stopped_at < 400 and shot.is_file()
    assert not errors, errors


AI_TOOLKIT_JOB = """\
job: extension
config:
  name: toy_import
  process:
    - type: sd_trainer
      trigger_word: sks
      network: {type: lora, linear: 4, linear_alpha: 4}
      save: {save_every: 3, max_step_saves_to_keep: 1}
      datasets:
        - folder_path: toy
          resolution: [64]
      train: {steps: 3, lr: 0.002, optimizer: adamw}
"""


@pytest.mark.skipif(not CHROMIUM, reason="no Chromium (apt install chromium, or set CHROMIUM_PATH)")
def test_an_ai_toolkit_job_pasted_into_import_training_config_in_a_real_browser(server):
    """A user's flow: the quickstart template, an Import Training Config node added by hand, an
    ai-toolkit job pasted into it, its outputs wired into Train, Run."""
    pytest.importorskip("playwright", reason="the playwright package drives the browser")
    from playwright.sync_api import sync_playwright

    shutil.copytree(PACK_DIR / "trainer" / "assets" / "quickstart", server.base / "input" / "toy")
    workflow = quickstart_template(server)
    train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "FluxDreamBoothTrain")
    version = server.get("/system_stats")["system"]["comfyui_version"]
    errors: list = []
    with sync_playwright() as p:
        browser, page = open_workflow(p, server, workflow, errors)
        page.evaluate(f"""(job) => {{
            const train = app.graph.getNodeById({train_id});
            const node = LiteGraph.createNode("FluxDreamBoothImportConfig");
            app.graph.add(node);
            node.pos = [train.pos[0] - 420, train.pos[1]];
            node.widgets.find(w => w.name === "config_text").value = job;
            for (const [slot, input] of [[0, "dataset"], [1, "lora_layers"], [2, "settings"], [4, "run"]])
                node.connect(slot, train, train.findInputSlot(input));
            app.canvas.ds.offset = [480 - train.pos[0], 40 - train.pos[1]];
            app.graph.setDirtyCanvas(true, true); }}""", AI_TOOLKIT_JOB)
        page.get_by_role("button", name="Run").first.click()
        page.wait_for_timeout(3000)
        server.wait_idle(timeout=300)
        page.wait_for_timeout(1500)
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"import_config_comfyui_{version}.png"))
        browser.close()
    history = server.get("/history")
    outputs = max(history.values(), key=lambda h: h["status"].get("messages", [[0, {"timestamp": 0}]])[-1][1]
                  .get("timestamp", 0))["outputs"]
    summary = next(o["text"][0] for o in outputs.values() if "text" in o and "ai-toolkit format" in o["text"][0])
    trained = outputs[str(train_id)]["text"][0]
    assert "3 steps at learning_rate 0.002" in summary and "Unsupported: none" in summary
    assert trained.startswith("3 steps") and "run toy_import_001" in trained  # the job's, not the template's
    assert not errors, errors


@pytest.mark.skipif(not CHROMIUM, reason="no Chromium (apt install chromium, or set CHROMIUM_PATH)")
def test_the_panel_draws_likeness_and_drift_beside_the_loss(server):
    """The panel fed the pack's events as the server sends them (progress, scores, the best-checkpoint
    note): the scores show in the status line and as two more lines on the chart, the note keeps it."""
    pytest.importorskip("playwright", reason="the playwright package drives the browser")
    from playwright.sync_api import sync_playwright

    workflow = quickstart_template(server)
    train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "FluxDreamBoothTrain")
    errors: list = []
    with sync_playwright() as p:
        browser, page = open_workflow(p, server, workflow, errors)
        result = page.evaluate("""(id) => {
            const api = window.comfyAPI?.api?.api ?? window.app.api;  // the object the pack's scripts listen on
            const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, {detail: {node: String(id),
                                                                                             ...detail}}));
            send("flux_dreambooth.status", {state: "training", message: "", run: "scored_001"});
            for (const step of [1, 2, 3, 4])
                send("flux_dreambooth.progress", {step, total: 4, loss: 1 / step, loss_smooth: 1 / step, lr: 1e-3,
                     seconds_per_step: 0.5, eta_seconds: 2, peak_memory_gib: 1, memory_device: "RAM"});
            send("flux_dreambooth.scores", {step: 2, likeness: 0.25, drift: 0.05});
            send("flux_dreambooth.scores", {step: 4, likeness: 0.3125, drift: 0.125});
            send("flux_dreambooth.status", {state: "training", message: "best checkpoint: step 4", run: "scored_001"});
            const panel = app.graph.getNodeById(id).fluxPanel;
            const c = panel.canvas, data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let green = 0, red = 0;
            for (let i = 0; i < data.length; i += 4) {
                green += data[i] === 0x4c && data[i + 1] === 0xaf && data[i + 2] === 0x50;
                red += data[i] === 0xe0 && data[i + 1] === 0x55 && data[i + 2] === 0x45;
            }
            return {status: panel.status.textContent, points: panel.points.length, scores: panel.scores.length,
                    green, red};
        }""", train_id)
        browser.close()
    assert "likeness 0.313 · drift 0.125 (step 4)" in result["status"], result
    assert "best checkpoint: step 4" in result["status"], result
    assert result["points"] == 4 and result["scores"] == 2, result  # the note kept the chart
    assert result["green"] > 0 and result["red"] > 0, result
    assert not errors, errors


@pytest.mark.skipif(not CHROMIUM, reason="no Chromium (apt install chromium, or set CHROMIUM_PATH)")
def test_the_kontext_quickstart_queued_from_a_real_browser(server):
    """The Kontext template from the Templates menu, queued with the Run button: it trains on the
    bundled pairs, its panel shows the edit samples, and the LoRA is saved (screenshot kept)."""
    pytest.importorskip("playwright", reason="the playwright package drives the browser")
    from playwright.sync_api import sync_playwright

    workflow = quickstart_template(server, "flux_dreambooth_kontext_quickstart")
    SCREENSHOTS.mkdir(exist_ok=True)
    version = server.get("/system_stats")["system"]["comfyui_version"]
    errors: list = []
    with sync_playwright() as p:
        browser, page = open_workflow(p, server, workflow, errors)
        train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "FluxDreamBoothTrain")
        page.evaluate(f"""() => {{ const n = app.graph.getNodeById({train_id});
            app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [60 - n.pos[0], 40 - n.pos[1]];
            app.graph.setDirtyCanvas(true, true); }}""")
        page.get_by_role("button", name="Run").first.click()
        page.wait_for_function("/^(Done|Failed|Stopped|Cancelled)/.test(document.querySelector("
                               "'.flux-dreambooth-status')?.textContent || '')", timeout=400000)
        server.wait_idle(400)
        page.wait_for_timeout(1500)
        shot = SCREENSHOTS / f"kontext_quickstart_comfyui_{version}.png"
        page.screenshot(path=str(shot))
        status = page.text_content(".flux-dreambooth-status")
        browser.close()
    assert status.startswith("Done"), status
    saved = sorted((server.base / "models" / "loras" / "flux_dreambooth").glob("kontext_quickstart*.safetensors"))
    assert saved and shot.is_file()
    assert sorted((server.base / "output" / "flux_dreambooth").glob("kontext_quickstart_*/samples/step_*.png"))
    assert not errors, errors


@pytest.mark.skipif(not CHROMIUM, reason="no Chromium (apt install chromium, or set CHROMIUM_PATH)")
def test_the_flux2_quickstart_from_the_templates_menu_in_a_real_browser(server):
    """The FLUX.2 quickstart as the Templates menu serves it, queued from ComfyUI's frontend, trains
    to its last step: the panel draws the loss, shows samples and says Done."""
    pytest.importorskip("playwright", reason="the playwright package drives the browser")
    from playwright.sync_api import sync_playwright

    if not server.get("/object_info/EmptyFlux2LatentImage"):
        pytest.skip("this ComfyUI has no FLUX.2")
    workflow = quickstart_template(server, "flux_dreambooth_quickstart_flux2")
    train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "FluxDreamBoothTrain")
    version = server.get("/system_stats")["system"]["comfyui_version"]
    errors: list = []
    with sync_playwright() as p:
        browser, page = open_workflow(p, server, workflow, errors)
        page.evaluate(f"""() => {{ const n = app.graph.getNodeById({train_id});
            app.canvas.ds.scale = 1; app.canvas.ds.offset = [60 - n.pos[0], 40 - n.pos[1]];
            app.graph.setDirtyCanvas(true, true); }}""")
        page.get_by_role("button", name="Run").first.click()
        page.wait_for_function("/^Done at step 40/.test(document.querySelector('.flux-dreambooth-status')"
                               ".textContent)", timeout=400000)
        page.wait_for_function("[...document.querySelectorAll('.flux-dreambooth-sample')]"
                               ".some(i => i.complete && i.naturalWidth > 0 && i.title.startsWith('step 40'))",
                               timeout=30000)
        points = page.evaluate(f"app.graph.getNodeById({train_id}).fluxPanel.points.length")
        server.wait_idle()
        page.wait_for_timeout(1000)
        SCREENSHOTS.mkdir(exist_ok=True)
        shot = SCREENSHOTS / f"quickstart_flux2_comfyui_{version}.png"
        page.screenshot(path=str(shot))
        browser.close()
    (run,) = sorted((server.base / "output" / "flux_dreambooth").glob("quickstart_flux2_*"))
    assert (run / "checkpoints" / "step_000040" / "lora.safetensors").is_file()
    assert list((server.base / "models" / "loras" / "flux_dreambooth").glob("flux2_quickstart_*.safetensors"))
    assert points >= 3 and shot.is_file()
    assert not errors, errors
