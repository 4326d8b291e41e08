// Shows the file name the Save node wrote, at the bottom of the node. Drawn, not a widget, so
// saved workflows keep their widget values. (The Train node reports in its panel: training_panel.js.)
import { app } from "../../scripts/app.js";
import { NODE } from "./ids.js";

const REPORTING = new Set([NODE.SAVE]);
const LINE = 15;

function wrap(ctx, text, width) {
  const lines = [];
  for (const paragraph of text.split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > width) {
        lines.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    lines.push(line);
  }
  return lines;
}

// The caption node hands its captions back; put them in its edited_captions box to be edited.
app.registerExtension({
  name: "flux_dreambooth.captions",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE.CAPTION) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = output?.captions?.[0];
      const box = this.widgets?.find((w) => w.name === "edited_captions");
      if (box && typeof text === "string") {
        box.value = text;
        this.setDirtyCanvas(true, true);
      }
    };
  },
});

app.registerExtension({
  name: "flux_dreambooth.report",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING.has(nodeData.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      this.fluxReport = (output?.text ?? []).join("\n");
      this.fluxReportLines = null;
      this.setDirtyCanvas(true, true);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.fluxReport || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "12px sans-serif";
      if (!this.fluxReportLines) {
        this.fluxReportLines = wrap(ctx, this.fluxReport, this.size[0] - 20);
        const needed = this.computeSize()[1] + this.fluxReportLines.length * LINE + 10;
        if (this.size[1] < needed) this.setSize([this.size[0], needed]);
      }
      ctx.fillStyle = "#8fd18f";
      const top = this.size[1] - this.fluxReportLines.length * LINE - 4;
      this.fluxReportLines.forEach((line, i) => ctx.fillText(line, 10, top + (i + 1) * LINE - 3));
      ctx.restore();
    };
  },
});
