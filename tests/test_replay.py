"""Reusing the sampler's products in the update (spice_fast.model.replay).

The record must hold exactly the products a training forward computes for the same rows, and an
update that takes them from the record must give the update's gradients without it.
"""

import copy
import math

import pytest
import torch
from helpers import max_err
from spice_fast.kernels.linear import linear, replay_linear
from tiny_models import VOCAB, hf_model, ours_from_hf

from spice_fast.engine import Engine, SamplingParams
from spice_fast.model.cpu_decode import cpu_decode_enabled
from spice_fast.model.replay import PRODUCTS, ActivationRecord, prefix_keys, product_columns
from spice_fast.train import make_config
from spice_fast.train.rollout import Sequence
from spice_fast.train.update import accumulate_gradients


@pytest.fixture(params=["cpp", "torch"])
def decode_path(request, monkeypatch):
    """The decode steps through the C++ step or the Python layers: both record."""
    if request.param == "cpp" and not cpu_decode_enabled():
        pytest.skip("the C++ decode step is not built here")
    monkeypatch.setenv("SPICE_FAST_CPU_DECODE", request.param)
    return request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_taken", [0, 5, 9])
def test_replay_linear_equals_linear_in_values_and_gradients(bias, num_taken):
    gen = torch.Generator().manual_seed(num_taken)
    x = torch.randn(9, 24, generator=gen, requires_grad=True)
    w = torch.randn(40, 24, generator=gen, requires_grad=True)
    b = torch.randn(40, generator=gen, requires_grad=True) if bias else None
    perm = torch.randperm(9, generator=gen)
    taken, computed = perm[:num_taken].sort().values, perm[num_taken:].sort().values
    # the record: a wider buffer (other columns around this product's) with the rows somewhere in it
    record = torch.randn(20, 3 + 40 + 5, generator=gen)
    record_rows = torch.randperm(20, generator=gen)[:num_taken]
    with torch.no_grad():
        record[record_rows, 3:43] = linear(x[taken], w, b)
    recorded = record[:, 3:43]
    out = replay_linear(x, w, b, recorded, taken, record_rows, computed)
    ref = linear(x, w, b)
    assert max_err(out, ref) <= 1e-5
    upstream = torch.randn(9, 40, generator=gen)
    grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), upstream)
    grads_ref = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), upstream)
    for g, r in zip(grads, grads_ref, strict=True):
        assert max_err(g, r) <= 1e-5 * max(1.0, r.abs().max().item())


def test_replay_linear_takes_the_record_not_a_recomputation():
    x = torch.randn(4, 8)
    w = torch.randn(6, 8)
    recorded = torch.full((2, 6), 7.0)
    out = replay_linear(
        x, w, None, recorded, torch.tensor([1, 3]), torch.tensor([1, 0]), torch.tensor([0, 2])
    )
    assert torch.equal(out[1], recorded[1]) and torch.equal(out[3], recorded[0])
    assert max_err(out[[0, 2]], x[[0, 2]] @ w.T) <= 1e-5


def test_replay_linear_names_rows_that_do_not_cover_the_input():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="must cover the 4 rows"):
        replay_linear(x, w, None, torch.zeros(3, 6), torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))


def _model(arch):
    return ours_from_hf(hf_model(arch, tied=True))


