// FlashVSR ⚡ front-end extension (served at /extensions/<pack folder>/flashvsr.js).
// 1. A badge above both FlashVSR nodes says whether the server has SageAttention
//    (GET /api/flashvsr/info), so the `sageattention` dropdown is chosen knowingly.
// 2. After a run, the node shows the report its execute() returned as ui.text: attention
//    backends that ran (and why sage did not), frames, time, fps, peak VRAM.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_IDS = new Set(["FlashVSRBolt", "FlashVSRBoltAdvanced"]);
const LINE_HEIGHT = 15;
const FONT = "12px sans-serif";
const PAD = 6;

let sageInfo = null; // {installed, version, flavour, reason} once the route answered

async function loadInfo() {
  try {
    const res = await api.fetchApi("/flashvsr/info");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    sageInfo = (await res.json()).sageattention;
  } catch (err) {
    sageInfo = { installed: null, reason: `could not ask the server: ${err}` };
  }
  window.__flashvsrSage = sageInfo; // read by the integration test
  app.graph?.setDirtyCanvas(true, true);
}

function badge(node) {
  const sage = node.widgets?.find((w) => w.name === "sageattention");
  const wanted = sage ? sage.value === "enable" : true; // the basic node always asks for sage
  if (!sageInfo) return { text: "SageAttention: checking…", color: "#555" };
  if (sageInfo.installed === null) return { text: "SageAttention: unknown", color: "#555" };
  if (sageInfo.installed) {
    const v = sageInfo.version ? ` ${sageInfo.version}` : "";
    return wanted
      ? { text: `⚡ SageAttention${v} installed`, color: "#2e7d32" }
      : { text: `SageAttention${v} installed, off here`, color: "#555" };
  }
  return wanted
    ? { text: "SageAttention not installed: PyTorch attention", color: "#9a6700" }
    : { text: "SageAttention not installed", color: "#555" };
}

// The front end draws its own badges (pack name, node id) in the same row above the title,
// right-aligned unless the node says top-left: sit beside them, never on top of them.
function theirBadgesWidth(node, ctx) {
  if (node.badgePosition === "top-left") return 0;
  return (node.badges ?? []).reduce((sum, b) => {
    const badgeObj = typeof b === "function" ? b() : b;
    return sum + (badgeObj?.getWidth?.(ctx) ?? 0) + 2;
  }, 0);
}

function drawBadge(node, ctx) {
  const { text, color } = badge(node);
  node.flashvsrBadge = text; // what is drawn, for the integration test
  ctx.save();
  const theirs = theirBadgesWidth(node, ctx);
  ctx.font = FONT;
  const w = ctx.measureText(text).width + 2 * PAD;
  const h = LINE_HEIGHT + 4;
  const row = -LiteGraph.NODE_TITLE_HEIGHT - h - 4;
  const beside = node.size[0] - w - theirs - (theirs ? 4 : 0);
  // Too narrow to sit beside theirs: take the row above instead.
  const [x, y] = beside >= 0 ? [beside, row] : [Math.max(0, node.size[0] - w), row - h - 2];
  ctx.fillStyle = color;
  ctx.beginPath();
  ctx.roundRect ? ctx.roundRect(x, y, w, h, 6) : ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + PAD, y + h / 2);
  ctx.restore();
}

// The summary joins its parts with " | " (and explanations with "; "): one part per line, each
// wrapped to the node's width.
function wrap(ctx, lines, width) {
  const out = [];
  for (const line of lines) {
    for (const part of String(line).split(/ \| |; /)) {
      let cur = "";
      for (const word of part.split(" ")) {
        const next = cur ? `${cur} ${word}` : word;
        if (cur && ctx.measureText(next).width > width) {
          out.push(cur);
          cur = `  ${word}`;
        } else {
          cur = next;
        }
      }
      out.push(cur);
    }
  }
  return out;
}

function drawReport(node, ctx) {
  if (!node.flashvsrReport?.length) return;
  ctx.save();
  ctx.font = FONT;
  const lines = wrap(ctx, node.flashvsrReport, node.size[0] - 2 * PAD);
  const needed = node.computeSize()[1] + lines.length * LINE_HEIGHT + 2 * PAD;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  const top = node.size[1] - lines.length * LINE_HEIGHT - PAD;
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(PAD / 2, top - PAD / 2, node.size[0] - PAD, lines.length * LINE_HEIGHT + PAD);
  ctx.fillStyle = "#9fe6a0";
  ctx.textBaseline = "top";
  lines.forEach((l, i) => ctx.fillText(l, PAD, top + i * LINE_HEIGHT));
  ctx.restore();
}

app.registerExtension({
  name: "flashvsr.bolt",
  async setup() {
    await loadInfo();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_IDS.has(nodeData.name)) return;

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      drawBadge(this, ctx);
      drawReport(this, ctx);
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.flashvsrReport = message?.text ?? [];
      this.setDirtyCanvas(true, true);
    };
  },
});
