"""Two labeling actors on a 2-CPU Ray (the tests' shared head): the pool takes every CPU, and
the stage must still finish (it waited for ever when Ray Data's parquet listing task asked
for a CPU the actors held), with the same rows as labeling in-process."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.integration.conftest import deep_merge, run
from tests.integration.test_labeling import (PY, corpus_files, decide_distill, fixed_models,  # noqa: F401
                                             label_rows, labeling_project, stages, train_block_ids,
                                             write_corpus)

# The stage reads the prepared shards through Ray Data read tasks only above
# SMALL_DATA_BYTES (below, the driver selects the rows itself): 0 takes that path here.
LABEL_THROUGH_READ_TASKS = "import tasks.label as L; L.SMALL_DATA_BYTES = 0; L.main()"
STAGE_TIMEOUT_S = 300  # a starved pool fails the test instead of hanging it


def test_two_actors_on_two_cpus_label_every_block(tmp_path, fixed_models, shared_ray):  # noqa: F811
    write_corpus(tmp_path / "corpus", corpus_files(12))
    project = labeling_project(tmp_path / "project", fixed_models, tmp_path / "corpus")
    params = project / "params.yaml"
    full = yaml.safe_load(params.read_text())
    params.write_text(yaml.safe_dump(deep_merge(full, {"label": {"num_actors": 2, "cpus_per_actor": 1.0,
                                                                 "inline_blocks": 0}})))
    stages(project, "prepare", "teacher")
    decide_distill(project)

    proc = run([PY, "-c", LABEL_THROUGH_READ_TASKS], cwd=project, timeout=STAGE_TIMEOUT_S)
    assert "in this process" not in proc.stdout
    manifest = json.loads((project / "data/labels/manifest.json").read_text())
    wanted = train_block_ids(project)
    assert manifest["status"] == "complete" and manifest["errors"] == 0
    assert manifest["labeled_now"] == manifest["blocks"] == len(wanted) > 0
    pooled = label_rows(project / "data/labels")
    assert set(pooled) == wanted

    # the same blocks labeled in this process (no Ray): the same rows
    shutil.rmtree(project / "data/labels")
    full = yaml.safe_load(params.read_text())
    params.write_text(yaml.safe_dump(deep_merge(full, {"label": {"inline_blocks": 10 ** 6}})))
    assert "labeling in this process" in stages(project, "label")["label"].stdout
    assert label_rows(project / "data/labels") == pooled
