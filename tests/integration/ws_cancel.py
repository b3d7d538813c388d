"""Press Cancel in the middle of a FlashVSR run, the way the front end does, and report what happened.

Runs in ComfyUI's venv (it needs aiohttp for the WebSocket)::

    <workdir>/venv/bin/python tests/integration/ws_cancel.py --url http://127.0.0.1:8188 \
        --prompt prompt.api.json --node 2 --after 2

Queues the prompt, watches the node's ``progress`` messages on ``/ws``, posts ``/interrupt`` once
``--after`` chunks are done, and prints one JSON line: the progress values seen before and after
the interrupt, the chunk total, and how the run ended.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

import aiohttp


async def cancel_run(url: str, prompt: dict, node: str, after: int, timeout: float) -> dict:
    client_id = str(uuid.uuid4())
    report = {"before": [], "after": [], "total": None, "ended": None, "interrupted_node": None}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            async with http.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                if r.status != 200:
                    raise RuntimeError(f"POST /prompt -> {r.status}: {await r.text()}")
                prompt_id = (await r.json())["prompt_id"]
            state = {"sent": False}

            async def watch() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary previews
                    event = json.loads(msg.data)
                    kind, data = event.get("type"), event.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if kind == "progress" and data.get("node") == node:
                        report["total"] = data["max"]
                        report["after" if state["sent"] else "before"].append(data["value"])
                        if not state["sent"] and data["value"] >= after:
                            async with http.post(f"{url}/interrupt", json={}) as r:
                                r.raise_for_status()
                            state["sent"] = True
                    elif kind == "execution_interrupted":
                        report["ended"] = "interrupted"
                        report["interrupted_node"] = data.get("node_id")
                        return
                    elif kind in ("execution_success", "execution_error"):
                        report["ended"] = kind
                        return

            await asyncio.wait_for(watch(), timeout)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8188")
    p.add_argument("--prompt", required=True, help="API-format prompt JSON file")
    p.add_argument("--node", required=True, help="id of the FlashVSR node in the prompt")
    p.add_argument("--after", type=int, default=2, help="chunks to let finish before Cancel")
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args(argv)
    with open(a.prompt) as f:
        prompt = json.load(f)
    print(json.dumps(asyncio.run(cancel_run(a.url.rstrip("/"), prompt, a.node, a.after, a.timeout))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
