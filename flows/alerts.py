"""The failure alert of the `mft-pipeline` flow: a Prefect automation that posts to a webhook when
any run of the flow (any deployment, or `mft run` against the server) ends Failed or Crashed.

`make prefect-up` runs `python -m flows.alerts` against its server. The target is the webhook URL
in $MFT_ALERT_WEBHOOK_URL, saved as the notification block `custom-webhook/mft-alerts` (a JSON
POST: {"text": subject + body}, which Slack, Mattermost and plain receivers accept). Without the
variable, no alert is set up and an earlier one is removed. Running it again replaces both.
"""

from __future__ import annotations

import os
import sys

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client

FLOW_NAME = "mft-pipeline"
AUTOMATION_NAME = "mft-pipeline failed"
BLOCK_NAME = "mft-alerts"
URL_VARIABLE = "MFT_ALERT_WEBHOOK_URL"

SUBJECT = "mft-pipeline run {{ flow_run.name }}: {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }}"
    "{% if deployment %} (deployment {{ deployment.name }}){% endif %} ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}\n"
    "Parameters: {{ flow_run.parameters }}\n"
    "{{ flow_run|ui_url }}"
)


def failure_trigger() -> EventTrigger:
    """A Failed or Crashed state of any flow run of mft-pipeline, each one alone."""
    return EventTrigger(
        expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
        posture=Posture.Reactive,
        threshold=1,
        within=0,
    )


def remove_automation() -> bool:
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        for automation in existing:
            client.delete_automation(automation.id)
    return bool(existing)


def set_up(url: str) -> Automation:
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=url, method="POST", json_data={"text": "{{subject}}\n{{body}}"})
    block_id = block.save(BLOCK_NAME, overwrite=True)
    remove_automation()
    return Automation(
        name=AUTOMATION_NAME,
        description=f"POST to ${URL_VARIABLE} (block custom-webhook/{BLOCK_NAME}) when a run of {FLOW_NAME} fails or crashes",
        trigger=failure_trigger(),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()


def main() -> int:
    url = os.environ.get(URL_VARIABLE, "").strip()
    if not url:
        removed = remove_automation()
        print(f"failure alerts: off (set {URL_VARIABLE} to a webhook URL and run `make prefect-up` again)"
              + ("; the earlier alert is removed" if removed else ""))
        return 0
    automation = set_up(url)
    print(f"failure alerts: automation '{automation.name}' posts to {URL_VARIABLE} when a run fails or crashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
