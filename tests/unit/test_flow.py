"""The flow's view of the DAG and the stage wrapper, without running anything heavy."""

from pathlib import Path

import pytest
import yaml

from flows.pipeline import stage_order

ROOT = Path(__file__).resolve().parents[2]


def test_stage_order_follows_dvc_yaml():
    order = stage_order(ROOT / "dvc.yaml")
    core = ["prepare", "teacher", "gate", "label", "train", "evaluate"]
    assert [s for s in order if s in core] == core  # other stages (calibrate) slot in between
    assert sorted(order) == sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_every_stage_runs_its_task_module_and_declares_its_code():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        assert f"tasks/{name}.py" in stage["deps"]


def code_deps(stage: dict) -> list[str]:
    """The deps of a stage that are project code (files or folders under distill/ or tasks/)."""
    return [d for d in stage["deps"] if d.split("/")[0] in ("distill", "tasks")]


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def test_every_stage_declares_the_import_closure_of_its_module():
    """dvc.yaml's code deps equal what the stage's module can import (computed from the source
    with ast): a missing one would let DVC skip a stage whose code changed."""
    from distill.provenance import import_closure

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        closure = import_closure([f"tasks.{name}"], root=ROOT)
        deps = code_deps(stage)
        missing = [f for f in closure if not any(covers(d, f) for d in deps)]
        assert not missing, f"dvc.yaml stage {name}: code deps missing {missing}"
        extra = [d for d in deps if not any(covers(d, f) for f in closure)]
        assert not extra, f"dvc.yaml stage {name}: code deps not imported by tasks.{name}: {extra}"


def test_the_closure_guard_can_fail(tmp_path):
    """The same check on a stage that forgot a lazily imported module finds it."""
    from distill.provenance import import_closure

    closure = import_closure(["tasks.evaluate"], root=ROOT)
    assert "distill/losses.py" in closure and "distill/config.py" in closure
    deps = [d for d in code_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"])
            if d != "distill/losses.py"]
    assert [f for f in closure if not any(covers(d, f) for d in deps)] == ["distill/losses.py"]


def test_cycles_are_reported(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "deps": ["b.out"], "outs": ["a.out"]},
        "b": {"cmd": "y", "deps": ["a.out"], "outs": ["b.out"]}}}))
    with pytest.raises(ValueError, match="cycle"):
        stage_order(tmp_path / "dvc.yaml")


def test_core_library_does_not_import_prefect_or_dvc():
    for path in (ROOT / "distill").rglob("*.py"):
        text = path.read_text()
        for banned in ("import prefect", "from prefect", "import dvc", "from dvc"):
            assert banned not in text, f"{path} imports {banned.split()[-1]}"


# --- robustness: the pipeline lock and the tracking-store check -------------------------

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from distill.tracking import TrackingStoreError, check_tracking_store
from flows.lineage import (data_changes, data_version, document_count, document_hashes,
                           untracked_source_warning)
from flows.pipeline import describe_changes
from flows.runlock import PipelineBusyError, is_locked, lock_path, pipeline_lock


@pytest.fixture
def dvc_project(tmp_path):
    (tmp_path / ".dvc").mkdir()
    return tmp_path


def test_second_holder_is_refused_naming_the_first(dvc_project):
    with pipeline_lock(dvc_project, run_label="Prefect flow run brave-fox") as holder:
        with pytest.raises(PipelineBusyError) as err:
            with pipeline_lock(dvc_project):
                pass
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and holder["started"] in msg and "brave-fox" in msg
        assert "Nothing was run" in msg and "--wait-for-lock" in msg
        assert is_locked(dvc_project) == msg
    assert is_locked(dvc_project) is None  # released at the end of the block
    with pipeline_lock(dvc_project):  # and can be taken again
        pass


def test_waiting_for_the_lock_times_out_then_says_so(dvc_project):
    with pipeline_lock(dvc_project):
        started = time.monotonic()
        with pytest.raises(PipelineBusyError, match="after waiting 2 s"):
            with pipeline_lock(dvc_project, wait_s=2):
                pass
        assert time.monotonic() - started >= 2


def test_a_waiting_run_gets_the_lock_when_the_holder_finishes(dvc_project):
    release = threading.Event()

    def hold():
        with pipeline_lock(dvc_project):
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    while is_locked(dvc_project) is None:
        time.sleep(0.05)
    threading.Timer(1.0, release.set).start()
    with pipeline_lock(dvc_project, wait_s=30) as me:
        assert me["pid"] == os.getpid()
    holder.join()


