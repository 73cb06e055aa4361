"""Driving griffinlm models from EleutherAI's lm-evaluation-harness (an optional extra).

`HarnessAdapter` answers the harness's three request types without importing lm_eval, from any
objects with an `args` tuple (the harness's `Instance`s):
  loglikelihood          args (context, continuation) -> (sum log p(continuation | context), is greedy)
  loglikelihood_rolling  args (text,)                 -> sum log p(text), the whole text scored
  generate_until         args (context, gen_kwargs)   -> generated text, cut at the first `until` string

`lm_eval_model_class()` imports lm_eval lazily and returns an `lm_eval.api.model.LM` subclass
registered as "griffinlm", so that

    import lm_eval
    from griffinlm.evaluate.lm_eval_adapter import lm_eval_model_class
    lm = lm_eval_model_class()(checkpoint="runs/griffin-tiny")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

works once `pip install lm-eval` is done.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import Tokenizer, load_tokenizer
from ..model import LanguageModel
from .scoring import chunked_token_nats, continuation_logprobs

INSTALL_HINT = ("lm-evaluation-harness is not installed: pip install lm-eval "
                "(or pip install 'griffinlm[eval]'), then retry")


class HarnessAdapter:
    """lm-evaluation-harness request handling for a model and its tokenizer.

    Args:
        model: the language model (put in eval mode).
        tokenizer: what the model was trained with; every text starts with its BOS.
        batch_size: sequences per forward pass when scoring.
        max_length: longest sequence fed to the model (contexts are cut from the left);
            default the model's `max_position`, else unlimited.
        chunk: tokens per cached forward in `loglikelihood_rolling`.
    """

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, batch_size: int = 16,
                 max_length: int | None = None, chunk: int = 1024) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position
        self.chunk = chunk

    @classmethod
    def from_checkpoint(cls, checkpoint: str, device: str = "cpu", **kwargs: Any) -> "HarnessAdapter":
        """An adapter for a `griffinlm train` run or checkpoint directory."""
        from ..checkpoint import load_model
        from ..train.loop import resolve_device

        model, ckpt = load_model(checkpoint, resolve_device(device))
        return cls(model, load_tokenizer(ckpt.trainer.get("tokenizer") or "byte"), **kwargs)

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            pairs.append(([self.tok.bos_id] + self._encode(context), self._encode(continuation)))
        return continuation_logprobs(self.model, pairs, self.batch_size, self.max_length)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        out = []
        for req in requests:
            ids = [self.tok.bos_id] + self._encode(req.args[0])
            if len(ids) < 2:
                out.append(0.0)
                continue
            nats = chunked_token_nats(self.model, torch.tensor([ids]), self.chunk)
            out.append(-float(nats.sum()))
        return out

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = [self.tok.bos_id] + self._encode(context)
            if self.max_length is not None:
                ids = ids[-max(1, self.max_length - max_new):]
            gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(0)
            row = self.model.generate([ids], max_new, temperature=temperature, generator=gen,
                                      stop_tokens=self.tok.eos_id)[0].tolist()[len(ids):]
            text = self.tok.decode([t for t in row if t != self.tok.eos_id])
            cut = min((text.index(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out


_REGISTERED: dict[str, type] = {}


def lm_eval_model_class() -> type:
    """The `lm_eval.api.model.LM` subclass for griffinlm models, registered as "griffinlm".

    Raises ImportError with the install command when lm_eval is missing."""
    if "cls" in _REGISTERED:
        return _REGISTERED["cls"]
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e

    class GriffinLMEval(LM):
        """lm-evaluation-harness model: `checkpoint` is a griffinlm run or checkpoint directory."""

        def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 16,
                     max_length: int | None = None, **_: Any) -> None:
            super().__init__()
            self.adapter = HarnessAdapter.from_checkpoint(
                checkpoint, device, batch_size=int(batch_size) if str(batch_size).isdigit() else 16,
                max_length=int(max_length) if max_length else None)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.adapter.generate_until(requests)

    try:
        from lm_eval.api.registry import register_model
        register_model("griffinlm")(GriffinLMEval)
    except (ImportError, ValueError, AssertionError):  # older harness, or already registered
        pass
    _REGISTERED["cls"] = GriffinLMEval
    return GriffinLMEval


def run_lm_eval(checkpoint: str, tasks: list[str], device: str = "cpu", batch_size: int = 16,
                limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """`lm_eval.simple_evaluate` on a griffinlm checkpoint; returns the harness's results dict."""
    cls = lm_eval_model_class()
    try:
        import lm_eval
    except ImportError as e:  # pragma: no cover - lm_eval_model_class already imported it
        raise ImportError(INSTALL_HINT) from e
    lm = cls(checkpoint=checkpoint, device=device, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot)
