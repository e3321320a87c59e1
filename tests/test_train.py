"""The trainer: packed fused update vs a per-sequence reference, NaN skipping, master weights, end-to-end
runs with metrics and checkpoints, crash inside a checkpoint then resume = uninterrupted."""

import copy
import json
import math
import random

import fake_judge as fake_judge_module
import pytest
import torch
import transformers
from helpers import max_err
from spice_fast.kernels import policy_loss_ref
from tiny_models import VOCAB, hf_model, ours_from_hf, tiny_checkpoint

import spice_fast
from spice_fast.spice.parsing import Invalid, Task
from spice_fast.train import Trainer, make_config, resume_config
from spice_fast.train import checkpoint as ckpt
from spice_fast.train import rollout as rollout_mod
from spice_fast.train.rollout import Sequence
from spice_fast.train.update import MasterAdamW, accumulate_gradients, pack, policy_update


def tiny_model(dtype=torch.float32):
    return ours_from_hf(hf_model("qwen2", tied=True)).to(dtype)


def random_sequences(num: int, seed: int = 0, *, zero_every: int = 0) -> list[Sequence]:
    rng = random.Random(seed)
    seqs = []
    for i in range(num):
        p, c = rng.randint(1, 12), rng.randint(1, 9)
        adv = 0.0 if zero_every and i % zero_every == 0 else rng.uniform(-1, 1)
        seqs.append(
            Sequence(
                "challenger" if i % 2 else "reasoner",
                [rng.randrange(VOCAB) for _ in range(p)],
                [rng.randrange(VOCAB) for _ in range(c)],
                [-rng.uniform(5.0, 9.0) for _ in range(c)],  # sampler logprobs: ratios far from 1 clip
                adv,
            )
        )
    return seqs


