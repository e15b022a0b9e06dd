"""One registry version per distinct build (the sha256 of its files): rerunning with nothing new
registers nothing. A new build is first logged into MLflow's artifact store as an MLflow model
(ftq.registry.package), under the registry lock, read back and verified, or an earlier upload of it
that no version references is reused (ftq.registry.upload); the version is created from that copy,
never from a working-tree path, so a version never changes and deploys wherever the tracking server is
reachable. Each version is tagged with the sha256 of every file (verified by `ftq serve` before loading),
its method and options, every eval metric, and its lineage (data md5, base hash, params hash, git rev,
DVC experiment, MLflow run ids)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ftq.params import params_hash
from ftq.registry import ARTIFACT_TAG, FILES_TAG, MODEL_TAG, build_digest, files_tag

if TYPE_CHECKING:  # the registry reads a candidate's name, manifest and metrics; it needs no policy
    from ftq.promotion.policy import Candidate

log = logging.getLogger(__name__)

# the params sections a build depends on: their hash is the version's lineage.params_hash
BUILD_PARAMS = ("base", "data", "train", "preference", "merge", "quantize")


def ensure_registered_model(client, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name, description="ftq quantized builds; alias champion = the best")
        except MlflowException as exc:  # a concurrent promote created it first
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise


def run_ids(client, params: dict, name: str) -> dict[str, str]:
    """The latest finished run of each stage that made build `name` ('' where none is found)."""
    from ftq.tracking import experiment_id

    exp = experiment_id(client, params)

    def latest(run_name: str) -> str:
        runs = client.search_runs([exp], f"attributes.run_name = '{run_name}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else ""

    return {"train": latest("train"), "merge": latest("merge"), "quantize": latest(f"quantize@{name}"),
            "evaluate": latest(f"evaluate@{name}")}


def version_tags(candidate: Candidate, params: dict, ids: dict[str, str]) -> dict[str, str]:
    from ftq.tracking import git_rev

    manifest = candidate.manifest
    lineage = manifest["source"].get("lineage", {})
    tags = {
        ARTIFACT_TAG: build_digest(manifest),
        "ftq.build": candidate.name,
        "method": manifest["method"],
        "format": manifest.get("format", manifest["method"]),
        "options": json.dumps(manifest["options"], sort_keys=True),
        "size_bytes": manifest["size_bytes"],
        "lineage.data_md5": lineage.get("data_md5", ""),
        "lineage.base_sha256": lineage.get("base_sha256", ""),
        "lineage.params_hash": params_hash({k: params.get(k) for k in BUILD_PARAMS}),
        "lineage.git_rev": git_rev(),
        "lineage.dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        **{f"run_id.{stage}": run_id for stage, run_id in ids.items()},
    }
    for key, value in (candidate.metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"eval.{key}"] = value
    return {k: str(v) for k, v in tags.items()}


def version_description(candidate: Candidate, ids: dict[str, str]) -> str:
    manifest = candidate.manifest
    runs = ", ".join(f"{stage} run {run_id}" for stage, run_id in ids.items() if run_id)
    return (f"ftq build {candidate.name} ({manifest['method']}, {json.dumps(manifest['options'], sort_keys=True)}), "
            f"{manifest['size_bytes']:,} bytes. Made by: {runs or 'runs not found in this tracking store'}.")


def existing_version(client, model_name: str, digest: str) -> str | None:
    """The first version holding the build with this digest, or None."""
    found = [int(v.version) for v in client.search_model_versions(f"name = '{model_name}'")
             if v.tags.get(ARTIFACT_TAG) == digest]
    return str(min(found)) if found else None


def register(client, model_name: str, candidate: Candidate, root: Path, params: dict, exp_id: str) -> tuple[str, bool]:
    """The version holding this build, and whether it was created now; if no version has its bytes yet,
    the build is logged into the artifact store (or an earlier upload of it reused: ftq.registry.upload),
    read back and verified, and a version is created from that logged copy, all under the registry lock."""
    from ftq.registry.lock import registry_lock
    from ftq.registry.upload import upload_build

    manifest, name = candidate.manifest, candidate.name
    digest = build_digest(manifest)
    version = existing_version(client, model_name, digest)
    if version is not None:
        return version, False
    ids = run_ids(client, params, name)
    with registry_lock(client, model_name):
        version = existing_version(client, model_name, digest)  # another promote registered these bytes meanwhile
        if version is not None:
            return version, False
        logged = upload_build(client, model_name, exp_id, name, root / "models" / "quantized" / name, manifest,
                              ids["quantize"], root / ".ftq")
        tags = {**version_tags(candidate, params, ids), MODEL_TAG: logged.sha256, FILES_TAG: files_tag(logged.files)}
        created = client.create_model_version(model_name, logged.source, run_id=ids["quantize"] or None,
                                              model_id=logged.model_id, tags=tags,
                                              description=version_description(candidate, ids))
        link_version(client, logged.model_id, model_name, str(created.version))
    link_metrics(client, logged.model_id, ids["evaluate"], candidate.metrics or {})
    return str(created.version), True


def link_version(client, model_id: str, model_name: str, version: str) -> None:
    """The logged model's `mlflow.modelVersions` tag, as `mlflow.register_model` sets it (a tracking
    server sets it on its own; a sqlite store does not), so its page links to the version."""
    entry = {"name": model_name, "version": version}
    try:
        listed = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        if entry not in listed:
            client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(listed + [entry])})
    except Exception as exc:  # a convenience link: never fail a promotion for it
        log.warning("could not link logged model %s to %s version %s: %s", model_id, model_name, version, exc)


def link_metrics(client, model_id: str, evaluate_run_id: str, metrics: dict) -> None:
    """The build's evaluation metrics, linked to its logged model (shown with the model in MLflow 3),
    logged through the evaluate run that measured them."""
    from mlflow.entities import Metric

    if not evaluate_run_id:
        return
    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, 0, model_id=model_id) for key, value in metrics.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)]
    try:
        for start in range(0, len(items), 1000):
            client.log_batch(evaluate_run_id, metrics=items[start:start + 1000], synchronous=True)
    except Exception as exc:  # the version is registered; the link is a convenience
        log.warning("could not link metrics to logged model %s: %s", model_id, exc)
