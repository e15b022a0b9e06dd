"""End to end through real DVC and real MLflow on the tiny model: `dvc repro`, skipping, `ftq run`
nesting, and `dvc exp run` with a param override rerunning only what depends on it."""

import json
import sys
from pathlib import Path

from conftest import mlflow_runs, project_env, run
from ftq.layout import eval_dir as report_dir


def dvc(project, *args, check=True):
    return run([sys.executable, "-m", "dvc", *args], project, project_env(project), check=check)


def ftq(project, *args, check=True):
    return run([sys.executable, "-m", "ftq", *args], project, project_env(project), check=check)


def test_dvc_repro_prepare_then_nothing_to_do(project):
    first = dvc(project, "repro", "prepare")
    assert "Running stage 'base'" in first.stdout and "Running stage 'prepare'" in first.stdout
    assert (project / "models" / "base" / "model.safetensors").exists()
    assert (project / "data" / "processed" / "train").is_dir()
    runs = mlflow_runs(project)
    assert sorted(r.data.tags["ftq.stage"] for r in runs) == ["base", "prepare"]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.params and r.data.metrics
        assert r.data.tags["dvc.stage"] == r.data.tags["ftq.stage"]

    second = dvc(project, "repro", "prepare")
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout
    assert len(mlflow_runs(project)) == 2
    status = dvc(project, "status", "prepare")
    assert "up to date" in status.stdout
    lock = (project / "dvc.lock").read_text()
    assert "models/base" in lock and "data/processed" in lock
    # run ids live outside every stage's outputs and deps, so logging them never reruns a stage
    ids = {json.loads(line)["run_id"] for line in (project / ".ftq" / "runs.jsonl").read_text().splitlines()}
    assert ids == {r.info.run_id for r in runs}


