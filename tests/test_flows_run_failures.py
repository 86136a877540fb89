"""`dpcompress run` after pre-flight passed: a stage that fails (exit 1: the stage, the cause, the log file with the
traceback, the command that resumes), a temporary Prefect server that does not start (exit 1, one line of advice, no
server left behind), and Ctrl-C in a real process (exit 130, the server's process group gone)."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from preflight_study import run_cli

from flows import runlog, server
from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| INFO    \| (Flow|Task) run '")  # Prefect's lines on the console


def _tasks_module(source: str, name: str = "tasks.fake_stage") -> dict:
    """Functions defined as if in a module under tasks/ (where failed_stage looks for the stage)."""
    namespace = {"__name__": name}
    exec(source, namespace)
    return namespace


def _raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn(*args, **kwargs)
    return info.value


def test_failed_stage_names_the_outermost_task_and_its_stage():
    inner = _tasks_module("def run_dp_stage(*, name):\n    raise RuntimeError('boom')\n", "tasks.stage_fake")
    outer = _tasks_module("def train_teacher(*, stage, inner):\n    inner(name=stage)\n")
    err = _raised(outer["train_teacher"], stage="teacher", inner=inner["run_dp_stage"])
    assert runlog.failed_stage(err) == "stage 'teacher' (task train_teacher)"
    assert runlog.one_line(err) == "RuntimeError: boom"


def test_failed_stage_without_a_stage_names_the_task_and_outside_tasks_the_flow():
    fake = _tasks_module("def plan_privacy(*, budget):\n    raise ValueError(f'no plan for {budget}\\nsecond line')\n")
    err = _raised(fake["plan_privacy"], budget=3)
    assert runlog.failed_stage(err) == "task plan_privacy"
    assert runlog.one_line(err) == "ValueError: no plan for 3"
    assert runlog.failed_stage(_raised(int, "x")) == "the study flow"
    assert runlog.one_line(KeyError()) == "KeyError"


def test_resume_command_is_absolute_and_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = runlog.resume_command("studies/my study.yaml", ["privacy.epsilon=4", "tracking.experiment=a b"],
                                    "glue")
    assert shlex.split(command) == ["dpcompress", "run", str(tmp_path / "studies/my study.yaml"),
                                    "--set", "privacy.epsilon=4", "--set", "tracking.experiment=a b",
                                    "--glue-dir", str(tmp_path / "glue")]
    assert runlog.resume_command(str(tmp_path / "s.yaml"), [], None) == f"dpcompress run {tmp_path / 's.yaml'}"


@pytest.fixture
def server_processes(monkeypatch) -> Iterator[list[subprocess.Popen]]:
    """The temporary Prefect servers `dpcompress run` starts in this test (recorded as they are waited for). The
    API URL and the server's database are the defaults for the test: a session's Prefect harness that an earlier test
    left active in this worker's process would otherwise stand in for the temporary server, or lend it its database."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    started, wait = [], server._wait_until_healthy

    def recording(process, url, timeout_s):
        started.append(process)
        return wait(process, url, timeout_s)

    monkeypatch.setattr(server, "_wait_until_healthy", recording)
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL}):
        yield started


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_stopped(process: subprocess.Popen) -> None:
    assert process.returncode is not None, "the temporary server was not stopped"
    assert _group_gone(process.pid), "a process of the temporary server's group survived"  # its own session


@pytest.mark.slow
def test_a_stage_that_fails_exits_1_with_stage_cause_log_and_resume_command(study, server_processes, capsys,
                                                                          monkeypatch):
    import tasks.teacher

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tasks.teacher, "load_classifier", boom)
    override = "tracking.experiment=run failures"  # a space: the resume command must quote it
    code = main(["run", str(study.config), "--set", override])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 1
    ours = [line for line in lines if line.startswith("dpcompress:")]
    assert len(ours) == 3, lines
    assert ours[0] == "dpcompress: stage 'teacher' (task train_teacher) failed: RuntimeError: boom"
    log = Path(ours[1].removeprefix("dpcompress: full traceback in "))
    assert log.parent == study.tmp / "runs" / "pf" / "logs" and log.is_file(), ours[1]
    tracking = f"sqlite:///{study.tmp}/mlflow/mlflow.db"
    assert out.splitlines() == [f"study 'pf': output in {log.parents[1]}, tracking at {tracking}, log in {log}"]
    assert ours[2] == ("dpcompress: to resume (finished stages are reused): "
                       + runlog.resume_command(str(study.config), [override], None))
    assert shlex.split(ours[2].split(": ", 2)[2]) == ["dpcompress", "run", str(study.config), "--set", override]
    assert not [line for line in lines if line not in ours and not PROGRESS.match(line)], lines  # nothing else
    assert "Traceback" not in err + out
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom" in text and "in boom" in text
    assert len(server_processes) == 1
    _assert_stopped(server_processes[0])


