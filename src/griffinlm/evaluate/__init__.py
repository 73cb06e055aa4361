"""Evaluation studies that check the papers' claims in miniature (each writes a Markdown report, a
PNG plot and a JSON of its numbers; runs are cached by configuration), the multiple-choice scorer,
and the lm-evaluation-harness adapter. CLI: `griffinlm study ...`."""
from .harness import HarnessAdapter
from .lm_eval_adapter import lm_eval_model_class, register
from .multiple_choice import load_questions, score_questions
from .runcache import RunCache, config_key
from .scoring import chunked_token_nats, continuation_logprobs
from .study import StudyContext

__all__ = ["HarnessAdapter", "RunCache", "StudyContext", "chunked_token_nats", "config_key",
           "continuation_logprobs", "lm_eval_model_class", "load_questions", "register", "score_questions"]
