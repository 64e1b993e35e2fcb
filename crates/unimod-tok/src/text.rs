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

/// The text tokenizer of a run: a byte-level BPE whose first ids are the [`Special`] tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
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
        Ok(TextTokenizer { inner: tk.into() })
    }

    /// Writes it as a `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TextError> {
        self.inner.save(path, false).map_err(err)
    }

    /// Reads a `tokenizer.json`, refusing one whose specials are not at their ids.
    pub fn load(path: &Path) -> Result<TextTokenizer, TextError> {
        let inner = Tokenizer::from_file(path).map_err(err)?;
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
        Ok(TextTokenizer { inner })
    }

    /// Vocabulary size, specials included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TextError> {
        let e = self.inner.encode(text, false).map_err(err)?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Decodes text ids, skipping special tokens and anything outside the text vocabulary.
    pub fn decode(&self, ids: &[i64]) -> Result<String, TextError> {
        let n = self.vocab_size() as i64;
        let ids: Vec<u32> = ids
            .iter()
            .filter(|&&i| i >= 0 && i < n)
            .map(|&i| i as u32)
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
        std::fs::remove_file(path).unwrap();
    }
}