@pytest.mark.slow
def test_a_server_start_up_timeout_is_one_line_and_leaves_no_server(study, server_processes, capsys, monkeypatch):
    monkeypatch.setenv(server.TIMEOUT_ENV, "1")  # the least Prefect accepts; its server takes seconds to import
    code, lines = run_cli(capsys, "run", str(study.config))
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("dpcompress: the temporary Prefect server did not answer within 1 s")
    assert server.TIMEOUT_ENV in lines[0] and "PREFECT_API_URL" in lines[0] and "Traceback" not in lines[0]
    assert len(server_processes) == 1
    _assert_stopped(server_processes[0])


@pytest.mark.parametrize("value", ["0.01", "", "0", "-5", "3 min"])
def test_a_start_up_timeout_prefect_cannot_read_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(server.TIMEOUT_ENV, value)
    (line,) = server.startup_timeout_problems()
    assert line.startswith(f"${server.TIMEOUT_ENV}={value!r}: not a whole number of seconds > 0")


@pytest.mark.parametrize("value", [None, "20", " 20 ", "20.0", "1"])
def test_a_start_up_timeout_prefect_reads_passes(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(server.TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(server.TIMEOUT_ENV, value)
    assert server.startup_timeout_problems() == []


def test_run_refuses_a_start_up_timeout_prefect_cannot_read_before_importing_it(study, no_server, capsys,
                                                                                monkeypatch):
    monkeypatch.setenv(server.TIMEOUT_ENV, "0.5")  # Prefect's settings would stop its import with a traceback
    code, lines = run_cli(capsys, "run", str(study.config))
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].startswith(f"dpcompress: ${server.TIMEOUT_ENV}='0.5': not a whole number of seconds > 0")


def test_a_server_that_exits_while_starting_is_one_line():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)
    try:
        with pytest.raises(server.ServerError) as info:
            server._wait_until_healthy(process, f"http://127.0.0.1:{server._free_port()}/api", timeout_s=120)
    finally:
        process.kill()
        process.wait()
    message = str(info.value)
    assert "exited with code 3 while starting" in message and "PREFECT_API_URL" in message
    assert "\n" not in message


# `python -m flows.cli`, with the teacher's model loading replaced by a wait that says when it began (Ctrl-C then lands
# inside a stage, as in a long training run, whatever the machine's speed)
# Ctrl-C as in a terminal's foreground job: a suite started in the background (`pytest ... &` from a script) passes
# SIGINT down ignored, and Python then keeps it ignored (the run would hang in the teacher).
LAUNCH = """\
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import tasks.teacher
def hang(*args, **kwargs):
    print("test: the teacher started", file=sys.stderr, flush=True)
    while True:
        time.sleep(0.1)
tasks.teacher.load_classifier = hang
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        assert process.poll() is None, f"exited with {process.returncode}: {path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s: {path.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server through /proc")
def test_ctrl_c_in_a_real_process_exits_130_and_stops_the_temporary_server(study):
    out, err = study.tmp / "stdout.txt", study.tmp / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(out, "w") as stdout, open(err, "w") as stderr:  # its own process group, as a terminal's foreground
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, "run", str(study.config)], cwd=ROOT, env=env,
                                   stdout=stdout, stderr=stderr, start_new_session=True)  # job: Ctrl-C reaches all
    servers = []
    try:
        _wait_for(err, "test: the teacher started", process, timeout_s=300)
        servers = [pid for pid in _children(process.pid) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(servers) == 1, _children(process.pid)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=120)  # it stops its server first; slack for 2 loaded cores
        survived = [pid for pid in servers if not _group_gone(pid)]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in servers:
            if not _group_gone(pid):
                os.killpg(pid, signal.SIGKILL)
    text = err.read_text()
    assert code == 130, text[-3000:]
    interrupted = [line for line in text.splitlines() if line.startswith("dpcompress: interrupted")]
    assert len(interrupted) == 1, text[-3000:]
    assert "resume with: dpcompress run " + str(study.config) in interrupted[0]
    assert "Traceback" not in text + out.read_text()
    assert not survived, "the temporary server survived Ctrl-C"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_temporary_server_dies_with_a_killed_run(tmp_path):
    """kill -9 (or the OOM killer) on `dpcompress run` gives it no chance to stop its server, which runs in a
    session of its own: the kernel's parent-death signal does."""
    out = tmp_path / "stdout.txt"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    code = ("import time\nfrom flows.server import prefect_api\n"
            "with prefect_api():\n    print('up', flush=True)\n    time.sleep(600)\n")
    with open(out, "w") as stdout:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=stdout,
                                   stderr=subprocess.STDOUT)
    servers = []
    try:
        _wait_for(out, "up", process, timeout_s=300)
        servers = [pid for pid in _children(process.pid) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(servers) == 1, _children(process.pid)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30
        while not _group_gone(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_gone(servers[0]), "the temporary server outlived its killed parent"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in servers:
            if not _group_gone(pid):
                os.killpg(pid, signal.SIGKILL)
