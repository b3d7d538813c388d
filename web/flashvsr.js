// FlashVSR ⚡ front-end extension (served at /extensions/<pack folder>/flashvsr.js).
// 1. A badge above both FlashVSR nodes says what `sageattention` will run on the server's GPU
//    (GET /api/flashvsr/info: our INT8 kernel, SageAttention, or PyTorch attention).
// 2. After a run, the node shows the report its execute() returned as ui.text: attention
//    backends that ran (and why sage did not), frames, time, fps, peak VRAM. The report is kept
//    in the node's properties, so a run that ComfyUI serves from its cache still shows it.
// 3. The Advanced node shows only the widgets that apply: the VAE tiling widgets in `full` mode
//    (their sizes only with vae_tiling on), tile_overlap only while tile_size is not 0. Hidden
//    widgets keep their values, so saved workflows keep every value in its place.
// 4. tile_overlap stays below half of tile_size as the user edits either (the server's table of
//    limits, GET /api/flashvsr/info): ComfyUI can only check one input against another in a
//    validator whose message lands on every input it names. Values loaded from a saved workflow
//    are never changed here; the server refuses a bad pair when the node runs, naming tile_overlap.
// 5. Dropdown entries in the front end's language: the pack's locales/<lang>/nodeDefs.json give
//    an "options" map per input (ComfyUI serves every pack's locales at GET /i18n; the front end
//    itself translates names and tooltips only). Only the label changes: the value, what workflows
//    save and the server receives, stays the English one.
// 6. `gpus` (the DiT over several GPUs) shows only on a server with more than one CUDA GPU (the
//    info route's `gpus`), or when a saved workflow asks for more than one GPU, so that a value
//    this server refuses is never hidden.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_IDS = new Set(["FlashVSRBolt", "FlashVSRBoltAdvanced"]);
const LINE_HEIGHT = 15;
const FONT = "12px sans-serif";
const PAD = 6;

let sageInfo = null; // {installed, version, flavour, reason} once the route answered
let plan = null; // {enable, disable, sage}: what each sageattention choice runs on this server
let overlapMax = null; // {tile_size: largest tile_overlap}, from the server
let translations = null; // GET /i18n: {lang: {nodeDefs: {...}}}, every pack's locales
let visibleGpus = null; // CUDA GPUs the server sees

async function loadInfo() {
  try {
    const res = await api.fetchApi("/flashvsr/info");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const info = await res.json();
    sageInfo = info.sageattention;
    plan = info.badge ?? null;
    overlapMax = info.tile_overlap_max ?? null;
    visibleGpus = info.gpus ?? null;
  } catch (err) {
    sageInfo = { installed: null, reason: `could not ask the server: ${err}` };
  }
  window.__flashvsrSage = sageInfo; // read by the integration test
  window.__flashvsrPlan = plan;
  for (const node of app.graph?._nodes ?? []) {
    if ((node.comfyClass ?? node.type) === "FlashVSRBoltAdvanced") showWhatApplies(node);
  }
  app.graph?.setDirtyCanvas(true, true);
}

function badge(node) {
  const sage = node.widgets?.find((w) => w.name === "sageattention");
  const wanted = sage ? sage.value === "enable" : true; // the basic node always asks for sage
  if (!sageInfo) return { text: "attention: checking…", color: "#555" };
  if (!plan) return { text: "attention: unknown", color: "#555" };
  if (!wanted) return { text: plan.disable, color: "#555" };
  const color = { full: "#2e7d32", partial: "#2e7d32", none: "#9a6700" }[plan.sage] ?? "#555";
  return { text: plan.enable, color };
}

// Which Advanced widgets apply to the current choices (the others are hidden, not removed).
const VAE_SIZES = ["vae_tile_height", "vae_tile_width", "vae_stride_height", "vae_stride_width"];

function applies(node, name) {
  const value = (n) => node.widgets?.find((w) => w.name === n)?.value;
  if (name === "vae_tiling") return value("mode") === "full";
  if (VAE_SIZES.includes(name)) return value("mode") === "full" && !!value("vae_tiling");
  if (name === "tile_overlap") return Number(value("tile_size")) !== 0;
  if (name === "gpus") return (visibleGpus ?? 0) > 1 || String(value("gpus") ?? "1") !== "1";
  return true;
}

