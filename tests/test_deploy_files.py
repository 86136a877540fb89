"""The deployment and stack files point at real code and expose nothing beyond loopback."""
import inspect
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_deployment_entrypoint_and_parameters_match_the_flow():
    spec = yaml.safe_load((ROOT / "flows/prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    module_path, name = deployment["entrypoint"].split(":")
    assert (ROOT / module_path).exists()
    import flows.study

    flow = getattr(flows.study, name)
    params = inspect.signature(flow.fn).parameters
    assert set(deployment["parameters"]) <= set(params)
    assert (ROOT / deployment["parameters"]["config_path"]).exists()


def test_compose_binds_every_port_to_loopback_and_has_the_stack():
    spec = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    assert {"postgres", "mlflow", "prefect", "worker"} <= set(spec["services"])
    ports = [p for s in spec["services"].values() for p in s.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)
    assert "postgresql://" in spec["services"]["mlflow"]["command"]
    assert not (ROOT / "docker/__init__.py").exists()  # would shadow the docker SDK
