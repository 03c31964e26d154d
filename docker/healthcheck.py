"""Container healthchecks of docker-compose.yml: the same probes `lmforge stack status` makes of its roles.

    python /app/docker/healthcheck.py http URL            # 200 from URL (Prefect, MLflow, the inference server)
    python /app/docker/healthcheck.py tcp PORT            # something listens on this container's PORT (Ray nodes)
    python /app/docker/healthcheck.py prefect-worker API  # the stack's worker sent its heartbeat to the pool

Exit status 0: healthy; 1: not. The probes are lmforge.stack's own, so the container form and the process
form of the stack call a role healthy on the same evidence.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from lmforge.stack.processes import http_ok, tcp_open
    from lmforge.stack.roles import POOL, worker_online

    kind, target = argv
    if kind == "http":
        return 0 if http_ok(target) else 1
    if kind == "tcp":
        return 0 if tcp_open(int(target)) else 1
    if kind == "prefect-worker":
        return 0 if worker_online(target, POOL) else 1
    print(f"unknown probe {kind!r}: http URL, tcp PORT or prefect-worker API", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