def reference_loss(model, sequences, config, old=None):
    """Per sequence: full logits, log_softmax(z / T) at the completion tokens, policy_loss_ref per token."""
    T = config.rollout.temperature
    lps = []
    for s in sequences:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(ids)[0, len(s.prompt_ids) - 1 : -1].double() / T
        lps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0])
    agg = config.loss.agg
    total = 0.0
    for i, (s, lp) in enumerate(zip(sequences, lps, strict=True)):
        old_lp = torch.tensor(s.sampler_logprobs, dtype=lp.dtype) if old is None else old[i]
        loss, _ = policy_loss_ref(
            lp[None], old_lp[None], torch.tensor([s.advantage], dtype=lp.dtype), torch.ones_like(lp)[None],
            clip_low=config.loss.clip_low, clip_high=config.loss.clip_high, agg="drgrpo", max_new_tokens=1,
        )  # fmt: skip
        if agg == "drgrpo":
            total = total + loss / (len(sequences) * config.loss_max_new_tokens)
        elif agg == "token_mean":
            total = total + loss / sum(len(x.completion_ids) for x in sequences)
        else:
            total = total + loss / (len(s.completion_ids) * len(sequences))
    return total, lps


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("agg", ["drgrpo", "token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("budget", [16, 4096])
def test_packed_fused_update_matches_per_sequence_reference(agg, budget):
    config = make_config(
        overrides=[f"loss.agg={agg}", f"loss.micro_batch_tokens={budget}", "rollout.temperature=0.7"]
    )
    seqs = random_sequences(7, zero_every=3)
    model = tiny_model()
    metrics = accumulate_gradients(model, seqs, config)
    assert metrics["update/num_sequences"] == 4 and metrics["update/num_zero_advantage"] == 3
    assert (metrics["update/num_micro_batches"] > 1) == (budget == 16)
    ours = grads_of(model)
    # torch's own float32 error and the float64 truth, over all sequences (zero advantages included)
    model.zero_grad()
    loss32, _ = reference_loss(model, seqs, config)
    loss32.backward()
    torch32 = grads_of(model)
    model64 = copy.deepcopy(model).double()
    model64.zero_grad()
    loss64, _ = reference_loss(model64, seqs, config)
    loss64.backward()
    truth = grads_of(model64)
    assert math.isclose(metrics["loss"], float(loss64.detach()), rel_tol=1e-5, abs_tol=1e-9)
    flat = lambda grads: torch.cat([grads[n].double().flatten() for n in truth])  # noqa: E731
    err_ours, err_torch = (flat(ours) - flat(truth)).norm(), (flat(torch32) - flat(truth)).norm()
    assert err_ours <= 2 * err_torch + 1e-12, (err_ours, err_torch)  # STYLE.md rule, whole gradient
    eps = torch.finfo(torch.float32).eps
    for name, g in truth.items():
        assert g.abs().max() > 0, name  # every parameter gets a gradient: the check can fail
        # per tensor, with the order of the fp32 sums free: a few ulps of the tensor's largest entry
        assert max_err(ours[name], g) <= 4 * max_err(torch32[name], g) + 4 * eps * g.abs().max().item(), name


def test_recompute_old_logprobs_with_truncated_importance_weights():
    config = make_config(overrides=["loss.old_logprobs=recompute", "loss.tis_cap=2.0"])
    seqs = random_sequences(5, seed=1)
    model = tiny_model().double()
    metrics = accumulate_gradients(model, seqs, config)
    ours = grads_of(model)
    model.zero_grad()
    with torch.no_grad():
        _, recomputed = reference_loss(model, seqs, config)
    # ratio against the recomputed logprobs, times min(exp(recomputed - sampler), cap) per token
    total = 0.0
    T = config.rollout.temperature
    for s, old in zip(seqs, recomputed, strict=True):
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(ids)[0, len(s.prompt_ids) - 1 : -1] / T
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        isw = torch.exp(old - torch.tensor(s.sampler_logprobs, dtype=old.dtype)).clamp(max=2.0)
        loss, _ = policy_loss_ref(
            lp[None], old[None], torch.tensor([s.advantage], dtype=lp.dtype), torch.ones_like(lp)[None],
            agg="drgrpo", max_new_tokens=len(seqs) * config.loss_max_new_tokens, is_weights=isw[None],
        )  # fmt: skip
        total = total + loss
    total.backward()
    for name, g in grads_of(model).items():
        # the kernels return float32 logprobs and take float32 weights: float32-level agreement
        assert max_err(ours[name], g) <= 1e-5 * g.abs().max().item(), name
    assert metrics["time/logprob"] > 0 and metrics["mean_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_pack_respects_the_budget_and_order():
    assert pack([5, 5, 5, 12, 3, 1], 10) == [[0, 1], [2], [3], [4, 5]]
    assert pack([], 10) == []


@pytest.mark.parametrize("where", ["advantage", "sampler_logprob"])
def test_non_finite_values_skip_the_update_and_keep_the_weights(where):
    config = make_config()
    seqs = random_sequences(4, seed=2)
    if where == "advantage":
        seqs[1].advantage = float("nan")
    else:
        seqs[2].sampler_logprobs[0] = float("-inf")  # ratio inf
        seqs[2].advantage = -1.0
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MasterAdamW(list(model.parameters()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    metrics = policy_update(model, optimizer, seqs, config, lr=1e-2)
    assert metrics["skipped"] == 1 and metrics["skip_reason"].startswith("nonfinite")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not optimizer.optimizer.state  # no moment was touched either
    # the same batch without the bad value updates
    clean = random_sequences(4, seed=2)
    assert policy_update(model, optimizer, clean, config, lr=1e-2)["skipped"] == 0
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_gradient_clipping_equals_torch_clip_grad_norm():
    """The update's norm and clipping (one norm computation) scale fp32 gradients exactly as
    torch.nn.utils.clip_grad_norm_ does, and leave gradients under the bound untouched."""
    from spice_fast.train.update import _clip_grads, _grad_norm

    gen = torch.Generator().manual_seed(3)
    for max_norm in (0.5, 1e6):
        ours = [torch.nn.Parameter(torch.zeros(s)) for s in ((7, 5), (11,), (3, 3, 2))]
        theirs = [torch.nn.Parameter(torch.zeros(p.shape)) for p in ours]
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        norm = _grad_norm(ours)
        _clip_grads(ours, max_norm, norm)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert norm == float(expected)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))


def test_master_weights_update_bf16_parameters_in_place():
    model = tiny_model(torch.bfloat16)
    params = list(model.parameters())
    pointers = [p.data_ptr() for p in params]
    reference = [p.detach().float().clone().requires_grad_() for p in params]
    opt = MasterAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, r in zip(params, reference, strict=True):
            g = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            p.grad, r.grad = g, g.float()
        opt.step()
        ref_opt.step()
    assert opt.use_masters and all(m.dtype == torch.float32 for m in opt.masters)
    assert [p.data_ptr() for p in params] == pointers  # the sampler keeps reading the same tensors
    for p, m, r in zip(params, opt.masters, reference, strict=True):
        assert torch.equal(m, r.detach())  # fp32 masters follow fp32 (fused) AdamW exactly
        assert torch.equal(p, r.detach().to(torch.bfloat16))
    # the state round-trips
    state = opt.state_dict()
    other = MasterAdamW(list(tiny_model(torch.bfloat16).parameters()), lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                        weight_decay=0.1)  # fmt: skip
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.masters, opt.masters, strict=True))


# ---- end to end ----


@pytest.fixture
def fake_judge(monkeypatch):
    fake_judge_module.install(monkeypatch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    for i in range(5):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps. " * (3 + i))
    return folder


def run_config(tmp_path, model_dir, run_name, *extra):
    return make_config(overrides=[
        f"model.name={model_dir}", f"run_dir={tmp_path / run_name}", f"corpus.source={corpus_dir(tmp_path)}",
        "corpus.max_doc_tokens=40", "rollout.challenger_max_tokens=12", "rollout.reasoner_max_tokens=10",
        "rollout.max_model_len=2048", "optim.lr=1e-3", "progress=false", "tensorboard=false",
        "model.device=cpu", *extra,
    ])  # fmt: skip


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def deterministic(row):
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "throughput/gen_tokens_per_s"}


def test_two_steps_write_metrics_samples_and_a_loadable_checkpoint(tmp_path, model_dir, fake_judge):
    config = run_config(tmp_path, model_dir, "run", "steps=2")
    trainer = Trainer(config)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.train()
    run = tmp_path / "run"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["challenger/num_samples"] == 8 and 0 < row["challenger/valid_rate"] < 1
        assert sum(row["reasoner/pass_rate_hist"]) == row["reasoner/num_questions"]
        assert row["update/num_sequences"] > 0 and row["skipped"] == 0 and math.isfinite(row["loss"])
        assert row["logprob_gap/max"] < 1e-3  # sampler and trainer agree in float32
        for key in (
            "time/rollout",
            "time/matching",
            "time/update",
            "throughput/gen_tokens_per_s",
            "grad_norm",
        ):
            assert row[key] is not None, key
    assert history[-1]["challenger/valid_rate"] == rows[-1]["challenger/valid_rate"]
    assert any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and any("task" in s for s in samples)
    last = ckpt.latest_checkpoint(run)
    assert last.name == "step-000002"
    hf = transformers.AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32)
    ids = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        assert max_err(hf(ids).logits, trainer.model(ids)) < 1e-4
    reloaded, _ = spice_fast.load(last)
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.parameters(), trainer.model.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(config)


