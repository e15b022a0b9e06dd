"""Promotion, one job per module; stage `promote` (ftq.stages.promote) composes them.

- `policy`: pure (no MLflow, no files): which build may be champion and which one is. Dataclasses for a
  candidate and its verdict, a contender (a candidate with its registered version), the incumbent (the
  current champion scored on this run's examples), the ranking and the decision; `judge`, `rank`, `decide`.
  Its statistics come from ftq.evidence; stage `ladder` applies its walk order and tests (fixed-sequence).
- `candidates`: reads each build's manifest, evaluation and per-example scores into a `Candidate`.
- `reevaluation`: the current champion on this run's examples; when it is not one of this run's builds,
  its registered artifact is downloaded and answers the current examples again (I/O: a model runs).
- `report`: the decision as reports/promotion.json (pure: dataclasses in, a dict out).

Registry writes live in ftq.registry: `versions` (a version per distinct build, its tags and links) and
`aliases` (the champion read and moved by compare-and-set under the registry lock).
"""
