"""What data a pipeline run used, and what changed since the previous pipeline run.

The data version is DVC's: the md5 of ``data/prepared`` (and of the corpus folder, when
it is a dependency of ``prepare``) from ``dvc.lock``, plus the prepared manifest's counts.
The change is computed against the latest *finished* pipeline run of the same MLflow
experiment, from the ``data_version.json`` it logged: documents added/removed (from the
manifest's per-document content hashes where prepare records them, else from counts),
blocks per split, and how much of the labeling was reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distill.io import read_json

DATA_VERSION_ARTIFACT = "data_version.json"
CHANGES_ARTIFACT = "changes.json"
NO_BASELINE = "no earlier data version to compare with"


def data_version(root: Path, source: str) -> dict:
    """The data this run used, from ``dvc.lock`` and ``data/prepared/manifest.json``."""
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    prepare = lock.get("stages", {}).get("prepare")
    if prepare is None:
        raise ValueError(f"{root / 'dvc.lock'} has no prepare stage: the pipeline has not prepared data")
    outs = {o["path"]: o.get("md5", "") for o in prepare.get("outs", [])}
    deps = {d["path"]: d.get("md5", "") for d in prepare.get("deps", [])}
    manifest = read_json(root / "data" / "prepared" / "manifest.json")
    hashes = document_hashes(manifest)
    return {
        "prepared_md5": outs.get("data/prepared", ""),
        "source": source,
        "corpus_md5": deps.get(_as_dep(source, root)),  # None: the source is not a DVC dep
        "documents": document_count(manifest),
        "blocks": {name: split["blocks"] for name, split in manifest["splits"].items()},
        "tokens": {name: split["tokens"] for name, split in manifest["splits"].items()},
        "document_hashes": sorted(hashes) if hashes is not None else None,
    }


def _as_dep(source: str, root: Path) -> str:
    """``data.source`` as dvc.lock names a dependency (relative to the project, POSIX)."""
    path = Path(source)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(root.resolve())
        except ValueError:
            return str(path)
    return path.as_posix().rstrip("/")


def untracked_source_warning(root: Path, source: str) -> str | None:
    """A warning when ``data.source`` is a local path that ``prepare`` does not list as a DVC dep
    (new documents there would not re-run the pipeline); None when it is, or not a path."""
    if source == "stdlib" or source.startswith("hf:"):
        return None
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stages.get("prepare", {}).get("deps", [])]
    dep = _as_dep(source, root)
    if any(dep == d.rstrip("/") or dep.startswith(d.rstrip("/") + "/") for d in deps):
        return None
    return (f"data.source {source} is not a dependency of the prepare stage in dvc.yaml: documents "
            f"added there will not re-run the pipeline. Keep recurring data under corpus/ "
            f"(data.source: corpus) or add the folder to prepare's deps.")


def document_hashes(manifest: dict) -> set[str] | None:
    """Per-document content hashes from the manifest's ``documents`` entry, if it records them.

    Accepted shapes: a list of hashes (or of records with a ``sha``/``hash`` field), a mapping
    hash → anything, or a mapping whose ``hashes``/``shas`` entry is such a list. Counts only
    (``{"total": n, ...}``) give None.
    """
    docs = manifest.get("documents")
    if isinstance(docs, dict):
        for key in ("hashes", "shas", "sha256"):
            if isinstance(docs.get(key), (list, dict)):
                return _hash_set(docs[key])
        if docs and all(_is_hash(k) for k in docs):
            return set(docs)
        return None
    return _hash_set(docs) if isinstance(docs, list) else None


def _hash_set(items: Any) -> set[str] | None:
    if isinstance(items, dict):
        return set(items) if all(_is_hash(k) for k in items) else None
    out = set()
    for item in items:
        value = item.get("sha") or item.get("hash") if isinstance(item, dict) else item
        if not isinstance(value, str):
            return None
        out.add(value)
    return out


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= 16 and all(c in "0123456789abcdef" for c in value)


def document_count(manifest: dict) -> int:
    """How many documents went into the prepared data."""
    docs = manifest.get("documents")
    if isinstance(docs, dict) and isinstance(docs.get("total"), int):
        return docs["total"]
    hashes = document_hashes(manifest)
    if hashes is not None:
        return len(hashes)
    return sum(split.get("documents", 0) for split in manifest["splits"].values())


def data_changes(previous: dict | None, current: dict, previous_run: str | None = None) -> dict:
    """What changed between the previous run's data version and this one's."""
    if previous is None:  # no earlier run, or one from before data versions were logged
        return {"previous_run": previous_run, "first_run": previous_run is None, "data_changed": True,
                "documents_added": current["documents"], "documents_removed": 0,
                "method": NO_BASELINE, "blocks_delta": dict(current["blocks"])}
    old_h, new_h = previous.get("document_hashes"), current.get("document_hashes")
    if old_h is not None and new_h is not None:
        added, removed = len(set(new_h) - set(old_h)), len(set(old_h) - set(new_h))
        method = "per-document content hashes"
    else:
        # Counts give the net change only: a replaced document shows as no change in count.
        delta = current["documents"] - previous["documents"]
        added, removed, method = max(delta, 0), max(-delta, 0), "document counts (net change)"
    return {
        "previous_run": previous_run, "first_run": False,
        "data_changed": previous.get("prepared_md5") != current["prepared_md5"],
        "previous_prepared_md5": previous.get("prepared_md5"),
        "documents_added": added, "documents_removed": removed, "method": method,
        "blocks_delta": {k: v - previous.get("blocks", {}).get(k, 0) for k, v in current["blocks"].items()},
    }


def label_reuse(root: Path, label_status: str | None) -> dict:
    """How much labeling this run did vs reused (label manifest), and the stage's DVC status."""
    path = root / "data" / "labels" / "manifest.json"
    manifest = read_json(path) if path.is_file() else {}
    out = {"stage": label_status, "status": manifest.get("status")}
    for key in ("labeled_now", "reused", "blocks"):
        if isinstance(manifest.get(key), int):
            out[key] = manifest[key]
    return out


