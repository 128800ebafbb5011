"""Integration fixtures: one shared local Ray and one Prefect server per test session (per
pytest-xdist worker), tiny projects in temp git repos, and a base project (prepare and teacher
already run by `dvc repro`) built once per session and copied into the modules that start
from those two stages."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY_PARAMS = {
    "seed": 0,
    "data": {"source": "stdlib", "max_documents": 30, "max_doc_chars": 20000, "val_fraction": 0.2,
             "vocab_size": 320, "block_size": 32, "shard_blocks": 96},
    "teacher": {"layers": 2, "d_model": 32, "heads": 2,
                "optim": {"steps": 30, "batch_size": 8, "warmup_steps": 3, "eval_every": 15, "lr": 0.01}},
    "student": {"layers": 1, "d_model": 16, "heads": 2},
    # The paper's coefficients: the calibrate stage skips its sweep (CALIBRATED turns it on).
    "gate": {"force": "distill", "coefficients": "paper"},
    # A tiny sweep (8 supervised + 12 distillation configurations × 2 seeds, and the swept
    # teacher's run, of a few steps each): seconds per run.
    "calibrate": {"students": "1x8, 1x16", "head_dim": 8, "steps": "5, 10, 20, 40",
                  "teachers": "pipeline, 1x16", "teacher_steps": 80, "teacher_strengths": 1, "seeds": 2,
                  "heldout_share": 0.1,
                  "bootstrap": 5, "fit_starts": 8},
    "distill": {"top_k": 8, "alpha": 0.5},
    "label": {"batch_size": 16},
    "train": {"steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_every": 10,
              "checkpoint_every": 10, "lr": 0.01},
    "evaluate": {"max_blocks": 32, "batch_size": 8},
}


# The tiny sweep: 2 sizes × 4 budgets supervised and 12 distilled configurations (both sizes
# from the pipeline's teacher, 1x8 from the swept 1x16: a swept teacher distills smaller
# students), each trained with 2 seeds, plus the swept teacher's own run (1x16 at 80 steps).
TINY_SWEEP_CONFIGS = 8 + 12
TINY_SWEEP_RUNS = 2 * TINY_SWEEP_CONFIGS + 1


def calibrated_params() -> dict:
    """TINY_PARAMS with the gate on this project's calibration (the calibrate stage sweeps)."""
    return deep_merge(TINY_PARAMS, {"gate": {"coefficients": "auto"}})


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command in ``cwd`` with the test environment; on failure show its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory):
    """One local Ray head for the whole session; stages join it through RAY_ADDRESS."""
    temp = tmp_path_factory.mktemp("ray")
    port = str(free_port())
    # A loopback-only head for the tests: no token auth, so stage subprocesses just join.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Every port free-picked: two sessions (or two xdist workers) each run a head on this
    # machine, and the agent's and metrics' default ports are fixed numbers.
    run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--object-store-memory=300000000"], cwd=temp)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    yield os.environ["RAY_ADDRESS"]
    os.environ.pop("RAY_ADDRESS", None)
    stop_ray_head(temp)


def stop_ray_head(temp: Path) -> None:
    """Stop this session's Ray head and nothing else.

    `ray stop` stops every Ray on the machine, other test sessions' heads included (their
    stages then fail mid-run). This head's own processes (GCS, raylet, monitors) all name
    its temp dir on their command line; its workers exit with the raylet.
    """
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        run([str(BIN / "ray"), "stop", "--force"], cwd=temp, check=False)
        return
    mine = []
    for entry in proc_root.iterdir():
        try:
            if entry.name.isdigit() and f"{temp}/".encode() in (entry / "cmdline").read_bytes():
                mine.append(int(entry.name))
        except OSError:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while (mine := [pid for pid in mine if (proc_root / str(pid)).exists()]) and time.monotonic() < deadline:
            time.sleep(0.2)


