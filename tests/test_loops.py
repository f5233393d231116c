"""Training-loop features match eager PyTorch with the same parameters frozen:
buffers a forward mutates (BatchNorm running statistics), several backward calls
through one graph, partial backward, parameter hooks, gradient accumulation, and
layer weights that meet activations through cat and add (learned tokens)."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import slimfit_fx
from slimfit_fx.memory import eager_frozen

from . import models
from .harness import TOLERANCE, assert_matches_eager


def _compiled(case, backend="aot_eager"):
    return slimfit_fx.compile(case.model, schedule="manual", backend=backend, compression="off")


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE, msg=what)


def _assert_grads_match(cm_model, reference, frozen):
    for (name, p), q in zip(cm_model.named_parameters(), reference.parameters()):
        if name in frozen:
            assert p.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert p.grad is not None, f"{name} trains but got no gradient"
            _close(p.grad, q.grad, name)


# -- buffers a forward mutates ------------------------------------------------------------

def _running_stats_runs(backend):
    """Three SGD steps with the norms' weights training, three with them frozen;
    the buffers after each phase, compiled and eager; then eval outputs."""
    case = models.running_stats()
    reference = copy.deepcopy(case.model)
    cm = _compiled(case, backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (case.model, reference)]
    norms = frozenset({"features.1.weight", "features.4.weight"})
    assert norms <= set(cm.slimfit.layers)
    for frozen in (frozenset(), norms):
        cm.slimfit.set_frozen(frozen)
        for _ in range(3):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            case.loss(cm(**case.batch)).backward()
            with eager_frozen(reference, frozen):
                case.loss(reference(**case.batch)).backward()
            for opt in optimizers:
                opt.step()
        yield frozen, dict(case.model.named_buffers()), dict(reference.named_buffers())
    case.model.eval(), reference.eval()
    with torch.no_grad():
        _close(cm(**case.batch), reference(**case.batch), "eval output")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_running_statistics_update_once_per_step(backend):
    """A trainable norm's weight gradient runs batch_norm again outside the
    region; it must not move the running statistics a second time."""
    for frozen, got, want in _running_stats_runs(backend):
        assert got.keys() == want.keys() and len(want) == 6
        for name in want:
            _close(got[name], want[name], f"{name} (frozen: {sorted(frozen)})")


# -- several backward calls, partial backward ---------------------------------------------

FROZEN_SOME = {"mlp": {"net.3.weight"},
               "bert": {"bert.encoder.layer.0.attention.self.query.weight",
                        "bert.encoder.layer.1.intermediate.dense.weight"}}


def _backward_twice(model, case):
    model.zero_grad(set_to_none=True)
    loss = case.loss(model(**case.batch))
    loss.backward(retain_graph=True)
    loss.backward()


@pytest.mark.parametrize("backend,name", [("aot_eager", "mlp"), ("aot_eager", "bert"), ("inductor", "mlp")])
def test_backward_twice_with_retain_graph_accumulates_like_eager(backend, name):
    case = getattr(models, name)()
    reference = copy.deepcopy(case.model)
    cm = _compiled(case, backend)
    frozen = frozenset(FROZEN_SOME[name])
    cm.slimfit.set_frozen(frozen)
    _backward_twice(cm, case)
    with eager_frozen(reference, frozen):
        _backward_twice(reference, case)
    _assert_grads_match(case.model, reference, frozen)
    # and the graph is freed after a backward without retain_graph, as in eager
    loss = case.loss(cm(**case.batch))
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


PARTIAL = ["bert.encoder.layer.0.attention.self.key.weight", "bert.encoder.layer.1.output.dense.weight",
           "bert.encoder.layer.1.output.dense.bias", "classifier.weight"]


def _partial_and_full(model, case, frozen):
    """.grad after backward(inputs=PARTIAL) and then backward(inputs=PARTIAL[:2])
    through one graph; then torch.autograd.grad of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    loss = case.loss(model(**case.batch))
    loss.backward(inputs=[params[n] for n in PARTIAL], retain_graph=True)
    loss.backward(inputs=[params[n] for n in PARTIAL[:2]])
    partial = {n: (None if p.grad is None else p.grad.clone()) for n, p in params.items()}
    trainable = [n for n in params if n not in frozen]
    loss = case.loss(model(**case.batch))
    return partial, dict(zip(trainable, torch.autograd.grad(loss, [params[n] for n in trainable])))


