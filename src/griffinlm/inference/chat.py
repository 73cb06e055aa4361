"""Chat prompts: the tokenizer's own chat template where it has one, else a documented plain one.

A converted RecurrentGemma keeps its `tokenizer_config.json` beside the tokenizer file; its
"chat_template" (Jinja, as `transformers` renders it) is rendered here in a sandbox with
`messages`, `add_generation_prompt=True` and the special-token strings of that file. Our own
tokenizers carry no template: messages then become "System: ...", "User: ...",
"Assistant: ..." lines ending in "Assistant:" (`PLAIN_TEMPLATE`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

PLAIN_TEMPLATE = """Each message becomes "System: {content}\\n", "User: {content}\\n" or "Assistant: {content}\\n"
(by its role), and the prompt ends with "Assistant:"; generation stops at EOS, max_tokens, or a stop string
(default for the plain template: "\\nUser:")."""


def _token_string(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatFormat:
    """Renders chat messages into prompt token ids for one tokenizer."""

    def __init__(self, tokenizer, template: str | None = None, special_tokens: dict | None = None) -> None:
        self.tok = tokenizer
        self.special = special_tokens or {}
        self.template = None
        if template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self.template = env.from_string(template)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatFormat":
        """The tokenizer's chat template, read from the tokenizer_config.json beside its file."""
        path = tokenizer.to_dict().get("path") if hasattr(tokenizer, "to_dict") else None
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json") if path else None
        if not config or not os.path.isfile(config):
            return cls(tokenizer)
        with open(config) as f:
            cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        specials = {k: _token_string(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(tokenizer, template if isinstance(template, str) else None, specials)

    @property
    def default_stop(self) -> list[str]:
        """Stop strings a chat request gets when it gives none."""
        return [] if self.template is not None else ["\nUser:"]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The text of `messages` (dicts with "role" and "content"): a prompt for the assistant's
        next turn, or (add_generation_prompt=False) the conversation as it stands, as fine-tuning
        reads it."""
        if self.template is None:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return text + "Assistant:" if add_generation_prompt else text
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    **{k: v for k, v in self.special.items() if v is not None})

    def strip_bos(self, text: str) -> str:
        """`text` without the BOS string a template may begin with (the id is added instead)."""
        bos = self.special.get("bos_token")
        return text[len(bos):] if self.template is not None and bos and text.startswith(bos) else text

    def encode(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids: the rendered text, after BOS unless the template already begins with it."""
        return [self.tok.bos_id] + [int(i) for i in self.tok.encode(self.strip_bos(self.render(messages)))]


def _raise(message: str):
    raise ValueError(message)
