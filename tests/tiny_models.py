"""Tiny random transformers models of the supported family, with every parameter perturbed.

transformers initialises norms to one and biases to zero, which would let a model that ignores
them pass a parity test; ``perturb`` gives every parameter random values first.
"""

from __future__ import annotations

import torch
import transformers

from spice_fast.model import CausalLM, ModelConfig

VOCAB = 1000 + 37

# name -> (model class, config class, extra config)
FAMILY = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, {"head_dim": 24}),
}


def hf_config(arch: str, *, tied: bool, **overrides):
    _, config_cls, extra = FAMILY[arch]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA 4:1
        tie_word_embeddings=tied,
        rope_theta=5000.0,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    return config_cls(**kwargs)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + std * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def hf_model(arch: str, *, tied: bool, seed: int = 0, **overrides):
    model_cls = FAMILY[arch][0]
    torch.manual_seed(seed)
    return perturb(model_cls(hf_config(arch, tied=tied, **overrides)).eval(), seed)


def ours_from_hf(hf) -> CausalLM:
    config = ModelConfig.from_hf(hf.config.to_dict())
    model = CausalLM(config)
    state = {k: v for k, v in hf.state_dict().items() if k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials, no merges): any text round-trips, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<unk>": 256, "<s>": 257, "</s>": 258})
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_checkpoint(path, arch: str = "qwen2", *, tied: bool = True, seed: int = 0, **overrides):
    """A tiny random model with the byte tokenizer, saved as an HF directory that spice_fast.load reads.

    EOS is the tokenizer's ``</s>`` (258) so that generation can stop.
    """
    import spice_fast

    overrides = {"eos_token_id": 258, "bos_token_id": 257, "pad_token_id": 256, **overrides}
    model = ours_from_hf(hf_model(arch, tied=tied, seed=seed, **overrides))
    spice_fast.save(model, byte_tokenizer(), path)
    return path
