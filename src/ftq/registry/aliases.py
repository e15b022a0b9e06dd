"""The champion alias: read, decided on and moved by compare-and-set under the registry lock
(ftq.registry.lock), so that concurrent promotes (experiments finishing together) each decide against
the champion the other left; `challenger` marks the runner-up."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
# seconds to wait between reading the champion and moving it: widens the read-decide-write window so
# that a test can make two promotes overlap (see tests/registry/test_registry.py); 0 in normal use
DECIDE_DELAY_ENV = "FTQ_PROMOTE_DECIDE_DELAY"
CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class Registered:
    """A registered model version as an alias points to it."""
    version: str
    tags: dict[str, str] = field(default_factory=dict)


class AliasMoves(Protocol):
    moves_to: str | None      # the version `champion` moves to; None: it stays
    challenger: str | None


M = TypeVar("M", bound=AliasMoves)


def champion_of(client, model_name: str) -> Registered | None:
    """The version the champion alias points to; None where there is no champion yet."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except Exception:  # no alias yet
        return None
    return Registered(str(version.version), dict(version.tags))


def move_champion(client, model_name: str, decide: Callable[[Registered | None], M]) -> M:
    """Read the champion, decide against it, move it by compare-and-set, all under the registry lock; a
    champion moved by someone else since it was read (a conflict) means reading and deciding again."""
    from ftq.registry.lock import compare_and_set_alias, registry_lock

    with registry_lock(client, model_name):
        for _ in range(CAS_ATTEMPTS):
            champion = champion_of(client, model_name)
            decision = decide(champion)
            delay = float(os.environ.get(DECIDE_DELAY_ENV) or 0)
            if delay > 0:
                time.sleep(delay)
            expected = champion.version if champion else None
            if decision.moves_to is None or compare_and_set_alias(client, model_name, CHAMPION, expected,
                                                                  decision.moves_to):
                break
            log.info("champion moved while deciding (conflict); reading it again")
        else:
            raise RuntimeError(f"{model_name}: the champion alias kept moving; {CAS_ATTEMPTS} attempts failed")
        if decision.challenger is not None:
            client.set_registered_model_alias(model_name, CHALLENGER, decision.challenger)
    return decision
