"""vLLM backend without vLLM: prompt log-probs in vLLM's exact shapes → the HF backend's labels.

vllm cannot be installed here, so its output containers are rebuilt below from its source
(github.com/vllm-project/vllm):

* ``Logprob``: the dataclass of ``vllm/logprobs.py`` (commit 578b601cd1f4), fields
  ``logprob: float``, ``rank: int | None = None``, ``decoded_token: str | None = None``.
* a position's dict, newest form: ``append_logprobs_for_next_position`` (same file) builds
  ``{id: Logprob(...)}`` from ``[actual, top 1..k]`` with ranks ``(actual's true rank, 1..k)``;
  an actual token inside the top k is overwritten by its top-k entry (k entries), else
  it stays as a (k+1)-th entry.
* older form: ``LogprobsProcessor._make_pos_logprob_dict`` of ``vllm/v1/engine/logprobs.py``
  (commit 016e747a032d): the top k with ranks 1..k, then the actual token injected with
  rank k+1 when outside them.
* ``FlatLogprobs`` (``vllm/logprobs.py``, 578b601cd1f4, returned with
  ``SamplingParams(flat_logprobs=True)``): flat lists with per-position start/end
  indices; position 0 is empty, position j holds ``[actual, top 1..k]`` undeduplicated.
"""

import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import topk_labels
from distill.teachers.vllm import (VLLMLabeler, check_settings, engine_kwargs,
                                   generation_kwargs, prompt_logprobs_to_arrays, sampling_kwargs)


@dataclass
class Logprob:
    """Field-for-field copy of ``vllm.logprobs.Logprob`` (vllm/logprobs.py @ 578b601cd1f4)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    """The data fields of ``vllm.logprobs.FlatLogprobs`` and its ``append``/``append_fast``."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append_none(self):
        self.start_indices.append(len(self.logprobs))
        self.end_indices.append(len(self.logprobs))

    def append_fast(self, token_ids, logprobs, ranks):
        self.start_indices.append(len(self.logprobs))
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.decoded_tokens += [None] * len(token_ids)
        self.end_indices.append(len(self.logprobs))

    def __len__(self):
        return len(self.start_indices)


def vllm_position(logp_row: torch.Tensor, actual: int, k: int):
    """What vLLM's sampler gathers for one prompt position: [actual, top k] and the rank."""
    top = torch.topk(logp_row, k)  # sorted, as vLLM's torch.topk
    rank = int((logp_row >= logp_row[actual]).sum())
    ids = [actual] + top.indices.tolist()
    lps = [float(logp_row[actual])] + top.values.tolist()
    return ids, lps, rank


def new_style(ids, lps, rank, k):
    ranks = [rank] + list(range(1, k + 1))
    return {t: Logprob(logprob=lp, rank=r) for t, lp, r in zip(ids, lps, ranks)}


def old_style(ids, lps, rank, k):
    d = {t: Logprob(logprob=lp, rank=i + 1) for i, (t, lp) in enumerate(zip(ids[1:], lps[1:]))}
    if ids[0] not in d:
        d[ids[0]] = Logprob(logprob=lps[0], rank=k + 1)
    return d


def vllm_prompt_logprobs(logits: torch.Tensor, block: torch.Tensor, k: int, form: str):
    """prompt_logprobs as vLLM returns them for ``block`` [T], with ``logits[p]`` [V] the
    model's prediction after tokens 0..p (so prompt position j uses ``logits[j-1]``)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if form == "flat":
        out = FlatLogprobs()
        out.append_none()
    else:
        out = [None]
    for j in range(1, block.numel()):
        ids, lps, rank = vllm_position(logp[j - 1], int(block[j]), k)
        if form == "flat":
            out.append_fast(ids, lps, [rank] + list(range(1, k + 1)))
        else:
            out.append((new_style if form == "new" else old_style)(ids, lps, rank, k))
    return out


def make_case(t=12, v=40, k=6, where="mixed", seed=0, scale=3.0):
    """Random logits [T, V] and a block whose actual tokens sit inside/outside the top k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, v, generator=g) * scale
    block = torch.randint(0, v, (t,), generator=g)
    order = logits.argsort(dim=-1, descending=True)
    for j in range(1, t):
        inside = where == "inside" or (where == "mixed" and j % 2 == 0)
        block[j] = order[j - 1, 1] if inside else order[j - 1, -1]  # 2nd best, or the worst
    return logits, block


FORMS = ["new", "old", "flat"]


