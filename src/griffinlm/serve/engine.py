"""The serving engine: continuous batching of text requests over the model's state slots.

One thread owns the model and a pool of `max_batch` slots (`model.init_cache`). Each iteration
  1. admits queued requests into free slots (each slot reset: a new sequence),
  2. prefills prompts in chunks within a per-iteration token budget (`chunk_tokens`), oldest
     first, so that a long prompt delays the running decodes by one chunk at most,
  3. runs one `model.step` over every decoding slot and samples each row with its own
     parameters and its own seeded generator (a request's samples do not depend on what else
     is in the batch),
and streams every new piece of text to the request's `sink`. Prompt chunks end on multiples of
`chunk_tokens`; with a prefix cache the slot's state after each full chunk is kept (an LRU
bounded in bytes, keyed by a hash of the tokens so far), and a request whose prompt starts with
a kept prefix restores the longest one and prefills only the rest. A Griffin/Hawk state has a
constant size; a global-attention state grows with its prefix, and its size is what counts. A request leaves its slot the
moment it finishes (EOS, a stop string, `max_tokens`) or is cancelled (a client that went
away); the next iteration can hand the slot to a queued request. Nothing waits for a batch to
drain. Copies of one prompt (OpenAI's `n`) prefill it once: the first copy leads, the others
wait in their slots for its state after the prompt (a slot snapshot) and its last logits, then
each samples on with its own generator; a copy whose leader failed before that prefills itself.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..generate import check_sampling, sample_next
from ..layers.blocks import block_spec
from ..inference.text import TextOutput, check_stop


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests: the caller should retry later (HTTP 429)."""


