"""End to end: flows/prefect.yaml deployed to a real `prefect server` (a subprocess with its own home and database),
run by a `process` worker of the dpcompress pool as the UI's Run button starts it; the server refuses a parameter
of the wrong type, naming it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")]
FLOW_RUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Subprocesses of this test, each in a session of its own with its output in a log file; `stop` ends each one's
    whole process group (a worker's flow-run process included)."""

    def __init__(self, folder: Path):
        self.folder, self.started = folder, {}

    def start(self, name: str, args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
        """Start `args` in the checkout; `popen`: more of Popen's arguments (e.g. `user`)."""
        with open(self.folder / f"{name}.log", "w") as log:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, **popen)
        self.started[name] = proc
        return proc

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.folder / f"{name}.log"
        return f"\n--- {name} log (end) ---\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "")

    def logs(self) -> str:
        return "".join(self.log(name) for name in self.started)

    def stop(self) -> None:
        strays = _descendants({proc.pid for proc in self.started.values()})  # e.g. a flow run in its own session
        for proc in reversed(self.started.values()):
            for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pid, started in strays.items():
            if _start_time(pid) == started:  # still that process, not a reused pid
                os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pids: set[int]) -> dict[int, str]:
    """Every process below `pids` (Linux /proc; none elsewhere), with its start time."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(") ", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if (started := _start_time(child)) is not None:
                found[child] = started
            todo.append(child)
    return found


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def _prefect_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "DPCOMPRESS_WORKDIR"))}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}


def _start_server(processes: Processes, tmp_path: Path) -> tuple[str, dict[str, str]]:
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _prefect_env(tmp_path, api_url)
    server_env = {**env, "PREFECT_SERVER_UI_ENABLED": "false",
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"}
    processes.start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], server_env)
    return api_url, env


def _wait_healthy(processes: Processes, url: str, timeout_s: float = 180, *, name: str = "server",
                  what: str = "prefect server") -> None:
    """Wait until `url`/health answers 200, failing with the log of `processes`' `name` if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert processes.started[name].poll() is None, f"{what} exited" + processes.log(name)
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{what} not healthy after {timeout_s}s" + processes.log(name))


def tiny_study(tmp_path: Path, *, name: str, output_dir: Path, tracking: dict, dataset_budget: float | None = 100.0
               ) -> Path:
    """The quickstart on a 2-layer BERT built from a config (no download), 48 train and 32 dev rows, teacher only;
    data.dir unset (the run's glue_dir parameter), its own dataset ledger. Written to `tmp_path`/NAME.yaml."""
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier

    model = tmp_path / "tiny-bert"
    save_classifier(build_tiny(vocab_size=30522, hidden_size=32, num_layers=2, intermediate_size=64, seed=0),
                    AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), model)
    cfg = yaml.safe_load((ROOT / "flows/configs/quickstart.yaml").read_text())
    cfg.update(name=name, output_dir=str(output_dir), model={"name_or_path": str(model)})
    cfg["data"].update(max_train_examples=48, max_eval_examples=32)
    cfg["teacher"].update(train={"epochs": 1, "batch_size": 16, "physical_batch_size": 8},
                          method={"name": "full", "layers": 2})
    cfg["prune"]["enabled"] = cfg["distill"]["enabled"] = False
    cfg["privacy"]["dataset_ledger"] = str(output_dir / "ledger.db")
    if dataset_budget is not None:
        cfg["privacy"]["dataset_budget"] = dataset_budget
    cfg["tracking"] = tracking
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tiny_study(tmp_path: Path) -> Path:
    """`tiny_study` tracked to a sqlite store of its own."""
    from mlflow import MlflowClient

    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "deployed"}
    # with a sqlite store, a new experiment's artifacts go to ./mlruns of the run's working directory (the checkout)
    MlflowClient(tracking["uri"]).create_experiment("deployed", artifact_location=str(tmp_path / "artifacts"))
    return tiny_study(tmp_path, name="tiny", output_dir=tmp_path / "runs", tracking=tracking)


def _run_cli(processes: Processes, name: str, args: list[str], env: dict[str, str], timeout_s: float = 180) -> None:
    proc = processes.start(name, [sys.executable, "-m", "prefect", "--no-prompt", *args], env)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`prefect {' '.join(args)}` still running after {timeout_s}s" + processes.logs())
    assert code == 0, f"`prefect {' '.join(args)}` exited with {code}" + processes.logs()


def _wait_final(client, flow_run_id, processes: Processes):
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert processes.started["worker"].poll() is None, "the worker exited" + processes.logs()
        time.sleep(2)
    pytest.fail(f"flow run not finished after {FLOW_RUN_TIMEOUT_S}s (state {run.state_name})" + processes.logs())


def _flow_run_logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n--- flow run logs ---\n" + "\n".join(log.message for log in logs)[-4000:]


def test_deployment_runs_a_study_from_the_api_and_refuses_wrong_types(tmp_path, processes):
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url, env = _start_server(processes, tmp_path)
    config = _tiny_study(tmp_path)  # builds the tiny model while the server starts
    _wait_healthy(processes, api_url)

    _run_cli(processes, "pool", ["work-pool", "create", "dpcompress", "--type", "process"], env)
    # the worker's environment says where the code is; `prefect deploy` runs without DPCOMPRESS_WORKDIR
    processes.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dpcompress",
                               "--type", "process"],
                    {**env, "DPCOMPRESS_WORKDIR": str(ROOT), "DPCOMPRESS_HOME": str(tmp_path / "owner"),
                     "PREFECT_WORKER_QUERY_SECONDS": "1"})
    _run_cli(processes, "deploy", ["deploy", "--prefect-file", "flows/prefect.yaml", "--all"], env)

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dpcompress-study/study")
        assert deployment.enforce_parameter_schema
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $DPCOMPRESS_WORKDIR }}"}}], "resolved on the worker, not fixed at deploy time"
        assert deployment.parameter_openapi_schema["properties"]["overrides"]["description"]

        for field, wrong in (("overrides", 5), ("config_path", [1])):
            with pytest.raises(httpx.HTTPStatusError) as refused:
                client.create_flow_run_from_deployment(deployment.id, parameters={"config_path": str(config),
                                                                                  field: wrong})
            assert refused.value.response.status_code == 409
            detail = refused.value.response.json()["detail"]
            assert f"Validation failed for field '{field}'" in detail, detail
            print(f"{field}={wrong!r}: {detail}")
        assert client.read_flow_runs() == [], "a refused run must not exist"

        began = time.monotonic()
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "config_path": str(config), "overrides": ["name=from-the-ui"], "glue_dir": str(GLUE)})
        finished = _wait_final(client, flow_run.id, processes)
        assert finished.state.is_completed(), (f"{finished.state_name}: {finished.state.message}"
                                               + _flow_run_logs(client, flow_run.id) + processes.logs())
        print(f"flow run: {time.monotonic() - began:.0f}s from creation to COMPLETED")

    study = tmp_path / "runs" / "from-the-ui"  # the override reached the study
    rows = (study / "results" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("teacher")
    assert (tmp_path / "owner" / "fingerprint.key").exists()  # the worker's data-owner state
    assert list((tmp_path / "artifacts").rglob("results.md")), "MLflow artifacts stay in this test's folder"
