//! The text tokenizer: a byte-level BPE trained with HuggingFace `tokenizers` on the dataset's
//! own captions, questions and answers, saved as a `tokenizer.json` that Python's `tokenizers`
//! loads too. The special tokens of the sequence formats take the first ids, in
//! [`Special::ALL`] order, so [`Special::id`] is valid for every trained tokenizer.

use crate::vocab::Special;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Why a text tokenizer cannot be trained, read or used.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum TextError {
    /// The `tokenizers` crate failed.
    #[error("text tokenizer: {0}")]
    Tokenizers(String),
    /// A tokenizer whose special tokens are not where the formats expect them.
    #[error(
        "{path} is not a UniMoD-rs text tokenizer: special token {token} has id {found:?}, expected {expected}"
    )]
    Specials {
        path: String,
        token: &'static str,
        found: Option<u32>,
        expected: i64,
    },
}

fn err(e: impl std::fmt::Display) -> TextError {
    TextError::Tokenizers(e.to_string())
}

/// The text tokenizer of a run: a byte-level BPE trained here, whose first ids are the
/// [`Special`] tokens, or a pretrained backbone's `tokenizer.json`, whose ids sit after them.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Added to the inner tokenizer's ids: 0 for a trained BPE (its specials are its own first
    /// ids), `Special::ALL.len()` for a pretrained one (the unified vocabulary puts the specials
    /// first and the backbone's text after them, as `unimod_model::hf` loads its embeddings).
    offset: i64,
    /// The text vocabulary's size, specials included.
    size: usize,
}

impl TextTokenizer {
    /// Trains a BPE of at most `vocab_size` tokens (specials included) on `texts`.
    pub fn train(
        texts: impl Iterator<Item = String> + Send,
        vocab_size: usize,
    ) -> Result<TextTokenizer, TextError> {
        let specials = Special::ALL
            .iter()
            .map(|s| AddedToken::from(s.text(), true))
            .collect();
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(specials)
            .build();
        let mut tk = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(true)))
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_decoder(Some(ByteLevelDecoder::default()))
            .build()
            .map_err(err)?;
        tk.train(&mut trainer, texts).map_err(err)?;
        let inner: Tokenizer = tk.into();
        Ok(TextTokenizer {
            size: inner.get_vocab_size(true),
            inner,
            offset: 0,
        })
    }

    /// Writes it as a `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TextError> {
        self.inner.save(path, false).map_err(err)
    }

    /// Reads a `tokenizer.json`, refusing one whose specials are not at their ids.
    pub fn load(path: &Path) -> Result<TextTokenizer, TextError> {
        let inner = Tokenizer::from_file(path).map_err(err)?;
        let size = inner.get_vocab_size(true);
        for s in Special::ALL {
            let found = inner.token_to_id(s.text());
            if found.map(i64::from) != Some(s.id()) {
                return Err(TextError::Specials {
                    path: path.display().to_string(),
                    token: s.text(),
                    found,
                    expected: s.id(),
                });
            }
        }
        Ok(TextTokenizer {
            inner,
            offset: 0,
            size,
        })
    }

    /// A pretrained backbone's `tokenizer.json` (any Hugging Face tokenizer) for a model whose
    /// text embedding rows are the backbone's `n_text` rows after the [`Special`] ones: its id
    /// `i` becomes `Special::ALL.len() + i`. `n_text` is the backbone's `vocab_size` (often
    /// above the tokenizer's own count: padded embedding tables); a tokenizer with ids at or
    /// past it is refused.
    pub fn pretrained(path: &Path, n_text: usize) -> Result<TextTokenizer, TextError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TextError::Tokenizers(format!("{}: {e}", path.display())))?;
        let own = inner.get_vocab_size(true);
        if own > n_text {
            return Err(TextError::Tokenizers(format!(
                "{} has {own} tokens, more than the backbone's vocab_size {n_text}",
                path.display()
            )));
        }
        Ok(TextTokenizer {
            inner,
            offset: Special::ALL.len() as i64,
            size: Special::ALL.len() + n_text,
        })
    }

    /// Vocabulary size, specials included.
    pub fn vocab_size(&self) -> usize {
        self.size
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TextError> {
        let e = self.inner.encode(text, false).map_err(err)?;
        Ok(e.get_ids()
            .iter()
            .map(|&i| i as i64 + self.offset)
            .collect())
    }

    /// Decodes text ids, skipping special tokens and anything outside the text vocabulary.
    pub fn decode(&self, ids: &[i64]) -> Result<String, TextError> {
        let n = self.vocab_size() as i64;
        let ids: Vec<u32> = ids
            .iter()
            .filter(|&&i| i >= self.offset && i < n)
            .map(|&i| (i - self.offset) as u32)
            .collect();
        Ok(self
            .inner
            .decode(&ids, true)
            .map_err(err)?
            .trim()
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_round_trips_and_keeps_special_ids() {
        let corpus: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "a red circle at the top left and {} blue squares",
                    ["two", "three"][i % 2]
                )
            })
            .collect();
        let tk = TextTokenizer::train(corpus.into_iter(), 300).unwrap();
        let ids = tk.encode("a red circle at the top left").unwrap();
        assert!(ids.iter().all(|&i| i >= Special::ALL.len() as i64));
        assert_eq!(tk.decode(&ids).unwrap(), "a red circle at the top left");
        let path = std::env::temp_dir().join(format!("unimod-bpe-{}.json", std::process::id()));
        tk.save(&path).unwrap();
        let back = TextTokenizer::load(&path).unwrap();
        assert_eq!(
            back.encode("three blue squares").unwrap(),
            tk.encode("three blue squares").unwrap()
        );
        assert_eq!(
            Special::Mask.id(),
            back.inner.token_to_id("<|mask|>").unwrap() as i64
        );
        // Read as a pretrained backbone's tokenizer, its ids move past the specials (its own
        // specials are then plain text); one larger than the backbone's vocabulary is refused.
        let n = tk.vocab_size();
        let pre = TextTokenizer::pretrained(&path, n + 4).unwrap();
        let offset = Special::ALL.len() as i64;
        let shifted: Vec<i64> = tk
            .encode("red circle")
            .unwrap()
            .iter()
            .map(|i| i + offset)
            .collect();
        assert_eq!(pre.encode("red circle").unwrap(), shifted);
        assert_eq!(pre.decode(&shifted).unwrap(), "red circle");
        assert_eq!(pre.vocab_size(), Special::ALL.len() + n + 4);
        let e = TextTokenizer::pretrained(&path, n - 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("more than the backbone's vocab_size"), "{e}");
        std::fs::remove_file(path).unwrap();
    }
}