def _products(model, ids: list[int]) -> dict[tuple[int, str], torch.Tensor]:
    """Every layer's seven products over ``ids`` in one training-style forward (hooks on the Linears)."""
    out, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name in PRODUCTS:
            module = getattr(layer.self_attn if name in PRODUCTS[:4] else layer.mlp, name)
            hooks.append(module.register_forward_hook(lambda m, a, y, key=(i, name): out.__setitem__(key, y)))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_decode_steps_record_the_products_of_a_training_forward(arch, decode_path):
    model = _model(arch)
    engine = Engine(model, max_model_len=64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 19)]
    params = SamplingParams(n=2, max_tokens=6, temperature=1.0, ignore_eos=True, seed=3)
    record = ActivationRecord(model.config, 64)
    # sample 1 of request 0 and sample 0 of request 1 only; the second has fewer rows than its inputs
    assert record.reserve(("t", 0, 1), 5) and record.reserve(("t", 1, 0), 3)
    assert not record.reserve(("t", 1, 0), 5)  # a key once
    assert not record.reserve(("t", 9, 9), 64)  # past the end
    outs = engine.generate(prompts, params, record=record, record_tag="t")
    # decode rows, and the 19 prompt rows of request 1 (its sample 0 has rows; request 0's has none)
    assert int(record.filled.sum()) == 5 + 3 + 19
    columns = product_columns(model.config)
    for (request, sample), count in (((0, 1), 5), ((1, 0), 3)):
        completion = outs[request].outputs[sample].token_ids
        ids = prompts[request] + completion[:-1]
        products = _products(model, ids)
        rows = record.rows(("t", request, sample), 5)
        assert rows[count:] == [-1] * (5 - count) and min(rows[:count]) >= 0
        prompt_rows = record.filled_prompt_rows(prefix_keys(ids, len(prompts[request])))
        assert (min(prompt_rows) >= 0) == (request == 1) and (max(prompt_rows) >= 0) == (request == 1)
        checks = [(len(prompts[request]) + j, rows[j]) for j in range(count)]  # decode input j
        checks += [(t, row) for t, row in enumerate(prompt_rows) if row >= 0]  # prompt token t
        for position, row in checks:
            j = (position, row)
            for (layer, name), y in products.items():
                start, end = columns[name]
                got = record.data[layer, row, start:end]
                want = y[position]
                assert max_err(got, want) <= 2e-5 * max(1.0, want.abs().max().item()), (layer, name, j)
    assert record.rows(("t", 0, 0), 5) == [-1] * 5  # not reserved: nothing recorded


def _engine_sequences(model, record):
    """Two challenger-like groups (a shared document, answer-type suffixes) and a reasoner group, all
    sampled by the engine with the record on; one sequence of the last group left unrecorded."""
    engine = Engine(model, max_model_len=96)
    gen = torch.Generator().manual_seed(5)
    doc = torch.randint(3, VOCAB, (21,), generator=gen).tolist()
    prompts = [doc + [11, 12], doc + [13], torch.randint(3, VOCAB, (6,), generator=gen).tolist()]
    params = [
        SamplingParams(n=n, max_tokens=9, temperature=0.8, ignore_eos=True, seed=s)
        for n, s in ((2, 1), (1, 2), (3, 3))
    ]
    for i, p in enumerate(params):
        for g in range(p.n):
            if (i, g) != (2, 2):
                record.reserve(("r", i, g), 8)
    outs = engine.generate(prompts, params, record=record, record_tag="r")
    gen_adv = torch.Generator().manual_seed(7)
    seqs = []
    for i, out in enumerate(outs):
        for g, c in enumerate(out.outputs):
            adv = float(torch.randn((), generator=gen_adv))
            group = ("document", 0) if i < 2 else ("question", 2)
            seqs.append(
                Sequence(
                    "challenger",
                    out.prompt_token_ids,
                    c.token_ids,
                    c.logprobs,
                    adv,
                    group,
                    record,
                    ("r", i, g),
                )
            )
    return seqs