def free_port() -> int:
    """A TCP port nothing listens on now (so a second test session never collides)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_project(path: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC project holding the pipeline's code and tiny params."""
    path.mkdir(parents=True, exist_ok=True)
    for item in ("distill", "tasks", "flows", "corpus"):
        shutil.copytree(ROOT / item, path / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / item, path / item)
    (path / "mlflow").mkdir()
    # DVC needs every params key a stage names: start from the project's params.yaml.
    full = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), params or TINY_PARAMS)
    (path / "params.yaml").write_text(yaml.safe_dump(full))
    run(["git", "init", "-q"], cwd=path)
    run(["git", "config", "user.email", "test@example.com"], cwd=path)
    run(["git", "config", "user.name", "test"], cwd=path)
    run([str(BIN / "dvc"), "init", "-q"], cwd=path)
    run(["git", "add", "-A"], cwd=path)
    run(["git", "commit", "-qm", "project"], cwd=path)
    return path


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s values, nested sections merged."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


# --- One Prefect server per session -------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One `prefect server start` on a free loopback port for the session (each xdist worker
    its own), named by PREFECT_API_URL for every flow the tests start, in this process and in
    the `distill run` / `distill calibrate` subprocesses: each would otherwise start Prefect's
    temporary server of its own (about 14 s each here). Yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-session")
    # nothing here is scheduled: the scheduler would only spend CPU
    proc, url, _ = start_prefect_server(home, PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    previous = os.environ.get("PREFECT_API_URL")
    try:
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        stop_process_group(proc)


def start_prefect_server(home: Path, **settings: str) -> tuple[subprocess.Popen, str, dict]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (``home``, which
    also holds its log) and the extra ``settings`` (PREFECT_* variables), once it answers its
    health check: the process (its own session: stop it with ``stop_process_group``), the API
    URL and the environment that names it. A server that exits or never answers is stopped
    and fails with its log."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false", **settings}
    port = url.rsplit(":", 1)[1].split("/")[0]
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port,
                                 "--no-ui", "--analytics-off"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"{url}/health", proc, log, timeout=240)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, url, env


def wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or times out."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer (exit code {proc.poll()}):\n{log.read_text()[-4000:]}")


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a process a fixture started in its own session, with its children."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- One base project per session ---------------------------------------------------------

# The stages the base project has run. Their params (data, teacher, seed, train.num_workers,
# train.cpus_per_worker, train.use_gpu, evaluate.max_blocks) are TINY_PARAMS' in every module
# that copies the base, so `dvc repro` there finds them up to date and runs what follows.
BASE_STAGES = ("prepare", "teacher")


@pytest.fixture(scope="session")
def base_project(tmp_path_factory, shared_ray) -> Path:
    """A tiny project (TINY_PARAMS) after a real `dvc repro teacher` (prepare and teacher),
    built once per test session: under pytest-xdist the first worker builds it and the others
    wait for it (a file lock in the session's shared temp dir). Never changed after; modules
    take copies (``copy_project``)."""
    from filelock import FileLock

    # The workers of one xdist session share getbasetemp()'s parent; a plain session does not
    # (that parent holds other sessions' temp dirs, built from other code).
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    base = shared / "base-project"
    with FileLock(str(shared / "base-project.lock")):
        if not (base / ".built").is_file():
            if base.exists():  # a worker's build that failed half-way
                shutil.rmtree(base)
            make_project(base)
            proc = run([str(BIN / "dvc"), "repro", *BASE_STAGES], cwd=base, timeout=1500)
            (base / "base_repro.log").write_text(proc.stdout + proc.stderr)
            (base / ".built").write_text("")
    return base


def copy_project(base: Path, path: Path, params: dict | None = None) -> Path:
    """``make_project(path, params)`` with the base project's stages already run: a copy of
    ``base`` (git repo, DVC cache, dvc.lock, data and models) with ``params`` written (and
    committed) as make_project writes them. MLflow's store is left out (its experiment names
    the base's absolute artifact folder), and so are the base's Ray Train run folders and
    DVC's temp dir: the copy starts with an empty store, as a fresh project does."""
    skip = {(base, "mlflow"), (base, "runs"), (base, ".built"), (base, "base_repro.log"),
            (base / ".dvc", "tmp")}
    shutil.copytree(base, path, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if (Path(folder), n) in skip])
    (path / "mlflow").mkdir()
    full = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), params or TINY_PARAMS)
    (path / "params.yaml").write_text(yaml.safe_dump(full))
    run(["git", "add", "params.yaml"], cwd=path)
    run(["git", "commit", "-qm", "params", "--allow-empty"], cwd=path)
    return path