class _Crash(Exception):
    pass


def test_crash_inside_a_checkpoint_then_resume_equals_uninterrupted(
    tmp_path, model_dir, fake_judge, monkeypatch
):
    Trainer(run_config(tmp_path, model_dir, "straight", "steps=3", "checkpoint_every=1")).train()

    crash_config = run_config(tmp_path, model_dir, "crashed", "steps=3", "checkpoint_every=1")
    real_save = torch.save

    def torn_save(obj, path, *args, **kwargs):
        if "step-000002" in str(path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 torn")  # half a file, then the process dies
            raise _Crash
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(_Crash):
        Trainer(crash_config).train()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    crashed = tmp_path / "crashed"
    assert ckpt.latest_checkpoint(crashed).name == "step-000001"
    assert (crashed / "checkpoints" / ".step-000002.partial").exists()
    assert [r["step"] for r in read_metrics(crashed)] == [1, 2]  # step 2 ran but was not saved

    resumed = Trainer(resume_config(crashed), resume=True)
    assert resumed.start_step == 1
    assert not (crashed / "checkpoints" / ".step-000002.partial").exists()
    resumed.train()
    straight = tmp_path / "straight"
    assert [deterministic(r) for r in read_metrics(crashed)] == [
        deterministic(r) for r in read_metrics(straight)
    ]
    a, _ = spice_fast.load(ckpt.latest_checkpoint(straight))
    b, _ = spice_fast.load(ckpt.latest_checkpoint(crashed))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    sa = ckpt.load_state(ckpt.latest_checkpoint(straight))
    sb = ckpt.load_state(ckpt.latest_checkpoint(crashed))
    assert sa["corpus"] == sb["corpus"] and sa["step"] == sb["step"] == 3
    assert [p.name for _, p in ckpt.list_checkpoints(crashed)] == ["step-000002", "step-000003"]  # keep=2


def test_a_failed_checkpoint_write_is_cleaned_up_logged_and_raised_at_the_end(
    tmp_path, model_dir, fake_judge, monkeypatch, caplog
):
    """A full disk: the periodic checkpoint of step 2 fails (logged, training goes on), the final one of
    step 3 fails (raised). Neither leaves a partial directory; step 1 stays the latest."""
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step-000001" not in str(path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    run = tmp_path / "full"
    trainer = Trainer(run_config(tmp_path, model_dir, "full", "steps=3", "checkpoint_every=1"))
    with pytest.raises(
        ckpt.CheckpointWriteError, match="could not write checkpoint step-000003.*step-000001, is intact"
    ):
        trainer.train()
    assert "step 2: could not write checkpoint step-000002" in caplog.text
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # training went on after step 2's failure
    assert ckpt.latest_checkpoint(run).name == "step-000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_ctrl_c_writes_a_checkpoint_of_the_last_finished_step(tmp_path, model_dir, fake_judge, monkeypatch):
    config = run_config(tmp_path, model_dir, "interrupted", "steps=3")
    trainer = Trainer(config)
    real_step = trainer.step

    def step(n):
        if n == 2:
            raise KeyboardInterrupt
        return real_step(n)

    monkeypatch.setattr(trainer, "step", step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path / "interrupted").name == "step-000001"
    assert Trainer(resume_config(tmp_path / "interrupted"), resume=True).start_step == 1


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, model_dir):
    config = run_config(tmp_path, model_dir, "empty")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        Trainer(config, resume=True)
    with pytest.raises(ValueError, match="config.yaml"):
        resume_config(tmp_path / "nowhere")


