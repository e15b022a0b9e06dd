"""Shared fixtures: the real SmolLM2 tokenizer (from the embedded GGUF), a tiny LLaMA built from a
config around it, and throw-away project repos (real git, real DVC, real MLflow sqlite store)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures"

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub


# Test modules that share a fixture taking a minute or more to build (the `evaluated` project, the real
# SmolLM2 with its reference, the tool-calling model behind a server, the GGUF server) run in one xdist
# worker, so each fixture is built once per run rather than once per worker that gets one of its tests.
# xdist's own `--dist loadgroup` cannot do it here: it marks groups by rewriting `item._nodeid`, which
# pytest 9 no longer reads (nodeids come from `item._id`), so its groups are silently ignored.
SHARED_FIXTURE_MODULES = {
    **dict.fromkeys(("tests/stages/test_evaluate.py", "tests/stages/test_promote.py",
                     "tests/registry/test_registry.py", "tests/registry/test_tracking_server.py",
                     "tests/evaluation/test_mt_bench.py", "tests/serve/test_server.py"), "evaluated"),
    "tests/quantize/test_distance.py": "smollm2",
    "tests/serve/test_tool_calls.py": "calling_server",
}


# modules whose tests take a minute or more each: they start first, so the short tests fill both workers
# at the end instead of one worker finishing a four-minute test while the other idles
SLOW_MODULES = ("tests/test_pipeline.py", "tests/stages/test_train.py", "tests/stages/test_base.py",
                "tests/serve/test_soak.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in SLOW_MODULES)  # stable: same order on every worker


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under -p no:xdist (make test-gpu)
def pytest_xdist_make_scheduler(config, log):
    """Under `make test`'s --dist loadgroup: every other test is its own unit (xdist's `load`); the modules
    above are one unit per shared fixture, the largest first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED_FIXTURE_MODULES.get(nodeid.split("::", 1)[0], nodeid)

    return SharedFixtureScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread():
    import torch

    torch.set_num_threads(1)  # steadier than 2 on a shared 2-core box