def assert_rest_close(rest, ref, mass_atol=1e-6, log_atol=1e-5):
    """Rest log-masses agree: vLLM's float32 log-probs fix the rest *mass* to ~1e-7 absolute,
    so its log is compared closely only where the mass is not tiny."""
    rest, ref = np.asarray(rest, np.float64), np.asarray(ref, np.float64)
    assert np.allclose(np.exp(rest), np.exp(ref), rtol=0, atol=mass_atol)
    large = np.exp(ref) > 1e-2
    assert np.allclose(rest[large], ref[large], atol=log_atol)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("where", ["inside", "outside", "mixed"])
@pytest.mark.parametrize("scale", [3.0, 0.3])  # peaked (top-k mass > ½) and flat (< ½)
def test_matches_hf_topk_labels(form, where, scale):
    k, v = 6, 40
    logits, block = make_case(k=k, v=v, where=where, scale=scale)
    plp = vllm_prompt_logprobs(logits, block, k, form)
    if form != "flat":
        sizes = {len(d) for d in plp[1:]}
        assert sizes == {k} if where == "inside" else {k + 1} if where == "outside" else {k, k + 1}
    ids, lps, rest, nll = prompt_logprobs_to_arrays(plp, block.tolist(), k, v)

    # HF convention: logits of ids[:-1] predict ids[1:]; position p ↔ vLLM prompt position p+1
    ref = topk_labels(logits[:-1], k, 1.0)
    assert ids.shape == (block.numel() - 1, k) and ids.dtype == np.int32
    assert np.array_equal(ids, ref.ids.numpy())
    assert np.allclose(lps, ref.logprobs.numpy(), atol=1e-6)
    assert np.all(np.diff(lps, axis=1) <= 0)  # sorted, descending
    assert_rest_close(rest, ref.rest.numpy())
    assert nll == pytest.approx(F.cross_entropy(logits[:-1], block[1:]).item(), abs=1e-5)


def test_alignment_is_the_hf_one():
    """A teacher whose prediction after token p is the token at p+1 (a copy of the block)."""
    v, t, k = 30, 10, 3
    block = torch.tensor([5, 17, 2, 29, 11, 0, 8, 23, 14, 6])
    logits = torch.full((t, v), -5.0)
    logits[torch.arange(t - 1), block[1:]] = 5.0  # logits[p] peaks at ids[p+1]
    ids, _, _, nll = prompt_logprobs_to_arrays(vllm_prompt_logprobs(logits, block, k, "new"),
                                               block.tolist(), k, v)
    assert ids[:, 0].tolist() == block[1:].tolist()
    assert nll < 0.01  # the real next tokens are the teacher's near-certain picks


def test_entries_without_ranks_still_convert():
    logits, block = make_case(where="mixed")
    plp = vllm_prompt_logprobs(logits, block, 6, "new")
    bare = [None] + [{t: Logprob(lp.logprob) for t, lp in d.items()} for d in plp[1:]]
    ranked, unranked = (prompt_logprobs_to_arrays(x, block, 6, 40) for x in (plp, bare))
    for x, y in zip(ranked, unranked):
        assert np.array_equal(x, y)


def test_flat_and_dict_forms_agree():
    logits, block = make_case(t=20, v=50, k=8, seed=3)
    a = prompt_logprobs_to_arrays(vllm_prompt_logprobs(logits, block, 8, "new"), block, 8, 50)
    b = prompt_logprobs_to_arrays(vllm_prompt_logprobs(logits, block, 8, "flat"), block, 8, 50)
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y)
    assert a[3] == b[3]


def test_rest_is_at_least_the_actual_tokens_mass():
    """Kept log-probs whose mass rounds to 1: the actual token outside them still has mass."""
    k = 2
    plp = [None, {4: Logprob(np.log(0.5), 1), 9: Logprob(np.log(0.5), 2), 1: Logprob(-30.0, 7)}]
    ids, _, rest, nll = prompt_logprobs_to_arrays(plp, [3, 1], k, 16)
    assert sorted(ids[0].tolist()) == [4, 9]
    assert rest[0] == pytest.approx(-30.0) and nll == pytest.approx(30.0)
    plp[1].pop(1)
    plp[1][4] = Logprob(np.log(0.5), 1)  # actual token 4 inside: nothing known outside
    _, _, rest, _ = prompt_logprobs_to_arrays(plp, [3, 4], k, 16)
    assert rest[0] == -np.inf


@pytest.mark.parametrize("form", FORMS)
def test_all_tokens_kept_means_no_rest_mass(form):
    v = 8
    logits, block = make_case(t=6, v=v, k=v, where="inside")
    plp = vllm_prompt_logprobs(logits, block, v, form)
    _, _, rest, _ = prompt_logprobs_to_arrays(plp, block, v, v)
    assert np.all(rest == -np.inf)
    assert torch.all(topk_labels(logits[:-1], v, 1.0).rest == -torch.inf)  # the same convention


