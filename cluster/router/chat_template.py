"""Chat templates: the model's own Jinja template (or an override file), rendered in a sandbox.

Templates come with downloaded models, so they are untrusted code: jinja2's immutable sandbox
refuses attribute tricks and mutation of the values passed in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from batonserve.cluster.router.errors import invalid
from batonserve.cluster.schema import ConfigError


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, its content already flattened to text."""

    role: str
    content: str


def _token_text(value: object) -> str:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def _pick(template: object) -> str | None:
    """A template string, or the "default" one of Hugging Face's list of named templates."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        # Hugging Face's tojson keeps non-ASCII text as is; templates rely on that.
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, ensure_ascii=False, indent=indent
        )
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template: not a valid Jinja template: {e}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, model_dir: Path, override: str = "") -> ChatTemplate | None:
        """The override file, else chat_template.jinja, else tokenizer_config.json's; or None."""
        config: Mapping[str, Any] = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            loaded = json.loads(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        if override:
            try:
                return cls(Path(override).read_text(), bos, eos)
            except OSError as e:
                raise ConfigError(
                    f"router.chat_template: cannot read {override}: {e.strerror}"
                ) from None
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(), bos, eos)
        source = _pick(config.get("chat_template"))
        return cls(source, bos, eos) if source else None

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text; a template that fails on these messages is the client's 400."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except jinja2.TemplateError as e:
            raise invalid("messages", f"the model's chat template refused them: {e}") from None