@pytest.fixture(scope="session", autouse=True)
def _registry_cache(tmp_path_factory):
    """Registry downloads of the tests (ftq serve models:/...) go to a temp cache, not ~/.cache/ftq."""
    os.environ["FTQ_CACHE"] = str(tmp_path_factory.mktemp("ftq-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer and chat template, with the eos/pad fixes the base stage applies."""
    from transformers import AutoTokenizer, LlamaConfig

    from ftq.stages.base import embedded_gguf, fix_special_tokens

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    class _Config:  # fix_special_tokens only reads model.config.eos_token_id
        config = LlamaConfig(eos_token_id=2)

    fix_special_tokens(_Config(), tokenizer)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 64-wide LLaMA with the real tokenizer, saved as an HF folder (a valid base.source)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model(tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer)


def run(command, cwd, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def project_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["FTQ_PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def make_project(root: Path, base_source: Path, data_overrides: dict | None = None) -> Path:
    """A fresh git + DVC repo holding this project's pipeline, with base.source set to `base_source`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(REPO / "src" / "ftq", root / "src" / "ftq", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data").mkdir()
    shutil.copy(REPO / "data" / "datasets.yaml", root / "data" / "datasets.yaml")
    shutil.copytree(REPO / "data" / "raw", root / "data" / "raw")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["source"] = str(base_source)
    params["data"].update(data_overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(root)
    run(["git", "init", "-q"], root, env)
    run(["git", "config", "user.email", "test@ftq.local"], root, env)
    run(["git", "config", "user.name", "ftq test"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "config", "cache.type", "hardlink,symlink"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "project"], root, env)
    return root


@pytest.fixture()
def project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A temp project on the tiny model; the working directory is its root for in-process stage calls."""
    root = make_project(tmp_path / "project", tiny_model_dir)
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(root)
    return root


def load_params(root: Path) -> dict:
    from ftq.params import load_params as _load

    return _load(root / "params.yaml")


def set_params(root: Path, **blocks) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in blocks.items():
        params.setdefault(name, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_scores(root: Path, name: str, values, key: str = "json_field_accuracy") -> None:
    """Per-example scores of a candidate (reports/eval/<name>.answers.jsonl and the mean in <name>.json),
    as evaluate writes them: a list of values (rows are made with ids t#0.. unless it matches the number
    of rows already there, whose ids are kept) or one value for every row already there."""
    from ftq.layout import eval_dir as report_dir

    folder = root / report_dir(name)
    existing = [json.loads(line) for line in (folder / f"{name}.answers.jsonl").read_text().splitlines() if line]
    if not isinstance(values, list):
        values = [values] * len(existing)
    rows = existing if len(values) == len(existing) else [{"id": f"t#{i}", "answer": ""} for i in range(len(values))]
    for row, value in zip(rows, values):
        row[key] = float(value)
    (folder / f"{name}.answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = json.loads((folder / f"{name}.json").read_text())
    report[f"task_{key}"] = round(sum(values) / len(values), 4)
    (folder / f"{name}.json").write_text(json.dumps(report))


def mlflow_runs(root: Path, experiment: str = "ftq"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (../shared/data beside the project)")
    return path


HELLASWAG = SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt"
# the promotion policy of the tiny projects: every evaluated build ranked (select best), and margins the tiny
# project's 4 held-out examples and 8 HellaSwag items can decide (the defaults' error rates and power are
# tested in tests/promotion/test_simulation.py); the guard where HellaSwag is there (absent, it fails closed)
TINY_POLICY = {"select": "best", "margin": 0.9,
               "general_guard": {"task": "hellaswag" if HELLASWAG.exists() else None, "tolerance": 0.9}}
# llama-imatrix needs two chunks of text: the tiny project's training data holds several of 64 tokens
SMALL_IMATRIX = {"samples": 32, "max_length": 128, "chunk_size": 64}
SMALL_EVAL = {"task_examples": 4, "max_new_tokens": 8, "perplexity_examples": 4, "perplexity_max_length": 96,
              "speed_prompts": ["Who are you?", "Hello"], "speed_max_new_tokens": 8,
              # HellaSwag from ../shared/data when it is there (8 items), else absent: skipped, saying so
              "lm_eval": {"tasks": ["ftq"], "limit": 3, "max_gen_toks": 8, "batch_size": 4, "max_length": 512,
                          "local_data": {"hellaswag": {"path": str(HELLASWAG), "format": "llama.cpp-hellaswag",
                                                       "sample": 8}}}}


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, tiny_model_dir):
    """A tiny project with base, merged and two GGUF builds, each evaluated, then compared (shared by the
    evaluate, compare and promote tests; promote tests only touch the registry and reports/promotion.json)."""
    from ftq import layout
    from ftq.stages import base, benchmark_data, compare, evaluate, imatrix, ladder, merge, prepare, quantize, reference, train

    project = make_project(tmp_path_factory.mktemp("evaluate") / "project", tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
            patch.delenv(key, raising=False)
        patch.chdir(project)
        set_params(project, train={"max_steps": 2, "per_device_batch_size": 4, "eval_steps": 0, "save_steps": 2,
                                   "warmup": 0},
                   quantize={"enabled": ["q8_0", "q4_0"], "check": {"max_new_tokens": 8, "prompt": "Who are you?"},
                             "reference": {"examples": 4, "max_length": 96}, "imatrix": SMALL_IMATRIX},
                   evaluate=SMALL_EVAL,
                   # every build evaluated (the ladder's fixed-sequence walk is tested on its own); the tiny
                   # project's 4 examples and 8 HellaSwag items decide nothing at the default margins
                   promote={"policy": TINY_POLICY})
        params = load_params(project)
        for stage in (base, prepare, train, merge, reference, imatrix, benchmark_data):
            stage.run(params)
        quantize.run(params, "q8_0")
        quantize.run(params, "q4_0")
        merged = evaluate.run(params, "merged")  # first: the others' benchmarks are paired with merged's
        reports = {"base": evaluate.run(params, "base"), "merged": merged}
        ladder.run(params)  # select best: every screened build evaluated
        for name in ("q8_0", "q4_0"):
            reports[name] = json.loads((project / layout.eval_dir(name) / f"{name}.json").read_text())
        compare.run(params)
    yield project, reports




@pytest.fixture(scope="session")
def rating_judge_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model trained until it answers every judge prompt with 'Rating: [[7]]': a real model whose
    real generated text the MT-Bench code must parse (the random tiny model never writes a rating)."""
    import torch

    model = build_tiny_model(tokenizer, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompts = ["Please act as an impartial judge. [Question] Tell me about Rome. [The Start of Assistant's Answer] "
               f"Rome is old. {i} [The End of Assistant's Answer]" for i in range(16)]
    model.train()
    for step in range(120):
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": prompts[step % len(prompts)]}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        target = tokenizer("Rating: [[7]]<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + target])
        labels = torch.tensor([[-100] * len(prompt_ids) + target])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("rating-judge")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def start_server(model: str, *args: str, cwd=None, env=None, inherit_env=True):
    """A real `ftq serve` process on loopback; returns (process, port, /health) once it answers.
    `inherit_env=False`: the process gets `env` alone (a second machine that knows nothing else)."""
    import json
    import time
    import urllib.request

    from ftq.processes import free_port

    port = free_port()
    env = {**(os.environ if inherit_env else {}), "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "ftq", "serve", "--model", model, "--port", str(port), "--threads", "1", *args],
        cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ftq serve exited:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return process, port, json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("ftq serve did not come up in 120 s")


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture()
def evaluated_copy(evaluated, tmp_path, monkeypatch) -> Path:
    """A private copy of the `evaluated` project with an empty MLflow store (tests that rebuild builds
    or need a registry of their own); the working directory is its root."""
    project, _ = evaluated
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", ".ftq"))
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FTQ_CACHE", str(tmp_path / "cache"))  # downloads of registry versions
    monkeypatch.chdir(copy)
    return copy


def chromium(tmp_path):
    """Headless Debian Chromium through chromedriver (skips where they are not installed)."""
    import shutil

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian chromium and chromium-driver are not installed (make test installs them where apt works)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
