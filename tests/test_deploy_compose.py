"""docker/compose.yaml is a valid Compose file once its variables are set (the Compose specification's JSON schema,
vendored in tests/data, plus what the schema cannot see: references, build files, volumes, database URLs), refuses to
start without them, and mounts the user's GLUE folder. `docker compose config` checks it too where Compose is
installed (no Docker engine is needed for that)."""
from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from compose_file import COMPOSE, ROOT, MissingVariable, database_urls, interpolate, load, variables
from jsonschema import Draft7Validator

# github.com/compose-spec/compose-spec, schema/compose-spec.json as of commit a08f8d5 (2025-10-21), Apache-2.0
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
ENV = {"POSTGRES_PASSWORD": "0123abcd", "GLUE_DIR": "/home/someone/data/glue"}


def test_interpolation_follows_the_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$$SET ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+alt} ${UNSET:+alt}", env) == \
        "$SET v v d d  alt "
    with pytest.raises(MissingVariable, match="EMPTY is missing a value: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?say so}", env) == ""


def test_the_stack_validates_against_the_compose_specification():
    spec = load(ENV)
    errors = sorted(Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(spec), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert variables() == set(ENV), "every variable the stack reads is documented in its header"
    header = COMPOSE.read_text().split("\nname:")[0]
    assert all(f"#   {name}" in header for name in ENV)


def test_the_stack_refuses_to_start_without_password_or_glue_folder():
    for missing in ENV:
        with pytest.raises(MissingVariable, match=missing):
            load({k: v for k, v in ENV.items() if k != missing})


def test_services_references_build_files_and_volumes_exist():
    spec = load(ENV)
    here = COMPOSE.parent
    services, volumes = spec["services"], set(spec.get("volumes", {}))
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (here / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name
        assert set(service.get("depends_on", [])) <= set(services) - {name}, name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert source == ENV["GLUE_DIR"] or (here / source).exists(), f"{name}: {mount}"
            else:
                assert source in volumes, f"{name}: volume {source!r} is not declared"
    assert spec["services"]["postgres"]["volumes"][1] == "./initdb:/docker-entrypoint-initdb.d:ro"
    assert (here / "initdb" / "create-databases.sh").stat().st_mode & 0o111, "the entrypoint runs it: executable"


def test_glue_folder_is_the_users_own():
    worker = load(ENV)["services"]["worker"]
    assert f"{ENV['GLUE_DIR']}:/data/glue:ro" in worker["volumes"]  # where the user said, nothing else
    relative = load({**ENV, "GLUE_DIR": "../data/glue"})["services"]["worker"]["volumes"]
    assert "../data/glue:/data/glue:ro" in relative  # relative to docker/: the user's checkout
    text = COMPOSE.read_text()
    assert "shared/" not in text and "/work" not in text, "no developers' folder"


def test_database_urls_use_the_installed_drivers_and_the_created_databases():
    spec = load(ENV)
    urls = database_urls(spec)
    password, user = ENV["POSTGRES_PASSWORD"], spec["services"]["postgres"]["environment"]["POSTGRES_USER"]
    databases = spec["services"]["postgres"]["environment"]["POSTGRES_MULTIPLE_DATABASES"].split(",")
    assert urls == {"mlflow": f"postgresql+psycopg://{user}:{password}@postgres:5432/mlflow",
                    "prefect": f"postgresql+asyncpg://{user}:{password}@postgres:5432/prefect"}
    assert sorted(databases) == sorted(urls)
    # the image that runs MLflow installs the [stack] extra, which has psycopg 3; Prefect's image has asyncpg
    assert 'pip install ".[stack]"' in (ROOT / "docker" / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("psycopg[binary]==") for req in extras["stack"])
    assert "dpcompress[stack]" in extras["test"], "the tests run the stack's database path"


def _compose_command() -> list[str] | None:
    """Compose v2 (the `docker compose` plugin, or a docker-compose 2.x binary), if installed. Version 1 (Debian's
    docker-compose 1.29) predates the specification's top-level `name` and refuses the file."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            done = subprocess.run([*command, "version", "--short"], capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith("2."):
                return command
    return None


@pytest.mark.skipif(_compose_command() is None, reason="Compose v2 (`docker compose` or docker-compose 2.x) is not "
                                                      "installed")
def test_docker_compose_config_accepts_the_stack(tmp_path):
    (tmp_path / "empty.env").write_text("")  # not docker/.env, which may set both
    command = [*_compose_command(), "-f", str(COMPOSE), "--env-file", str(tmp_path / "empty.env")]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([*command, "config", "-q"], env={**env, **ENV}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([*command, "config", "-q"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr + refused.stdout
