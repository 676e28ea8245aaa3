"""The Prefect set-up end to end, with real processes: the README's Prefect commands run as typed,
the UI in headless Chromium, the failure alert, scheduled retraining, and a server on PostgreSQL
that restarts in the middle of a flow run.

"As typed": each line of the README's Prefect code block (parsed from README.md, so the two cannot
drift) runs in a new `bash -c`, from the root of a temporary copy of the project, with no Prefect
variable in its environment at all. Only our own MFT_PREFECT_PORT (a free port, so a second test
run or a developer's server on 4200 cannot collide) and MFT_ALERT_WEBHOOK_URL (a receiver this
test starts on loopback) are set. The copy isolates the state folder: its `.prefect/` (server
database, profile, pid files) and `runs/` are new and go away with it. Its `.venv` is a link to the
checkout's, and its `configs/cpu-tiny.yaml` is replaced by the same pipeline on a 2-layer random
Llama and 2 x 25 records, so that the README's commands run in seconds rather than minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.browser import Browser, chromium_missing
from tests.installed import require_installed

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STAGES = ["ingest", "tokenize", "train", "merge", "evaluate"]


def readme_prefect_commands() -> list[str]:
    """The lines of the first ```bash block of the README's Prefect section."""
    section = (REPO / "README.md").read_text().split("\n## Prefect", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's Prefect section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_project(dest: Path, model_dir: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        source = REPO / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)  # mtimes kept: make sees the shared venv up to date
    (dest / ".venv").symlink_to(REPO / ".venv")
    question = subprocess.run(["make", "-q", "setup"], cwd=dest, capture_output=True)
    assert question.returncode == 0, "the venv is older than pyproject.toml: run `make setup` in the checkout first"
    for task in ("alpha", "beta"):
        (dest / "tiny-data" / task).mkdir(parents=True)
        (dest / "tiny-data" / task / "d.jsonl").write_text("".join(
            json.dumps({"prompt": f"{task} question {i}", "answer": f"answer {i}"}) + "\n" for i in range(25)))
    (dest / "configs" / "cpu-tiny.yaml").write_text(
        "# The test's cpu-tiny: the same pipeline on a tiny random model and tiny data.\n"
        "runs_root: ../runs\n"
        "data:\n  tasks: [{path: ../tiny-data/alpha}, {path: ../tiny-data/beta}]\n"
        f"model: {{path: '{model_dir}'}}\n"
        "ingest: {decontaminate: {enabled: false}, min_valid: 3}\n"
        "tokenize: {seq_length: 64, num_workers: 1}\n"
        "train: {max_steps: 2, warmup_steps: 0, grad_accum: 1, eval_every: 2, precision: fp32, threads: 1}\n"
        "merge: {check_samples: 2}\n"
        "evaluate: {languages: [python], limit: 1, max_new_tokens: 16, evaluate_base: false}\n")
    return dest


def typed_env(**ours: str) -> dict[str, str]:
    """The test's environment without any Prefect variable, plus our own settings."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, **ours}


def shell(project: Path, env: dict[str, str], line: str, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", "-c", line], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"`{line}` did not return within {timeout:.0f} s; its output:\n{out[-4000:]}")


class Api:
    """The server's REST API, read directly (the test process itself has no Prefect settings)."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/api"

    def call(self, method: str, path: str, body: dict | None = None):
        """One request. A 503 is the server's "retry me" (on SQLite a write that met the scheduler's
        lock); Prefect's own client retries it with back-off, and so does this one, a few times."""
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(6):
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as err:
                if err.code != 503 or attempt == 5:
                    raise
                time.sleep(0.5 * 2 ** attempt)

    def flow_run(self, run_id: str) -> dict:
        return self.call("GET", f"/flow_runs/{run_id}")

    def wait_final(self, run_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while (run := self.flow_run(run_id))["state_type"] not in FINAL:
            assert time.monotonic() < deadline, f"flow run {run_id} still {run['state_name']} after {timeout:.0f} s"
            time.sleep(1)
        return run

    def task_states(self, run_id: str, expected: int) -> dict[str, str]:
        """{stage: state name} of a flow run's task runs (their states arrive as events: wait for all)."""
        deadline = time.monotonic() + 30
        while True:
            runs = self.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
            settled = len(runs) >= expected and all(r["state_type"] in FINAL for r in runs)
            if settled or time.monotonic() > deadline:
                return {r["name"].rsplit("-", 1)[0]: r["state_name"] for r in runs}
            time.sleep(0.5)


def run_id_of(output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output[-3000:]
    return match.group(1)


class WebhookReceiver:
    """A real HTTP server on loopback that keeps every POST body it gets."""

    def __init__(self):
        self.bodies: list[bytes] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.bodies.append(body)
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float) -> bytes:
        with self.arrived:
            found = self.arrived.wait_for(lambda: next((b for b in self.bodies if predicate(b)), None), timeout)
        assert found, f"no matching POST within {timeout:.0f} s; got {self.bodies}"
        return found

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def postgres_value(url: str, query: str, *args):
    import asyncio
    import uuid

    import asyncpg

    async def fetch():
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await connection.fetchval(query, *(uuid.UUID(a) for a in args))
        finally:
            await connection.close()

    return asyncio.run(fetch())


def stop_leftovers(project: Path) -> None:
    """After a failed test: whatever prefect-down could not stop (by the pid files it wrote)."""
    for name in ("worker", "server"):
        pid_file = project / ".prefect" / "local" / f"{name}.pid"
        if pid_file.is_file():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llama_dir):
    """The README's first command, `make prefect-up`, in a fresh copy of the project; its last,
    `make prefect-down`, at the end (the README test runs it itself and checks what it does)."""
    commands = readme_prefect_commands()
    assert commands[0].startswith("make prefect-up") and commands[-1].startswith("make prefect-down"), commands
    project = copy_project(tmp_path_factory.mktemp("project"), tiny_llama_dir)
    receiver = WebhookReceiver()
    port = free_port()
    env = typed_env(MFT_PREFECT_PORT=str(port), MFT_ALERT_WEBHOOK_URL=receiver.url)
    try:
        up = shell(project, env, commands[0])
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"api_url\":\"http://127.0.0.1:{port}/api" in urllib.request.urlopen(
            f"http://127.0.0.1:{port}/ui-settings").read().decode()
        yield {"project": project, "env": env, "port": port, "api": Api(port), "receiver": receiver,
               "commands": commands}
    finally:
        shell(project, env, commands[-1])
        stop_leftovers(project)
        receiver.close()


def test_a_failed_run_posts_to_the_alert_webhook(stack):
    run = shell(stack["project"], stack["env"],
                ".venv/bin/prefect deployment run mft-pipeline/default -p config=configs/missing.yaml --watch")
    assert run.returncode == 1 and "Failed" in run.stdout, run.stdout[-3000:]
    run_id = run_id_of(run.stdout)
    name = stack["api"].flow_run(run_id)["name"]
    body = json.loads(stack["receiver"].wait_for(lambda b: name.encode() in b, timeout=90))
    text = body["text"]
    assert f"mft-pipeline run {name}: Failed" in text and "(deployment default) ended Failed" in text
    assert "configs/missing.yaml" in text  # the parameters, and the run's page in the UI
    assert f"http://127.0.0.1:{stack['port']}/runs/flow-run/{run_id}" in text


def test_scheduled_retraining_reruns_what_changed(stack):
    """The scheduler (not `deployment run`) creates the runs of a 20-second interval schedule: a
    run with nothing changed is all Cached; after a raw file changed, ingest and everything after it
    run again."""
    project, api = stack["project"], stack["api"]
    # Its own data and runs root: the other tests' runs neither feed nor see its cache.
    shutil.copytree(project / "tiny-data", project / "scheduled-data")
    (project / "configs" / "scheduled.yaml").write_text((project / "configs" / "cpu-tiny.yaml").read_text()
                                                        .replace("../runs", "../runs-scheduled")
                                                        .replace("../tiny-data/", "../scheduled-data/"))
    name = "retrain-every-20s"
    deploy = shell(project, stack["env"], ".venv/bin/python -c \"from flows.mft_pipeline import mft_pipeline; "
                   "mft_pipeline.from_source(source='.', entrypoint='flows/mft_pipeline.py:mft_pipeline').deploy("
                   f"name='{name}', work_pool_name='local-pool', interval=20, "
                   "parameters={'config': 'configs/scheduled.yaml'}, print_next_steps=False)\"")
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    deployment = api.call("GET", f"/deployments/name/mft-pipeline/{name}")

    def runs() -> list[dict]:
        found = api.call("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                                       "sort": "EXPECTED_START_TIME_ASC", "limit": 50})
        assert all(r["auto_scheduled"] for r in found), "a run not created by the scheduler"
        return found

    def scheduled_after(earlier: set[str], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            pending = [r for r in runs() if r["id"] not in earlier]
            if pending:
                return pending[0]
            assert time.monotonic() < deadline, "the scheduler created no run (is it alive? see .prefect/local/server.log)"
            time.sleep(1)

    try:
        first = scheduled_after(set())
        assert api.wait_final(first["id"])["state_name"] == "Completed"
        unchanged = scheduled_after({first["id"]})
        assert api.wait_final(unchanged["id"])["state_name"] == "Completed"
        assert api.task_states(unchanged["id"], 5) == {stage: "Cached" for stage in STAGES}

        # Change a raw file while no run is under way, then take the first run that had not started.
        while any(r["state_type"] in ("PENDING", "RUNNING") for r in runs()):
            time.sleep(0.5)
        seen = {r["id"] for r in runs() if r["state_type"] != "SCHEDULED"}
        raw = project / "scheduled-data" / "beta" / "d.jsonl"
        changed_text = raw.read_text() + json.dumps({"prompt": "beta question 25", "answer": "answer 25"}) + "\n"
        raw.with_name("d.jsonl.new").write_text(changed_text)
        os.replace(raw.with_name("d.jsonl.new"), raw)  # whole: a run never reads half of it
        changed = scheduled_after(seen)
        assert changed["state_type"] == "SCHEDULED"
        while api.flow_run(changed["id"])["state_type"] == "SCHEDULED":
            time.sleep(0.5)
        # Started: stop the schedule (its future runs are deleted), so nothing queues behind this one.
        for schedule in deployment["schedules"]:
            api.call("DELETE", f"/deployments/{deployment['id']}/schedules/{schedule['id']}")
        assert api.wait_final(changed["id"])["state_name"] == "Completed"
        assert api.task_states(changed["id"], 5) == {stage: "Completed" for stage in STAGES}
    finally:
        api.call("DELETE", f"/deployments/{deployment['id']}")


def test_readme_prefect_commands_as_typed_and_the_ui_on_another_port(stack):
    project, env, api, port = stack["project"], stack["env"], stack["api"], stack["port"]
    commands = stack["commands"]
    profile = (project / ".prefect" / "profiles.toml").read_text()
    assert f'PREFECT_API_URL = "http://127.0.0.1:{port}/api"' in profile
    # What a command typed here resolves (`prefect config view` is no witness: it showed this URL
    # "from profile" while the commands started a temporary server of their own).
    resolved = shell(project, env, ".venv/bin/python -c 'from prefect.settings import get_current_settings as s; print(s().api.url)'")
    assert resolved.stdout.strip() == f"http://127.0.0.1:{port}/api", resolved.stdout + resolved.stderr

    deployment_runs = []
    for line in commands[1:-1]:
        result = shell(project, env, line)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"`{line}` exited {result.returncode}:\n{output[-4000:]}"
        assert "Starting temporary server" not in output, f"`{line}` did not talk to the project's server"
        if "deployment run" in line:
            assert "Flow run finished successfully in 'Completed'" in output, output[-3000:]
            deployment_runs.append((line, run_id_of(result.stdout)))
        if line.startswith(".venv/bin/mft status"):
            rows = [row.split() for row in result.stdout.splitlines()]
            states = {row[0]: row[2] for row in rows if row and row[0] in STAGES}
            assert states == {stage: "complete" for stage in STAGES}, result.stdout

    by_kind = {}
    for line, run_id in deployment_runs:
        tasks = api.task_states(run_id, 1)
        if "mft-experiment" in line:
            by_kind["experiment"] = run_id
        elif "eval-only" in line:
            by_kind["eval-only"] = tasks
        elif "stages=" in line:
            by_kind["stages"] = tasks
        elif "overrides=" in line:
            by_kind["overrides"] = tasks
        else:
            by_kind["default"] = tasks
    assert by_kind["default"] == {stage: "Completed" for stage in STAGES}  # a new runs root: all computed
    assert by_kind["eval-only"] == {"evaluate": "Completed"}  # forced; the others only located
    assert by_kind["stages"] == {"ingest": "Completed"}
    # The experiment: one mft-pipeline subflow run per arm (2 tasks: mft-case3, mixed-sft, sft-alpha,
    # sft-beta), every one Completed, and its table and report as artifacts of the experiment run.
    children = api.call("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [by_kind["experiment"]]}}})
    assert sorted(run["name"] for run in children) == [f"paper-{arm}-seed1" for arm in
                                                       ("mft-case3", "mixed-sft", "sft-alpha", "sft-beta")]
    assert all(run["state_name"] == "Completed" for run in children)
    artifacts = api.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [by_kind["experiment"]]}}})
    assert {a["key"] for a in artifacts} >= {"experiment", "experiment-report"}
    # A training setting: ingest and tokenize reused, train and what follows it run.
    assert by_kind["overrides"] == {"ingest": "Cached", "tokenize": "Cached", "train": "Completed",
                                    "merge": "Completed", "evaluate": "Completed"}

    # The UI on this port: the first run's page lists its task runs and its artifacts.
    require_installed(chromium_missing())
    first = deployment_runs[0][1]
    name = api.flow_run(first)["name"]
    with Browser() as browser:
        browser.open(f"http://127.0.0.1:{port}/runs/flow-run/{first}")
        assert "Can't connect to Server API" not in browser.wait_for_text([name, "Completed"])
        browser.click("Task Runs")
        browser.wait_for_text(["Newest to Oldest"] + [f"{stage}-" for stage in STAGES])  # the task list, sorted
        browser.click("Artifacts")
        browser.wait_for_text([f"{stage}-stats" for stage in STAGES] + ["train-loss-curves", "evaluate-report"],
                              scroll=True)  # the artifacts render as they come into view

    # `make prefect-down`: everything stops, and `mft run` is back on the embedded backend.
    down = shell(project, env, commands[-1])
    assert "worker: stopped" in down.stdout and "server: stopped" in down.stdout, down.stdout + down.stderr
    embedded = shell(project, env, ".venv/bin/mft run --config configs/cpu-tiny.yaml --stages ingest")
    assert embedded.returncode == 0, embedded.stdout[-3000:] + embedded.stderr[-3000:]
    assert "Starting temporary server" in embedded.stdout + embedded.stderr


def test_a_postgres_server_survives_a_restart_in_the_middle_of_a_run(tmp_path, tiny_llama_dir):
    """MFT_PREFECT_DB=postgres: the server runs on the project's own PostgreSQL cluster; it is
    stopped and started again while the train task runs, and the run ends Completed with every
    task's state right."""
    require_installed(None if list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
                      else "PostgreSQL is not installed; run `scripts/install-extras.sh postgresql`")
    project = copy_project(tmp_path / "project", tiny_llama_dir)
    port = free_port()
    env = typed_env(MFT_PREFECT_PORT=str(port), MFT_PREFECT_DB="postgres")
    api = Api(port)
    try:
        up = shell(project, env, "make prefect-up")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "with postgres" in up.stdout and not (project / ".prefect" / "prefect.db").exists()

        run = shell(project, env, ".venv/bin/prefect deployment run mft-pipeline/default -p config=configs/cpu-tiny.yaml")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        run_id = run_id_of(run.stdout)
        deadline = time.monotonic() + 300
        while not list((project / "runs" / "train").glob("*.partial")):
            assert time.monotonic() < deadline and api.flow_run(run_id)["state_type"] not in FINAL, "training never started"
            time.sleep(0.2)

        # Stop the server (as prefect-down does: SIGTERM) while the trainer runs, and start it again.
        server_pid = int((project / ".prefect" / "local" / "server.pid").read_text())
        os.kill(server_pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while process_alive(server_pid):
            assert time.monotonic() < deadline, "the server did not stop on SIGTERM"
            time.sleep(0.2)
        with pytest.raises(OSError):
            api.flow_run(run_id)  # down: the run goes on without it
        restart = shell(project, env, "scripts/prefect-up.sh")
        assert restart.returncode == 0 and "prefect worker already running" in restart.stdout, restart.stdout + restart.stderr

        final = api.wait_final(run_id)
        assert final["state_name"] == "Completed", final["state"]
        assert api.task_states(run_id, 5) == {stage: "Completed" for stage in STAGES}
        assert len(list((project / "runs" / "evaluate").glob("*/_SUCCESS"))) == 1
        # ... and it is PostgreSQL that holds it.
        url = shell(project, env, "scripts/prefect-db.sh start").stdout.strip()
        assert url.startswith("postgresql+asyncpg://prefect:")
        assert postgres_value(url, "select state_name from flow_run where id = $1", run_id) == "Completed"
    finally:
        shell(project, env, "make prefect-down")
        stop_leftovers(project)
        shell(project, env, "scripts/prefect-db.sh drop")