def test_ftq_run_nests_stage_runs_and_experiments_rerun_only_what_changed(project):
    ftq(project, "run", "prepare")
    runs = mlflow_runs(project)
    [parent] = [r for r in runs if r.data.tags["ftq.stage"] == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["ftq.stage"] for r in children) == ["base", "prepare"]
    assert parent.info.status == "FINISHED"
    times = json.loads((project / "reports" / "pipeline_times.json").read_text())
    assert [s["stage"] for s in times["stages"]] == ["base", "prepare"] and times["status"] == "FINISHED"
    spans = {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    assert all(abs(s["seconds"] - spans[s["stage"]]) < 0.1 for s in times["stages"])
    assert times["stage_seconds"] <= times["wall_seconds"]

    again = ftq(project, "run", "prepare")
    assert "every stage was up to date" in again.stderr
    assert len(mlflow_runs(project)) == 3  # the empty pipeline run is removed

    run(["git", "add", "-A"], project, project_env(project))
    run(["git", "commit", "-qm", "lock"], project, project_env(project))
    exp = ftq(project, "run", "--exp", "--name", "short", "-S", "data.max_length=64", "prepare")
    assert "Running stage 'prepare'" in exp.stdout and "Running stage 'base'" not in exp.stdout
    new = [r for r in mlflow_runs(project) if r.info.run_id not in {x.info.run_id for x in runs}]
    prepare_run = next(r for r in new if r.data.tags["ftq.stage"] == "prepare")
    assert prepare_run.data.params["data.max_length"] == "64"
    assert prepare_run.data.tags["dvc.exp"] == "short"
    assert json.loads((project / "reports" / "data.json").read_text())["train"]["length"]["max"] <= 64
    shown = dvc(project, "exp", "show", "--no-pager", "--csv")
    assert "short" in shown.stdout


def test_stage_failure_fails_repro_and_keeps_outputs_clean(project):
    (project / "data" / "raw" / "ftq_default" / "train.json").write_text('[{"instruction": "x"}]')
    result = dvc(project, "repro", "prepare", check=False)
    assert result.returncode != 0
    assert "record 0: field 'output': missing" in result.stderr + result.stdout
    assert not (project / "data" / "processed").exists()
    statuses = {r.data.tags["ftq.stage"]: r.info.status for r in mlflow_runs(project)}
    assert statuses == {"base": "FINISHED", "prepare": "FAILED"}


def test_train_stage_through_dvc_and_a_learning_rate_experiment(project):
    from conftest import set_params

    set_params(project, train={"max_steps": 6, "per_device_batch_size": 4, "eval_steps": 3, "save_steps": 3,
                               "learning_rate": 5e-3, "warmup": 0, "torch_threads": 1})
    run(["git", "add", "-A"], project, project_env(project))
    run(["git", "commit", "-qm", "short training"], project, project_env(project))
    first = ftq(project, "run", "train")
    assert "Running stage 'train'" in first.stdout
    assert (project / "models" / "adapter" / "adapter_model.safetensors").exists()
    report = json.loads((project / "reports" / "train.json").read_text())
    assert report["final_train_loss"] < report["first_train_loss"]

    run(["git", "add", "-A"], project, project_env(project))
    run(["git", "commit", "-qm", "trained"], project, project_env(project))
    exp = ftq(project, "run", "--exp", "--name", "lr-low", "-S", "train.learning_rate=0.001", "train")
    assert "Running stage 'train'" in exp.stdout
    assert "Running stage 'base'" not in exp.stdout and "Running stage 'prepare'" not in exp.stdout
    train_runs = sorted((r for r in mlflow_runs(project) if r.data.tags["ftq.stage"] == "train"),
                        key=lambda r: r.info.start_time)
    assert [r.data.params["train.learning_rate"] for r in train_runs] == ["0.005", "0.001"]
    assert train_runs[1].data.tags["dvc.exp"] == "lr-low"
    assert all("loss" in r.data.metrics and "eval_loss" in r.data.metrics for r in train_runs)
    diff = dvc(project, "metrics", "diff", "--md")
    assert "reports/train.json" in diff.stdout and "final_train_loss" in diff.stdout


def test_merge_and_quantize_builds_through_dvc_rerun_only_the_changed_build(project):
    """`dvc repro` after train makes models/merged, the importance matrix once, every enabled build
    (foreach), evaluates base and merged, walks the ladder (the builds that passed their screen, largest
    first, until one is not shown faithful: fixed-sequence testing), compares and promotes; changing one
    build's options rebuilds it alone (and walks the ladder again); a build that fails its screen is
    recorded, never evaluated."""
    import yaml

    from conftest import SMALL_EVAL, SMALL_IMATRIX, TINY_POLICY

    params = yaml.safe_load((project / "params.yaml").read_text())
    # one speed measurement per candidate: the repeats and their pairing are tested in test_evaluate
    params["evaluate"].update({**SMALL_EVAL, "speed_repeats": 1, "lm_eval": {**SMALL_EVAL["lm_eval"], "limit": 2}})
    # margins the tiny project's 4 examples can decide; the default select: smallest_faithful
    params["promote"]["policy"].update({k: v for k, v in TINY_POLICY.items() if k != "select"})
    params["train"].update({"max_steps": 2, "per_device_batch_size": 4, "eval_steps": 0, "save_steps": 2, "warmup": 0})
    params["quantize"].update({
        "enabled": ["q8_0", "q4_0"],
        "builds": {"q8_0": {"method": "gguf", "type": "q8_0"},
                   "q4_0": {"method": "gguf", "type": "q4_0"}},  # 4 bits: quantized with the importance matrix
        "check": {**params["quantize"]["check"], "max_new_tokens": 8},
        "reference": {**params["quantize"]["reference"], "examples": 4, "max_length": 96},
        "imatrix": SMALL_IMATRIX,
    })
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = dvc(project, "repro")
    for stage in ("merge", "reference", "imatrix", "quantize@q8_0", "quantize@q4_0", "evaluate_base",
                  "evaluate_merged", "ladder", "compare", "promote"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert first.stdout.count("Running stage 'imatrix'") == 1
    ladder = json.loads((project / "reports" / "ladder.json").read_text())
    assert [r["name"] for r in ladder["rungs"]] == ["q4_0", "q8_0"]  # the table: smallest first
    assert ladder["walk"]["order"] == ["q8_0", "q4_0"] and ladder["walk"]["pick"] == "q4_0"  # tested largest first
    assert "fixed-sequence" in ladder["walk"]["procedure"]
    tested = {r["name"]: r["test"] for r in ladder["rungs"]}
    assert all(t["outcome"] == "faithful" and {"margin", "lower", "p_value", "examples"} <= set(t["metric_test"])
               for t in tested.values())
    assert ladder["evaluated"] == ["q4_0"]  # the pick alone is evaluated in full
    for name in ("base", "merged", "q4_0"):
        report = json.loads((project / report_dir(name) / f"{name}.json").read_text())
        assert report["lm_eval_ftq_heldout_generate_chrf"] is not None and report["task_examples"] == 4
        assert (project / report_dir(name) / "lm_eval" / f"{name}.samples.jsonl").exists()
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert promotion["champion"]["note"].startswith("first champion: q4_0, the smallest build shown faithful")
    assert {c["name"]: c["status"] for c in promotion["candidates"]}["q4_0"] == "champion"
    for name in ("q8_0", "q4_0"):
        manifest = json.loads((project / "models" / "quantized" / name / "manifest.json").read_text())
        assert manifest["check"]["passed"] and (project / "models" / "quantized" / name / "model.gguf").exists()
        assert (project / "reports" / "quantize" / f"{name}.json").exists()
        assert (manifest["imatrix"] is not None) == (name == "q4_0")
    assert (project / "models" / "merged" / "README.md").exists()
    assert "Quantization ladder" in (project / "reports" / "compare.md").read_text()
    assert (project / "reports" / "compare" / "ladder.png").exists()
    metrics = dvc(project, "metrics", "show", "--json")
    assert "reports/quantize/q8_0.json" in metrics.stdout and "reports/ladder.json" in metrics.stdout

    # the machine's arithmetic is an input: on a machine without native bf16 (the file as stage machine
    # writes it there), what train and the evaluations made here at bf16 is out of date, not reused
    recorded = (project / "data" / "machine.json").read_text()
    other = json.loads(recorded)
    other["native_bf16"] = not other["native_bf16"]
    (project / "data" / "machine.json").write_text(json.dumps(other))
    status = dvc(project, "status").stdout
    assert all(f"{stage}:" in status for stage in ("train", "evaluate_merged", "evaluate_base", "ladder")), status
    (project / "data" / "machine.json").write_text(recorded)

    # one build's options change: it alone is rebuilt. Here the change makes it fail its screen: it is
    # recorded in the ladder, its model not kept, never evaluated, and the walk ends at q8_0
    params["quantize"]["builds"]["q4_0"]["check"] = {"max_kld_mean": 0.0}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc(project, "repro")
    assert "Running stage 'quantize@q4_0'" in second.stdout and "Running stage 'ladder'" in second.stdout
    for stage in ("train", "merge", "reference", "imatrix", "quantize@q8_0", "evaluate_merged"):
        assert f"Running stage '{stage}'" not in second.stdout, stage
    rungs = {r["name"]: r for r in json.loads((project / "reports" / "ladder.json").read_text())["rungs"]}
    assert not rungs["q4_0"]["evaluated"] and rungs["q4_0"]["why"].startswith("failed its screen: mean KL divergence")
    assert rungs["q8_0"]["evaluated"] and not (project / "models" / "quantized" / "q4_0" / "model.gguf").exists()
    assert not (project / report_dir("q4_0") / "q4_0.json").exists()

    # DVC shares data and models: push to a remote, clone, pull, and nothing is left to run
    dvc(project, "remote", "add", "-d", "-f", "shared", str(project.parent / "dvc-remote"))
    run(["git", "add", "-A"], project, project_env(project))
    run(["git", "commit", "-qm", "pipeline outputs"], project, project_env(project))
    assert "files pushed" in dvc(project, "push").stdout
    clone = project.parent / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], project.parent, project_env(project))
    dvc(clone, "pull")
    for path in ("models/base", "data/processed", "models/adapter", "models/merged", "models/quantized/q8_0/model.gguf"):
        assert (clone / path).exists(), path
    # benchmark_data and machine always run (they hash the benchmark files, which DVC does not track, and
    # record the machine's arithmetic); their outputs are unchanged, so nothing after them runs
    assert dvc(clone, "status").stdout.split() == ["benchmark_data:", "always", "changed",
                                                   "machine:", "always", "changed"]
    again = dvc(clone, "repro").stdout
    assert again.count("Running stage") == 2 and "Running stage 'benchmark_data'" in again
    assert "Running stage 'machine'" in again