def test_partial_backward_and_autograd_grad_match_eager():
    case = models.bert()
    reference = copy.deepcopy(case.model)
    cm = _compiled(case)
    frozen = frozenset(FROZEN_SOME["bert"])
    cm.slimfit.set_frozen(frozen)
    partial, grads = _partial_and_full(cm, case, frozen)
    with eager_frozen(reference, frozen):
        ref_partial, ref_grads = _partial_and_full(reference, case, frozen)
    for name, want in ref_partial.items():
        if want is None:
            assert partial[name] is None, f"{name} was not asked for but got a gradient"
        else:
            _close(partial[name], want, name)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        _close(grads[name], want, name)


# -- parameter hooks -----------------------------------------------------------------------

def _hook_counts(model, case, frozen, trainable_only):
    """Each parameter's tensor-hook and post-accumulate-hook calls over two backward
    passes, with the gradients the tensor hooks saw."""
    counts, post, seen = Counter(), Counter(), {}
    handles = []
    for name, p in model.named_parameters():
        if trainable_only and name in frozen:
            continue

        def hook(grad, name=name):
            counts[name] += 1
            seen[name] = grad.clone()

        def post_hook(param, name=name):
            post[name] += 1

        handles += [p.register_hook(hook), p.register_post_accumulate_grad_hook(post_hook)]
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        case.loss(model(**case.batch)).backward()
    for handle in handles:
        handle.remove()
    return counts, post, seen


@pytest.mark.parametrize("name", ["gpt2", "convnet"])
def test_parameter_hooks_fire_once_per_trained_parameter_per_backward(name):
    """GPT-2 ties its embedding to its LM head: one parameter, two uses, one call."""
    case = getattr(models, name)()
    reference = copy.deepcopy(case.model)
    cm = _compiled(case)
    layers = cm.slimfit.layers
    frozen = frozenset(layers[1::2])
    cm.slimfit.set_frozen(frozen)
    counts, post, seen = _hook_counts(cm, case, frozen, trainable_only=False)
    with eager_frozen(reference, frozen):
        ref_counts, ref_post, ref_seen = _hook_counts(reference, case, frozen, trainable_only=True)
    assert set(ref_counts.values()) == {2}
    assert counts == ref_counts and post == ref_post
    assert not frozen & set(counts) and not frozen & set(post)
    for name in ref_seen:
        _close(seen[name], ref_seen[name], name)


# -- gradient accumulation -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "convnet"])
def test_gradient_accumulation_matches_eager(name):
    """Three micro-batches per optimizer step, two steps, the frozen set switched
    between them: .grad sums like eager's and the weights follow it."""
    case = getattr(models, name)()
    micro_batches = [getattr(models, name)(seed=seed).batch for seed in range(3)]
    losses = [getattr(models, name)(seed=seed).loss for seed in range(3)]
    reference = copy.deepcopy(case.model)
    cm = _compiled(case)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (case.model, reference)]
    layers = cm.slimfit.layers
    for frozen in (frozenset(layers[::3]), frozenset(layers[1::3])):
        cm.slimfit.set_frozen(frozen)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for batch, loss in zip(micro_batches, losses):
            (loss(cm(**batch)) / 3).backward()
            with eager_frozen(reference, frozen):
                (loss(reference(**batch)) / 3).backward()
        _assert_grads_match(case.model, reference, frozen)
        for opt in optimizers:
            opt.step()
        for (n, p), q in zip(case.model.named_parameters(), reference.parameters()):
            _close(p, q, n)


# -- layer weights that meet activations through cat and add --------------------------------

@pytest.mark.parametrize("name", ["learned_tokens", "deit"])
def test_learned_tokens_and_position_embeddings_match_eager(name):
    """Two learned tokens expanded over the batch and concatenated with the
    activations in one cat, and a learned position embedding added (DeiT)."""
    case = getattr(models, name)()
    cm = _compiled(case)
    layers = cm.slimfit.layers
    tokens = [n for n in layers if n.endswith(("cls_token", "dist_token", "distillation_token"))]
    assert len(tokens) == 2, layers
    position = [n for n in layers if "position" in n]
    assert position, layers
    assert_matches_eager(cm, case, frozenset())
    assert_matches_eager(cm, case, frozenset(tokens[:1]))
    assert_matches_eager(cm, case, frozenset(tokens[1:] + position))
    assert_matches_eager(cm, case, frozenset(layers))
