#!/bin/sh
# Entry point of the prefect-worker service: join the Ray cluster as a node, then run the command given
# (`prefect worker start ...`, the one `lmforge stack` runs). A deployment's flow run is a Ray driver, and
# a Ray driver runs on a node of its cluster (as `RAY_ADDRESS=HEAD_IP:6379 lmforge train` on a node does in
# README.md); it gets RAY_ADDRESS, RAY_AUTH_MODE and RAY_AUTH_TOKEN from the service's environment.
set -eu
: "${RAY_ADDRESS:?RAY_ADDRESS names the Ray head (host:port)}"
ray start --address="$RAY_ADDRESS" --disable-usage-stats
exec "$@"