def test_cli_train_then_resume_with_more_steps(tmp_path, model_dir, fake_judge, capsys):
    from spice_fast import cli

    config = run_config(tmp_path, model_dir, "cli")
    args = [f"{k}={v}" for k, v in (
        ("model.name", model_dir), ("run_dir", tmp_path / "cli"), ("corpus.source", config.corpus.source),
        ("corpus.max_doc_tokens", 40), ("rollout.challenger_max_tokens", 12),
        ("rollout.reasoner_max_tokens", 10), ("rollout.max_model_len", 2048), ("tensorboard", "false"),
        ("steps", 1),
    )]  # fmt: skip
    assert cli.main(["train", *args]) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "cli"), "steps=2"]) == 0
    assert "resuming at step 2" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "cli")] == [1, 2]
    assert cli.main(["train", "--resume", str(tmp_path / "cli"), "--preset", "paper"]) == 2
    assert cli.main(["train", "steps=-1"]) == 2
    assert "steps: expected an int >= 1, got -1" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients():
    config = make_config(overrides=["loss.micro_batch_tokens=32"])
    seqs = random_sequences(5, seed=3)
    plain, recomputed = tiny_model(), tiny_model()
    recomputed.gradient_checkpointing = True
    accumulate_gradients(plain, seqs, config)
    accumulate_gradients(recomputed, seqs, config)
    for (name, a), b in zip(grads_of(plain).items(), grads_of(recomputed).values(), strict=True):
        assert max_err(a, b) <= 1e-6 * a.abs().max().item(), name


