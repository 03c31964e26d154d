"""Prefect flows: the order of stages and the flow parameters (the pydantic stage configs)."""
