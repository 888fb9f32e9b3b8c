"""Stand-ins for trainers' /metrics, for bench/operator_scale.py: run inside the local cluster's
network namespace (`ip netns exec ft-<id> python bench/trainer_standins.py`), where the pod IPs
kwok gives its fake pods (10.244.0.0/16, routed nowhere) can be made local addresses.

Reads one JSON line on stdin:

    {"port": 9400, "advance_seconds": 5, "planned_epochs": 1000,
     "targets": [{"ip": "10.244.128.3", "name": "running-0000", "advancing": true}, ...]}

adds each IP to `lo` (as a /32), serves http://<ip>:<port>/metrics on each with the exposition a
trainer serves (finetune_trainer.metrics.TrainerMetrics through prometheus_client's
generate_latest), and every `advance_seconds` finishes one more epoch in the advancing targets;
the others stay at their starting epoch forever. Prints one JSON line "ready" once serving.

Then answers commands on stdin, one per line: `stats` prints one JSON line with, per target,
the reads by client (operator / prometheus / other, told apart by User-Agent), the epoch it is at,
and `operator_changes`: how many times the operator read a body that differs from the one it
read before from that target (each is one progress change the operator can write); and when the
operator last read any of them (`last_operator_read`, Unix time). `quit` (or
end of input) removes the addresses and exits. Only the addresses added here are removed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "api"), str(REPO / "trainer")]

import prometheus_client  # noqa: E402
from aiohttp import web  # noqa: E402

from finetune_trainer.metrics import TrainerMetrics  # noqa: E402

STEPS_PER_EPOCH = 50
START_EPOCH = 3


@dataclass
class StandIn:
    """One trainer: its metrics, the body it serves now, and who read which body."""

    name: str
    advancing: bool
    planned_epochs: int
    advance_seconds: float
    metrics: TrainerMetrics = field(default_factory=TrainerMetrics)
    epoch: int = START_EPOCH
    version: int = 0
    body: bytes = b""
    reads: dict[str, int] = field(default_factory=lambda: {"operator": 0, "prometheus": 0,
                                                           "other": 0})
    operator_last_version: int | None = None
    operator_changes: int = 0

    def __post_init__(self) -> None:
        self.metrics.start(backbone="resnet18", strategy="FineTune", reason="bench stand-in",
                           planned_epochs=self.planned_epochs,
                           planned_steps=self.planned_epochs * STEPS_PER_EPOCH,
                           steps_done=self.epoch * STEPS_PER_EPOCH, epochs_done=self.epoch)
        self._record_epoch()

    def _record_epoch(self) -> None:
        m = self.metrics
        m.epoch_done(epoch=self.epoch, train_loss=1.0 / (1 + self.epoch),
                     val_accuracy=min(0.99, 0.5 + self.epoch / 100),
                     best_val_accuracy=min(0.99, 0.5 + self.epoch / 100), images_per_second=900.0)
        m.eta.set((self.planned_epochs - self.epoch) * self.advance_seconds)
        m.checkpoint_saved({"epoch": self.epoch, "step": 0,
                            "time": datetime.now(timezone.utc).isoformat()})
        self.version += 1
        self.body = prometheus_client.generate_latest(m.exported)

    def advance(self) -> None:
        if self.advancing and self.epoch < self.planned_epochs:
            self.epoch += 1
            self.metrics.steps.inc(STEPS_PER_EPOCH)
            self._record_epoch()

    def served(self, client: str) -> None:
        self.reads[client] += 1
        if client != "operator":
            return
        if self.operator_last_version is not None and self.operator_last_version != self.version:
            self.operator_changes += 1
        self.operator_last_version = self.version

    def stats(self) -> dict:
        return {"name": self.name, "advancing": self.advancing, "epoch": self.epoch,
                "reads": dict(self.reads), "operator_changes": self.operator_changes,
                "operator_has_read": self.operator_last_version is not None}


def client_of(user_agent: str) -> str:
    if user_agent.startswith("Prometheus/"):
        return "prometheus"
    if "aiohttp" in user_agent:  # the operator's progress reader
        return "operator"
    return "other"


def add_addresses(ips: list[str]) -> list[str]:
    """Adds each IP to lo; returns those this call added (an address already there is kept)."""
    added = []
    for ip in ips:
        result = subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            added.append(ip)
        elif "File exists" not in result.stderr:
            raise RuntimeError(f"ip addr add {ip}/32 dev lo: {result.stderr.strip()}")
    return added


def remove_addresses(ips: list[str]) -> None:
    for ip in ips:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


async def serve(config: dict) -> None:
    by_ip = {t["ip"]: StandIn(t["name"], bool(t["advancing"]), int(config["planned_epochs"]),
                              float(config["advance_seconds"]))
             for t in config["targets"]}

    last_operator_read = 0.0

    async def metrics(request: web.Request) -> web.Response:
        nonlocal last_operator_read
        local_ip = request.transport.get_extra_info("sockname")[0]
        standin = by_ip.get(local_ip)
        if standin is None:
            return web.Response(status=404)
        client = client_of(request.headers.get("User-Agent", ""))
        standin.served(client)
        if client == "operator":
            last_operator_read = time.time()
        return web.Response(body=standin.body,
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Standin-Version": str(standin.version)})

    async def advance_forever() -> None:
        while True:
            await asyncio.sleep(float(config["advance_seconds"]))
            for standin in by_ip.values():
                standin.advance()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    added = add_addresses(list(by_ip))
    advancing = None
    try:
        for ip in by_ip:
            await web.TCPSite(runner, ip, int(config["port"]), backlog=256).start()
        advancing = asyncio.create_task(advance_forever())
        print(json.dumps({"ready": True, "addresses_added": len(added),
                          "started": time.time()}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if command == "stats":
                print(json.dumps({"targets": [s.stats() for s in by_ip.values()],
                                  "last_operator_read": last_operator_read,
                                  "time": time.time()}), flush=True)
            elif command in ("quit", ""):
                break
    finally:
        if advancing:
            advancing.cancel()
        await runner.cleanup()
        remove_addresses(added)


def main() -> int:
    config = json.loads(sys.stdin.readline())
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
