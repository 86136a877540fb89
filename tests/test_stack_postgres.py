"""The docker stack's database path without docker: a real PostgreSQL server (this machine's; as user `nobody` when
the tests run as root, which PostgreSQL refuses), the databases docker/initdb creates, a real `mlflow server` and a
real `prefect server` on the database URLs of docker/compose.yaml, and a tiny study through them with `dpcompress
run`, as the stack's worker runs it (MLFLOW_TRACKING_URI and PREFECT_API_URL set)."""
from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from compose_file import database_urls, load
from test_flows_deploy import GLUE, ROOT, Processes, _free_port, _prefect_env, _wait_healthy, tiny_study

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")]
USER = "nobody"  # the server's user when the tests run as root
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 300
PLACEHOLDER = "compose-password"  # the password compose interpolates; the cluster's own replaces it


def _postgres_bin() -> Path | None:
    """The folder of a PostgreSQL server's programs (initdb, postgres, psql): on the PATH, else Debian's newest."""
    found = [Path(p).resolve().parent for p in filter(None, [shutil.which("initdb")])]
    found += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), key=lambda p: int(p.parent.name),
                    reverse=True)
    return next((d for d in found if all((d / name).is_file() for name in ("initdb", "postgres", "psql"))), None)


def _as_server_user() -> dict:
    """Popen arguments that run a program as `nobody` when this process is root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(USER)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class Postgres:
    """A throw-away PostgreSQL cluster in a folder of its own under the system's temporary folder (the server's user
    must reach it: pytest's folders are root's), on a free loopback port, with password authentication over TCP as
    in the stack and trust on its Unix socket, which lives in the same folder."""

    def __init__(self, bin_dir: Path, user: str):
        self.bin, self.user, self.password = bin_dir, user, secrets.token_hex(16)
        self.folder = Path(tempfile.mkdtemp(prefix="dpcompress-pg-"))
        self.port = _free_port()
        owner = _as_server_user()
        if owner:
            os.chown(self.folder, owner["user"], owner["group"])

    def start(self, processes: Processes) -> None:
        run_as = _as_server_user()
        password_file = self.folder / "password"
        password_file.write_text(self.password)
        if run_as:
            os.chown(password_file, run_as["user"], run_as["group"])
        subprocess.run([self.bin / "initdb", "-D", self.folder / "data", "-U", self.user, "--pwfile", password_file,
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, cwd=self.folder, **run_as)
        processes.start("postgres", [str(self.bin / "postgres"), "-D", str(self.folder / "data"), "-h", "127.0.0.1",
                                     "-p", str(self.port), "-k", str(self.folder), "-c", "fsync=off"],
                        dict(os.environ), **run_as)

    def wait_ready(self, processes: Processes) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert processes.started["postgres"].poll() is None, "postgres exited" + processes.log("postgres")
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.25)
        pytest.fail(f"postgres not ready after {START_TIMEOUT_S}s" + processes.log("postgres"))

    def conninfo(self, database: str) -> str:
        """psycopg's URL of `database` over TCP with the password, as the stack's services connect."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def local(self, compose_url: str) -> str:
        """A URL of the stack (host `postgres`, port 5432) on this cluster instead."""
        return compose_url.replace("@postgres:5432/", f"@127.0.0.1:{self.port}/")

    def rows(self, database: str, query: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.conninfo(database)) as connection:
            return connection.execute(query).fetchall()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def stack(tmp_path):
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server programs (initdb, postgres, psql) on PATH or in /usr/lib/postgresql/*/bin")
    spec = load({"POSTGRES_PASSWORD": PLACEHOLDER, "GLUE_DIR": str(GLUE)})
    postgres = Postgres(bin_dir, spec["services"]["postgres"]["environment"]["POSTGRES_USER"])
    processes = Processes(tmp_path)
    try:
        yield postgres, processes, spec
    finally:
        processes.stop()
        postgres.remove()


def _create_databases(postgres: Postgres, spec: dict) -> None:
    """What the postgres image's entrypoint does on a new cluster: create the database POSTGRES_DB (by default named
    after POSTGRES_USER), then run docker/initdb/create-databases.sh (psql on the local socket)."""
    import psycopg

    environment = spec["services"]["postgres"]["environment"]
    default_database = environment.get("POSTGRES_DB", environment["POSTGRES_USER"])
    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{default_database}"')
    env = {**os.environ, "PATH": f"{postgres.bin}:{os.environ['PATH']}", "PGHOST": str(postgres.folder),
           "PGPORT": str(postgres.port), "POSTGRES_USER": environment["POSTGRES_USER"],
           "POSTGRES_MULTIPLE_DATABASES": environment["POSTGRES_MULTIPLE_DATABASES"]}
    done = subprocess.run(["sh", str(ROOT / "docker/initdb/create-databases.sh")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def _service(spec: dict, name: str, replace: dict[str, str], env: dict[str, str]) -> tuple[list[str], dict]:
    """A service's compose command and environment on this machine: its program run by this interpreter
    (`python -m`), each word of `replace` replaced, and its compose environment over `env`."""
    program, *args = shlex.split(spec["services"][name]["command"])
    environment = {key: replace.get(value, value)
                   for key, value in spec["services"][name].get("environment", {}).items()}
    return [sys.executable, "-m", program, *(replace.get(arg, arg) for arg in args)], {**env, **environment}


def _start_servers(postgres: Postgres, processes: Processes, spec: dict, tmp_path: Path) -> tuple[str, str, dict]:
    """The stack's MLflow and Prefect servers, from their compose commands and environments: on loopback and free
    ports instead of 0.0.0.0:5000 and :4200 (MLflow also allows the Host of its port here), this cluster instead of
    host `postgres`, a folder for the artifact volume; MLflow with one worker process (its default wants more cores)."""
    urls = {url: postgres.local(url.replace(PLACEHOLDER, postgres.password)) for url in database_urls(spec).values()}
    mlflow_port, prefect_port = _free_port(), _free_port()
    here = f"127.0.0.1:{mlflow_port}"
    allowed = re.findall(r"--allowed-hosts\s+(\S+)", spec["services"]["mlflow"]["command"])
    args, mlflow_env = _service(spec, "mlflow", {**urls, "0.0.0.0": "127.0.0.1", "5000": str(mlflow_port),
                                                 "/mlartifacts": str(tmp_path / "mlartifacts"),
                                                 **{words: f"{words},{here}" for words in allowed}}, dict(os.environ))
    processes.start("mlflow", [*args, "--workers", "1", *([] if allowed else ["--allowed-hosts", here])], mlflow_env)
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    env = _prefect_env(tmp_path, api_url)
    args, server_env = _service(spec, "prefect", {**urls, "0.0.0.0": "127.0.0.1"},
                                {**env, "PREFECT_SERVER_UI_ENABLED": "false"})
    processes.start("server", [*args, "--port", str(prefect_port)], server_env)
    return f"http://127.0.0.1:{mlflow_port}", api_url, env


def _status(url: str, host: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def _check_host_names(spec: dict, mlflow_url: str, api_url: str) -> None:
    """The stack's clients reach the servers by other names than this test does: the worker by the compose URLs
    (mlflow:5000, prefect:4200), the user's browser by the published ports (127.0.0.1:5000). The servers must answer
    those Host headers; MLflow refuses any other (its DNS-rebinding protection), so the names must be allowed."""
    worker = spec["services"]["worker"]["environment"]
    published = spec["services"]["mlflow"]["ports"][0].rsplit(":", 1)[0]
    experiments = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    for host in (urllib.parse.urlsplit(worker["MLFLOW_TRACKING_URI"]).netloc, published):
        assert _status(experiments, host) == 200, f"MLflow refuses Host {host}"
    assert _status(experiments, "elsewhere.example:5000") == 403
    prefect_host = urllib.parse.urlsplit(worker["PREFECT_API_URL"]).netloc
    assert _status(f"{api_url}/version", prefect_host) == 200, f"Prefect refuses Host {prefect_host}"


def _tiny_study(tmp_path: Path) -> Path:
    """The tiny teacher-only study with no tracking.uri: the run reads $MLFLOW_TRACKING_URI, as on the stack's
    worker; no dataset_budget, the default."""
    return tiny_study(tmp_path, name="stack", output_dir=tmp_path / "runs", tracking={"experiment": "stack"},
                      dataset_budget=None)


def test_a_study_runs_through_postgres_backed_mlflow_and_prefect_servers(stack, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    postgres, processes, spec = stack
    began = time.monotonic()
    postgres.start(processes)
    postgres.wait_ready(processes)
    _create_databases(postgres, spec)
    mlflow_url, api_url, env = _start_servers(postgres, processes, spec, tmp_path)
    config = _tiny_study(tmp_path)  # while the servers start
    _wait_healthy(processes, mlflow_url, START_TIMEOUT_S, name="mlflow", what="mlflow server")
    _wait_healthy(processes, api_url, START_TIMEOUT_S)
    started = time.monotonic()
    _check_host_names(spec, mlflow_url, api_url)

    run = processes.start("run", [sys.executable, "-m", "flows.cli", "run", str(config), "--glue-dir", str(GLUE)],
                          {**env, "MLFLOW_TRACKING_URI": mlflow_url, "DPCOMPRESS_HOME": str(tmp_path / "owner")})
    try:
        code = run.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`dpcompress run` still running after {RUN_TIMEOUT_S}s" + processes.logs())
    assert code == 0, f"`dpcompress run` exited with {code}" + processes.logs()
    print(f"servers up in {started - began:.0f}s, study in {time.monotonic() - started:.0f}s")

    client = MlflowClient(mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("stack").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dpcompress.kind") == "study"]
    assert parent.info.status == "FINISHED"
    teacher = next(r for r in runs if r.info.run_name == "teacher")
    assert teacher.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert 0 < teacher.data.metrics["epsilon"] <= 8.0 * (1 + 1e-6) and "dev_accuracy" in teacher.data.metrics
    assert "ledger.json" in {a.path for a in client.list_artifacts(teacher.info.run_id)}  # through the server
    assert list((tmp_path / "mlartifacts").rglob("ledger.json")), "artifacts in the server's destination"
    assert client.search_model_versions("name='stack-sst2'"), "the registry, in PostgreSQL too"

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as prefect:
        (flow_run,) = prefect.read_flow_runs()
        assert flow_run.state.is_completed(), flow_run.state
        assert prefect.read_task_runs(), "the study's tasks ran against this server"

    # It all lives in PostgreSQL: the rows the servers wrote, read back with psycopg.
    assert ("teacher",) in postgres.rows("mlflow", "SELECT name FROM runs")
    teacher_metrics = f"FROM metrics WHERE run_uuid = '{teacher.info.run_id}'"
    assert postgres.rows("mlflow", f"SELECT value {teacher_metrics} AND key = 'epsilon'") == [
        (teacher.data.metrics["epsilon"],)]
    assert postgres.rows("mlflow", f"SELECT key, step {teacher_metrics} GROUP BY key, step HAVING count(*) > 1") == []
    assert postgres.rows("prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run.id}'") == [("COMPLETED",)]
