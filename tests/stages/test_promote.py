import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import load_params, set_params
from ftq.params import ParamsError
from ftq.stages import promote


@pytest.fixture()
def inside(evaluated, monkeypatch):
    project, reports = evaluated
    monkeypatch.chdir(project)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "FTQ_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    return project, reports


def registry(project):
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def set_eval(project, name, **values):
    path = project / "reports" / "eval" / f"{name}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_promotion_registers_once_picks_by_policy_and_moves_only_when_beaten(inside):
    project, reports = inside
    # the tiny random model scores 0 everywhere on the task: perplexity decides (lower is better)
    set_params(project, promote={"model_name": "tiny", "policy": {"metric": "perplexity", "direction": "min",
                                                                  "min_retention": 0.5}})
    first = promote.run(load_params(project))
    client = registry(project)
    versions = client.search_model_versions("name = 'tiny'")
    assert len(versions) == 2 and all(r["registered_now"] for r in first["candidates"])
    best = min(("q8_0", "q4_0"), key=lambda n: reports[n]["perplexity"])
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.tags["ftq.build"] == best and first["champion"]["note"] == "first champion"
    challenger = client.get_model_version_by_alias("tiny", "challenger")
    assert challenger.tags["ftq.build"] != best
    tags = champion.tags
    assert tags["method"] == "gguf" and json.loads(tags["options"])["type"] == best
    assert float(tags["eval.perplexity"]) == reports[best]["perplexity"]
    for key in ("lineage.data_md5", "lineage.base_sha256", "lineage.params_hash", "lineage.git_rev",
                "run_id.train", "run_id.merge", "run_id.quantize", "run_id.evaluate"):
        assert tags[key], key
    assert champion.source.startswith("models:/m-")  # a logged copy in the artifact store (tests/registry)
    # the version page's links: its source run, and a logged model that names the version and carries
    # the evaluation's metrics from the run that measured them
    assert champion.run_id == tags["run_id.quantize"]
    logged = client.get_logged_model(champion.source[len("models:/"):])
    assert logged.source_run_id == champion.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny", "version": str(champion.version)}]
    linked = {m.key: m for m in logged.metrics}
    assert linked["perplexity"].value == reports[best]["perplexity"]
    assert linked["perplexity"].run_id == tags["run_id.evaluate"]
    report = json.loads((project / "reports" / "promotion.json").read_text())
    assert {c["name"]: c["status"] for c in report["candidates"]} == {best: "champion", ({"q8_0", "q4_0"} - {best}).pop(): "challenger"}

    # nothing new: no new version, champion stays
    again = promote.run(load_params(project))
    assert len(client.search_model_versions("name = 'tiny'")) == 2
    assert not any(r["registered_now"] for r in again["candidates"])
    assert again["champion"]["version"] == str(champion.version) and not again["champion"]["moved"]

    # the other build now evaluates better than the champion did: the alias moves to it
    other = ({"q8_0", "q4_0"} - {best}).pop()
    set_eval(project, other, perplexity=reports[best]["perplexity"] / 2)
    moved = promote.run(load_params(project))
    assert client.get_model_version_by_alias("tiny", "champion").tags["ftq.build"] == other
    assert moved["champion"]["moved"] and "beats the champion's" in moved["champion"]["note"]
    set_eval(project, other, perplexity=reports[other]["perplexity"])


def test_a_failing_candidate_never_wins(inside):
    project, reports = inside
    set_params(project, promote={"model_name": "strict", "policy": {"metric": "perplexity", "direction": "min",
                                                                    "min_retention": 0.5}})
    best = min(("q8_0", "q4_0"), key=lambda n: reports[n]["perplexity"])
    worse = ({"q8_0", "q4_0"} - {best}).pop()
    evaluation = project / "reports" / "eval" / f"{best}.json"
    saved = evaluation.read_text()
    evaluation.unlink()  # the best build's evaluation is missing (failed)
    try:
        report = promote.run(load_params(project))
    finally:
        evaluation.write_text(saved)
    status = {c["name"]: c for c in report["candidates"]}
    assert status[best]["status"] == "rejected" and "not evaluated" in status[best]["reasons"][0]
    assert status[worse]["status"] == "champion"
    assert registry(project).get_model_version_by_alias("strict", "champion").tags["ftq.build"] == worse

    # a size cap rejects every build: the alias stays where it was
    set_params(project, promote={"model_name": "strict", "policy": {"metric": "perplexity", "direction": "min",
                                                                    "min_retention": 0.5, "max_size_bytes": 1000}})
    capped = promote.run(load_params(project))
    assert all(c["status"] == "rejected" and "max_size_bytes" in c["reasons"][0] for c in capped["candidates"])
    assert registry(project).get_model_version_by_alias("strict", "champion").tags["ftq.build"] == worse


def test_policy_is_validated(inside):
    project, _ = inside
    set_params(project, promote={"model_name": "x", "policy": {"direction": "up"}})
    with pytest.raises(ParamsError, match="direction 'up'"):
        promote.policy_of(load_params(project))