def previous_data_version(client, experiment_id: str, current_run_id: str) -> tuple[str | None, dict | None]:
    """The latest finished pipeline run before this one and its logged data version."""
    runs = client.search_runs([experiment_id],
                              filter_string="tags.`distill.flow` = 'pipeline' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if run.info.run_id == current_run_id:
            continue
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if DATA_VERSION_ARTIFACT not in names:
            return run.info.run_id, None  # a run from before data versions were logged
        local = client.download_artifacts(run.info.run_id, DATA_VERSION_ARTIFACT)
        return run.info.run_id, json.loads(Path(local).read_text())
    return None, None


def log_lineage(root: Path, source: str, stages: list[dict]) -> dict:
    """Log the data version and the change since the previous pipeline run to the active run."""
    import mlflow

    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    current = data_version(root, source)
    prev_id, previous = previous_data_version(client, run.info.experiment_id, run.info.run_id)
    changes = data_changes(previous, current, prev_id)
    status = {s["stage"]: s["status"] for s in stages}
    changes["prepare"] = status.get("prepare")
    changes["labels"] = label_reuse(root, status.get("label"))
    mlflow.log_dict(current, DATA_VERSION_ARTIFACT)
    mlflow.log_dict(changes, CHANGES_ARTIFACT)
    mlflow.log_params({"data.version": current["prepared_md5"], "data.source": source,
                       "data.corpus_md5": current["corpus_md5"] or "not a DVC dependency"})
    mlflow.set_tags({"distill.data.prepared": current["prepared_md5"],
                     "distill.data.previous_run": prev_id or "none",
                     "distill.data.changed": str(changes["data_changed"]).lower()})
    metrics = {"data.documents": current["documents"],
               "changes.documents_added": changes["documents_added"],
               "changes.documents_removed": changes["documents_removed"],
               **{f"data.blocks.{k}": v for k, v in current["blocks"].items()},
               **{f"changes.blocks_delta.{k}": v for k, v in changes["blocks_delta"].items()},
               **{f"labels.{k}": v for k, v in changes["labels"].items() if isinstance(v, int)}}
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    return {"data_version": current, "changes": changes}
