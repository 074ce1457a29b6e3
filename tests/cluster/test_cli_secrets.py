"""Secrets come from files or the environment: no CLI flag or config key takes a secret value."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from batonserve.cluster.cli import build_parser
from batonserve.cluster.config import ServeConfig, load_config
from batonserve.cluster.schema import ConfigError

SECRET_WORDS = {
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "credentials",
    "apikey",
    "key",
    "bearer",
    "pem",
    "private",
}
INDIRECT = {"file", "env", "dir", "path"}  # the value names where the secret is, not the secret
# Config keys whose words sound secret but hold no secret value, and why.
NOT_SECRETS = {
    "kubernetes.image.pull_secrets": "names of Kubernetes Secret objects, not their contents",
}


def _words(name: str) -> set[str]:
    return set(re.split(r"[-_.]+", name.strip("-").lower()))


def _takes_secret_value(words: set[str]) -> bool:
    return bool(words & SECRET_WORDS) and not words & INDIRECT


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_is_scanned() -> None:
    names = set(_subcommands())
    assert {"serve", "generate", "status", "bench"} <= names


def test_no_flag_takes_a_secret() -> None:
    bad = []
    for cmd, parser in _subcommands().items():
        for action in parser._actions:
            if action.nargs == 0 or action.type in (int, float):
                continue  # switches and numbers carry no secret (--max-tokens, --token-size)
            for name in (*action.option_strings, action.dest):
                if _takes_secret_value(_words(name)):
                    bad.append(f"{cmd} {name}")
    assert bad == [], f"take the secret from a file or an environment variable: {bad}"


def test_token_and_tls_flags_name_files() -> None:
    flags = {
        cmd: {s for a in p._actions for s in a.option_strings} for cmd, p in _subcommands().items()
    }
    for cmd in ("generate", "status", "bench"):
        assert {"--token-file", "--ca-file"} <= flags[cmd], cmd


def _config_fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out.append((prefix + f.name, t))
        if dataclasses.is_dataclass(t):
            out += _config_fields(t, f"{prefix}{f.name}.")  # type: ignore[arg-type]
    return out


def test_no_config_key_holds_a_secret() -> None:
    bad = []
    for key, t in _config_fields(ServeConfig):
        if t in (int, float, bool) or dataclasses.is_dataclass(t) or key in NOT_SECRETS:
            continue
        if _takes_secret_value(_words(key.rsplit(".", 1)[-1])):
            bad.append(key)
    assert bad == []
    keys = {k for k, _ in _config_fields(ServeConfig)}
    assert {"router.auth.token_file", "router.auth.token_env", "router.tls.key_file"} <= keys


def test_a_token_value_in_the_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("router:\n  auth:\n    token: s3cret\n")
    with pytest.raises(ConfigError, match="token"):
        load_config(path)