def test_a_killed_holder_leaves_no_stale_lock(dvc_project):
    code = ("import sys, time; from pathlib import Path; from flows.runlock import pipeline_lock\n"
            "with pipeline_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(dvc_project)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert f"pid {proc.pid}" in is_locked(dvc_project)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert is_locked(dvc_project) is None


def test_lock_needs_a_dvc_project(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DVC project"):
        lock_path(tmp_path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_http_store_fails_fast_naming_it():
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingStoreError) as err:
        check_tracking_store(uri)
    assert time.monotonic() - started < 10
    assert uri in str(err.value) and "unreachable" in str(err.value) and "mlflow.tracking_uri" in str(err.value)


def test_http_server_that_is_not_mlflow_is_refused():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(TrackingStoreError, match="HTTP 501"):
            check_tracking_store(uri)
    finally:
        server.server_close()


def test_sqlite_store_in_a_missing_or_unusable_place_is_refused(tmp_path):
    with pytest.raises(TrackingStoreError, match="does not exist"):
        check_tracking_store(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    (tmp_path / "mlflow.db").mkdir()  # a folder where the database file should be
    with pytest.raises(TrackingStoreError, match="not writable"):
        check_tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_tracking_store(f"sqlite:///{tmp_path / 'ok.db'}")  # a usable one passes


# --- recurring runs: the data version and what changed ------------------------------------

def manifest(hashes: list[str] | None, train_blocks: int = 10) -> dict:
    docs = {"total": len(hashes or []) or 3, "train": 2, "val": 1}
    if hashes is not None:
        docs["hashes"] = {h: {"split": "train"} for h in hashes}
    return {"documents": docs, "splits": {"train": {"blocks": train_blocks, "tokens": 320, "documents": 2},
                                          "val": {"blocks": 2, "tokens": 64, "documents": 1}}}


def test_document_hashes_from_the_manifest_shapes():
    a, b = "a" * 64, "b" * 64
    assert document_hashes(manifest([a, b])) == {a, b}
    assert document_hashes({"documents": [a, {"sha": b}]}) == {a, b}
    assert document_hashes({"documents": {a: {}, b: {}}}) == {a, b}
    assert document_hashes(manifest(None)) is None  # counts only
    assert document_count(manifest(None)) == 3 and document_count(manifest([a, b])) == 2


def test_changes_by_document_hashes_and_by_counts():
    old = {"prepared_md5": "x.dir", "documents": 2, "blocks": {"train": 10, "val": 2},
           "document_hashes": ["a" * 64, "b" * 64]}
    new = {"prepared_md5": "y.dir", "documents": 3, "blocks": {"train": 14, "val": 2},
           "document_hashes": ["a" * 64, "c" * 64, "d" * 64]}
    c = data_changes(old, new, "run1")
    assert (c["documents_added"], c["documents_removed"]) == (2, 1) and c["data_changed"]
    assert c["blocks_delta"] == {"train": 4, "val": 0} and c["previous_run"] == "run1"
    c = data_changes({**old, "document_hashes": None}, new)
    assert (c["documents_added"], c["documents_removed"]) == (1, 0) and "counts" in c["method"]
    assert not data_changes(new, new)["data_changed"]
    first = data_changes(None, new)
    assert first["first_run"] and first["documents_added"] == 3
    assert "first pipeline run" in describe_changes(first)
    older = data_changes(None, new, "run0")  # a run from before data versions were logged
    assert not older["first_run"] and "run0 logged no data version" in describe_changes(older)
    assert "+2 / -1 documents" in describe_changes(c | {"documents_added": 2, "documents_removed": 1})


def test_data_version_reads_dvc_lock_and_manifest(tmp_path):
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps(manifest(["a" * 64, "b" * 64])))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {
        "cmd": "python -m tasks.prepare",
        "deps": [{"path": "corpus", "md5": "c0.dir"}, {"path": "tasks/prepare.py", "md5": "p"}],
        "outs": [{"path": "data/prepared", "md5": "d1.dir"}]}}}))
    v = data_version(tmp_path, "corpus")
    assert v["prepared_md5"] == "d1.dir" and v["corpus_md5"] == "c0.dir"
    assert v["documents"] == 2 and v["blocks"] == {"train": 10, "val": 2}
    assert v["document_hashes"] == ["a" * 64, "b" * 64]
    assert data_version(tmp_path, str(tmp_path / "corpus"))["corpus_md5"] == "c0.dir"
    assert data_version(tmp_path, "stdlib")["corpus_md5"] is None


def test_a_local_source_outside_prepares_deps_is_warned_about():
    assert untracked_source_warning(ROOT, "corpus") is None
    assert untracked_source_warning(ROOT, "corpus/news") is None
    assert untracked_source_warning(ROOT, "stdlib") is None
    assert "not a dependency of the prepare stage" in untracked_source_warning(ROOT, "/mnt/raw")


# --- schedules -------------------------------------------------------------------------------

def test_bad_cron_or_time_zone_is_named():
    from flows.serve import cron_schedule

    assert cron_schedule("0 3 * * 1").cron == "0 3 * * 1"
    with pytest.raises(ValueError, match="--cron '61 3 \\* \\* 1'.*Invalid cron string"):
        cron_schedule("61 3 * * 1")
    with pytest.raises(ValueError, match="Invalid timezone"):
        cron_schedule("0 3 * * 1", "Mars/Base")


def test_serving_needs_a_prefect_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import prefect_api_url

    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(ValueError, match="prefect server start"):
            prefect_api_url()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{closed_port()}/api"}):
        with pytest.raises(ValueError, match="not answering"):
            prefect_api_url()


def test_the_prefect_yaml_deployment_points_at_the_flow():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    module, _, func = dep["entrypoint"].partition(":")
    assert (ROOT / module).is_file() and func == "pipeline"
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=dep["schedules"][0]["cron"], timezone=dep["schedules"][0]["timezone"])
    assert dep["work_pool"]["name"] and set(dep["parameters"]) <= {"root", "wait_for_lock"}


def test_cli_serve_reports_a_bad_cron_before_touching_prefect():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["serve", "--root", str(ROOT), "--cron", "61 3 * * 1"])
    assert result.exit_code == 2 and "Invalid cron string" in result.output
