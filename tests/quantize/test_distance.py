"""The quantize check's measure: KL divergence from merged's distribution and top-1 agreement, and the
gate at its default limits on the real SmolLM2 (a tiny random model's near-flat distributions cannot
show what a bad quant does)."""

import json
import shutil

import numpy as np
import pytest

from conftest import load_params, make_project, set_params
from ftq.quantize import distance
from ftq.quantize.calibration import Sequences
from ftq.stages import base, prepare, quantize, reference


class Logits:
    """A runtime stand-in that returns fixed logit rows: these tests are about the arithmetic."""

    kind = "fixed"

    def __init__(self, rows: dict[int, np.ndarray]):
        self.rows = rows

    def logits(self, ids):
        return self.rows[len(ids)]


def full_kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = distance.log_softmax(p_logits), distance.log_softmax(q_logits)
    return (np.exp(p) * (p - q)).sum(axis=1)


@pytest.mark.parametrize("top_k", [1, 16, 256])
def test_top_k_divergence_is_a_tight_lower_bound_of_the_full_one(top_k):
    rng = np.random.default_rng(0)
    vocab, n = 2000, 40
    merged = rng.normal(size=(n, vocab)) * 4 + np.eye(n, vocab) * 12  # peaked, like a trained model's answers
    build = merged + rng.normal(size=(n, vocab)) * 0.5
    sequences = Sequences("eval", [list(range(1, n + 1))], [[True] * n])
    ref = distance.compute(Logits({n: merged}), sequences, top_k, {})
    measured = distance.divergence(Logits({n: build}), ref)
    exact = full_kld(merged[:-1], build[:-1])
    assert measured["positions"] == n - 1
    assert measured["kld_mean"] <= exact.mean() + 1e-9
    if top_k == 256:  # the default keeps all but a sliver of the mass (0.3 % here): within 1 % of the full KL
        assert ref.meta["tail_mass_mean"] < 0.01
        assert measured["kld_mean"] == pytest.approx(exact.mean(), rel=0.01)
    same = (build[:-1].argmax(1) == merged[:-1].argmax(1)).mean()
    assert measured["top1_agreement"] == pytest.approx(same)


def test_identical_distributions_have_zero_divergence():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(12, 500)) * 4
    sequences = Sequences("eval", [list(range(12))], [[False] * 6 + [True] * 6])
    ref = distance.compute(Logits({12: logits}), sequences, 64, {})
    measured = distance.divergence(Logits({12: logits}), ref)
    assert ref.positions == 6 and measured["kld_max"] < 1e-9 and measured["top1_agreement"] == 1.0
    assert measured["perplexity_ratio"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real 135M SmolLM2 as the "merged" model, with the reference distribution computed once."""
    import os

    project = make_project(tmp_path_factory.mktemp("kld") / "project", "embedded")
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))] + ["FTQ_PARENT_RUN_ID"]:
            patch.delenv(key, raising=False)
        patch.chdir(project)
        set_params(project, base={"source": "embedded"}, quantize={"reference": {"examples": 24, "max_length": 256}})
        params = load_params(project)
        base.run(params)
        prepare.run(params)
        shutil.copytree(project / "models" / "base", project / "models" / "merged")
        reference.run(params)
        yield project


def build(project, name, **options):
    params = load_params(project)
    params["quantize"]["builds"][name] = {"method": "gguf", **options}
    return quantize.run(params, name)


def test_reference_covers_a_seeded_sample_of_every_kind(smollm2):
    meta = json.loads((smollm2 / "models" / "reference" / "reference.json").read_text())
    stored = json.loads((smollm2 / "models" / "reference" / "sequences.json").read_text())
    assert meta["sequences"]["samples"] == 24 and meta["positions"] > 200 and meta["tail_mass_mean"] < 0.05
    # the held-out file lists 40 extraction prompts, then 8 identity questions: the first 24 rows hold one kind
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2 / "models" / "base")
    texts = [tokenizer.decode(ids) for ids in stored["ids"]]
    assert any("Extract the order" in t for t in texts) and any("Extract the order" not in t for t in texts)


def test_q8_0_passes_and_a_damaged_build_is_rejected_at_the_default_limits(smollm2):
    good = build(smollm2, "q8_0", type="q8_0").manifest["check"]
    assert good["passed"] and good["kld_mean"] < 0.02 and good["top1_agreement"] > 0.95
    failed = build(smollm2, "q2_k_pure", type="q2_k", pure=True, imatrix=False).manifest["check"]
    assert not failed["passed"] and any("quantize.check.max_kld_mean" in f for f in failed["failures"])
    assert not (smollm2 / "models" / "quantized" / "q2_k_pure" / "model.gguf").exists()
    report = json.loads((smollm2 / "reports" / "quantize" / "q8_0.json").read_text())
    assert report["kld_mean"] == round(good["kld_mean"], 6) and report["top1_agreement"] > 0.95
    assert report["kld_p99"] >= report["kld_median"] and report["positions"] == good["positions"]


def test_top_k_indices_are_a_stable_descending_argsort_ties_included():
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=(64, 2000)), 1)  # one decimal: many ties, some across the k-th value
    for k in (1, 7, 256, 2000):
        assert np.array_equal(distance.top_k_indices(values, k), np.argsort(-values, axis=-1, kind="stable")[:, :k])
