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
    # The same graph again: ComfyUI serves every node from its cache; the report must stay.
    page.evaluate("(id) => { app.graph.getNodeById(id).flashvsrReport = []; }", node)
    before = set(run.http_json("/history").keys())
    page.get_by_role("button", name="Run", exact=True).first.click()
    run.wait_history(before, run.a.timeout)
    page.wait_for_timeout(1500)
    result["report_after_cached_run"] = page.evaluate(
        "(id) => app.graph.getNodeById(id).flashvsrReport ?? null", node)
    node_shot(run, page, node, "flashvsr_06_node_report_cached.png")
    result["screenshots"] = run.shots
    return result


def template_run(run, page) -> dict:
    """Templates browser -> the pack -> the example's title -> Run, with no edit."""
    result = {"fallbacks": []}
    run.close_dialogs(page)
    page.get_by_role("button", name="Templates").first.click()
    page.wait_for_timeout(2500)
    page.get_by_text(run.a.pack, exact=False).first.click()
    page.wait_for_timeout(1500)
    run.shot(page, f"template_{run.a.tag}_01_listed.png")
    page.get_by_text(run.a.title, exact=True).first.click()
    page.wait_for_timeout(2500)
    run.close_dialogs(page)
    result["node_types"] = sorted({n["type"] for n in run.node_list(page)})
    result["load_video"] = page.evaluate(
        "() => app.graph.nodes.filter(n => n.type === 'LoadVideo').map(n => n.widgets[0].value)")
    before = set(run.http_json("/history").keys())
    page.get_by_role("button", name="Run", exact=True).first.click()
    pid, hist = run.wait_history(before, run.a.timeout)
    result["prompt_id"] = pid
    result["status"] = (hist or {}).get("status", {}).get("status_str")
    result["messages"] = [m[0] for m in (hist or {}).get("status", {}).get("messages", [])]
    page.wait_for_timeout(1000)
    result["error_dialog"] = page.locator(".p-dialog").count()
    run.shot(page, f"template_{run.a.tag}_02_after_run.png")
    return result


LOCALE_JS = "async (lang) => { await app.extensionManager.setting.set('Comfy.Locale', lang); }"


def chinese_names(run, page) -> dict:
    """Front end in Chinese: a newly added Advanced node shows its Chinese name, inputs and widgets."""
    result = {"fallbacks": []}
    run.close_dialogs(page)
    page.evaluate(LOCALE_JS, "zh")   # a server-side user setting: put back below for the other tests
    try:
        return _chinese_names(run, page, result)
    finally:
        page.evaluate(LOCALE_JS, "en")


def _chinese_names(run, page, result: dict) -> dict:
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && app.graph && window.LiteGraph", timeout=run.a.timeout * 1000)
    page.wait_for_timeout(2500)
    run.close_dialogs(page)
    node = page.evaluate("""() => { const n = LiteGraph.createNode('FlashVSRBoltAdvanced'); n.pos = [-800, 100];
        app.graph.add(n); app.canvas.ds.offset = [860, 60]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);
        return n.id; }""")
    page.wait_for_timeout(800)
    result["locale"] = page.evaluate("() => app.extensionManager.setting.get('Comfy.Locale')")
    result["title"] = page.evaluate("(id) => app.graph.getNodeById(id).title", node)
    result["widget_labels"] = page.evaluate(
        "(id) => Object.fromEntries(app.graph.getNodeById(id).widgets.map(w => [w.name, w.label ?? null]))", node)
    result["input_labels"] = page.evaluate(
        "(id) => app.graph.getNodeById(id).inputs.map(i => i.localized_name ?? i.label ?? null)", node)
    result["option_labels"] = page.evaluate(
        "(id) => Object.fromEntries(app.graph.getNodeById(id).widgets.filter(w => w.type === 'combo')"
        ".map(w => [w.name, [w.value, w.options.getOptionLabel?.(w.value) ?? null]]))", node)
    result["toggle_labels"] = page.evaluate(
        "(id) => Object.fromEntries(app.graph.getNodeById(id).widgets.filter(w => w.type === 'toggle')"
        ".map(w => [w.name, [w.value, w.options.on, w.options.off]]))", node)
    result["sent"] = page.evaluate("async (id) => (await app.graphToPrompt()).output[String(id)].inputs", node)
    run.shot(page, "zh_01_advanced_node.png")
    node_shot(run, page, node, "zh_02_node.png")
    # What applies: the fresh node is tiny with tile_size 0; then full, then VAE tiling on, then tiles.
    hidden = "(id) => app.graph.getNodeById(id).widgets.filter(w => w.hidden).map(w => w.name)"
    pick = """([id, name, v]) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
        w.value = v; w.callback?.(v); }"""
    result["hidden"] = {"fresh": page.evaluate(hidden, node)}
    for name, value in (("mode", "full"), ("vae_tiling", True), ("tile_size", 512)):
        page.evaluate(pick, [node, name, value])
        result["hidden"][f"{name}={value}"] = page.evaluate(hidden, node)
    overlap = "(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'tile_overlap');" \
              " return [w.value, w.options.max]; }"
    page.evaluate(pick, [node, "tile_overlap", 300])
    result["overlap"] = {"typed 300 at tile_size 512": page.evaluate(overlap, node)}
    page.evaluate(pick, [node, "tile_size", 256])
    result["overlap"]["tile_size 256"] = page.evaluate(overlap, node)
    page.evaluate(pick, [node, "tile_size", 512])
    result["overlap"]["tile_size 512 again"] = page.evaluate(overlap, node)
    result["overlap"]["sent"] = page.evaluate(
        "async (id) => (await app.graphToPrompt()).output[String(id)].inputs.tile_overlap", node)
    result["height"] = page.evaluate("(id) => app.graph.getNodeById(id).size[1]", node)
    node_shot(run, page, node, "zh_03_node_full_tiled.png")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", type=pathlib.Path, required=True, help="folder of comfy_browser.py")
    p.add_argument("--url", default="http://127.0.0.1:8188")
    p.add_argument("--out-dir", default="/tmp/flashvsr-browser")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--scenario", choices=("advanced", "template", "zh"), default="advanced")
    p.add_argument("--pack", default="ComfyUI-FlashVSR", help="template: the pack's folder name")
    p.add_argument("--title", help="template: the example's title in the Templates browser")
    p.add_argument("--tag", default="example", help="template: screenshot name part")
    a = p.parse_args(argv)
    sys.path.insert(0, str(a.harness))
    import comfy_browser as cb
    from playwright.sync_api import sync_playwright

    opts = argparse.Namespace(url=a.url.rstrip("/"), out_dir=a.out_dir, chromium=a.chromium,
                              width=1600, height=1000, timeout=a.timeout, pack=a.pack, title=a.title,
                              tag=a.tag)
    run = cb.Run(opts)
    steps = {"advanced": scenario, "template": template_run, "zh": chinese_names}
    with sync_playwright() as pw:
        try:
            page = run.open(pw)
            result = steps[a.scenario](run, page)
        finally:
            if hasattr(run, "browser"):
                run.browser.close()
    result["console_errors"] = run.errors()
    result["screenshots"] = run.shots
    print(json.dumps(result, ensure_ascii=False))
    if a.scenario == "advanced":
        ok = result["status"] == "success" and not result["fallbacks"] and result["report_on_node"]
    elif a.scenario == "template":
        ok = result["status"] == "success"
    else:
        ok = result["title"] != "FlashVSR ⚡ Advanced"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