@pytest.mark.parametrize("form", FORMS)
def test_padding_row_in_topk_is_refused_by_id(form):
    """Model of 40 rows, tokenizer of 32: row 37 (padding) wins at one position."""
    logits, block = make_case(v=40, k=6, where="inside")
    logits[:, 32:] = -20.0  # padding rows: improbable...
    logits[4, 37] = 50.0  # ...but one, after prefix 0..4
    block = block % 32
    plp = vllm_prompt_logprobs(logits, block, 6, form)
    with pytest.raises(ValueError, match=r"token id 37 \(prompt position 5\).*vocabulary of 32"):
        prompt_logprobs_to_arrays(plp, block, 6, 32)


def test_too_few_or_too_many_entries_are_refused():
    logits, block = make_case(k=6, where="inside")
    plp = vllm_prompt_logprobs(logits, block, 6, "new")
    short, actual = list(plp), int(block[3])
    others = [t for t in plp[3] if t != actual][:4]
    short[3] = {t: plp[3][t] for t in others + [actual]}  # 5 entries where k = 6
    with pytest.raises(ValueError, match="prompt position 3: 5 log-probs"):
        prompt_logprobs_to_arrays(short, block, 6, 40)
    with pytest.raises(ValueError, match="prompt position 1: .* log-probs"):
        prompt_logprobs_to_arrays(plp, block, 4, 40)  # asked k=4 of a k=6 answer
    flat = vllm_prompt_logprobs(logits, block, 6, "flat")
    with pytest.raises(ValueError, match="prompt position 1: 7 flat log-probs"):
        prompt_logprobs_to_arrays(flat, block, 4, 40)


def test_wrong_prompt_is_refused():
    logits, block = make_case()
    plp = vllm_prompt_logprobs(logits, block, 6, "new")
    other = block.clone()
    other[4] = (other[4] + 1) % 40
    with pytest.raises(ValueError, match="prompt position 4: the actual token"):
        prompt_logprobs_to_arrays(plp, other, 6, 40)
    with pytest.raises(ValueError, match="entries for a prompt"):
        prompt_logprobs_to_arrays(plp[:-1], block, 6, 40)


def test_temperature_other_than_one_is_refused():
    check_settings(1.0, k=8, vocab_size=64)
    with pytest.raises(ValueError, match=r"distill.temperature = 2.0.*label.backend: hf"):
        check_settings(2.0, k=8, vocab_size=64)
    with pytest.raises(ValueError, match="distill.top_k"):
        check_settings(1.0, k=65, vocab_size=64)
    with pytest.raises(ValueError, match="label.dtype"):
        check_settings(1.0, k=8, vocab_size=64, dtype="int8")
    with pytest.raises(ValueError, match="distill.temperature"):  # before any vllm import
        VLLMLabeler("/nonexistent", k=8, temperature=0.5, vocab_size=64)


def test_engine_and_request_settings():
    kw = engine_kwargs("/m", k=32, dtype="bfloat16", tensor_parallel_size=2)
    assert kw["max_logprobs"] >= 33 and kw["enable_prefix_caching"] is False
    assert kw["skip_tokenizer_init"] is True and kw["tensor_parallel_size"] == 2
    assert "max_model_len" not in kw
    assert "distributed_executor_backend" not in kw and "kv_cache_memory_bytes" not in kw
    # blocks of up to 99 tokens: vLLM counts the one token it samples after the prompt
    long = engine_kwargs("/m", 4, max_model_len=99, distributed_executor_backend="mp",
                         kv_cache_memory_bytes=2**30)
    assert long["max_model_len"] == 100 and long["hf_overrides"] == {"model_max_length": 100}
    assert long["distributed_executor_backend"] == "mp" and long["kv_cache_memory_bytes"] == 2**30
    sp = sampling_kwargs(32)
    assert sp["prompt_logprobs"] == 32 and sp["max_tokens"] == 1 and sp["flat_logprobs"] is True
    assert sp["detokenize"] is False
    assert "flat_logprobs" not in sampling_kwargs(32, flat_logprobs=False)


def test_tensor_parallel_workers_are_subprocesses_of_the_actor():
    from distill.teachers.vllm import executor_backend

    assert executor_backend(1) is None and executor_backend(2) == "mp"


