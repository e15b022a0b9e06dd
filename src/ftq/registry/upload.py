"""A build into MLflow's artifact store, leaving nothing behind that no version can use.

`upload_build` runs under the registry lock (ftq.registry.lock), so at most one upload per registered
model is in flight and whatever it finds half-done was left by a dead process:

- a READY logged model of the same build (its sha256 in tag `ftq.artifact_sha256`) that no version
  references yet (a promote that died between upload and version creation) is reused, after its
  stored bytes are read back and verified; a retry never uploads another copy;
- a PENDING or FAILED one (an upload killed or failed midway) is deleted with its files;
- a new upload is read back from the store (the store's own files for a local store, a download
  otherwise) and every file's sha256 compared with what was staged before the logged model becomes
  READY: a truncated or corrupt copy is refused (`UploadVerificationError`), and deleted along with
  any partial files a failed upload left.

A READY logged model carries `ftq.files` and `ftq.model_sha256`, as the version will: what was verified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from ftq.params import flatten
from ftq.registry import ARTIFACT_TAG, FILES_TAG, MODEL_TAG, build_digest, differences, digest, file_hashes, files_tag
from ftq.registry.package import LoggedBuild, stage
from ftq.registry.resolve import VerificationError

log = logging.getLogger(__name__)

REGISTERED_TAG = "ftq.registered_model"  # the registered model an upload was made for (reuse and gc)
# MLflow's own loader writes this into a local store's folder (see resolve.verify): bookkeeping, not the build
MLFLOW_BOOKKEEPING = ("registered_model_meta",)


class UploadVerificationError(VerificationError):
    """The artifact store does not hold the bytes that were uploaded."""


def upload_build(client, model_name: str, experiment_id: str, name: str, build_dir: Path, manifest: dict,
                 source_run_id: str | None, scratch: Path, *,
                 after_upload: Callable[[str], None] | None = None) -> LoggedBuild:
    """The verified logged copy of the build: an earlier one reused, or a new upload. Hold the registry
    lock. `after_upload(model_id)` runs between the upload and its read-back (fault injection in tests)."""
    reused = reuse(client, model_name, experiment_id, build_digest(manifest), scratch)
    if reused is not None:
        log.info("%s: reusing logged model %s, uploaded earlier by a promote that did not register it", name,
                 reused.model_id)
        return reused
    return upload(client, model_name, experiment_id, name, build_dir, manifest, source_run_id, scratch,
                  after_upload)


def uploads_of(client, experiment_id: str, model_name: str, build_sha256: str) -> list:
    """Logged models uploaded for `model_name` with the build's sha256, oldest first (deleted ones excluded)."""
    found, token = [], None
    query = f"tags.`{ARTIFACT_TAG}` = '{build_sha256}' AND tags.`{REGISTERED_TAG}` = '{model_name}'"
    while True:
        page = client.search_logged_models([experiment_id], filter_string=query, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda m: m.creation_timestamp)


def reuse(client, model_name: str, experiment_id: str, build_sha256: str, scratch: Path) -> LoggedBuild | None:
    from mlflow.entities import LoggedModelStatus

    for logged in uploads_of(client, experiment_id, model_name, build_sha256):
        if logged.status != LoggedModelStatus.READY or FILES_TAG not in logged.tags:
            sweep(client, logged.model_id, f"an upload of this build that never finished ({logged.status}: its "
                                           "process died or failed)")
            continue
        files = json.loads(logged.tags[FILES_TAG])
        try:
            verify_stored(client, logged.model_id, files, scratch)
        except UploadVerificationError as exc:
            sweep(client, logged.model_id, f"not reused: {exc}")
            continue
        return LoggedBuild(logged.model_id, f"models:/{logged.model_id}", files)
    return None


def sweep(client, model_id: str, why: str) -> None:
    """Delete an abandoned upload; one that cannot be deleted now is left to `ftq registry gc`."""
    log.warning("deleting logged model %s: %s", model_id, why)
    try:
        discard(client, model_id)
    except Exception as exc:  # never fail a promote over a leftover: a fresh upload follows
        log.warning("could not delete logged model %s (`ftq registry gc --delete` retries): %s", model_id, exc)


def upload(client, model_name: str, experiment_id: str, name: str, build_dir: Path, manifest: dict,
           source_run_id: str | None, scratch: Path, after_upload: Callable[[str], None] | None) -> LoggedBuild:
    """A new logged model: staged, uploaded, read back and verified, then READY; deleted with its files
    on any failure (a full disk, a dropped connection, a mismatch)."""
    from mlflow.entities import LoggedModelStatus

    fmt = manifest.get("format", manifest["method"])
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=source_run_id or None, model_type=f"ftq-{fmt}",
        params={k: str(v) for k, v in flatten(manifest.get("options") or {}, "options.").items()},
        tags={ARTIFACT_TAG: build_digest(manifest), REGISTERED_TAG: model_name, "ftq.build": name, "format": fmt})
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f"{name}.tmp-registry-", dir=scratch) as tmp:
            files = stage(build_dir, Path(tmp), manifest, logged.model_id)
            client.log_model_artifacts(logged.model_id, tmp)
        if after_upload is not None:
            after_upload(logged.model_id)
        verify_stored(client, logged.model_id, files, scratch)
        client.set_logged_model_tags(logged.model_id, {FILES_TAG: files_tag(files), MODEL_TAG: digest(files)})
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be what failed; the next upload sweeps it then
            discard(client, logged.model_id)
        raise
    return LoggedBuild(logged.model_id, f"models:/{logged.model_id}", files)


def artifact_repository(client, model_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    location = client.get_logged_model(model_id).artifact_location
    return get_artifact_repository(location, tracking_uri=client.tracking_uri)


def stored_files(client, model_id: str, scratch: Path) -> dict[str, str]:
    """Every file the artifact store holds for the logged model -> its sha256, read from the store: in
    place for a local store (no second copy of a large build), downloaded into `scratch` otherwise."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = artifact_repository(client, model_id)
    if isinstance(repo, LocalArtifactRepository):
        return file_hashes(Path(repo.artifact_dir), skip=MLFLOW_BOOKKEEPING)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{model_id}.tmp-readback-", dir=scratch) as tmp:
        return file_hashes(Path(repo.download_artifacts("", dst_path=tmp)), skip=MLFLOW_BOOKKEEPING)


def verify_stored(client, model_id: str, files: dict[str, str], scratch: Path) -> None:
    problems = differences(stored_files(client, model_id, scratch), files, "the upload")
    if problems:
        raise UploadVerificationError(
            f"logged model {model_id}: the artifact store does not hold the uploaded bytes: {'; '.join(problems)}. "
            "No version was created from it and it was deleted; run `ftq promote` again (check the store's disk "
            "space or connection first)")


def discard(client, model_id: str) -> None:
    """The logged model's files, then its record (a record without files would look like a corrupt copy)."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = artifact_repository(client, model_id)
    repo.delete_artifacts()
    if isinstance(repo, LocalArtifactRepository):  # MLflow leaves the emptied models/<id>/ folder behind
        with contextlib.suppress(OSError):
            Path(repo.artifact_dir).parent.rmdir()
    client.delete_logged_model(model_id)