def test_challenger_reply_prefix_is_part_of_the_prompt_and_of_the_parsed_text():
    from spice_fast.spice import prompts

    assert prompts.render(None, "hi", "<question>").endswith("Assistant: <question>")
    assert prompts.render(None, "hi") == "User: hi\n\nAssistant:"
    for answer_type in prompts.ANSWER_TYPES:  # the format example in each prompt has the right format
        text = prompts.challenger_prompt("doc", answer_type)
        example = text.split("on another topic:\n", 1)[1].split("\n\nReply", 1)[0]
        question = example.split("<question>")[1].split("</question>")[0]
        parsed = rollout_mod.parse_challenger(example.replace(question, "A new question?"), answer_type)
        assert isinstance(parsed, Task) and parsed.answer_type == answer_type, parsed
        # copied as it stands, it is not a task from the document
        assert rollout_mod.parse_challenger(example, answer_type) == Invalid("copied_example", question[:60])
        copied = example.replace(question, "  " + question.upper() + " ")
        assert rollout_mod.parse_challenger(copied, answer_type).reason == "copied_example"
    placeholder = rollout_mod.parse_challenger(
        "<question>the question</question><answer>7</answer>", "integer"
    )
    assert placeholder.reason == "copied_example"


class ScriptedEngine:
    """Stands in for the Engine: canned challenger replies (the text after the "<question>" prefix),
    then reasoner answers that box the gold answer for every second sample."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []
        self.stats = type("Stats", (), {"num_generated_tokens": 0})()

    def generate(self, prompts, params, progress=False):
        from spice_fast.engine import Completion, RequestOutput

        self.calls.append([self.tokenizer.decode(p) for p in prompts])
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            text = self.tokenizer.decode(prompt)
            completions = []
            for j in range(sp.n):
                if len(self.calls) == 1:
                    reply = self.replies[text.split("<question>")[0].count("multiple-choice")][j % 2]
                else:
                    reply = "so \\boxed{7}" if j % 2 == 0 else "I do not know"
                ids = self.tokenizer.encode(reply, add_special_tokens=False)
                completions.append(Completion(j, ids, reply, [-1.0] * len(ids), "stop"))
            outs.append(RequestOutput(i, None, list(prompt), completions))
        return outs


def test_rollout_parses_the_prefixed_reply_and_scores_with_the_matcher():
    from tiny_models import byte_tokenizer

    tok = byte_tokenizer()
    replies = {  # [non-mcq, mcq] x [valid, invalid]: what follows the "<question>" the prompt ends with
        0: ["What is 3 + 4?</question>\n<answer>7</answer>", "no answer tag</question>"],
        1: [
            "Pick seven.</question>\n<options>\nA) 5\nB) 6\nC) 7\nD) 8\n</options>\n<answer>C</answer>",
            "Pick.</question>\n<options>\nA) 5\nB) 6\n</options>\n<answer>A</answer>",
        ],
    }
    config = make_config(overrides=["spice.num_docs=2", "spice.num_challenger_samples=4"])
    from spice_fast.spice.corpus import Document

    docs = [Document("Seven is a number.", "a", 0), Document("Sheep graze.", "b", 0)]
    engine = ScriptedEngine(tok, replies)
    result = rollout_mod.spice_rollout(engine, tok, docs, config, step=1)
    m = result.metrics
    assert all(p.endswith("<question>") for p in engine.calls[0])
    assert m["challenger/num_samples"] == 8 and m["challenger/num_valid"] >= 2
    assert (
        m["challenger/invalid/unparseable"] + m["challenger/invalid/bad_options"]
        == 8 - m["challenger/num_valid"]
    )
    # MCQ answers "\boxed{7}" are wrong (gold C), integer answers 7 right for every second sample
    assert m["reasoner/num_questions"] == m["challenger/num_valid"]
    assert 0 < m["reasoner/accuracy"] <= 0.5
    challenger = [s for s in result.sequences if s.role == "challenger"]
    assert len(challenger) == 8 and abs(sum(s.advantage for s in challenger)) < 1e-6


def shared_prefix_sequences(seed: int = 4) -> list[Sequence]:
    """Groups of sequences whose prompts share prefixes: identical prompts, prompts that diverge after a
    common document, one-token completions, a lone member, and no group at all."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    doc, question = tok(20), tok(6)
    seqs = []
    for i in range(5):  # one document, two "answer types": prompts diverge after the document
        suffix = tok(3) if i % 2 else [7, 8, 9]
        seqs.append(
            Sequence("challenger", doc + suffix, tok(rng.randint(1, 6)), [-7.0] * 0, rng.uniform(-1, 1), "d")
        )
    for _ in range(3):  # identical prompts (reasoner samples of one question)
        seqs.append(Sequence("reasoner", list(question), tok(rng.randint(1, 5)), [], rng.uniform(-1, 1), "q"))
    seqs.append(Sequence("reasoner", tok(5), tok(4), [], 0.5, "lone"))
    seqs.append(Sequence("reasoner", tok(4), tok(3), [], -0.5, None))
    for s in seqs:
        s.sampler_logprobs = [-rng.uniform(5.0, 9.0) for _ in s.completion_ids]
    return seqs


