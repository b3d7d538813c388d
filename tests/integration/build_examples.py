"""Rebuild ``example_workflows/*.json`` and their ``.jpg`` thumbnails with the real ComfyUI front end.

The graphs are created through the front end's own API (nodes, links, widget values) and saved
with ``app.graph.serialize()``, so the files are exactly what the pinned front end writes when a
user saves the workflow. Needs a running ComfyUI with this pack loaded and Playwright (the
harness's ``browser-venv``)::

    <workdir>/browser-venv/bin/python tests/integration/build_examples.py --url http://127.0.0.1:8188

Only core nodes besides ours: LoadVideo -> GetVideoComponents -> FlashVSR -> CreateVideo ->
SaveVideo, with audio and fps wired from GetVideoComponents into CreateVideo.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import sys

from playwright.sync_api import sync_playwright

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_VIDEO = "flashvsr_sample.mp4"  # the integration test writes a clip of this name


def _example_titles() -> dict[str, str]:
    """``nodes/options.py``'s EXAMPLE_WORKFLOWS, read without importing the pack (this runs in the
    browser venv)."""
    tree = ast.parse((ROOT / "nodes" / "options.py").read_text())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "EXAMPLE_WORKFLOWS" for t in n.targets)]
    return ast.literal_eval(value)


EXAMPLE_WORKFLOWS = _example_titles()

# name -> (node id, {widget: value}); values not listed keep the node's defaults
EXAMPLES = {
    "basic": ("FlashVSRBolt", {"preset": "Tiny", "scale": 4.0, "seed": 0}),
    "advanced": ("FlashVSRBoltAdvanced", {"version": "v1.1", "mode": "tiny-long", "scale": 4.0,
                                          "sageattention": "enable", "color_fix": "adain",
                                          "keep_model_loaded": True}),
}

BUILD_JS = """([nodeType, widgets, video, prefix]) => {
  const g = app.graph;
  const add = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; g.add(n); return n; };
  const set = (n, name, v) => { const w = n.widgets.find(w => w.name === name);
                                if (!w) throw new Error(`${n.type} has no widget ${name}`); w.value = v; };
  const link = (a, out, b, inp) => {
    const i = b.findInputSlot(inp);
    if (i < 0 || !a.connect(a.findOutputSlot(out), b, i)) {
    throw new Error(`cannot link ${a.type}.${out} -> ${b.type}.${inp}`);
  }
  };
  const load = add("LoadVideo", 40, 120);
  const parts = add("GetVideoComponents", 420, 120);
  const fv = add(nodeType, 760, 60);
  const create = add("CreateVideo", 1180, 120);
  const save = add("SaveVideo", 1500, 120);
  set(load, "file", video);
  for (const [k, v] of Object.entries(widgets)) set(fv, k, v);
  set(save, "filename_prefix", prefix);
  link(load, "VIDEO", parts, "video");
  link(parts, "images", fv, "frames");
  link(fv, "frames", create, "images");
  link(parts, "fps", create, "fps");
  link(parts, "audio", create, "audio");
  link(create, "VIDEO", save, "video");
  app.canvas.setDirty(true, true);
  return g.nodes.map(n => n.type);
}"""

THUMB = {"width": 1200, "height": 900}  # Templates cards are square-ish: show FlashVSR and its neighbours

CENTER_JS = """([nodeType, w, h]) => {
  // Centre the FlashVSR node in the canvas at 100 % and return the page rect of the thumbnail.
  const c = app.canvas, r = c.canvas.getBoundingClientRect();
  const n = app.graph.nodes.find(n => n.type === nodeType);
  n.onDrawForeground = () => {};  // no SageAttention badge: it shows this server, not the user's
  const cx = n.pos[0] + n.size[0] / 2, cy = n.pos[1] + (n.size[1] - LiteGraph.NODE_TITLE_HEIGHT) / 2;
  c.ds.scale = 1;
  c.ds.offset = [r.width / 2 - cx, r.height / 2 - cy];
  c.setDirty(true, true);
  return {x: r.left + (r.width - w) / 2, y: r.top + (r.height - h) / 2, width: w, height: h};
}"""


def build(url: str, out_dir: pathlib.Path, chromium: str) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--headless=new", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 2000, "height": 1400})  # overlays stay off the centre
        page.goto(url + "/", wait_until="domcontentloaded")
        page.wait_for_function("() => !!(window.app && window.app.graph && window.LiteGraph)",
                               timeout=120_000)
        page.wait_for_timeout(1500)
        for name, (node_type, widgets) in EXAMPLES.items():
            for _ in range(3):
                page.keyboard.press("Escape")
            page.get_by_role("button", name="Create a new blank workflow").first.click()
            page.wait_for_timeout(800)
            types = page.evaluate(BUILD_JS, [node_type, widgets, SAMPLE_VIDEO, f"video/FlashVSR_{name}"])
            print(f"{name}: {types}", flush=True)
            workflow = page.evaluate("() => app.graph.serialize()")
            (out_dir / f"{EXAMPLE_WORKFLOWS[name]}.json").write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
            page.evaluate("() => app.canvas.deselectAll?.()")
            clip = page.evaluate(CENTER_JS, [node_type, THUMB["width"], THUMB["height"]])
            page.wait_for_timeout(1500)  # the Load Video preview loads asynchronously
            page.screenshot(path=str(out_dir / f"{EXAMPLE_WORKFLOWS[name]}.jpg"), type="jpeg", quality=85, clip=clip)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8188")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "example_workflows")  # files named by EXAMPLE_WORKFLOWS
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    a = p.parse_args(argv)
    a.out.mkdir(exist_ok=True)
    build(a.url.rstrip("/"), a.out, a.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