@pytest.mark.parametrize(("budget", "capacity"), [(16, 128), (4096, 128), (4096, 64)])
def test_update_with_replayed_products_equals_the_update_without(budget, capacity, decode_path):
    model = _model("qwen2")
    record = ActivationRecord(model.config, capacity)  # 64: no room left for the question's prompt
    seqs = _engine_sequences(model, record)
    grads = {}
    for replay in (True, False):
        config = make_config(
            overrides=[
                f"loss.replay_activations={replay}",
                f"loss.micro_batch_tokens={budget}",
                "rollout.temperature=0.8",
            ]
        )
        m = copy.deepcopy(model)
        metrics = accumulate_gradients(m, seqs, config)
        grads[replay] = ({n: p.grad.clone() for n, p in m.named_parameters()}, metrics)
    (ours, m_on), (ref, m_off) = grads[True], grads[False]
    # every forwarded row but the 8 decode inputs of the one sequence without decode rows: all three
    # prompts were recorded in prefill (each request's first sample has rows), and prompt rows that
    # several micro-batches forward again are found again
    if capacity == 128:
        assert m_on["update/num_replayed_tokens"] == m_on["update/num_forward_tokens"] - 8
    else:  # the 6-token question prompt, forwarded once, is computed
        assert m_on["update/num_replayed_tokens"] == m_on["update/num_forward_tokens"] - 8 - 6
    assert m_off["update/num_replayed_tokens"] == 0
    assert math.isclose(m_on["loss"], m_off["loss"], rel_tol=1e-4, abs_tol=1e-7)
    # float32 rounding apart (the sampler's kernels against the trainer's), the same gradient
    flat = lambda g: torch.cat([g[n].flatten() for n in ref])  # noqa: E731
    assert (flat(ours) - flat(ref)).norm() <= 1e-4 * flat(ref).norm()
    for name, g in ref.items():
        assert g.abs().max() > 0, name
        assert max_err(ours[name], g) <= 1e-3 * g.abs().max().item(), name


def test_a_wrong_record_changes_the_gradient():
    """The replayed rows are used: corrupting one recorded product moves the loss and the gradients."""
    model = _model("qwen2")
    record = ActivationRecord(model.config, 128)
    seqs = _engine_sequences(model, record)
    config = make_config(overrides=["rollout.temperature=0.8"])
    base = copy.deepcopy(model)
    m0 = accumulate_gradients(base, seqs, config)
    record.data[1, record.rows(("r", 0, 0), 8)[3], :] += 1.0
    bad = copy.deepcopy(model)
    m1 = accumulate_gradients(bad, seqs, config)
    assert m0["update/num_replayed_tokens"] == m1["update/num_replayed_tokens"] > 0
    assert not math.isclose(m0["loss"], m1["loss"], rel_tol=1e-6)


def test_rollout_records_only_where_the_run_can_replay():
    from spice_fast.train import rollout

    engine = Engine(_model("qwen2"), max_model_len=32)
    on = make_config(overrides=[])
    assert rollout.new_record(engine, on, 10) is not None
    for override in (
        "loss.replay_activations=false", "loss.old_logprobs=recompute", "model.gradient_checkpointing=true",
        "loss.replay_max_gb=0", "optim.fsdp=true",
    ):  # fmt: skip
        assert rollout.new_record(engine, make_config(overrides=[override]), 10) is None, override
    engine.model.to(torch.bfloat16)
    assert rollout.new_record(engine, on, 10) is None


def test_the_engine_reuses_its_record_buffer_and_retires_the_last_record():
    engine = Engine(_model("qwen2"), max_model_len=32)
    first = engine.activation_record(8)
    assert first.reserve("a", 4)
    first.filled[:4] = True
    second = engine.activation_record(6)  # smaller: the same buffer
    assert second.data.data_ptr() == first.data.data_ptr()
    assert first.rows("a", 4) == [-1] * 4 and not first.reserve("b", 1)  # retired: nothing to hand out
    assert second.rows("a", 4) == [-1] * 4 and second.reserve("a", 4)
    third = engine.activation_record(100)  # larger: a new buffer
    assert third.data.shape[1] == 100 and second.rows("a", 4) == [-1] * 4
    with torch.inference_mode():  # as the engine runs: the record must stay usable under autograd
        fourth = engine.activation_record(200)
    assert not fourth.data.is_inference() and not fourth.filled.is_inference()
