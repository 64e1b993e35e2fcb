"""Tiny Hugging Face checkpoints and their reference outputs, for the parity tests of
`unimod_model::hf` (crates/unimod-model/tests/hf.rs).

    pip install "transformers==4.57.1" safetensors   # torch: the one `cargo xtask setup` installed
    python scripts/hf_fixtures.py                    # writes crates/unimod-model/tests/fixtures/hf/
    python scripts/hf_fixtures.py --check-export target/tmp/hf-export/{phi,llama}
                                                     # what `cargo test --test hf` exported loads here

Each fixture directory holds what a user's checkpoint holds (`config.json`, `model.safetensors`)
and `expected.safetensors`: `input_ids` [2, T] and what `transformers` computes from them in f32,
`logits` [2, T, V] and `hidden_states` [L + 1, 2, T, D] (the embedding output, then every layer's
output; the last layer's is before the final norm, as ours). The models are randomly initialised
(seeded) and well under 1 MB each.
"""

import argparse
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/unimod-model/tests/fixtures/hf"
# Ids of the unified vocabulary that the Hugging Face text ids move to: our special tokens come
# first (unimod_tok::Special::ALL), then the checkpoint's vocabulary, then the image codes.
TEXT_OFFSET = 10


def models():
    phi = PhiConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        initializer_range=0.2,
        rope_theta=10000.0,
    )
    llama = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    return {"phi": (PhiForCausalLM, phi), "llama": (LlamaForCausalLM, llama)}


def reference(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # transformers' last hidden state is after the final norm; ours is before it, so the last
    # layer is compared through the logits only.
    hidden = torch.stack(out.hidden_states[:-1])
    return out.logits.float().contiguous(), hidden.float().contiguous()


def write(name, cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    # Non-trivial norms and biases, so that a mapping that drops one is caught.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)  # not read
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=g)
    logits, hidden = reference(model, ids)
    save_file({"input_ids": ids, "logits": logits, "hidden_states": hidden}, d / "expected.safetensors")
    print(f"{d}: {sum(p.numel() for p in model.parameters())} parameters")


def check_export(d):
    """The exported model's logits on our ids equal the fixture's on the same text."""
    d = pathlib.Path(d)
    cfg = json.loads((d / "config.json").read_text())
    source = OUT / cfg["model_type"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    from safetensors.torch import load_file

    expected = load_file(source / "expected.safetensors")
    ids = expected["input_ids"] + TEXT_OFFSET
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    v = expected["logits"].shape[-1]
    diff = (logits[..., TEXT_OFFSET : TEXT_OFFSET + v] - expected["logits"]).abs().max().item()
    print(f"{d}: {cfg['model_type']} loads in transformers; max |logit difference| {diff:.2e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-export", nargs="*", default=None)
    a = ap.parse_args()
    if a.check_export:
        for d in a.check_export:
            check_export(d)
    else:
        for name, (cls, config) in models().items():
            write(name, cls, config)
