"""`finetune-operator`: serve metrics, win the leader Lease, then run kopf with the handlers and
the background loops. Configuration comes from the environment (docs/operator.md)."""

from __future__ import annotations

import asyncio
import logging
import sys

from finetune_operator.config import ConfigError, OperatorConfig


def main(argv: list[str] | None = None) -> int:
    try:
        config = OperatorConfig.from_env()
        # Before any logging or thread starts: without a cluster to talk to, say so in one line.
        from finetune_operator.kube import load_kube_config
        load_kube_config()
    except ConfigError as error:
        print(f"finetune-operator: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level != "DEBUG":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from finetune_operator import runtime  # heavy imports only once the configuration is good

    runtime.log.info("starting: watching %s",
                     ", ".join(config.watch_namespaces) or "all namespaces")
    asyncio.run(runtime.run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
