"""Drive the real ComfyUI front end like a user, for FlashVSR ⚡ Advanced (headless Chromium).

Builds on the harness's ``comfy_browser.py`` (its page helpers: canvas search, drag-connect, combo
menus, screenshots). Scenario: new blank workflow -> add "FlashVSR ⚡ Advanced" from the canvas
search box -> add an Empty Image source and a Preview Image sink, connect both by dragging ->
switch ``sageattention`` to ``disable`` through its menu -> Run -> wait until the node shows its
report. Prints one JSON line (report, badge, status) and exits 0 only if everything worked as a
user would do it (no programmatic fallbacks)::

    <workdir>/browser-venv/bin/python tests/integration/flashvsr_browser.py \
        --harness "$FLASHVSR_HARNESS" --url http://127.0.0.1:8188 --out-dir /tmp/shots
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

NODE = "FlashVSRBoltAdvanced"
SEARCH = "FlashVSR ⚡ Advanced"
SOURCE = {"width": 24, "height": 16, "batch_size": 3}

NODE_BOX_JS = """(id) => {
  const n = app.graph.getNodeById(id), c = app.canvas, r = c.canvas.getBoundingClientRect(), ds = c.ds;
  const top = n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT - 52;  // two badge rows
  const x = r.left + (n.pos[0] - 20 + ds.offset[0]) * ds.scale, y = r.top + (top + ds.offset[1]) * ds.scale;
  return {x, y, width: (n.size[0] + 40) * ds.scale, height: (n.pos[1] + n.size[1] + 20 - top) * ds.scale};
}"""


def node_shot(run, page, node, name: str) -> None:
    path = os.path.join(run.out, name)
    page.screenshot(path=path, clip=page.evaluate(NODE_BOX_JS, node))
    run.shots.append(path)


def scenario(run, page) -> dict:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    result = {"fallbacks": []}
    run.shot(page, "flashvsr_01_loaded.png")
    run.close_dialogs(page)
    page.get_by_role("button", name="Create a new blank workflow").first.click()
    page.wait_for_timeout(1000)
    left, top, w, h = page.evaluate("() => { const r = app.canvas.canvas.getBoundingClientRect();"
                                    " return [r.left, r.top, r.width, r.height]; }")
    node = run.add_node_by_search(page, SEARCH, NODE, (left + w * 0.45, top + h * 0.25))
    src = run.add_node_by_search(page, "Empty Image", "EmptyImage", (left + w * 0.2, top + h * 0.75))
    sink = run.add_node_by_search(page, "Preview Image", "PreviewImage", (left + w * 0.8, top + h * 0.75))
    page.evaluate("""([s, n, k, vals]) => {
        const g = app.graph, a = g.getNodeById(s), b = g.getNodeById(n), c = g.getNodeById(k);
        for (const [name, v] of Object.entries(vals)) a.widgets.find(w => w.name === name).value = v;
        b.pos = [420, 80]; a.pos = [b.pos[0] - a.size[0] - 80, 120]; c.pos = [b.pos[0] + b.size[0] + 80, 120];
        app.canvas.ds.offset = [40, 80]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);
    }""", [src, node, sink, SOURCE])
    page.wait_for_timeout(400)
    for a, b in ((src, node), (node, sink)):
        if not run.connect_by_drag(page, a, 0, b, 0):
            result["fallbacks"].append(f"connect {a}->{b}")
            page.evaluate("([s, d]) => app.graph.getNodeById(s).connect(0, app.graph.getNodeById(d), 0)",
                          [a, b])
    page.wait_for_timeout(300)
    node_shot(run, page, node, "flashvsr_02_node_badge_sage_enable.png")
    result["badge_enable"] = page.evaluate("(id) => app.graph.getNodeById(id).flashvsrBadge ?? null", node)
    if not run.set_combo_by_click(page, node, "sageattention", "disable"):
        result["fallbacks"].append("sageattention menu")
        page.evaluate("(id) => { const n = app.graph.getNodeById(id);"
                      " const w = n.widgets.find(w => w.name === 'sageattention');"
                      " w.value = 'disable'; w.callback?.('disable'); }", node)
    page.mouse.click(left + w * 0.5, top + h * 0.95)  # empty canvas: close menus, deselect
    page.wait_for_timeout(300)
    run.shot(page, "flashvsr_03_graph_built.png")
    result["badge_disable"] = page.evaluate("(id) => app.graph.getNodeById(id).flashvsrBadge ?? null", node)
    result["badge_info"] = page.evaluate("() => window.__flashvsrSage ?? null")
    result["api_prompt"] = page.evaluate("async () => (await app.graphToPrompt()).output")

    before = set(run.http_json("/history").keys())
    page.get_by_role("button", name="Run", exact=True).first.click()
    pid, hist = run.wait_history(before, run.a.timeout)
    result["status"] = (hist or {}).get("status", {}).get("status_str")
    result["outputs"] = (hist or {}).get("outputs", {}).get(str(node))
    try:
        page.wait_for_function("(id) => (app.graph.getNodeById(id).flashvsrReport ?? []).length > 0",
                               arg=node, timeout=30_000)
    except PlaywrightTimeout:
        pass  # reported below as report_on_node = null
    result["report_on_node"] = page.evaluate("(id) => app.graph.getNodeById(id).flashvsrReport ?? null", node)
    page.wait_for_timeout(500)
    run.shot(page, "flashvsr_04_after_run.png")
    node_shot(run, page, node, "flashvsr_05_node_report.png")
    result["screenshots"] = run.shots
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", type=pathlib.Path, required=True, help="folder of comfy_browser.py")
    p.add_argument("--url", default="http://127.0.0.1:8188")
    p.add_argument("--out-dir", default="/tmp/flashvsr-browser")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args(argv)
    sys.path.insert(0, str(a.harness))
    import comfy_browser as cb
    from playwright.sync_api import sync_playwright

    opts = argparse.Namespace(url=a.url.rstrip("/"), out_dir=a.out_dir, chromium=a.chromium,
                              width=1600, height=1000, timeout=a.timeout)
    run = cb.Run(opts)
    with sync_playwright() as pw:
        try:
            page = run.open(pw)
            result = scenario(run, page)
        finally:
            if hasattr(run, "browser"):
                run.browser.close()
    result["console_errors"] = run.errors()
    print(json.dumps(result))
    ok = (result["status"] == "success" and not result["fallbacks"] and result["report_on_node"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
