"""The deployment and stack files point at real code, expose nothing beyond loopback, and hold no fixed secret."""
import inspect
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_PASSWORD = re.compile(r"^\$\{POSTGRES_PASSWORD:\?[^}]+\}$")


def test_prefect_deployments_entrypoints_and_parameters_match_the_flows():
    import importlib

    spec = yaml.safe_load((ROOT / "flows/prefect.yaml").read_text())
    assert [d["name"] for d in spec["deployments"]] == ["study", "sweep"]
    for deployment in spec["deployments"]:
        module_path, name = deployment["entrypoint"].split(":")
        assert (ROOT / module_path).exists()
        flow = getattr(importlib.import_module(module_path.removesuffix(".py").replace("/", ".")), name)
        params = inspect.signature(flow.fn).parameters
        assert set(deployment["parameters"]) <= set(params)
        assert (ROOT / deployment["parameters"]["config_path"]).exists()
        assert deployment["enforce_parameter_schema"] is True  # the server refuses a parameter of the wrong type
        assert deployment["work_pool"]["name"] == "dpcompress"
        for param in params:  # the UI's form shows each parameter's description
            assert f"{param}:" in flow.fn.__doc__.split("Args:")[1], param
    import flows.study
    import flows.sweep

    assert f"{flows.study.study.name}/{spec['deployments'][0]['name']}" == flows.sweep.STUDY_DEPLOYMENT


def test_deployment_working_directory_comes_from_the_worker_environment():
    spec = yaml.safe_load((ROOT / "flows/prefect.yaml").read_text())
    (step,) = spec["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DPCOMPRESS_WORKDIR }}"}}
    assert "DPCOMPRESS_WORKDIR=/opt/dpcompress" in (ROOT / "docker/Dockerfile").read_text()


def test_compose_binds_every_port_to_loopback_and_has_the_stack():
    spec = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    assert {"postgres", "mlflow", "prefect", "worker"} <= set(spec["services"])
    ports = [p for s in spec["services"].values() for p in s.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)
    assert "postgresql+psycopg://" in spec["services"]["mlflow"]["command"]
    assert not (ROOT / "docker/__init__.py").exists()  # would shadow the docker SDK


def test_compose_has_no_fixed_password_and_no_developer_paths():
    text = (ROOT / "docker/compose.yaml").read_text()
    spec = yaml.safe_load(text)
    assert REQUIRED_PASSWORD.match(spec["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"])
    urls = re.findall(r"postgresql(?:\+\w+)?://\w+:([^@\n]+)@", text)
    assert len(urls) == 2 and all(REQUIRED_PASSWORD.match(password) for password in urls)
    assert not re.search(r"PASSWORD[^}\n]*:-", text), "a password must not have a default"
    mounts = [m for s in spec["services"].values() for m in s.get("volumes", []) if m.endswith(":/data/glue:ro")]
    assert mounts == ["${GLUE_DIR:?set GLUE_DIR to the local GLUE folder}:/data/glue:ro"]
    assert "shared/data" not in text
