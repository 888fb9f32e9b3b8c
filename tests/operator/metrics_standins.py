"""Trainer /metrics stand-ins for the end-to-end tests, run inside the local cluster's network
namespace (`ip netns exec <netns> python metrics_standins.py '<json>'`), where the pod IPs kwok
gives its fake pods (routed nowhere else) can be made local addresses on `lo`.

The JSON maps pod IPs to a behaviour, all on `port`:
  normal   the exposition of the trainer's own TrainerMetrics, one more epoch every 2 s
  huge     a valid-looking exposition that never ends (100 MB, sent as fast as it is read)
  drip     one byte per second, forever
  garbage  random bytes

Prints "ready" once serving; removes the addresses it added when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "api"), str(REPO / "trainer")]

import prometheus_client  # noqa: E402
from aiohttp import web  # noqa: E402

from finetune_trainer.metrics import TrainerMetrics  # noqa: E402

HUGE_BYTES = 100 * 2**20


class Normal:
    def __init__(self) -> None:
        self.metrics = TrainerMetrics()
        self.metrics.start(backbone="resnet18", strategy="FineTune", reason="stand-in",
                           planned_epochs=100000, planned_steps=100000 * 10, steps_done=0,
                           epochs_done=0)
        self.epoch = 0

    def advance(self) -> None:
        self.epoch += 1
        self.metrics.steps.inc(10)
        self.metrics.epoch_done(epoch=self.epoch, train_loss=1.0, val_accuracy=0.5,
                                best_val_accuracy=0.5, images_per_second=100.0)

    def body(self) -> bytes:
        return prometheus_client.generate_latest(self.metrics.exported)


async def main(config: dict) -> None:
    port = int(config["port"])
    behaviours: dict[str, str] = config["pods"]
    normal = Normal()

    async def handle(request: web.Request) -> web.StreamResponse:
        kind = behaviours.get(request.transport.get_extra_info("sockname")[0])
        if kind == "normal":
            return web.Response(body=normal.body(), content_type="text/plain")
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        if kind == "huge":
            line = b"finetune_epoch_padding_total 1.0\n" * 2048
            for _ in range(HUGE_BYTES // len(line)):
                await response.write(line)
        elif kind == "drip":
            for _ in range(3600):
                await response.write(b"#")
                await asyncio.sleep(1)
        else:
            for _ in range(64):
                await response.write(os.urandom(4096))
        return response

    async def advance() -> None:
        while True:
            await asyncio.sleep(2)
            normal.advance()

    added = []
    for ip in behaviours:
        result = subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            added.append(ip)
    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        for ip in behaviours:
            await web.TCPSite(runner, ip, port).start()
        ticker = asyncio.create_task(advance())
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        ticker.cancel()
    finally:
        await runner.cleanup()
        for ip in added:
            subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
