//! What the trainer's end-to-end tests share.

/// `--set` overrides of a miniature run: a 2-layer d-32 model, 8×8 tokens, tiny tokenizers and
/// pools, 6 steps on the CPU (seconds).
pub const MINIATURE: &[&str] = &[
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.d_ffn=64",
    "format.text_len=32",
    "format.image_side=8",
    "data.train_pool=64",
    "data.val_pool=32",
    "tokenizer.text_vocab=512",
    "tokenizer.text_examples=1000",
    "tokenizer.image={ steps = 20, channels = 8, codebook_size = 32, batch_size = 8, restart_every = 10 }",
    "train.steps=6",
    "train.warmup=2",
    "train.device=\"cpu\"",
];
