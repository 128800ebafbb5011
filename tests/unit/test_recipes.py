"""The cluster recipes under deploy/ (a `ray up` cluster and a KubeRay RayJob): they parse,
carry the fields their tools require, and the commands they run exist with those options."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def check_distill_command(command: str) -> None:
    """``distill <subcommand> [--options]``: the console script, its subcommand and options exist."""
    import typer.main

    from flows.cli import app

    argv = shlex.split(command)
    assert argv[0] in pyproject()["scripts"], f"{argv[0]}: not a console script of pyproject.toml"
    group = typer.main.get_command(app)
    assert argv[1] in group.commands, f"distill {argv[1]}: no such command ({sorted(group.commands)})"
    options = {o for p in group.commands[argv[1]].params for o in p.opts}
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"distill {argv[1]} has no option {arg}"


def check_ray_start(command: str) -> None:
    """A ``ray start`` line whose options ``ray start`` accepts."""
    from ray.scripts.scripts import start

    argv = shlex.split(command)
    assert argv[:2] == ["ray", "start"], command
    options = {o for p in start.params for o in p.opts}
    for arg in argv[2:]:
        assert arg.split("=")[0] in options, f"ray start has no option {arg}"


def check_extras(install: str) -> None:
    extras = set(pyproject()["optional-dependencies"])
    for group in re.findall(r"\[([a-z0-9,_-]+)\]", install):
        assert set(group.split(",")) <= extras, f"{install}: unknown extras (pyproject has {sorted(extras)})"


def test_ray_up_cluster_has_a_head_and_gpu_workers_starting_ray():
    cfg = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"ray-cluster.yaml: missing {key}"
    assert cfg["provider"]["type"] in {"aws", "gcp", "azure", "local", "kubernetes"}
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_workers = [t for name, t in types.items()
                   if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers and all(t["min_workers"] >= 1 and "node_config" in t for t in gpu_workers)
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if c.startswith("ray start")]
    assert any("--head" in c for c in cfg["head_start_ray_commands"] if c in starts)
    assert any("--address" in c for c in cfg["worker_start_ray_commands"] if c in starts)
    for command in starts:
        check_ray_start(command.replace("$RAY_HEAD_IP", "10.0.0.1"))
    for command in cfg["setup_commands"]:
        check_extras(command)


def test_rayjob_runs_distill_on_gpu_workers_with_the_store_credentials():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    check_distill_command(spec["entrypoint"])
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside the manifest
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    assert head["image"] and "rayStartParams" in cluster["headGroupSpec"]
    gpu = [w for w in workers
           if int(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu and all(w["groupName"] and w["replicas"] >= 1 for w in gpu)
    for container in [head] + [w["template"]["spec"]["containers"][0] for w in workers]:
        assert {"secretRef": {"name": "distill-s3"}} in container["envFrom"], container["name"]


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml"])
def test_the_readme_names_each_recipe(name):
    section = (ROOT / "README.md").read_text().split("## Running on a cluster", 1)
    assert len(section) == 2, "README.md: no section 'Running on a cluster'"
    assert f"deploy/{name}" in section[1].split("\n## ", 1)[0]