class FakeEngine:
    """Stands in for ``vllm.LLM``: runs an HF model and answers ``generate`` the vLLM way."""

    def __init__(self, model, k, form):
        self.model, self.k, self.form = model, k, form

    @torch.inference_mode()
    def generate(self, prompts, params, use_tqdm=True):
        if isinstance(params, list):  # hard modes: one SamplingParams (here: its kwargs) each
            return [self.complete(p, q) for p, q in zip(prompts, params)]
        outs = []
        for prompt in prompts:
            block = torch.tensor(prompt["prompt_token_ids"])
            logits = self.model(input_ids=block[None]).logits[0].float()
            outs.append(SimpleNamespace(prompt_token_ids=list(prompt["prompt_token_ids"]),
                                        prompt_logprobs=vllm_prompt_logprobs(logits, block, self.k,
                                                                             self.form)))
        return outs

    def complete(self, prompt, params):
        """A greedy completion as vLLM returns it: ``outputs[0].token_ids`` (the stop token
        included), ``.logprobs`` one dict per generated token (top k + the chosen token,
        new-style ranks), and ``prompt_logprobs`` with the actual tokens only (``=0``)."""
        assert params["temperature"] == 0.0 and params["prompt_logprobs"] == 0
        ids = list(prompt["prompt_token_ids"])
        logp = F.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        prompt_lps = [None] + [{ids[j]: Logprob(float(logp[j - 1, ids[j]]), 1)} for j in range(1, len(ids))]
        gen, gen_lps = [], []
        for _ in range(params["max_tokens"]):
            row = F.log_softmax(self.model(input_ids=torch.tensor([ids + gen])).logits[0, -1].float(), -1)
            token = int(row.argmax())
            if "logprobs" in params:
                gen_lps.append(new_style(*vllm_position(row, token, params["logprobs"]),
                                         params["logprobs"]))
            gen.append(token)
            if token in params["stop_token_ids"]:
                break
        return SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_lps,
                               outputs=[SimpleNamespace(token_ids=gen,
                                                        logprobs=gen_lps if gen_lps else None)])


@pytest.mark.parametrize("form", ["new", "flat"])
def test_labeler_output_contract_matches_hf_backend(tmp_path, form):
    from distill.config import ModelConfig
    from distill.models import build_llama
    from distill.teachers.hf import HFLabeler

    v, t, k = 64, 16, 8
    model = build_llama(ModelConfig(layers=1, d_model=32, heads=2), v, t, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)  # spread the logits (rest mass ~0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    rng = np.random.default_rng(0)
    batch = {"block_id": np.array(["a", "b", "c"]),
             "input_ids": np.array([rng.integers(0, v, t) for _ in range(3)], dtype=object)}
    hf_labeler = HFLabeler(str(tmp_path), k=k, temperature=1.0, vocab_size=v)
    hf = hf_labeler(dict(batch))
    engine = FakeEngine(hf_labeler.model, k, form)
    out = VLLMLabeler.from_engine(engine, None, k, v, max_model_len=t)(dict(batch))
    assert set(out) == set(hf)
    for col in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "teacher_nll"):
        assert out[col].dtype == hf[col].dtype and out[col].shape == hf[col].shape, col
    assert out["topk_ids"].shape == (3, (t - 1) * k)
    assert np.array_equal(out["block_id"], batch["block_id"])
    assert np.array_equal(out["topk_ids"], hf["topk_ids"])
    assert np.allclose(out["topk_logprobs"].astype(np.float32),
                       hf["topk_logprobs"].astype(np.float32), atol=2e-3)
    assert_rest_close(out["rest_logprob"], hf["rest_logprob"], mass_atol=2e-6, log_atol=2e-2)
    assert np.allclose(out["teacher_nll"], hf["teacher_nll"], atol=1e-4)