def test_queued_experiments_run_in_parallel_into_the_project_store(project):
    """`dvc exp run --queue` then `--run-all -j 2`: each experiment runs in a copy under .dvc/tmp/exps,
    where bin/ftq must find the project's .venv through $DVC_ROOT and write outputs into the copy (not the
    parent, which DVC_ROOT names), while MLflow runs land in the project's store, one pipeline run each."""
    import csv
    import io
    import os

    dvc(project, "repro", "prepare")
    run(["git", "add", "-A"], project, project_env(project))
    run(["git", "commit", "-qm", "prepared"], project, project_env(project))
    (project / ".venv").symlink_to(sys.prefix)  # what `make install` makes; git ignores it
    env = {k: v for k, v in project_env(project).items() if k != "FTQ_PYTHON"}
    # DVC's queue workers need `dvc` on PATH; a `python3` there must not have ftq, or the lookup goes untested
    tools = project.parent / "bin"
    tools.mkdir()
    (tools / "dvc").symlink_to(Path(sys.executable).parent / "dvc")
    env["PATH"] = os.pathsep.join([str(tools), *(p for p in env["PATH"].split(os.pathsep)
                                                if Path(p) != Path(sys.executable).parent)])
    dvc_bin = [sys.executable, "-m", "dvc"]
    before = {p: (project / p).read_text() for p in ("params.yaml", "reports/data.json", "dvc.lock")}
    for name, length in (("short", 64), ("medium", 96)):
        run([*dvc_bin, "exp", "run", "--queue", "--name", name, "-S", f"data.max_length={length}", "prepare"], project, env)
    run([*dvc_bin, "exp", "run", "--run-all", "-j", "2"], project, env, timeout=900)

    status = run([*dvc_bin, "queue", "status"], project, env).stdout
    assert status.count("Success") == 2, status
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(
        run([*dvc_bin, "exp", "show", "--no-pager", "--csv"], project, env).stdout))}
    column = next(c for c in rows["short"] if c.endswith("train.length.max"))
    assert 0 < float(rows["short"][column]) <= 64 < float(rows["medium"][column]) <= 96
    param = next(c for c in rows["short"] if c.endswith("data.max_length"))
    assert (rows["short"][param], rows["medium"][param]) == ("64", "96")
    assert {p: (project / p).read_text() for p in before} == before  # the workspace is untouched
    assert run(["git", "status", "--porcelain"], project, env).stdout == ""

    runs = mlflow_runs(project)  # the project's own store
    for name in ("short", "medium"):
        [pipeline] = [r for r in runs if r.data.tags.get("dvc.exp") == name and r.data.tags["ftq.stage"] == "pipeline"]
        [stage] = [r for r in runs if r.data.tags.get("dvc.exp") == name and r.data.tags["ftq.stage"] == "prepare"]
        assert stage.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
        assert stage.info.status == pipeline.info.status == "FINISHED"
        assert stage.data.params["data.max_length"] == str(dict(short=64, medium=96)[name])
