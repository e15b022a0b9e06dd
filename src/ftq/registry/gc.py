"""`ftq registry gc`: the registry's versions and logged models that nothing needs, and (with
`--delete`) their removal; without it the artifact store only grows, one full copy per build promoted.

Kept: every version an alias points at (champion, challenger, any other), and the newest `keep`
versions of each build (tag `ftq.build`), so a rollback target stays at hand. Everything else of the
registered model goes: its other versions, and the logged models (with their files in the artifact
store) that only those versions, or no version at all, reference: uploads a promote never registered.
A logged model a version of another registered model references is never touched.

`plan` decides from plain records (milliseconds to test); `collect` reads them from the registry and
`apply` deletes, both under the registry lock, so no promote uploads or moves an alias meanwhile.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

KEEP = 3


@dataclass(frozen=True)
class Version:
    version: str
    build: str
    aliases: tuple[str, ...] = ()
    model_id: str | None = None   # its logged model (None: not created from one)


@dataclass(frozen=True)
class Upload:
    model_id: str
    build: str
    status: str


@dataclass
class Plan:
    kept: dict[str, str] = field(default_factory=dict)             # version -> why it stays
    versions: dict[str, str] = field(default_factory=dict)         # version -> why it goes
    logged_models: dict[str, str] = field(default_factory=dict)    # model id -> why it goes


def plan(versions: list[Version], uploads: list[Upload], keep: int, elsewhere: frozenset[str] = frozenset()) -> Plan:
    """What gc deletes: versions no alias points at beyond the newest `keep` of their build, and the logged
    models no kept version (nor, `elsewhere`, another registered model's version) references."""
    result = Plan()
    for v in versions:
        if v.aliases:
            result.kept[v.version] = f"alias {', '.join(sorted(v.aliases))}"
    by_build: dict[str, list[Version]] = defaultdict(list)
    for v in versions:
        by_build[v.build].append(v)
    for build, listed in by_build.items():
        for v in sorted(listed, key=lambda v: int(v.version), reverse=True)[:keep]:
            result.kept.setdefault(v.version, f"one of the newest {keep} of build {build}")
    for v in versions:
        if v.version not in result.kept:
            result.versions[v.version] = f"build {v.build}: no alias, not among its newest {keep}"
    needed = {v.model_id for v in versions if v.version in result.kept} | set(elsewhere)
    for v in versions:
        if v.version in result.versions and v.model_id and v.model_id not in needed:
            result.logged_models[v.model_id] = f"only version {v.version} used it (deleted)"
    referenced = {v.model_id for v in versions}
    for u in uploads:
        if u.model_id not in referenced and u.model_id not in needed:
            result.logged_models[u.model_id] = f"build {u.build}: no version references it ({u.status} upload)"
    return result


def model_id_of(version) -> str | None:
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def pages(search, **kwargs) -> list:
    found, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def collect(client, model_name: str) -> tuple[list[Version], list[Upload], frozenset[str]]:
    """The registered model's versions, the uploads made for it (every experiment), and the logged models
    that versions of other registered models reference."""
    from ftq.registry.upload import REGISTERED_TAG

    every = pages(client.search_model_versions, filter_string=None)
    # from the registered model: a searched version does not carry its aliases
    aliases: dict[str, list[str]] = defaultdict(list)
    for alias, version in client.get_registered_model(model_name).aliases.items():
        aliases[str(version)].append(alias)
    versions = [Version(str(v.version), v.tags.get("ftq.build", "?"), tuple(aliases[str(v.version)]), model_id_of(v))
                for v in every if v.name == model_name]
    elsewhere = frozenset(model_id_of(v) for v in every if v.name != model_name and model_id_of(v))
    experiments = [e.experiment_id for e in pages(client.search_experiments)]
    uploads = [Upload(m.model_id, m.tags.get("ftq.build", "?"), str(m.status))
               for start in range(0, len(experiments), 100)
               for m in pages(client.search_logged_models, experiment_ids=experiments[start:start + 100],
                              filter_string=f"tags.`{REGISTERED_TAG}` = '{model_name}'")]
    return versions, uploads, elsewhere


def apply(client, model_name: str, decided: Plan) -> None:
    """Versions first, then the logged models with their files (a version never points at a deleted model)."""
    from ftq.registry.upload import discard

    for version in sorted(decided.versions, key=int):
        client.delete_model_version(model_name, version)
    for model_id in sorted(decided.logged_models):
        try:
            discard(client, model_id)
        except Exception as exc:
            raise RuntimeError(f"registry gc: deleting logged model {model_id} (and its files in the artifact store) "
                               f"failed: {exc}; run `ftq registry gc --delete` again") from exc


def gc(client, model_name: str, keep: int = KEEP, delete: bool = False) -> Plan:
    from ftq.errors import UsageError
    from ftq.registry.lock import registry_lock

    if keep < 1:
        raise UsageError(f"--keep {keep}: keep at least 1 version per build")
    if not client.search_registered_models(f"name = '{model_name}'"):
        raise UsageError(f"registry gc: no registered model {model_name} in {client.tracking_uri} (--model-name, or "
                         "promote.model_name in params.yaml)")
    with registry_lock(client, model_name):
        versions, uploads, elsewhere = collect(client, model_name)
        decided = plan(versions, uploads, keep, elsewhere)
        if delete:
            apply(client, model_name, decided)
    return decided
