"""Prefect tasks: one thin wrapper per stage (retries, timeouts, artifacts, events).

Each task calls exactly one engine function from ``lmforge`` and publishes its result as a Prefect
artifact; no ML logic lives here (ARCHITECTURE.md, "Three layers").
"""
