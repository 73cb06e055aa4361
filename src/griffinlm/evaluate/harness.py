"""The three request types of EleutherAI's lm-evaluation-harness, answered by a griffinlm model.

`HarnessAdapter` needs no lm_eval import: it takes any objects with an `args` tuple (the
harness's `Instance`s; `task_name`, `doc_id` and `idx` are used when present):
  loglikelihood          args (context, continuation) -> (sum log p(continuation | context), is greedy)
  loglikelihood_rolling  args (text,)                 -> sum log p(text), the whole text scored
  generate_until         args (context, gen_kwargs)   -> generated text, cut at the first `until` string

Tokenization follows the harness's own `hf` model, so that scores are comparable: every text
starts with BOS; a context's trailing whitespace moves to the front of the continuation, and the
continuation's ids are those of the whole text after the context's.

Generation runs on the serving engine (`griffinlm.serve.engine`, continuous batching over state
slots): requests share decode steps, each row stops as soon as EOS, `max_gen_toks` or one of its
`until` strings is reached, and a finished row's slot goes to the next request at once. Each
request samples from its own generator, seeded from (seed, task, document, request index, repeat
index): the repeats of a `repeats: k` task differ, and a rerun reproduces them.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..data import Tokenizer
from ..model import LanguageModel
from ..precision import autocast, check_dtype
from ..train.records import progress_bar
from .scoring import LOGITS_BUDGET, chunked_token_nats, continuation_logprobs

log = logging.getLogger("griffinlm.evaluate")

# gen_kwargs keys that generation reads (the rest are named in a warning, never dropped silently)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def request_seed(seed: int, key: tuple, repeat: int) -> int:
    """A 63-bit generator seed from the run seed, a request's identity and its repeat index."""
    digest = hashlib.sha256(repr((seed, key, repeat)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampling_settings(gen_kwargs: dict, default_max_gen: int = 256) -> dict[str, Any]:
    """Harness `gen_kwargs` -> {"until", "max_tokens", "temperature", "top_k", "top_p"}.

    As the harness's `hf` model (transformers' `generate`) reads them: greedy unless `do_sample`
    is true, or unset with a temperature > 0; `do_sample` without a temperature samples at 1.0;
    `top_k` 0 and `top_p` 1.0 mean no filtering. Raises ValueError on values that cannot work."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    max_gen = int(kw.get("max_gen_toks", default_max_gen))
    temperature, do_sample = kw.get("temperature"), kw.get("do_sample")
    if do_sample is None:
        do_sample = temperature is not None and float(temperature) > 0
    if do_sample:
        temperature = 1.0 if temperature is None else float(temperature)
        if temperature <= 0:
            raise ValueError(f"gen_kwargs: do_sample=True needs temperature > 0, got {temperature}")
    else:
        temperature = 0.0
    top_k = kw.get("top_k")
    top_k = int(top_k) if top_k not in (None, 0) else None
    top_p = kw.get("top_p")
    top_p = float(top_p) if top_p is not None and float(top_p) < 1.0 else None
    return {"until": until, "max_tokens": max_gen, "temperature": temperature, "top_k": top_k, "top_p": top_p}


class HarnessAdapter:
    """lm-evaluation-harness request handling for a model and its tokenizer.

    Args:
        model: the language model (put in eval mode).
        tokenizer: what the model was trained with; every text starts with its BOS.
        batch_size: sequences per forward pass when scoring and decoding slots when generating,
            or "auto": measured (the scoring batch with the best tokens/s on the first batch's
            length, doubling up to `max_batch_size`; generation uses `max_batch_size` slots).
        max_length: longest sequence fed to the model (contexts are cut from the left);
            default the model's `max_position`, else unlimited.
        chunk: tokens per cached forward in `loglikelihood_rolling`.
        max_batch_size: the ceiling of "auto".
        dtype: GEMM precision, "auto", "fp32" or "bf16" (`griffinlm.precision`).
        seed: the run's sampling seed (each request's generator is derived from it).
        max_gen_toks: generation budget when a request's gen_kwargs give none.
        progress: show progress bars (tqdm) on long runs.
    """

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, batch_size: int | str = 16,
                 max_length: int | None = None, chunk: int = 1024, *, max_batch_size: int = 64,
                 dtype: str = "auto", seed: int = 1234, max_gen_toks: int = 256, progress: bool = True) -> None:
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        check_dtype(dtype)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        autocast(self.device, dtype)  # refuses bf16 on a CPU without it, before any request
        self.tok = tokenizer
        self.batch_size, self.max_batch_size = batch_size, max_batch_size
        self.max_length = max_length or model.config.max_position
        self.chunk, self.dtype, self.seed = chunk, dtype, seed
        self.max_gen_toks, self.progress = max_gen_toks, progress
        self.measured_batch: int | None = None
        self._warned: set[str] = set()

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)]

    def _bar(self, total: int, desc: str, disabled: bool):
        return progress_bar(total, 0, self.progress and not disabled and total > 0, unit="req", desc=desc, leave=False)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(BOS + context ids, continuation ids) as the harness's `hf` model splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else []
        if not cont:  # the tokenizer merged across the boundary: encode the two apart
            cont = self._encode(continuation)
        return [self.tok.bos_id] + ctx, cont

    # --- batch size -----------------------------------------------------------------------
    @torch.no_grad()
    def measure_batch_size(self, length: int) -> int:
        """The scoring batch size with the best tokens/s for sequences of `length` tokens: 1, 2,
        4, ... up to `max_batch_size`, stopping when doubling gains less than 5%, a forward takes
        more than 2 s, or memory runs out."""
        length = max(2, min(length, self.max_length or length))
        best, best_rate, b = 1, 0.0, 1
        while b <= self.max_batch_size:
            tokens = torch.randint(0, self.model.config.vocab_size, (b, length), device=self.device)
            try:
                with autocast(self.device, self.dtype):
                    self.model(tokens)  # warm-up (kernel choices, allocations)
                    start = time.perf_counter()
                    self.model(tokens)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - start
            except torch.OutOfMemoryError:
                break
            rate = b * length / max(seconds, 1e-9)
            if rate < best_rate * 1.05:
                break
            best, best_rate = b, rate
            if seconds > 2.0:
                break
            b *= 2
        log.info("batch_size=auto: %d (measured on %d-token sequences, up to %d)", best, length, self.max_batch_size)
        return best

    def _scoring_batch(self, length: int) -> int:
        if self.batch_size != "auto":
            return int(self.batch_size)
        if self.measured_batch is None:
            self.measured_batch = self.measure_batch_size(length)
        return self.measured_batch

    # --- the three request types ------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        pairs, where = [], []
        for i, req in enumerate(requests):
            context, continuation = req.args[0], req.args[1]
            if not continuation:
                self._warn_once("a loglikelihood request has an empty continuation: scored as log p = 0 "
                                "(greedy); check the task's doc_to_target / doc_to_choice")
                continue
            pairs.append(self.encode_pair(context, continuation))
            where.append(i)
        if not pairs:
            return results
        longest = max(len(c) + len(x) for c, x in pairs)
        bar = self._bar(len(pairs), "loglikelihood", disable_tqdm)
        try:
            scored = continuation_logprobs(self.model, pairs, self._scoring_batch(longest), self.max_length,
                                           dtype=self.dtype, progress=bar.update)
        finally:
            bar.close()
        for i, r in zip(where, scored):
            results[i] = r
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text scored whole (every token after BOS), `chunk` tokens per cached forward;
        texts of similar length share a batch (right-padded: the padding is never scored)."""
        rows = [[self.tok.bos_id] + self._encode(req.args[0]) for req in requests]
        out = [0.0] * len(rows)
        order = sorted((i for i in range(len(rows)) if len(rows[i]) >= 2), key=lambda i: -len(rows[i]))
        if not order:
            return out
        batch = self._scoring_batch(min(len(rows[order[0]]), self.chunk))
        # tokens per cached forward: at most `chunk`, and a (batch, chunk, vocab) logits tensor within budget
        chunk = max(1, min(self.chunk, LOGITS_BUDGET // (batch * self.model.config.vocab_size)))
        bar = self._bar(len(order), "loglikelihood_rolling", disable_tqdm)
        try:
            for b0 in range(0, len(order), batch):
                idx = order[b0:b0 + batch]
                L = len(rows[idx[0]])
                tokens = torch.full((len(idx), L), self.tok.pad_id, dtype=torch.long)
                for j, i in enumerate(idx):
                    tokens[j, :len(rows[i])] = torch.tensor(rows[i])
                nats = chunked_token_nats(self.model, tokens, chunk, self.dtype)  # (b, L - 1)
                for j, i in enumerate(idx):
                    out[i] = -float(nats[j, :len(rows[i]) - 1].sum())
                bar.update(len(idx))
        finally:
            bar.close()
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        from ..serve.engine import Engine, Event, Request, Sampling

        out: list[str | None] = [None] * len(requests)
        jobs = []  # (request index, the request's id (its repeats share it), prompt ids, Sampling)
        repeats: dict[int, int] = {}  # the harness passes a `repeats: k` request k times (one object)
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {}
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                self._warn_once(f"generate_until ignores these gen_kwargs: {', '.join(unknown)}")
            s = sampling_settings(kwargs, self.max_gen_toks)
            if s["max_tokens"] < 1:
                out[i] = ""
                continue
            ids = [self.tok.bos_id] + self._encode(req.args[0])
            if self.max_length is not None:
                ids = ids[-max(1, self.max_length - s["max_tokens"]):]
            repeat = repeats.get(id(req), 0)
            repeats[id(req)] = repeat + 1
            key = (getattr(req, "task_name", None), getattr(req, "doc_id", None), getattr(req, "idx", None))
            key = key if key[1] is not None else ("request", i)
            jobs.append((i, id(req), ids, Sampling(max_tokens=s["max_tokens"], temperature=s["temperature"],
                                                   top_k=s["top_k"], top_p=s["top_p"], stop=s["until"],
                                                   seed=request_seed(self.seed, key, repeat))))
        if not jobs:
            return [o or "" for o in out]
        slots = self.max_batch_size if self.batch_size == "auto" else int(self.batch_size)
        slots = min(slots, len(jobs))
        longest = max(len(ids) + s.max_tokens for _, _, ids, s in jobs)
        # a large prompt budget: offline, every waiting prompt is prefilled in one batched forward
        first_prompts = sum(len(ids) for _, _, ids, _ in jobs[:slots])
        engine = Engine(self.model, self.tok, max_batch=slots, max_queue=len(jobs), max_length=longest,
                        max_prompt_tokens=longest, chunk_tokens=max(512, first_prompts),
                        precision=autocast(self.device, self.dtype), background=False)
        errors: list[str] = []
        bar = self._bar(len(jobs), "generate_until", disable_tqdm)

        def sink_for(i: int):
            pieces: list[str] = []

            def sink(event: Event) -> None:
                if event.kind == "token":
                    pieces.append(event.text)
                    return
                if event.kind == "error":
                    errors.append(event.message)
                out[i] = "".join(pieces)
                bar.update()
            return sink

        try:
            firsts: dict[int, Request] = {}  # the repeats of one request prefill its context once
            for i, key, ids, sampling in jobs:
                first = firsts.get(key)
                copy_of = first if first is not None and first.prompt == ids else None
                sub = engine.submit(ids, sampling, sink_for(i), copy_of=copy_of)
                firsts.setdefault(key, sub)
            engine.run_until_idle()  # in this thread (see `Engine`)
        finally:
            engine.stop()
            bar.close()
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")
        return [o or "" for o in out]
