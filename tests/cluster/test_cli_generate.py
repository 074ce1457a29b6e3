"""`batonserve generate --offline`: text or one JSON object, errors naming the bad flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testkit.hf_tiny import make_tiny_model

from batonserve.cluster.cli import main
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("cli-llama"))


def test_json_output_matches_engine(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--offline", "--model", str(model_dir), "--max-tokens", "7", "--json"]
    assert main([*argv, "--ignore-eos", "def main():"]) == 0
    cap = capsys.readouterr()
    record = json.loads(cap.out)
    assert set(record) == {"token_ids", "text", "finish_reason"}
    ref = Engine.from_model(model_dir).generate(
        ["def main():"], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    )[0]
    assert record["token_ids"] == ref.token_ids and len(ref.token_ids) == 7
    assert record["text"] == ref.text and record["finish_reason"] == "length"
    assert "loading model" in cap.err  # progress goes to stderr, never into the JSON


def test_text_output_and_seeded_sampling(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--offline", "--model", str(model_dir), "--max-tokens", "6", "--ignore-eos"]
    runs = []
    for _ in range(2):
        assert main([*argv, "--temperature", "0.8", "--seed", "3", "--json", "hello"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1] and len(runs[0]) == 6
    assert main([*argv, "hello"]) == 0
    ref = Engine.from_model(model_dir).generate(
        ["hello"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )[0]
    assert capsys.readouterr().out == ref.text + "\n"


def test_errors_name_the_field(
    model_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["generate", "--offline", "--model", str(tmp_path / "none"), "hi"]) == 2
    assert "model" in capsys.readouterr().err
    assert (
        main(["generate", "--offline", "--model", str(model_dir), "--max-tokens", "0", "hi"]) == 2
    )
    assert "max_tokens" in capsys.readouterr().err
    assert (
        main(["generate", "--offline", "--model", str(model_dir), "--temperature", "-1", "hi"]) == 2
    )
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--offline", "--model", str(model_dir), ""]) == 2
    assert "prompt" in capsys.readouterr().err
