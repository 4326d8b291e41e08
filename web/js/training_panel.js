// The Train node's live panel: loss chart (raw and smoothed; likeness and drift at each validation
// step when Validation Samples has a CLIP_VISION), step / speed / ETA / memory, the latest
// validation samples, and Stop. Fed by the pack's websocket events; sends Stop to the
// pack's route. Stop ends the run early with outputs and a checkpoint; ComfyUI's Cancel aborts.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { EVENT, NODE, ROUTE } from "./ids.js";

const MAX_POINTS = 2000; // the chart keeps every other point once it has this many

const clock = (s) => {
  if (!isFinite(s)) return "–";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(sec).padStart(2, "0")}`;
};

function element(tag, style, parent) {
  const el = document.createElement(tag);
  Object.assign(el.style, style);
  parent?.appendChild(el);
  return el;
}

class Panel {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.scores = []; // [step, likeness, drift]
    this.root = element("div", { display: "flex", flexDirection: "column", gap: "4px", font: "12px sans-serif",
                                 color: "#ddd", width: "100%", boxSizing: "border-box", padding: "2px 4px" });
    this.root.className = "flux-dreambooth-panel";
    const top = element("div", { display: "flex", gap: "6px", alignItems: "center" }, this.root);
    this.status = element("div", { flex: "1", whiteSpace: "pre-wrap", lineHeight: "1.3" }, top);
    this.status.className = "flux-dreambooth-status";
    this.status.textContent = "Queue the workflow to train.";
    this.stopButton = element("button", { padding: "2px 10px", cursor: "pointer" }, top);
    this.stopButton.textContent = "Stop";
    this.stopButton.className = "flux-dreambooth-stop";
    this.stopButton.title = "End training after the current step: keeps the LoRA so far, saves a checkpoint";
    this.stopButton.disabled = true;
    this.stopButton.onclick = () => this.stop();
    this.canvas = element("canvas", { width: "100%", height: "110px", background: "#1b1b1b", borderRadius: "4px" },
                          this.root);
    this.canvas.className = "flux-dreambooth-chart";
    this.gallery = element("div", { display: "flex", flexWrap: "wrap", gap: "3px" }, this.root);
    this.gallery.className = "flux-dreambooth-samples";
    this.widget = node.addDOMWidget("training_panel", "flux_dreambooth_panel", this.root, {
      serialize: false,
      getMinHeight: () => Math.max(220, this.root.scrollHeight + 8),
    });
    this.widget.serialize = false; // not a setting: keep it out of the saved workflow's values
  }

  async stop() {
    this.stopButton.disabled = true;
    const node = this.executionId ?? String(this.node.id);
    const response = await api.fetchApi(ROUTE.STOP, { method: "POST", body: JSON.stringify({ node }) });
    const { stopping } = await response.json();
    this.status.textContent += stopping ? "\nStopping after this step…" : "\nThis node is not training.";
  }

  onStatus(d) {
    this.executionId = d.node;
    if (d.state === "training" && d.message) { // a note while training (e.g. the best checkpoint): keep the chart
      this.status.textContent = `${this.status.textContent.split("\n")[0]}\n${d.message}`;
      return;
    }
    if (d.state === "training") {
      this.points = [];
      this.scores = [];
      this.step = this.checkpoint = null;
      this.gallery.replaceChildren();
      this.stopButton.disabled = false;
      this.status.textContent = `Training… (run ${d.run})`;
    } else {
      this.stopButton.disabled = true;
      const words = { done: "Done", stopped: "Stopped", cancelled: "Cancelled", error: "Failed" };
      this.status.textContent = `${words[d.state] ?? d.state}${this.step ? ` at step ${this.step}` : ""}` +
        `${this.checkpoint ? ` · checkpoint ${this.checkpoint}` : ""}${d.message ? `\n${d.message}` : ""}`;
    }
    this.draw();
  }

  onProgress(d) {
    this.executionId = d.node;
    this.step = d.step;
    this.stopButton.disabled = false; // also after a reload or a tab switch rebuilt the panel
    this.points.push([d.step, d.loss, d.loss_smooth]);
    if (this.points.length > MAX_POINTS) this.points = this.points.filter((_, i) => i % 2 === 0);
    this.status.textContent =
      `step ${d.step}/${d.total} · loss ${d.loss.toFixed(4)} (avg ${d.loss_smooth.toFixed(4)}) · ` +
      `${d.seconds_per_step.toFixed(2)} s/step · ETA ${clock(d.eta_seconds)} · ` +
      `peak ${d.peak_memory_gib.toFixed(1)} GiB ${d.memory_device}` + this.scoreText();
    this.draw();
  }

  onScores(d) {
    this.scores = this.scores.filter((p) => p[0] !== d.step).concat([[d.step, d.likeness, d.drift]]);
    this.scores.sort((a, b) => a[0] - b[0]);
    this.status.textContent = `${this.status.textContent.split("\n")[0].split(" · likeness")[0]}${this.scoreText()}`;
    this.draw();
  }

  scoreText() {
    const s = this.scores.at(-1);
    return s ? ` · likeness ${s[1].toFixed(3)} · drift ${s[2].toFixed(3)} (step ${s[0]})` : "";
  }

  onExecuted(output) {
    const text = (output?.text ?? []).join("\n");
    if (text) this.status.textContent = `${this.status.textContent.split("\n")[0]}\n${text}`;
  }

  onRendering(d) {
    this.status.textContent = `Rendering ${d.count} sample${d.count === 1 ? "" : "s"} at step ${d.step}…`;
  }

  onCheckpoint(d) {
    this.checkpoint = d.path.split("/").pop();
  }

  onSamples(d) {
    this.gallery.replaceChildren(...d.images.map((ref, i) => {
      const img = element("img", { width: "31%", borderRadius: "3px" });
      img.className = "flux-dreambooth-sample";
      img.title = `step ${d.step}: ${d.labels[i]}`;
      const q = new URLSearchParams({ ...ref, rand: String(Math.random()) });
      img.src = api.apiURL(`/view?${q}`);
      img.onload = () => this.fit();
      return img;
    }));
  }

  fit() {
    // grow the node to show the whole panel (samples arrive after the node was laid out)
    const needed = this.node.computeSize()[1];
    if (this.node.size[1] < needed) this.node.setSize([this.node.size[0], needed]);
    this.node.setDirtyCanvas(true, true);
  }

  draw() {
    const c = this.canvas, ctx = c.getContext("2d");
    c.width = c.clientWidth || 300;
    c.height = c.clientHeight || 110;
    ctx.clearRect(0, 0, c.width, c.height);
    if (this.points.length < 2) return;
    let lo = Infinity, hi = -Infinity;
    for (const p of this.points) {
      lo = Math.min(lo, p[1], p[2]);
      hi = Math.max(hi, p[1], p[2]);
    }
    const first = this.points[0][0], last = this.points.at(-1)[0];
    const x = (s) => 6 + ((s - first) / Math.max(1, last - first)) * (c.width - 12);
    const y = (v) => c.height - 14 - ((v - lo) / (hi - lo || 1)) * (c.height - 24);
    for (const [col, color, width] of [[1, "#6b8fc7", 1], [2, "#f0c040", 2]]) {
      ctx.beginPath();
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      this.points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[col])) : ctx.moveTo(x(p[0]), y(p[col]))));
      ctx.stroke();
    }
    ctx.fillStyle = "#aaa";
    ctx.fillText(`${hi.toFixed(3)}`, 4, 10);
    ctx.fillText(`${lo.toFixed(3)}  ·  step ${first}–${last}`, 4, c.height - 3);
    this.drawScores(ctx, c, x, first, last);
  }

  drawScores(ctx, c, x, first, last) {
    // likeness (green) and drift (red) on a scale of their own, written on the right
    const shown = this.scores.filter((p) => p[0] >= first && p[0] <= last);
    if (!shown.length) return;
    const values = shown.flatMap((p) => [p[1], p[2]]);
    const lo = Math.min(...values), hi = Math.max(...values);
    const y = (v) => c.height - 14 - ((v - lo) / (hi - lo || 1)) * (c.height - 24);
    for (const [col, color] of [[1, "#4caf50"], [2, "#e05545"]]) {
      ctx.strokeStyle = ctx.fillStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      shown.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[col])) : ctx.moveTo(x(p[0]), y(p[col]))));
      ctx.stroke();
      shown.forEach((p) => ctx.fillRect(x(p[0]) - 2, y(p[col]) - 2, 4, 4));
    }
    ctx.textAlign = "right";
    ctx.fillStyle = "#4caf50";
    ctx.fillText(`likeness`, c.width - 4, 10);
    ctx.fillStyle = "#e05545";
    ctx.fillText(`drift  ${lo.toFixed(2)}–${hi.toFixed(2)}`, c.width - 4, 22);
    ctx.textAlign = "left";
  }
}

// Events name the node by its id in the running prompt ("12:5" inside subgraph 12): find it in the
// workflow on screen. A workflow in another tab gets them again when it is shown (Stop re-enables).
function nodeOf(executionId) {
  let graph = app.graph, node = null;
  for (const id of String(executionId).split(":")) {
    node = graph?.getNodeById(Number(id));
    graph = node?.subgraph;
  }
  return node;
}

const forward = (method) => (event) => nodeOf(event.detail.node)?.fluxPanel?.[method](event.detail);

app.registerExtension({
  name: "flux_dreambooth.training_panel",
  setup() {
    api.addEventListener(EVENT.STATUS, forward("onStatus"));
    api.addEventListener(EVENT.PROGRESS, forward("onProgress"));
    api.addEventListener(EVENT.CHECKPOINT, forward("onCheckpoint"));
    api.addEventListener(EVENT.SAMPLES, forward("onSamples"));
    api.addEventListener(EVENT.RENDERING, forward("onRendering"));
    api.addEventListener(EVENT.SCORES, forward("onScores"));
    api.addEventListener(EVENT.QUEUED, (event) => {
      const toast = app.extensionManager?.toast;
      if (toast) toast.add({ severity: "info", summary: "FLUX DreamBooth", detail: event.detail.message, life: 8000 });
      else console.info(event.detail.message);
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE.TRAIN) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      this.fluxPanel?.onExecuted(output);
    };
  },
  nodeCreated(node) {
    if (node.comfyClass === NODE.TRAIN) node.fluxPanel = new Panel(node);
  },
});
