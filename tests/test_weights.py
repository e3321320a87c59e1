"""Checkpoints: round trips through transformers, atomic saves, hub ids, and clear errors on bad files."""

import json
import os

import pytest
import torch
import transformers
from helpers import assert_close
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, hf_model, ours_from_hf

import spice_fast
from spice_fast import CheckpointError
from spice_fast.weights import safetensors_io

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    )  # fmt: skip


def logits_of(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_save_loads_in_transformers_with_same_logits(tmp_path, arch, tied):
    ours = ours_from_hf(hf_model(arch, tied=tied))
    spice_fast.save(ours, tiny_tokenizer(), tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(hf).__name__ == ours.config.architecture
    assert_close(logits_of(hf), logits_of(ours), atol=1e-5)
    # PreTrainedTokenizerFast: AutoTokenizer would pick the model type's own class for this toy vocabulary.
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "ckpt")
    assert tok.encode("w5 w7", add_special_tokens=False) == [5, 7]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, arch, tied):
    hf = hf_model(arch, tied=tied)
    hf.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    ours, tok = spice_fast.load(tmp_path / "hf", device="cpu")
    assert ours.dtype == torch.float32
    assert_close(logits_of(ours), logits_of(hf), atol=1e-4)
    assert tok is not None and tok.chat_template is not None


def test_sharded_round_trip(tmp_path):
    ours = ours_from_hf(hf_model("qwen3", tied=False))
    spice_fast.save(ours, None, tmp_path / "sharded", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert not any(f.startswith("tokenizer") for f in files)
    back, tok = spice_fast.load(tmp_path / "sharded", device="cpu")
    assert tok is None
    assert_close(logits_of(back), logits_of(ours), atol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    assert_close(logits_of(hf), logits_of(ours), atol=1e-5)


def test_load_dtype(tmp_path):
    ours = ours_from_hf(hf_model("llama", tied=True))
    spice_fast.save(ours, None, tmp_path / "c")
    back, _ = spice_fast.load(tmp_path / "c", dtype="bfloat16", device="cpu")
    assert back.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype.*'int8'"):
        spice_fast.load(tmp_path / "c", dtype="int8", device="cpu")


def test_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    ours = ours_from_hf(hf_model("llama", tied=True))
    spice_fast.save(ours, None, tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, path, metadata={"format": "pt"})
    back, _ = spice_fast.load(tmp_path / "c", device="cpu")
    assert_close(logits_of(back), logits_of(ours), atol=0)


# ---- atomic saves ----


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = ours_from_hf(hf_model("llama", tied=False, seed=1))
    second = ours_from_hf(hf_model("llama", tied=False, seed=2))
    out = tmp_path / "ckpt"
    spice_fast.save(first, None, out)
    real_write = safetensors_io.save_file

    def dies_after_first_file(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(safetensors_io, "save_file", dies_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        spice_fast.save(second, None, out, max_shard_bytes=100_000)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    back, _ = spice_fast.load(out, device="cpu")
    assert_close(logits_of(back), logits_of(first), atol=0)


def test_crash_between_renames_is_recovered(tmp_path):
    first = ours_from_hf(hf_model("qwen2", tied=True, seed=1))
    second = ours_from_hf(hf_model("qwen2", tied=True, seed=2))
    out = tmp_path / "ckpt"
    spice_fast.save(first, None, out)
    out.rename(tmp_path / "ckpt.old")  # the state a crash after the first rename leaves
    with pytest.raises(CheckpointError, match="not found"):
        spice_fast.load(out, device="cpu")
    spice_fast.save(second, None, out)
    back, _ = spice_fast.load(out, device="cpu")
    assert_close(logits_of(back), logits_of(second), atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---- bad checkpoints ----


@pytest.fixture
def good_dir(tmp_path):
    spice_fast.save(ours_from_hf(hf_model("llama", tied=False)), None, tmp_path / "good")
    return tmp_path / "good"


def test_truncated_file_names_the_file(good_dir):
    path = good_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        spice_fast.load(good_dir, device="cpu")


def test_garbage_file_names_the_file(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"\x00\xffnot a safetensors file" * 7)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        spice_fast.load(good_dir, device="cpu")


def test_missing_tensor_is_named(good_dir):
    path = good_dir / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        spice_fast.load(good_dir, device="cpu")


def test_shape_mismatch_names_file_and_tensor(good_dir):
    config = json.loads((good_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (good_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape",
    ):
        spice_fast.load(good_dir, device="cpu")


def test_non_finite_weight_is_named(good_dir):
    path = good_dir / "model.safetensors"
    state = load_file(path)
    state["model.norm.weight"][3] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' holds NaN"):
        spice_fast.load(good_dir, device="cpu")


def test_missing_shard_is_named(tmp_path):
    spice_fast.save(
        ours_from_hf(hf_model("llama", tied=False)), None, tmp_path / "s", max_shard_bytes=200_000
    )
    (tmp_path / "s" / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors"):
        spice_fast.load(tmp_path / "s", device="cpu")


def test_pickle_weights_are_refused_not_unpickled(good_dir, monkeypatch):
    (good_dir / "model.safetensors").unlink()
    (good_dir / "pytorch_model.bin").write_bytes(b"pretend pickle")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called on a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles"):
        spice_fast.load(good_dir, device="cpu")


def test_missing_config_and_bad_json(tmp_path, good_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        spice_fast.load(tmp_path / "empty")
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        spice_fast.load(good_dir)


def test_unknown_architecture_in_directory(good_dir):
    config = json.loads((good_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (good_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported"):
        spice_fast.load(good_dir)


def test_bad_names_and_gguf_files(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found.*aliases"):
        spice_fast.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        spice_fast.load(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setenv("SPICE_FAST_CACHE", "off")
    with pytest.raises(CheckpointError, match=r"bad\.gguf: cannot read GGUF"):
        spice_fast.load(bad)


# ---- hub ids ----


def test_hub_id_offline_without_cache_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'someorg/some-model'.*HF_HUB_OFFLINE.*local cache"):
        spice_fast.load("someorg/some-model")


def test_hub_id_offline_loads_from_local_cache(tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<rev>)."""
    ours = ours_from_hf(hf_model("qwen3", tied=True))
    repo = tmp_path / "models--someorg--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    spice_fast.save(ours, tiny_tokenizer(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    back, tok = spice_fast.load("someorg/tiny", device="cpu")
    assert tok is not None
    assert_close(logits_of(back), logits_of(ours), atol=0)


def test_save_rejects_foreign_models(tmp_path):
    with pytest.raises(TypeError, match="CausalLM"):
        spice_fast.save(torch.nn.Linear(2, 2), None, tmp_path / "x")
