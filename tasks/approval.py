"""The approval step of promotion: the flow run pauses with an input form until a person answers.

:func:`promote_with_approval` is the flow's promote step; it calls :func:`request_approval` (in the
flow body, not a task) when the promote task left the candidate ``pending``
(``registry.policy.approval.enabled``). It uses Prefect's own mechanism: ``pause_flow_run`` with
``wait_for_input`` saves :class:`ApprovalInput`'s JSON schema on the flow run, the Prefect UI shows
it as a form on the paused run (or a script resumes it through the API, ``POST
/flow_runs/{id}/resume`` with ``{"run_input": {"approve": true, "comment": "..."}}``), and the
answer comes back here. No answer within ``timeout_s`` rejects the candidate: the pause raises
``FlowPauseTimeout``, and the flow run is set back to Running so the rest of the pipeline (deploy
of the unchanged champion) still runs and the rejection is recorded like any other decision.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, pause_flow_run
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.settings import PREFECT_UI_URL
from prefect.states import Running
from pydantic import Field

from lmforge.config import PlatformConfig, RegistryConfig
from tasks.registry import promote_task, settle_approval_task


class ApprovalInput(RunInput):
    """The form on the paused flow run."""

    approve: bool = Field(description="true: promote this version (move the alias); false: reject it.")
    comment: str = Field("", description="Why; recorded on the model version with your answer.")


def promote_with_approval(cfg: RegistryConfig, platform: PlatformConfig, version: str) -> dict[str, Any]:
    """The promote step of a flow: apply the policy and, when it leaves the version pending
    (``registry.policy.approval.enabled``), pause for a person's answer and record it."""
    decision = promote_task(cfg, platform, version)
    if decision["decision"] == "pending":
        answer = request_approval(decision, cfg.policy.approval.timeout_s)
        decision = settle_approval_task(cfg, platform, version, answer)
    return decision


def request_approval(decision: dict[str, Any], timeout_s: int) -> dict[str, Any]:
    """Pause this flow run until the form is answered or ``timeout_s`` passes; the answer as a dict
    (``approved``, ``comment``, ``timed_out``, ``by``, ``via``) for the settle-approval task."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("request_approval pauses a flow run; call it from a flow")
    run_id = context.flow_run.id
    logger = get_run_logger()
    where = f"{PREFECT_UI_URL.value()}/runs/flow-run/{run_id}" if PREFECT_UI_URL.value() else f"flow run {run_id}"
    logger.info(f"promote: v{decision['candidate_version']} of {decision['name']} passed the rules; waiting up to "
                f"{timeout_s} s for approval at {where}")
    form = ApprovalInput.with_initial_data(description=_describe(decision))
    via = f"prefect flow run {run_id}"
    try:
        # Prefect checks for the answer every 10 s by default; a person who just clicked should not wait that long.
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=1 if timeout_s < 10 else 2)
    except FlowPauseTimeout:
        with get_client(sync_client=True) as client:
            # The server fails an expired pause (and refuses a late resume); the flow itself goes on.
            client.set_flow_run_state(run_id, Running(message="approval timed out: the candidate was rejected"),
                                      force=True)
        logger.warning(f"promote: no answer within {timeout_s} s; v{decision['candidate_version']} is rejected")
        return {"approved": False, "comment": "", "timed_out": True, "by": "timeout", "via": via}
    return {"approved": bool(answer.approve), "comment": answer.comment, "timed_out": False,
            "by": "prefect-ui", "via": via}


def _describe(decision: dict[str, Any]) -> str:
    """The markdown above the form: what is being decided and the numbers the rules saw."""
    rows = [f"| {g['metric']} | {g['candidate']} | {g['champion']} | {g['tolerance']} {g['kind']} | "
            f"{'yes' if g['passed'] else 'no'} |" for g in decision.get("guardrails", [])]
    table = ("\n\n| guardrail | candidate | champion | tolerance | passed |\n|---|---|---|---|---|\n" + "\n".join(rows)
             if rows else "")
    return (f"## Promote {decision['name']} v{decision['candidate_version']} to `{decision['alias']}`?\n\n"
            f"{decision['metric']}: candidate {decision['candidate_value']}, champion "
            f"{decision['champion_value']} (v{decision['previous_champion_version']}).\n\n"
            f"{decision['reason']}{table}")