def tiny_teacher(path, v=64, t=16):
    from distill.config import ModelConfig
    from distill.models import build_llama

    model = build_llama(ModelConfig(layers=1, d_model=32, heads=2), v, t, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("mode", ["hard", "hard+soft"])
def test_hard_labels_match_hf_backend(tmp_path, mode):
    """Greedy generations in vLLM's CompletionOutput shape → the HF backend's hard-label rows."""
    import json

    from distill.teachers.hf import HFLabeler

    v, t, k, eos = 64, 16, 8, 1
    tiny_teacher(tmp_path, v, t)
    gen = json.dumps({"prompt_tokens": 4, "max_new_tokens": 9, "sampling": "greedy",
                      "temperature": None, "top_p": None, "seed": None})
    rng = np.random.default_rng(1)
    batch = {"block_id": np.array(["a", "b", "c"]), "input_ids": rng.integers(2, v, (3, t)).astype(np.int32)}
    hf_labeler = HFLabeler(str(tmp_path), k=k, temperature=1.0, vocab_size=v, block_size=t, mode=mode,
                           generation=gen, eos_id=eos, pad_id=0)
    hf = hf_labeler(dict(batch))
    out = VLLMLabeler.from_engine(FakeEngine(hf_labeler.model, k, "new"), None, k, v, max_model_len=t,
                                  block_size=t, mode=mode, generation=gen, eos_id=eos, pad_id=0)(dict(batch))
    assert set(out) == set(hf)
    for col in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "teacher_nll", "loss_from",
                "length"):
        assert out[col].dtype == hf[col].dtype and out[col].shape == hf[col].shape, col
    assert np.array_equal(out["input_ids"], hf["input_ids"])
    assert np.array_equal(out["length"], hf["length"]) and (out["loss_from"] == 3).all()
    assert np.allclose(out["teacher_nll"], hf["teacher_nll"], atol=1e-4)
    if mode == "hard+soft":
        assert np.array_equal(out["topk_ids"], hf["topk_ids"])
        assert np.allclose(out["topk_logprobs"].astype(np.float32), hf["topk_logprobs"].astype(np.float32),
                           atol=2e-3)
        assert_rest_close(out["rest_logprob"], hf["rest_logprob"], mass_atol=2e-6, log_atol=2e-2)
    else:
        assert out["topk_ids"].shape == (3, 0)


def test_generation_request_settings():
    greedy = {"prompt_tokens": 4, "max_new_tokens": 9, "sampling": "greedy", "temperature": None,
              "top_p": None, "seed": None}
    kw = generation_kwargs(greedy, 0, eos_id=7, seed=None)
    assert kw["temperature"] == 0.0 and kw["max_tokens"] == 9 and kw["stop_token_ids"] == [7]
    assert "logprobs" not in kw and "seed" not in kw and kw["prompt_logprobs"] == 0
    sampled = {**greedy, "sampling": "sample", "temperature": 0.7, "top_p": 0.9, "seed": 3}
    kw = generation_kwargs(sampled, 8, eos_id=7, seed=1234)
    assert (kw["temperature"], kw["top_p"], kw["seed"], kw["logprobs"]) == (0.7, 0.9, 1234, 8)


def test_blocks_that_cannot_be_labeled_become_error_rows(tmp_path):
    """Empty, wrong-length and too-long blocks come back with a reason; the others are labeled."""
    from distill.teachers.hf import HFLabeler

    v, t, k = 64, 16, 8
    tiny_teacher(tmp_path, v, t)
    hf_labeler = HFLabeler(str(tmp_path), k=k, temperature=1.0, vocab_size=v, block_size=t)
    rng = np.random.default_rng(0)
    batch = {"block_id": np.array(["ok", "empty", "short", "bad"]),
             "input_ids": np.array([rng.integers(0, v, t), np.arange(0), np.arange(5),
                                    np.full(t, v + 3)], dtype=object)}
    labeler = VLLMLabeler.from_engine(FakeEngine(hf_labeler.model, k, "new"), None, k, v,
                                      max_model_len=t, block_size=t)
    out = labeler(dict(batch))
    assert out["error"][0] == ""
    assert out["error"][1].startswith("empty") and "length 5 differs" in out["error"][2]
    assert "token id 67 outside the vocabulary of 64" in out["error"][3]
    hf = hf_labeler({k_: v_[:1] for k_, v_ in batch.items()})
    assert np.array_equal(out["topk_ids"][0], hf["topk_ids"][0])
    long = VLLMLabeler.from_engine(FakeEngine(hf_labeler.model, k, "new"), None, k, v,
                                   max_model_len=t - 4, block_size=t)(dict(batch))
    assert "too long for the teacher: 16 tokens exceed its max_model_len of 12" in long["error"][0]


def test_module_imports_without_vllm():
    code = ("import sys; sys.modules['vllm'] = None\n"  # any `import vllm` now fails
            "import distill.teachers.vllm as m\n"
            "assert callable(m.VLLMLabeler) and callable(m.prompt_logprobs_to_arrays)\n"
            "try:\n"
            "    m.VLLMLabeler('/nonexistent', k=4, temperature=1.0, vocab_size=64)\n"
            "except ImportError:\n"
            "    print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cpu_tensor_parallel_ranks_split_the_cores(monkeypatch):
    import os

    from distill.teachers.vllm import cpu_thread_binding

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert cpu_thread_binding(2) == "0,1,2|3,4"
    assert cpu_thread_binding(1) == "0,1,2,3,4"
    with pytest.raises(ValueError, match="tensor_parallel_size = 8 on CPU needs at least"):
        cpu_thread_binding(8)
