"""ONNX export of a model fine-tuned with slimfit_fx, run with onnxruntime.

slimfit's graphs serve training only; the model to export is the plain one,
`cm.slimfit.model` (the module passed to compile), which holds the trained weights.
"""
from __future__ import annotations

import copy

import pytest
import torch

import slimfit_fx

from . import models

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates with it
ort = pytest.importorskip("onnxruntime")

# onnxruntime's fused fp32 kernels (LayerNormalization, Gelu, MatMul) sum in another
# order than eager's: ~1e-7 on these O(1) logits (measured 6e-8). 1e-5 leaves room
# for that; exporting the weights from before training is off by > 1e-2.
TOLERANCE = 1e-5


def _fine_tuned():
    """BERT after 3 steps with slimfit (paper compression, so its custom ops were in
    the training graphs), plus a copy of the weights before training."""
    case = models.bert(batch=4)
    initial = copy.deepcopy(case.model).eval()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager", compression="paper")
    cm.slimfit.set_frozen(cm.slimfit.layers[:4])
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    for _ in range(3):
        cm(**case.batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert cm.slimfit.report().pass_counters.get("tensors_compressed", 0) > 0
    return cm, case, initial


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.filterwarnings("ignore:# The axis name")  # both inputs share batch and seq
def test_exported_fine_tuned_model_matches_eager_in_onnxruntime(tmp_path):
    cm, case, initial = _fine_tuned()
    model = cm.slimfit.model.eval()
    assert model is case.model
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=128)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (), str(path), kwargs=_inputs(case.batch), dynamo=True,
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    domains = {o.domain for o in graph.opset_import} | {n.domain for n in graph.graph.node} \
        | {f.domain for f in graph.functions}
    assert not [d for d in domains if "slimfit" in d], domains
    assert not [n.op_type for n in graph.graph.node if "quantize" in n.op_type.lower()]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = models.bert(seed=7, batch=3, seq=9).batch  # another batch and sequence length
    for inputs in (_inputs(case.batch), _inputs(other)):
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            expected = model(**inputs).logits
            before_training = initial(**inputs).logits
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=TOLERANCE, atol=TOLERANCE)
        assert (expected - before_training).abs().max() > 1e-2  # the trained weights went out

    # Exporting does not disturb training: the next step runs the graph already captured.
    model.train()
    cm(**case.batch).loss.backward()
    assert cm.slimfit.stats["graphs_captured"] == 1
    assert all(p.grad is None for n, p in cm.named_parameters() if n in cm.slimfit.frozen)


@pytest.mark.parametrize("export", [
    pytest.param(lambda m, i: torch.onnx.export(m, (), kwargs=i, dynamo=True), id="onnx-dynamo"),
    pytest.param(lambda m, i: torch.export.export(m, (), kwargs=i), id="torch.export"),
])
def test_exporting_the_slimfit_module_names_the_model_to_export(export):
    case = models.bert()
    cm = slimfit_fx.compile(case.model, schedule="manual", backend="aot_eager")
    with pytest.raises(Exception, match=r"cm\.slimfit\.model"):
        export(cm.eval(), _inputs(case.batch))
