//! One vocabulary layout for the whole project: text ids first (the special tokens are the
//! first ids of the text tokenizer), then the image codes at an offset.

use serde::{Deserialize, Serialize};

/// Special tokens, in the order the text tokenizer assigns their ids (0, 1, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each variant is the token [`Special::text`] spells
pub enum Special {
    Pad,
    Bos,
    Eos,
    T2i,
    Mmu,
    Lm,
    Soi,
    Eoi,
    Eol,
    Mask,
}

impl Special {
    /// Every special token, in id order.
    pub const ALL: [Special; 10] = [
        Special::Pad,
        Special::Bos,
        Special::Eos,
        Special::T2i,
        Special::Mmu,
        Special::Lm,
        Special::Soi,
        Special::Eoi,
        Special::Eol,
        Special::Mask,
    ];

    /// The token as the text tokenizer spells it (`<|soi|>`).
    pub fn text(self) -> &'static str {
        match self {
            Special::Pad => "<|pad|>",
            Special::Bos => "<|bos|>",
            Special::Eos => "<|eos|>",
            Special::T2i => "<|t2i|>",
            Special::Mmu => "<|mmu|>",
            Special::Lm => "<|lm|>",
            Special::Soi => "<|soi|>",
            Special::Eoi => "<|eoi|>",
            Special::Eol => "<|eol|>",
            Special::Mask => "<|mask|>",
        }
    }

    /// Its id: its place in [`Special::ALL`].
    pub fn id(self) -> i64 {
        Special::ALL
            .iter()
            .position(|s| *s == self)
            .expect("listed") as i64
    }
}

/// `[0, n_text)` text ids (specials first), `[n_text, n_text + n_codes)` image codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabLayout {
    /// Size of the text vocabulary, special tokens included.
    pub n_text: usize,
    /// Size of the image codebook.
    pub n_codes: usize,
}

impl Default for VocabLayout {
    fn default() -> Self {
        VocabLayout {
            n_text: 1024,
            n_codes: 512,
        }
    }
}

impl VocabLayout {
    /// Rows of the embedding table.
    pub fn size(&self) -> usize {
        self.n_text + self.n_codes
    }

    /// The id of image code 0.
    pub fn image_offset(&self) -> i64 {
        self.n_text as i64
    }

    /// The id of an image code.
    pub fn image_token(&self, code: u32) -> i64 {
        self.image_offset() + code as i64
    }

    /// Whether `id` is an image code's.
    pub fn is_image(&self, id: i64) -> bool {
        id >= self.image_offset() && id < self.size() as i64
    }

    /// The code of an image token id, if it is one.
    pub fn code(&self, id: i64) -> Option<u32> {
        self.is_image(id).then(|| (id - self.image_offset()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specials_have_distinct_leading_ids() {
        let ids: Vec<i64> = Special::ALL.iter().map(|s| s.id()).collect();
        assert_eq!(ids, (0..Special::ALL.len() as i64).collect::<Vec<_>>());
    }

    #[test]
    fn image_codes_round_trip() {
        let v = VocabLayout {
            n_text: 100,
            n_codes: 16,
        };
        assert_eq!(v.size(), 116);
        for c in 0..16 {
            assert_eq!(v.code(v.image_token(c)), Some(c));
        }
        assert_eq!(v.code(99), None);
        assert_eq!(v.code(116), None);
    }
}