@pytest.mark.parametrize("budget", [16, 40, 4096])
def test_shared_prefix_packing_gives_the_reference_gradients(budget):
    seqs = shared_prefix_sequences()
    config = make_config(overrides=[f"loss.micro_batch_tokens={budget}"])
    shared, separate = tiny_model().double(), tiny_model().double()
    m_shared = accumulate_gradients(shared, seqs, config)
    m_separate = accumulate_gradients(separate, seqs, make_config(overrides=[
        f"loss.micro_batch_tokens={budget}", "loss.share_prefixes=false"
    ]))  # fmt: skip
    assert m_shared["update/num_forward_tokens"] < m_separate["update/num_forward_tokens"]
    if budget == 4096:  # one unit per group: the document once, the repeated suffix once, every branch
        lens = lambda group: [len(s.prompt_ids) + len(s.completion_ids) - 1 for s in group]  # noqa: E731
        doc_group, question_group, lone = seqs[:5], seqs[5:8], seqs[8:]
        # the suffix [7, 8, 9] of samples 0, 2, 4 once; samples 1 and 3 have suffixes of their own
        challenger = (
            20 + 3 + sum(n - 23 for n in lens(doc_group[::2])) + sum(n - 20 for n in lens(doc_group[1::2]))
        )
        reasoner = 6 + sum(n - 6 for n in lens(question_group))
        assert m_shared["update/num_forward_tokens"] == challenger + reasoner + sum(lens(lone))
    reference = tiny_model().double()
    loss, _ = reference_loss(reference, seqs, config)
    loss.backward()
    truth = grads_of(reference)
    for name, g in truth.items():
        assert max_err(grads_of(shared)[name], g) <= 1e-5 * g.abs().max().item(), name
        assert max_err(grads_of(separate)[name], g) <= 1e-5 * g.abs().max().item(), name
    assert m_shared["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)


@pytest.mark.gpu
def test_gpu_run_trains_bf16_parameters_from_fp32_masters(tmp_path, model_dir, fake_judge):
    """On a GPU the defaults give bf16 parameters that the engine reads and fp32 master weights."""
    config = run_config(tmp_path, model_dir, "gpu", "steps=2", "model.device=cuda")
    trainer = Trainer(config)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    pointers = [p.data_ptr() for p in trainer.model.parameters()]
    rows = trainer.train()
    assert trainer.model.dtype == torch.bfloat16 and trainer.optimizer.use_masters
    assert all(m.dtype == torch.float32 and m.is_cuda for m in trainer.optimizer.masters)
    assert [p.data_ptr() for p in trainer.model.parameters()] == pointers  # updated in place
    assert all(r["skipped"] == 0 and math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["logprob_gap/max"] < 0.5  # bf16 sampler vs bf16 trainer: close, not equal
    assert any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters())
    for p, m in zip(trainer.model.parameters(), trainer.optimizer.masters, strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))
