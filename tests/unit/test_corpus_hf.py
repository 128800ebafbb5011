"""``hf:`` sources read offline from local folders: a save_to_disk dataset (and dict), a
folder of data files in HF's layout; the text field is checked before any work."""

import json

import pytest

from distill.corpus import CorpusError, load_documents

datasets = pytest.importorskip("datasets", reason="hf: sources need the `datasets` package")

TEXTS = [f"record number {i}\n\nwith a second paragraph {i * 7}" for i in range(30)]


def test_save_to_disk_folder(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(30))}).save_to_disk(tmp_path / "ds")
    docs, stats = load_documents(f"hf:{tmp_path / 'ds'}", "text", 10_000)
    assert sorted(d.text for d in docs) == sorted(TEXTS) and stats.records_read == 30
    assert all(d.origin.startswith(f"hf:{tmp_path / 'ds'}:train:") for d in docs)


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS[:20]}),
                               "test": datasets.Dataset.from_dict({"body": TEXTS[20:]})})
    dd.save_to_disk(tmp_path / "dd")
    docs, _ = load_documents(f"hf:{tmp_path / 'dd'}:test", "body", 10_000)
    assert sorted(d.text for d in docs) == sorted(TEXTS[20:])
    with pytest.raises(CorpusError, match=r"no split 'validation'.*splits: \['test', 'train'\]"):
        load_documents(f"hf:{tmp_path / 'dd'}:validation", "body", 10_000)


def test_local_data_files_folder_streams_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "local"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train-00000.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    docs, stats = load_documents(f"hf:{folder}", "text", 10_000)
    assert sorted(d.text for d in docs) == sorted(TEXTS) and stats.records_read == 30


def test_missing_text_field_is_named_before_any_work(tmp_path):
    datasets.Dataset.from_dict({"content": TEXTS}).save_to_disk(tmp_path / "ds")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: \['content'\]\); set data.text_field"):
        load_documents(f"hf:{tmp_path / 'ds'}", "text", 10_000)


def test_unloadable_local_folder_says_why(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="neither a save_to_disk dataset nor data files"):
        load_documents(f"hf:{tmp_path / 'nothing'}", "text", 10_000)