function showWhatApplies(node) {
  let changed = false;
  for (const w of node.widgets ?? []) {
    const hidden = !applies(node, w.name);
    if (!!w.hidden !== hidden) {
      w.hidden = hidden;
      changed = true;
    }
  }
  if (changed) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

async function loadTranslations() {
  try {
    const res = await api.fetchApi("/i18n");
    if (res.ok) translations = await res.json();
  } catch (err) {
    console.warn("[FlashVSR] no translations for dropdown entries:", err);
  }
  app.graph?.setDirtyCanvas(true, true);
}

function locale() {
  return app.extensionManager?.setting?.get?.("Comfy.Locale") ?? "en";
}

// Labels for the node's dropdowns in the current language (asked each time they are drawn, so a
// change of language applies at once); entries without a translation show their value.
// Toggles take their two labels ("on", "off") the same way.
function translateOptions(node, nodeId) {
  for (const w of node.widgets ?? []) {
    if (w.type !== "combo" && w.type !== "toggle") continue;
    w.options = w.options ?? {};
    const labels = () => translations?.[locale()]?.nodeDefs?.[nodeId]?.inputs?.[w.name]?.options;
    if (w.type === "combo") {
      w.options.getOptionLabel = (value) => labels()?.[value] ?? String(value ?? "");
      continue;
    }
    for (const side of ["on", "off"]) {
      const english = w.options[side];
      Object.defineProperty(w.options, side, { configurable: true, enumerable: true,
                                               get: () => labels()?.[side] ?? english });
    }
  }
}

// The largest tile_overlap the current tile_size allows (null: tiling off or limits unknown).
function overlapLimit(node) {
  const size = node.widgets?.find((w) => w.name === "tile_size")?.value;
  return overlapMax?.[String(size)] ?? null;
}

// Called after the user changed tile_size or tile_overlap: the widget's range follows tile_size
// and a value above it comes down to the limit (as ComfyUI does with any widget's max).
function keepOverlapInRange(node, clamp) {
  const w = node.widgets?.find((x) => x.name === "tile_overlap");
  const limit = overlapLimit(node);
  if (!w || limit === null) return;
  w.options = w.options ?? {};
  w.options.max = limit;
  if (clamp && Number(w.value) > limit) {
    w.value = limit;
    node.setDirtyCanvas?.(true, true);
  }
}

function watchWidgets(node) {
  for (const name of ["mode", "vae_tiling", "tile_size", "tile_overlap", "gpus"]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function () {
      const r = callback?.apply(this, arguments);
      if (name === "tile_size" || name === "tile_overlap") keepOverlapInRange(node, true);
      showWhatApplies(node);
      return r;
    };
  }
  keepOverlapInRange(node, false);
  showWhatApplies(node);
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
    // A fully cached run sends no "executed" for our node: show the report the node already
    // keeps (from the run whose result ComfyUI reuses), marked as such.
    api.addEventListener("execution_cached", ({ detail }) => {
      for (const id of detail?.nodes ?? []) {
        const node = app.graph?.getNodeById(id);
        const kept = node?.properties?.flashvsr_report;
        if (!NODE_IDS.has(node?.comfyClass ?? node?.type) || !kept?.length) continue;
        node.flashvsrReport = [...kept, "(result reused from ComfyUI's cache)"];
        node.setDirtyCanvas(true, true);
      }
    });
    await Promise.all([loadInfo(), loadTranslations()]);
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
      this.properties = this.properties ?? {};
      this.properties.flashvsr_report = this.flashvsrReport;
      this.setDirtyCanvas(true, true);
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      if (this.properties?.flashvsr_report?.length) this.flashvsrReport = this.properties.flashvsr_report;
      if (nodeData.name === "FlashVSRBoltAdvanced") {
        keepOverlapInRange(this, false);
        showWhatApplies(this);
      }
      return r;
    };

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      translateOptions(this, nodeData.name);
      if (nodeData.name === "FlashVSRBoltAdvanced") watchWidgets(this);
      return r;
    };
  },
});
