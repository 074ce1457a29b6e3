"""Chat templates: where they come from, the override file, the sandbox, and template errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batonserve.cluster.router.chat_template import ChatMessage, ChatTemplate
from batonserve.cluster.router.errors import RequestError
from batonserve.cluster.schema import ConfigError
from batonserve.workers.models.paths import resolve_model_dir

MSGS = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]


def _model(tmp_path: Path, config: dict[str, object], jinja: str | None = None) -> Path:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


def test_sources_in_order_of_precedence(tmp_path: Path) -> None:
    cfg = {"bos_token": {"content": "<s>"}, "chat_template": "cfg:{{ bos_token }}"}
    assert ChatTemplate.for_model(_model(tmp_path, cfg)).render(MSGS) == "cfg:<s>"  # type: ignore[union-attr]
    named = {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}  # fmt: skip
    assert ChatTemplate.for_model(_model(tmp_path, named)).render(MSGS) == "d"  # type: ignore[union-attr]
    with_file = _model(tmp_path, cfg, "file:{{ messages | length }}")
    assert ChatTemplate.for_model(with_file).render(MSGS) == "file:2"  # type: ignore[union-attr]
    override = tmp_path / "mine.jinja"
    override.write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    got = ChatTemplate.for_model(with_file, str(override))
    assert got is not None and got.render(MSGS) == "[system][user]"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert ChatTemplate.for_model(_model(bare, {})) is None
    with pytest.raises(ConfigError, match=r"router\.chat_template"):
        ChatTemplate.for_model(with_file, str(tmp_path / "missing.jinja"))


def test_bundled_demo_models_answer_chat() -> None:
    for name in ("demo", "demo-moe"):
        t = ChatTemplate.for_model(resolve_model_dir(name))
        assert t is not None
        text = t.render(MSGS)
        assert text.startswith("<|endoftext|># system: be brief\n# user: hi\n")
        assert text.endswith("# assistant: ")
        assert not t.render(MSGS, add_generation_prompt=False).endswith("# assistant: ")


def test_sandbox_and_template_errors_are_the_clients_400() -> None:
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError, match=r"^messages: "):
        escape.render(MSGS)
    refuse = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RequestError, match="roles must alternate"):
        refuse.render(MSGS)
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        ChatTemplate("{% for %}")