class BadRequest(ValueError):
    """A request the engine cannot run; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Sampling:
    """Per-request generation settings (OpenAI names). temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # how many most likely alternatives to report per token (0-5)
    ignore_eos: bool = False

    def check(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        for name, args in (("temperature", (self.temperature,)), ("top_k", (0.0, self.top_k)),
                           ("top_p", (0.0, None, self.top_p))):
            try:
                check_sampling(*args)
            except ValueError as e:
                raise BadRequest(str(e), name) from None
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise BadRequest(f"logprobs must be between 0 and 5, got {self.logprobs!r}", "logprobs")
        try:
            self.stop = check_stop(self.stop)
        except ValueError as e:
            raise BadRequest(str(e), "stop") from None


@dataclass
class Event:
    """What the engine sends a request's sink: a piece of text with its token(s), or the end.

    kind: "token" (text may be "" while a character or a possible stop string is held back),
    "done" (finish_reason "stop" or "length"), or "error" (message)."""

    kind: str
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


_ids = itertools.count()


class PrefixCache:
    """LRU of slot snapshots (`ModelCache.snapshot`) keyed by the hash of a prompt prefix, within
    `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self.entries: collections.OrderedDict[bytes, tuple[dict, int]] = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(tokens: list[int]) -> bytes:
        return hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).digest()

    def get(self, key: bytes) -> dict | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry[0]
        return None

    def put(self, key: bytes, snapshot: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in snapshot.values())
        if key in self.entries or size > self.max_bytes:
            return
        while self.used + size > self.max_bytes:
            _, (_, old) = self.entries.popitem(last=False)
            self.used -= old
        self.entries[key] = (snapshot, size)
        self.used += size


class Request:
    """One generation: prompt ids, sampling settings, and where its events go (`sink`, called
    from the engine thread)."""

    def __init__(self, prompt: list[int], sampling: Sampling, sink: Callable[[Event], None], tokenizer,
                 device: torch.device | str = "cpu", leader: "Request | None" = None) -> None:
        self.id = next(_ids)
        # A copy of `leader`'s prompt takes its state after the prompt instead of prefilling.
        self.leader = leader
        self.copies_waiting = 0  # as a leader: copies that have not taken its state yet
        self.shared: tuple[dict, torch.Tensor] | None = None  # (slot snapshot, last logits) for them
        self.gone = False  # left (failed or cancelled) before its prompt was in
        self.prompt, self.sampling, self.sink = prompt, sampling, sink
        self.generator = None
        if sampling.seed is not None:  # on the model's device: it draws from the logits there
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.text = TextOutput(tokenizer, [i for i in prompt if i != tokenizer.bos_id], sampling.stop)
        self.slot: int | None = None
        self.prefilled = 0
        self.generated: list[int] = []
        self.cancelled = False
        self.arrived = time.perf_counter()
        self.last_token_at: float | None = None


class Engine:
    """Continuous batching over `max_batch` state slots (see the module docstring).

    `submit` (any thread) queues a request or raises QueueFull / BadRequest; `cancel` marks it
    to leave at the next iteration. `metrics` is an optional `ServeMetrics`. With
    `background=False` no engine thread starts: the caller runs `run()` (the server's main
    thread) or `run_until_idle()` (offline batch work such as the lm-eval adapter); keeping
    every model call in the thread that ran the model before avoids a second OpenMP thread
    team competing for the cores."""

    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_queue: int = 256,
                 max_prompt_tokens: int | None = None, chunk_tokens: int = 512, max_length: int | None = None,
                 metrics=None, precision=None, prefix_cache_bytes: int = 0, background: bool = True) -> None:
        if max_batch < 1 or max_queue < 0 or chunk_tokens < 1:
            raise ValueError("max_batch and chunk_tokens must be >= 1, max_queue >= 0")
        self.model, self.tok, self.metrics = model.eval(), tokenizer, metrics
        self.device = next(model.parameters()).device
        self.precision = precision  # an autocast context entered by the engine thread (None: fp32)
        self.max_batch, self.max_queue, self.chunk_tokens = max_batch, max_queue, chunk_tokens
        cfg = model.config
        # A state that grows with the sequence (global attention) holds at most max_length tokens.
        self.global_attention = any(block_spec(k).state_grows for k in cfg.block_types)
        self.max_length = max_length or cfg.max_position or 4096
        self.max_prompt_tokens = max_prompt_tokens or (self.max_length if self.global_attention else 1 << 20)
        self.cache = model.init_cache(max_batch, max_length=self.max_length if self.global_attention else None)
        self.free = list(range(max_batch))[::-1]
        self.queue: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.copying: list[Request] = []  # copies in their slots, waiting for their leader's prompt state
        self.decoding: list[Request] = []
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        if background:
            self.thread = threading.Thread(target=self._run, name="griffinlm-engine", daemon=True)
            self.thread.start()

    # --- called from other threads -----------------------------------------------------------
    def submit(self, prompt: list[int], sampling: Sampling, sink: Callable[[Event], None],
               copy_of: Request | None = None) -> Request:
        """Queues a generation; `copy_of`: an earlier request of this engine with the same prompt,
        whose prefill this one shares (OpenAI's `n`)."""
        sampling.check()
        if copy_of is not None and copy_of.prompt != prompt:
            raise ValueError("a copy must have its leader's prompt")
        if not prompt:
            raise BadRequest("the prompt has no tokens", "prompt")
        if any(not 0 <= t < self.model.config.vocab_size for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {self.model.config.vocab_size})", "prompt")
        if len(prompt) > self.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(prompt)} tokens, more than the server's limit of "
                             f"{self.max_prompt_tokens}", "prompt")
        if self.global_attention and len(prompt) + sampling.max_tokens > self.max_length:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds this "
                             f"model's context of {self.max_length} tokens", "max_tokens")
        req = Request(prompt, sampling, sink, self.tok, self.device, leader=copy_of)
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue + len(self.free):
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self.queue)} requests are queued")
            self.queue.append(req)
            if copy_of is not None:
                copy_of.copies_waiting += 1
            self.cond.notify()
        self._gauges()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops admitting, cancels what is left and ends the engine thread."""
        with self.cond:
            self.stopping = True
            for r in self.queue:
                r.cancelled = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
        """The scheduler loop in the calling thread, until `stop()` (from another thread) and
        the running requests have finished (an engine made with background=False)."""
        if self.thread is not None:
            raise RuntimeError("this engine already runs in its own thread")
        self._run()

    def run_until_idle(self) -> None:
        """Runs the scheduler in the calling thread until no request is queued or running (an
        engine made with background=False: the caller's thread does all the model's work)."""
        with torch.no_grad(), (self.precision or contextlib.nullcontext()):
            while self.queue or self.prefilling or self.copying or self.decoding:
                self._iteration()

    def active(self) -> int:
        return self.max_batch - len(self.free)

    # --- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.precision is not None:
            self.precision.__enter__()  # autocast state is per thread: this one runs the model
        while True:
            with self.cond:
                while not (self.queue or self.prefilling or self.copying or self.decoding or self.stopping):
                    self.cond.wait()
                if self.stopping and not (self.prefilling or self.copying or self.decoding):
                    for r in self.queue:
                        r.sink(Event("error", message="the server is shutting down"))
                    self.queue.clear()
                    return
            self._iteration()

    def _iteration(self) -> None:
        with self.cond:
            while self.queue and self.free:
                req = self.queue.popleft()
                if req.cancelled:
                    req.gone = True  # its copies, if any, prefill the prompt themselves
                    if req.leader is not None:
                        self._release_leader(req)
                    continue
                req.slot = self.free.pop()
                self.cache.reset([req.slot])
                if req.leader is not None and self._waits_for_leader(req.leader):
                    self.copying.append(req)
                else:
                    self._restore_prefix(req)
                    self.prefilling.append(req)
        self._gauges()
        budget = self.chunk_tokens
        chunks: list[tuple[Request, int]] = []  # this iteration's prompt chunks, oldest request first
        for req in list(self.prefilling):
            if budget <= 0:
                break
            if req.cancelled:
                self._leave(req, None)
                continue
            # chunks end on multiples of chunk_tokens (where prefix snapshots are taken)
            boundary = (req.prefilled // self.chunk_tokens + 1) * self.chunk_tokens
            n = min(budget, boundary - req.prefilled, len(req.prompt) - req.prefilled)
            chunks.append((req, n))
            budget -= n
        # First chunks of fresh slots go through the model together (`prefill_many`: left-padded);
        # a global-attention slot keeps its room for real tokens, so it prefills alone.
        fresh = [(r, n) for r, n in chunks if r.prefilled == 0] if not self.global_attention else []
        if len(fresh) < 2:
            fresh = []
        else:
            try:
                last = self.model.prefill_many([torch.tensor(r.prompt[:n]) for r, n in fresh], self.cache,
                                               [r.slot for r, _ in fresh])
            except Exception:  # one bad request must not fail the others: run them one by one
                fresh = []
            else:
                for (req, n), logits in zip(fresh, last):
                    self._prefilled(req, n, logits)
        done = {id(r) for r, _ in fresh}
        for req, n in chunks:
            if id(req) in done:
                continue
            chunk = torch.tensor(req.prompt[req.prefilled:req.prefilled + n])
            try:
                logits = self.model.prefill(chunk, self.cache, req.slot, last_only=True)
            except Exception as e:  # this request fails; the others go on
                self._fail(req, e)
                continue
            self._prefilled(req, n, logits)
        for req in list(self.copying):
            self._take_leaders_prompt(req)
        rows = []
        for req in list(self.decoding):
            if req.cancelled:
                self._leave(req, None)
            else:
                rows.append(req)
        if not rows:
            return
        tokens = torch.tensor([r.generated[-1] for r in rows])
        slots = torch.tensor([r.slot for r in rows])
        try:
            logits = self.model.step(tokens, self.cache, slots, check=False)  # (n, V)
        except Exception as e:  # not attributable to one row: every row of the step fails
            for r in rows:
                self._fail(r, e)
            return
        # greedy rows without logprobs: one argmax for all of them (sampled rows draw one by one,
        # each from its own generator)
        greedy = logits.argmax(-1).tolist()
        for i, (r, row) in enumerate(zip(rows, logits)):
            self._emit(r, row, greedy[i] if r.sampling.temperature == 0 else None)

    def _prefilled(self, req: Request, n: int, logits: torch.Tensor) -> None:
        """Bookkeeping after `n` more prompt tokens of `req` went in (`logits`: the last one's)."""
        req.prefilled += n
        if self.prefixes is not None and req.prefilled % self.chunk_tokens == 0 and req.prefilled < len(req.prompt):
            self.prefixes.put(PrefixCache.key(req.prompt[:req.prefilled]), self.cache.snapshot(req.slot))
        if req.prefilled == len(req.prompt):
            with self.cond:  # submit() counts copies from another thread
                keep = req.copies_waiting > 0
            if keep:  # a copy submitted from now on finds nothing kept and prefills itself
                req.shared = (self.cache.snapshot(req.slot), logits.detach().clone())
            self.prefilling.remove(req)
            self.decoding.append(req)
            self._emit(req, logits)

    @staticmethod
    def _waits_for_leader(lead: Request) -> bool:
        """Whether a copy of `lead` should wait for its state: kept for copies, or still to come
        (not when the leader left first, nor when its prompt went in before the copy was
        submitted, so that nothing was kept for it)."""
        return lead.shared is not None or not (lead.gone or lead.prefilled >= len(lead.prompt))

    def _take_leaders_prompt(self, req: Request) -> None:
        """A copy in `copying`: once its leader's prompt is in, its slot takes the leader's state
        after the prompt and it samples its first token from the same logits; if there is no such
        state for it (see `_waits_for_leader`), it prefills the prompt itself."""
        lead = req.leader
        if req.cancelled:
            self._release_leader(req)
            self._leave(req, None)
        elif lead.shared is not None:
            snapshot, logits = lead.shared
            self.copying.remove(req)
            self.cache.restore(req.slot, snapshot)
            req.prefilled = len(req.prompt)
            self._release_leader(req)
            self.decoding.append(req)
            self._emit(req, logits)
        elif not self._waits_for_leader(lead):
            self.copying.remove(req)
            self._release_leader(req)
            self._restore_prefix(req)
            self.prefilling.append(req)

    def _release_leader(self, copy: Request) -> None:
        """`copy` no longer waits for its leader's state (it took it, left, or prefills itself); the
        leader lets the kept state go once no copy waits."""
        lead = copy.leader
        with self.cond:  # submit() counts copies from another thread
            lead.copies_waiting -= 1
            if lead.copies_waiting == 0:
                lead.shared = None

    def _restore_prefix(self, req: Request) -> None:
        """Puts the longest kept prefix of the prompt (a multiple of chunk_tokens, shorter than the
        prompt: its last token's logits are still needed) into the request's slot."""
        if self.prefixes is None:
            return
        for k in range((len(req.prompt) - 1) // self.chunk_tokens, 0, -1):
            snap = self.prefixes.get(PrefixCache.key(req.prompt[:k * self.chunk_tokens]))
            if snap is not None:
                self.cache.restore(req.slot, snap)
                req.prefilled = k * self.chunk_tokens
                self.prefixes.hits += 1
                if self.metrics is not None:
                    self.metrics.prefix(hit=True)
                return
        self.prefixes.misses += 1
        if self.metrics is not None:
            self.metrics.prefix(hit=False)

    def _emit(self, req: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Samples the request's next token from logits (V,) (unless the caller gives the greedy
        `token`) and sends its text; ends the request on EOS, a stop string or max_tokens."""
        s = req.sampling
        if token is None:
            token = int(sample_next(logits[None], s.temperature, req.generator, s.top_k, s.top_p)[0])
        event = Event("token", token=token)
        if s.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            event.logprob = float(lp[token])
            if s.logprobs:
                top = torch.topk(lp, s.logprobs)
                event.top_logprobs = {int(i): float(v) for v, i in zip(top.values, top.indices)}
        req.generated.append(token)
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token(now - (req.last_token_at or req.arrived), first=req.last_token_at is None)
        req.last_token_at = now
        finish = None
        if token == self.tok.eos_id and not s.ignore_eos:
            finish = "stop"
        else:
            event.text = req.text.push(token)
            finish = "stop" if req.text.stopped else None
        if finish is None and len(req.generated) >= s.max_tokens:
            finish = "length"
        if finish is not None and not req.text.stopped:
            event.text += req.text.flush()  # a stop string may still end in the held-back tail
            finish = "stop" if req.text.stopped else finish
        req.sink(event)
        if finish is not None:
            self._leave(req, finish)

    def _leave(self, req: Request, finish_reason: str | None) -> None:
        """Frees the request's slot; sends "done" unless it was cancelled."""
        if req.prefilled < len(req.prompt):
            req.gone = True  # its copies, if any, prefill the prompt themselves
        for group in (self.prefilling, self.copying, self.decoding):
            if req in group:
                group.remove(req)
        if req.slot is not None:
            self.free.append(req.slot)
            req.slot = None
        if finish_reason is not None:
            req.sink(Event("done", finish_reason=finish_reason, prompt_tokens=len(req.prompt),
                           completion_tokens=len(req.generated)))
        self._gauges()

    def _fail(self, req: Request, error: Exception) -> None:
        self._leave(req, None)
        req.sink(Event("error", message=f"{type(error).__name__}: {error}"))

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.gauges(len(self.queue), self.active())
