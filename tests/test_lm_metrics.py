"""Causal-LM task metrics: verify's perplexity and top-1 agreement against an independent numpy
computation on a tiny language model, which models count as causal LMs, and the perplexity
budget (`--max-loss ppl<=+X%`)."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.calib_data import model_input_specs, open_dataset
from qcompile.model_io import load_model
from qcompile.verify import verify_models

VOCAB, DIM, SEQ = 11, 6, 7


def tiny_lm(seed: int, noise: float = 0.0) -> onnx.ModelProto:
    """input_ids [b, s] -> Gather(E) -> MatMul(W) -> logits [b, s, V] (attention_mask read by an
    Identity so it is a real input)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    w = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    if noise:
        w = w + noise * np.random.default_rng(99).standard_normal(w.shape).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["logits"], name="/lm_head/MatMul"),
             helper.make_node("Identity", ["attention_mask"], ["mask_copy"])]
    graph = helper.make_graph(
        nodes, "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB]),
         helper.make_tensor_value_info("mask_copy", TensorProto.INT64, ["batch", "sequence"])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def numpy_logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return inits["E"][ids] @ inits["W"]


def reference(ref_logits, got_logits, ids, mask):
    """Perplexities and agreement position by position, plainly."""
    nll_ref = nll_got = 0.0
    agree = count = 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not (mask[b, t] and mask[b, t + 1]):
                continue
            target = ids[b, t + 1]
            for logits, which in ((ref_logits, "ref"), (got_logits, "got")):
                row = logits[b, t]
                nll = math.log(sum(math.exp(v) for v in row)) - row[target]
                if which == "ref":
                    nll_ref += nll
                else:
                    nll_got += nll
            agree += int(np.argmax(ref_logits[b, t]) == np.argmax(got_logits[b, t]))
            count += 1
    return math.exp(nll_ref / count), math.exp(nll_got / count), agree / count, count


def test_perplexity_and_agreement_match_numpy(tmp_path):
    original, compiled = tiny_lm(0), tiny_lm(0, noise=0.4)
    onnx.save(original, tmp_path / "a.onnx")
    onnx.save(compiled, tmp_path / "b.onnx")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (9, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 4:] = 0          # a right-padded row
    mask[5, 1:] = 0          # one token only: nothing to predict
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    data = open_dataset(tmp_path / "d.npz", model_input_specs(load_model(tmp_path / "a.onnx")))
    result = verify_models(tmp_path / "a.onnx", tmp_path / "b.onnx", data, progress=False)
    task = result["task"]
    ppl_ref, ppl_got, agree, count = reference(numpy_logits(original, ids), numpy_logits(compiled, ids), ids, mask)
    assert task["tokens"] == count == 9 * (SEQ - 1) - 3 - 6
    assert task["perplexity_original"] == pytest.approx(ppl_ref, rel=1e-4)
    assert task["perplexity_compiled"] == pytest.approx(ppl_got, rel=1e-4)
    assert task["perplexity_delta_pct"] == pytest.approx(100 * (ppl_got / ppl_ref - 1), abs=2e-3)
    assert task["top1_agreement"] == pytest.approx(agree, abs=1e-4)
    assert 0 < agree < 1 and ppl_got != pytest.approx(ppl_ref)


def test_a_model_without_logits_gets_no_task_metrics(tmp_path):
    from conftest import TinyModels
    path, npz = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    data = open_dataset(npz, model_input_specs(load_model(path)))
    assert "task" not in verify_models(path, path, data, progress=False)


@pytest.mark.parametrize("text,metric,op,threshold", [("ppl<=+1%", "ppl", "<=", 1.0), ("ppl<=2.5", "ppl", "<=", 2.5),
                                                      ("top1>=0.9", "top1", ">=", 0.9),
                                                      ("cosine>=0.99", "cosine", ">=", 0.99)])
def test_budget_metrics_parse(text, metric, op, threshold):
    from qcompile.budget import parse_budget
    b = parse_budget(text)
    assert (b.metric, b.spec.op, b.threshold) == (metric, op, threshold)
    assert b.met(threshold) and (b.met(threshold - 0.5) if op == "<=" else b.met(threshold + 0.005))


@pytest.mark.parametrize("text,message", [("ppl>=1%", "ppl takes <="), ("ppl<=-1%", ">= 0 %"),
                                          ("top1>=1.5", "in [0, 1]"), ("cosine>=0.9%", "not a percentage")])
def test_bad_budget_metrics_are_usage_errors(text, message):
    from qcompile.budget import parse_budget
    from qcompile.errors import UsageError
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_budget(text)


def test_perplexity_budget_on_a_model_that_is_not_a_causal_lm_is_refused_before_any_work(run_cli, tmp_path):
    from conftest import TinyModels
    path, npz = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    out = tmp_path / "out"
    res = run_cli([path, "--recipe", "w8a8", "--calib", npz, "--max-loss", "ppl<=+1%", "-o", out])
    assert res.code == 2 and "causal-LM metric" in res.err and "input_ids" in res.err
    assert not out.exists()


def test_perplexity_budget_search_on_a_tiny_lm(run_cli, tmp_path):
    """The budget reads the task metric: a ppl budget the recipe as written misses makes it keep
    layers float until it holds (here the one layer there is), and the report says so."""
    model = tiny_lm(0)
    onnx.save(model, tmp_path / "lm.onnx")
    ids = np.zeros((16, SEQ), np.int64)          # text the float model predicts well: its own greedy chains
    ids[:, 0] = np.arange(16) % VOCAB
    for t in range(1, SEQ):
        ids[:, t] = numpy_logits(model, ids[:, t - 1:t])[:, 0].argmax(-1)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("apiversion: qcompile/v1\nmetadata: {name: w4, description: t}\nspec:\n  passes:\n"
                      "    - type: quantize\n      weight: {dtype: int4, granularity: per_channel}\n"
                      "      activation: null\n")
    res = run_cli([tmp_path / "lm.onnx", "--recipe", recipe, "--calib", tmp_path / "d.npz",
                   "--max-loss", "ppl<=+0.01%", "-o", out])
    assert res.code == 0, res.err
    import json
    budget = json.loads((out / "report.json").read_text())["budget"]
    assert budget["metric"] == "ppl" and budget["op"] == "<="
    first, last = budget["trials"][0], budget["trials"][budget["best_trial"]]
    assert first["metric"] > 0.01 and budget["met"] and last["metric"] <= 0.01
    assert "/lm_head/MatMul" in last["excluded"]
