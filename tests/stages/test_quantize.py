import json
import signal

import pytest

from conftest import SMALL_IMATRIX, load_params, make_project, mlflow_runs, set_params
from ftq.params import ParamsError
from ftq.runtimes import artifact_format, open_model
from ftq.stages import base, imatrix, merge, prepare, quantize, reference, train

FAST_TRAIN = {"max_steps": 2, "per_device_batch_size": 4, "learning_rate": 5e-3, "eval_steps": 0, "save_steps": 2,
              "warmup": 0}
SMALL_CHECK = {"max_new_tokens": 12}
SMALL_REFERENCE = {"examples": 6, "max_length": 128}
SMALL_CALIBRATION = {"split": "train", "samples": 8, "max_length": 128, "seed": 0}


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir):
    """One trained and merged tiny project shared by this module's tests (each build has its own folder)."""
    import os

    project = make_project(tmp_path_factory.mktemp("quantize") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
            patch.delenv(key, raising=False)
        patch.chdir(project)
        set_params(project, train=FAST_TRAIN, quantize={"check": SMALL_CHECK, "calibration": SMALL_CALIBRATION,
                                                        "reference": SMALL_REFERENCE, "imatrix": SMALL_IMATRIX})
        params = load_params(project)
        for stage in (base, prepare, train, merge, reference, imatrix):
            stage.run(params)
        yield project


def quantize_runs(root, name):
    return [r for r in mlflow_runs(root) if r.info.run_name == f"quantize@{name}"]


def with_builds(root, **builds):
    params = load_params(root)
    params["quantize"]["builds"].update(builds)
    return params


def test_gguf_build_with_output_type_and_manifest(merged):
    params = with_builds(merged, tq4={"method": "gguf", "type": "q4_0", "output_type": "q4_0"})
    manifest = quantize.run(params, "tq4").manifest
    out = merged / "models" / "quantized" / "tq4"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.gguf"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["method"] == "gguf" and manifest["options"]["type"] == "q4_0"
    # every weight matrix is Q4_0, the tied token embedding / output included; norms stay F32
    assert set(manifest["backend"]["tensor_types"]) == {"Q4_0", "F32"}
    assert manifest["files"]["model.gguf"]["sha256"] and manifest["size_bytes"] == manifest["files"]["model.gguf"]["bytes"]
    assert manifest["compression_ratio"] > 3 and manifest["calibration"] is None
    assert manifest["tool_versions"]["llama-cpp-python"] == "0.3.36"
    assert manifest["peak_memory_bytes"] > 0 and manifest["build_seconds"] > 0
    check = manifest["check"]
    assert check["passed"] and check["runtime"] == "llama.cpp" and check["positions"] > 0
    assert 0 <= check["kld_mean"] <= check["limits"]["max_kld_mean"] and 0 < check["top1_agreement"] <= 1
    assert manifest["source"]["lineage"]["train_method"] == "lora"
    report = json.loads((merged / "reports" / "quantize" / "tq4.json").read_text())
    assert report["perplexity_ratio"] == round(check["perplexity_ratio"], 4)
    assert report["kld_mean"] == round(check["kld_mean"], 6) and report["top1_agreement"] == round(check["top1_agreement"], 5)
    assert manifest["reference"]["sha256"] == json.loads((merged / "models" / "reference" / "reference.json").read_text())["sha256"]
    [run] = quantize_runs(merged, "tq4")
    assert run.data.tags["ftq.stage"] == "quantize" and run.data.params["quantize.type"] == "q4_0"
    assert run.data.metrics["compression_ratio"] == manifest["compression_ratio"]
    assert run.data.tags["quantize.artifact"].endswith("tq4/model.gguf")
    # the build is usable by any llama.cpp consumer
    runtime = open_model(out)
    assert runtime.kind == "llama.cpp"
    runtime.close()


def test_a_build_that_fails_its_screen_is_recorded_without_its_model_and_never_evaluated(merged):
    from ftq.evaluation import candidate

    params = with_builds(merged, broken={"method": "gguf", "type": "q2_k", "check": {"min_top1_agreement": 1.01}})
    manifest = quantize.run(params, "broken").manifest
    out = merged / "models" / "quantized" / "broken"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # the model is not kept
    assert not list((merged / "models" / "quantized").glob("broken.tmp-*"))
    assert manifest["kept"] is False and manifest["artifact"] is None and not manifest["check"]["passed"]
    report = json.loads((merged / "reports" / "quantize" / "broken.json").read_text())
    assert report["check_passed"] is False and "top-1 agreement" in report["check_failures"][0]
    assert report["size_bytes"] > 0 and report["kld_mean"] >= 0  # recorded: size and distances
    [run] = quantize_runs(merged, "broken")
    assert run.info.status == "FINISHED" and run.data.tags["quantize.screen"] == "failed"
    with pytest.raises(candidate.ScreenedOut, match="build 'broken' failed its screen"):
        candidate.candidate_path(merged, "broken")


def test_the_importance_matrix_is_computed_once_and_used_where_a_build_asks(merged):
    info = json.loads((merged / "models" / "imatrix" / "imatrix.json").read_text())
    assert info["chunks"] >= 2 and info["tokens"] > 0 and info["command"][0] == "llama-imatrix"
    assert (merged / "models" / "imatrix" / "imatrix.gguf").stat().st_size > 0
    stamp = (merged / "models" / "imatrix" / "imatrix.gguf").stat().st_mtime_ns
    with_matrix = quantize.run(with_builds(merged, q4m={"method": "gguf", "type": "q4_k_m"}), "q4m").manifest
    without = quantize.run(with_builds(merged, q4m_plain={"method": "gguf", "type": "q4_k_m", "imatrix": False}),
                           "q4m_plain").manifest
    q8 = quantize.run(with_builds(merged, q8={"method": "gguf", "type": "q8_0"}), "q8").manifest
    assert with_matrix["imatrix"]["sha256"] == info["sha256"] and without["imatrix"] is None and q8["imatrix"] is None
    assert with_matrix["files"]["model.gguf"]["sha256"] != without["files"]["model.gguf"]["sha256"]
    # the same tensor types, other rounding: equal sizes but for the matrix's own metadata keys
    assert with_matrix["backend"]["tensor_types"] == without["backend"]["tensor_types"]
    assert 0 <= with_matrix["size_bytes"] - without["size_bytes"] < 4096
    # every GGUF build quantized from stage imatrix's f16 GGUF: one conversion, not one per build
    assert with_matrix["backend"]["from_shared_f16"] and q8["backend"]["from_shared_f16"]
    # the build records the matrix and its text by file name, not where the project lies: clones make the
    # same bytes
    from gguf import GGUFReader

    fields = GGUFReader(str(merged / "models" / "quantized" / "q4m" / "model.gguf")).fields
    recorded = {k: bytes(fields[k].parts[fields[k].data[0]]).decode()
                for k in ("quantize.imatrix.file", "quantize.imatrix.dataset")}
    assert recorded == {"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": "sample.txt"}
    # every build read the one matrix: it was not made again
    assert (merged / "models" / "imatrix" / "imatrix.gguf").stat().st_mtime_ns == stamp
    # a DVC cache of symlinks (cache.type symlink) links the matrix to a file named by its hash: the same build
    matrix = merged / "models" / "imatrix" / "imatrix.gguf"
    cached = merged / "cache-by-hash" / info["sha256"]
    cached.parent.mkdir()
    matrix.rename(cached)
    matrix.symlink_to(cached)
    try:
        linked = quantize.run(with_builds(merged, q4m_linked={"method": "gguf", "type": "q4_k_m"}), "q4m_linked").manifest
    finally:
        matrix.unlink()
        cached.rename(matrix)
    assert linked["files"]["model.gguf"]["sha256"] == with_matrix["files"]["model.gguf"]["sha256"]


def test_bad_build_options_name_the_key(merged):
    with pytest.raises(ParamsError, match=r"quantize.builds.x: type 'q4_z'"):
        quantize.build_spec(with_builds(merged, x={"method": "gguf", "type": "q4_z"}), "x")
    with pytest.raises(ParamsError, match=r"quantize.builds.x: unknown options \['bitz'\]"):
        quantize.build_spec(with_builds(merged, x={"method": "gptq", "bitz": 4}), "x")
    with pytest.raises(ParamsError, match="method 'exl2'"):
        quantize.build_spec(with_builds(merged, x={"method": "exl2"}), "x")
    with pytest.raises(ParamsError, match="no build 'nope'"):
        quantize.build_spec(load_params(merged), "nope")


def test_awq_build_loads_in_transformers(merged):
    params = with_builds(merged, awq={"method": "awq", "bits": 4, "group_size": 32})
    manifest = quantize.run(params, "awq").manifest
    out = merged / "models" / "quantized" / "awq"
    assert artifact_format(out) == "compressed-tensors"
    assert manifest["calibration"]["samples"] == 8 and len(manifest["calibration"]["sha256"]) == 64
    assert manifest["check"]["passed"] and manifest["check"]["runtime"] == "transformers"
    assert manifest["tool_versions"]["llmcompressor"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == 32 and weights["symmetric"] is False


def test_gptq_build_loads_in_transformers(merged):
    params = with_builds(merged, gptq={"method": "gptq", "bits": 4, "group_size": 32, "act_order": True})
    manifest = quantize.run(params, "gptq").manifest
    out = merged / "models" / "quantized" / "gptq"
    assert artifact_format(out) == "gptq"
    assert manifest["check"]["passed"] and manifest["check"]["runtime"] == "transformers"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["group_size"] == 32 and config["desc_act"] is True


def test_gguf_scoring_in_batches_matches_whole_context_logits(merged):
    """The llama.cpp runtime decodes n_batch tokens at a time (logits memory n_batch x vocabulary): across
    batch boundaries it must give what llama-cpp-python's logits_all (context x vocabulary) gives."""
    import numpy as np
    from llama_cpp import Llama

    manifest = quantize.run(with_builds(merged, f16={"method": "gguf", "type": "f16"}), "f16").manifest
    path = merged / "models" / "quantized" / "f16" / manifest["artifact"]
    runtime = open_model(path.parent, n_ctx=1024)
    ids = [int(t) for t in np.random.default_rng(0).integers(10, 4000, size=700)]  # 512 + 188: two batches
    batched = runtime.logits(ids)
    whole = Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False)
    whole.eval(ids)
    expected = np.array(whole.scores[: len(ids)])
    assert batched.shape == expected.shape and runtime.llama.n_batch == 512
    assert np.abs(batched - expected).max() < 1e-3
    nll, n = runtime.sequence_nll(ids)
    logprobs = expected[:-1] - np.log(np.exp(expected[:-1] - expected[:-1].max(1, keepdims=True)).sum(1, keepdims=True)) \
        - expected[:-1].max(1, keepdims=True)
    assert n == 699 and abs(nll + logprobs[np.arange(699), ids[1:]].sum()) < 1e-2 * n
    following = runtime.next_logits(ids[0])  # continues after the 700 tokens
    whole.eval([ids[0]])
    assert np.abs(following - np.array(whole.scores[700])).max() < 1e-3
    runtime.close()
    whole.close()


def _start_build(root, name, sigint_ignored=False):
    """`bin/ftq quantize <name>` as DVC runs it, with the build added to params.yaml; returns once its
    temp folder exists (the stage is mid-build). `sigint_ignored`: started as a background job of a
    non-interactive shell is (`dvc repro &`, nohup), with SIGINT ignored."""
    import subprocess
    import time

    import yaml

    from conftest import project_env

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["quantize"]["builds"][name] = {"method": "gguf", "type": "q8_0"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = open(root / f"{name}.log", "w")
    process = subprocess.Popen([str(root / "bin" / "ftq"), "quantize", name], cwd=root, env=project_env(root),
                               stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    deadline = time.monotonic() + 300
    while not list((root / "models" / "quantized").glob(f"{name}.tmp-*")):
        assert process.poll() is None, (root / f"{name}.log").read_text()
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.01)
    return process


@pytest.mark.parametrize("signum", [15, 2], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_build_removes_its_temp_folder_and_ends_its_run_killed(merged, signum):
    name = f"stopped{signum}"
    process = _start_build(merged, name, sigint_ignored=signum == signal.SIGINT)  # stopped all the same
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum, (merged / f"{name}.log").read_text()
    assert "temporary outputs removed" in (merged / f"{name}.log").read_text()
    assert not list((merged / "models" / "quantized").glob(f"{name}*"))
    [run] = quantize_runs(merged, name)
    assert run.info.status == "KILLED"


def test_a_build_whose_process_dies_by_sigill_says_so_instead_of_a_bare_exit_code(merged):
    """What an AMX host without the patched llama.cpp did: the stage's process dies by SIGILL in native
    code. DVC alone would print "exited with -4"; the stage's watcher names the signal and its cause."""
    import psutil

    name = "sigill"
    process = _start_build(merged, name)
    [worker] = psutil.Process(process.pid).children()  # the stage itself, in the watched child
    worker.send_signal(signal.SIGILL)
    assert process.wait(timeout=60) == 128 + signal.SIGILL
    log = (merged / f"{name}.log").read_text()
    assert f"ftq quantize {name}: died by SIGILL (an instruction this CPU or VM does not allow" in log, log
    assert "Fatal Python error: Illegal instruction" in log  # faulthandler: where in Python it happened


def test_leftovers_of_a_sigkilled_build_are_removed_by_its_next_run(merged):
    name = "sigkilled"
    process = _start_build(merged, name)
    process.kill()
    process.wait(timeout=60)
    [leftover] = (merged / "models" / "quantized").glob(f"{name}.tmp-*")  # what SIGKILL cannot clean
    [killed] = quantize_runs(merged, name)
    assert killed.info.status == "RUNNING"

    quantize.run(load_params(merged), name)
    assert not leftover.exists() and (merged / "models" / "quantized" / name / "model.gguf").exists()
    runs = {r.info.run_id: r.info.status for r in quantize_runs(merged, name)}
    assert runs[killed.info.run_id] == "KILLED" and sorted(runs.values()) == ["FINISHED", "KILLED"]
