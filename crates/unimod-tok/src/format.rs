//! Sequence formats: how a sample of each task becomes one fixed-length token sequence with its
//! per-token metadata.
//!
//! **Show-o** ("universal prompting", omni-attention):
//! - T2I `[t2i] [pad…] [bos] prompt [eos] [soi] image [eoi]`, text left-padded; text is causal,
//!   `soi…eoi` attends bidirectionally to every non-pad token; the image is trained by masked
//!   token prediction (MaskGIT: cosine schedule, loss on masked positions, labels unshifted).
//! - MMU `[mmu] [soi] image [eoi] [bos] question answer [eos] [pad…]`: the prefix up to `eoi`
//!   is fully visible to every token, the text causal; next-token loss on the answer and `eos`.
//! - LM `[lm] [bos] text [eos] [pad…]`, causal, next-token loss.
//!
//! **Emu3**: the same layouts, every token causal, the image written in rows each followed by
//! `<|eol|>`, and next-token loss everywhere a loss applies (T2I: image codes and row ends
//! only). Emu3 also writes the grid size as text after `soi`; here every image of a run has the
//! grid of `format.image_side`, so the header would carry no information and is left out.

use crate::batch::{IGNORE, Sequence};
use crate::check::{self, InvalidValue};
use crate::task::{Segment, Task};
use crate::vocab::{Special, VocabLayout};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How the unified transformer models each task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Flavour {
    /// Omni-attention; T2I by masked image-token prediction (MaskGIT), MMU and LM next-token.
    #[default]
    Showo,
    /// Pure causal next-token prediction for every task.
    Emu3,
}

/// `[format]`: the shape of every sequence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FormatConfig {
    /// Show-o or Emu3 sequence layout.
    pub flavour: Flavour,
    /// Tokens of the text segment, `bos` and `eos` included.
    pub text_len: usize,
    /// Side of the image token grid (tokens per image = side²).
    pub image_side: usize,
    /// Probability of training T2I without its prompt (classifier-free guidance).
    pub cond_dropout: f64,
    /// Question–answer turns per MMU training sequence at most (as many of an image's
    /// questions, in random order, as fit `text_len`); 1 asks one question per image.
    pub mmu_turns: usize,
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            flavour: Flavour::Showo,
            text_len: 24,
            image_side: 8,
            cond_dropout: 0.1,
            mmu_turns: 1,
        }
    }
}

impl FormatConfig {
    /// `[format]` values in range: `text_len` in [4, 4096] (bos, eos and a token each way),
    /// `image_side` in [1, 256], `cond_dropout` in [0, 1], `mmu_turns` in [1, 64].
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check::int_in("format.text_len", self.text_len, 4, 4096)?;
        check::int_in("format.image_side", self.image_side, 1, 256)?;
        check::int_in("format.mmu_turns", self.mmu_turns, 1, 64)?;
        check::float_in("format.cond_dropout", self.cond_dropout, 0.0, 1.0)
    }
}

/// Why a sample cannot be formatted.
#[derive(Debug, thiserror::Error, PartialEq)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum FormatError {
    /// Text longer than `format.text_len`.
    #[error("{what} needs {len} text tokens, format.text_len allows {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// An image of the wrong number of codes.
    #[error("image has {got} codes, format.image_side = {side} needs {expected}")]
    ImageSize {
        got: usize,
        side: usize,
        expected: usize,
    },
}

/// Builds sequences as it goes, tracking segments and attention reach.
struct Builder {
    seq: Sequence,
}

impl Builder {
    fn new(task: Task) -> Builder {
        Builder {
            seq: Sequence {
                task,
                tokens: vec![],
                labels: vec![],
                segments: vec![],
                attn_upto: vec![],
            },
        }
    }

    fn push(&mut self, token: i64, segment: Segment) {
        let i = self.seq.tokens.len() as i64;
        self.seq.tokens.push(token);
        self.seq.labels.push(IGNORE);
        self.seq.segments.push(segment);
        self.seq.attn_upto.push(i);
    }

    fn special(&mut self, s: Special) {
        self.push(s.id(), Segment::Special);
    }

    fn pads(&mut self, n: usize) {
        for _ in 0..n {
            self.push(Special::Pad.id(), Segment::Pad);
        }
    }

    fn text(&mut self, ids: &[i64], segment: Segment) {
        for &t in ids {
            self.push(t, segment);
        }
    }

    fn len(&self) -> usize {
        self.seq.tokens.len()
    }

    /// Next-token labels: position i predicts token i+1 wherever `wanted(i + 1)`.
    fn next_token_labels(&mut self, wanted: impl Fn(&Sequence, usize) -> bool) {
        for i in 0..self.len().saturating_sub(1) {
            if wanted(&self.seq, i + 1) {
                self.seq.labels[i] = self.seq.tokens[i + 1];
            }
        }
    }

    /// Every token in `range` sees up to `upto` (bidirectional block or visible prefix).
    fn widen(&mut self, range: std::ops::Range<usize>, upto: usize) {
        for i in range {
            self.seq.attn_upto[i] = upto as i64;
        }
    }
}

impl FormatConfig {
    /// Image codes per image (`image_side²`; Emu3's row ends not counted).
    pub fn image_tokens(&self) -> usize {
        self.image_side * self.image_side
    }

    /// Tokens of the image block between `soi` and `eoi` (Emu3 adds a row end per row).
    pub fn image_block_len(&self) -> usize {
        match self.flavour {
            Flavour::Showo => self.image_tokens(),
            Flavour::Emu3 => self.image_tokens() + self.image_side,
        }
    }

    /// Every sequence of every task has this length.
    pub fn seq_len(&self) -> usize {
        1 + self.text_len + 2 + self.image_block_len()
    }

    fn check_image(&self, codes: &[u32]) -> Result<(), FormatError> {
        if codes.len() != self.image_tokens() {
            return Err(FormatError::ImageSize {
                got: codes.len(),
                side: self.image_side,
                expected: self.image_tokens(),
            });
        }
        Ok(())
    }

    fn image(&self, b: &mut Builder, vocab: &VocabLayout, codes: &[u32]) {
        match self.flavour {
            Flavour::Showo => {
                for &c in codes {
                    b.push(vocab.image_token(c), Segment::Image);
                }
            }
            Flavour::Emu3 => {
                for row in codes.chunks(self.image_side) {
                    for &c in row {
                        b.push(vocab.image_token(c), Segment::Image);
                    }
                    // Row ends are part of the image stream (routable, predicted, image modality).
                    b.push(Special::Eol.id(), Segment::Image);
                }
            }
        }
    }

    /// A T2I training or generation sequence. `codes: None` gives the generation prompt: every
    /// image token `<|mask|>` (Show-o; Emu3 generation uses [`FormatConfig::t2i_prefix`]).
    /// With `rng`, Show-o masks a cosine-scheduled share of the image and drops the prompt with
    /// probability `cond_dropout`.
    ///
    /// ```
    /// use unimod_tok::{FormatConfig, Segment, Special, VocabLayout};
    ///
    /// let vocab = VocabLayout { n_text: 40, n_codes: 16 };
    /// let f = FormatConfig { text_len: 6, image_side: 2, ..Default::default() }; // Show-o
    /// let s = f.t2i(&vocab, &[11, 12], Some(&[1, 5, 9, 2]), None)?;
    /// assert_eq!(s.len(), f.seq_len());
    /// assert_eq!(s.tokens[0], Special::T2i.id());
    /// // The four image codes follow `<|soi|>`, at the vocabulary's image offset.
    /// let image: Vec<i64> = (0..s.len()).filter(|&i| s.segments[i] == Segment::Image)
    ///     .map(|i| s.tokens[i]).collect();
    /// assert_eq!(image, [41, 45, 49, 42]);
    /// // The generation prompt: the same layout with every image token masked.
    /// let prompt = f.t2i(&vocab, &[11, 12], None, None)?;
    /// assert!((0..prompt.len()).filter(|&i| prompt.segments[i] == Segment::Image)
    ///     .all(|i| prompt.tokens[i] == Special::Mask.id()));
    /// # Ok::<(), unimod_tok::format::FormatError>(())
    /// ```
    pub fn t2i(
        &self,
        vocab: &VocabLayout,
        prompt: &[i64],
        codes: Option<&[u32]>,
        rng: Option<&mut dyn rand::RngCore>,
    ) -> Result<Sequence, FormatError> {
        let mut rng = rng;
        if prompt.len() + 2 > self.text_len {
            return Err(FormatError::TooLong {
                what: "the T2I prompt",
                len: prompt.len() + 2,
                max: self.text_len,
            });
        }
        let drop_prompt = match rng.as_deref_mut() {
            Some(r) => r.gen_bool(self.cond_dropout.clamp(0.0, 1.0)),
            None => false,
        };
        let prompt = if drop_prompt { &[][..] } else { prompt };
        let mut b = Builder::new(Task::T2I);
        b.special(Special::T2i);
        b.pads(self.text_len - prompt.len() - 2);
        b.special(Special::Bos);
        b.text(prompt, Segment::Prompt);
        b.special(Special::Eos);
        let soi = b.len();
        b.special(Special::Soi);
        let placeholder = vec![0u32; self.image_tokens()];
        let codes = match codes {
            Some(c) => {
                self.check_image(c)?;
                c
            }
            None => &placeholder,
        };
        self.image(&mut b, vocab, codes);
        b.special(Special::Eoi);
        let end = b.len() - 1;
        match self.flavour {
            Flavour::Showo => {
                b.widen(soi..b.len(), end);
                let image: Vec<usize> = (soi + 1..end).collect();
                let masked: Vec<usize> = match (rng, codes.as_ptr() == placeholder.as_ptr()) {
                    (_, true) => image.clone(),
                    (Some(r), false) => sample_mask(&image, r),
                    (None, false) => Vec::new(),
                };
                for i in masked {
                    if codes.as_ptr() != placeholder.as_ptr() {
                        b.seq.labels[i] = b.seq.tokens[i];
                    }
                    b.seq.tokens[i] = Special::Mask.id();
                }
            }
            Flavour::Emu3 => b.next_token_labels(|s, j| {
                j > soi
                    && (s.segments[j] == Segment::Image
                        || j == end
                        || s.segments[j - 1] == Segment::Image)
            }),
        }
        Ok(b.seq)
    }

    /// The autoregressive T2I generation prefix: everything up to and including `soi`.
    pub fn t2i_prefix(&self, vocab: &VocabLayout, prompt: &[i64]) -> Result<Sequence, FormatError> {
        let mut full = self.t2i(vocab, prompt, None, None)?;
        let keep = 1 + self.text_len + 1;
        full.tokens.truncate(keep);
        full.labels.truncate(keep);
        full.segments.truncate(keep);
        full.attn_upto.truncate(keep);
        Ok(full)
    }

    /// An MMU sequence; `answer: None` gives the generation prompt (ends after the question,
    /// unpadded).
    pub fn mmu(
        &self,
        vocab: &VocabLayout,
        codes: &[u32],
        question: &[i64],
        answer: Option<&[i64]>,
    ) -> Result<Sequence, FormatError> {
        match answer {
            Some(answer) => self.mmu_turns(vocab, codes, &[(question, answer)]),
            None => self.mmu_sequence(vocab, codes, &[], Some(question)),
        }
    }

    /// An MMU training sequence of several question–answer turns about one image (as LLaVA's
    /// conversations): `bos q₁ a₁ eos q₂ a₂ eos …`, each answer and its closing `eos` labelled,
    /// so one image teaches several answers. A turn sees the turns before it; the first turn is
    /// laid out as the single-question sequence evaluation asks.
    pub fn mmu_turns(
        &self,
        vocab: &VocabLayout,
        codes: &[u32],
        turns: &[(&[i64], &[i64])],
    ) -> Result<Sequence, FormatError> {
        self.mmu_sequence(vocab, codes, turns, None)
    }

    /// The text tokens `turns` take in an MMU sequence (`bos`, and each turn's `eos`).
    pub fn mmu_text_len(turns: &[(&[i64], &[i64])]) -> usize {
        1 + turns
            .iter()
            .map(|(q, a)| q.len() + a.len() + 1)
            .sum::<usize>()
    }

    /// The leading turns of `encoded` (question and answer tokens) that fit `text_len`
    /// together, the first always (too long alone, `mmu_turns` refuses it): how a dialogue is
    /// cut to one sequence.
    pub fn fitting_turns<'a>(
        &self,
        encoded: &'a [(Vec<i64>, Vec<i64>)],
    ) -> Vec<(&'a [i64], &'a [i64])> {
        let mut turns: Vec<(&[i64], &[i64])> = Vec::new();
        for (q, a) in encoded {
            turns.push((q, a));
            if turns.len() > 1 && Self::mmu_text_len(&turns) > self.text_len {
                turns.pop();
                break;
            }
        }
        turns
    }

    fn mmu_sequence(
        &self,
        vocab: &VocabLayout,
        codes: &[u32],
        turns: &[(&[i64], &[i64])],
        open: Option<&[i64]>,
    ) -> Result<Sequence, FormatError> {
        self.check_image(codes)?;
        let text = Self::mmu_text_len(turns) + open.map_or(0, |q| q.len() + 1);
        if text > self.text_len {
            return Err(FormatError::TooLong {
                what: "the MMU questions and answers",
                len: text,
                max: self.text_len,
            });
        }
        let mut b = Builder::new(Task::MMU);
        b.special(Special::Mmu);
        b.special(Special::Soi);
        self.image(&mut b, vocab, codes);
        b.special(Special::Eoi);
        let eoi = b.len() - 1;
        b.special(Special::Bos);
        for (question, answer) in turns {
            b.text(question, Segment::Question);
            b.text(answer, Segment::Answer);
            b.special(Special::Eos);
        }
        match open {
            Some(question) => b.text(question, Segment::Question),
            None => {
                b.pads(self.seq_len() - b.len());
                b.next_token_labels(|s, j| {
                    s.segments[j] == Segment::Answer
                        || (s.tokens[j] == Special::Eos.id()
                            && s.segments[j - 1] == Segment::Answer)
                });
            }
        }
        if self.flavour == Flavour::Showo {
            b.widen(0..eoi + 1, eoi);
        }
        Ok(b.seq)
    }

    /// An LM sequence of free text.
    pub fn lm(&self, text: &[i64]) -> Result<Sequence, FormatError> {
        let max = self.seq_len() - 3;
        if text.len() > max {
            return Err(FormatError::TooLong {
                what: "the LM text",
                len: text.len(),
                max,
            });
        }
        let mut b = Builder::new(Task::LM);
        b.special(Special::Lm);
        b.special(Special::Bos);
        b.text(text, Segment::Text);
        b.special(Special::Eos);
        let eos = b.len() - 1;
        b.pads(self.seq_len() - b.len());
        b.next_token_labels(|s, j| s.segments[j] == Segment::Text || j == eos);
        Ok(b.seq)
    }

    /// Tokens per segment of a full-length sequence of `task` (text segment filled, questions
    /// and answers splitting it evenly): what the analytic FLOPs count assumes. `None` for a
    /// task that has no format here (one beyond [`Task::BUILT_IN`]).
    pub fn composition(&self, task: Task) -> Option<[usize; Segment::COUNT]> {
        let mut c = [0usize; Segment::COUNT];
        let text = self.text_len - 2;
        let rows = self.image_block_len() - self.image_tokens();
        match task {
            Task::T2I | Task::MMU => {
                c[Segment::Special.index()] = 5;
                c[Segment::Image.index()] = self.image_tokens() + rows;
                if task == Task::T2I {
                    c[Segment::Prompt.index()] = text;
                } else {
                    c[Segment::Question.index()] = text / 2;
                    c[Segment::Answer.index()] = text - text / 2;
                }
            }
            Task::LM => {
                c[Segment::Special.index()] = 3;
                c[Segment::Text.index()] = self.seq_len() - 3;
            }
            _ => return None,
        }
        Some(c)
    }
}

/// Show-o's masking: ratio r = cos(π/2 · u), u ~ U(0, 1); mask max(1, round(r · N)) tokens
/// chosen uniformly.
fn sample_mask(image: &[usize], rng: &mut dyn rand::RngCore) -> Vec<usize> {
    let u: f64 = rng.r#gen();
    let ratio = (u * std::f64::consts::FRAC_PI_2).cos();
    let n = ((ratio * image.len() as f64).round() as usize).clamp(1, image.len());
    rand::seq::index::sample(rng, image.len(), n)
        .into_iter()
        .map(|i| image[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const V: VocabLayout = VocabLayout {
        n_text: 50,
        n_codes: 16,
    };

    fn cfg(flavour: Flavour) -> FormatConfig {
        FormatConfig {
            flavour,
            text_len: 8,
            image_side: 2,
            cond_dropout: 0.0,
            mmu_turns: 1,
        }
    }

    #[test]
    fn showo_t2i_layout_mask_and_labels() {
        let f = cfg(Flavour::Showo);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let s = f
            .t2i(&V, &[20, 21], Some(&[1, 2, 3, 4]), Some(&mut rng))
            .unwrap();
        assert_eq!(s.len(), f.seq_len());
        // [t2i] pad pad pad pad bos 20 21 eos soi i i i i eoi  → 1 + 8 + 2 + 4 = 15
        assert_eq!(s.len(), 15);
        assert_eq!(&s.segments[1..5], &[Segment::Pad; 4]);
        assert_eq!(s.tokens[9], Special::Soi.id());
        // text causal, image block sees everything up to eoi
        assert_eq!(s.attn_upto[6], 6);
        assert!(s.attn_upto[9..].iter().all(|&u| u == 14));
        // labels only on masked image positions, unshifted
        for i in 0..15 {
            if s.labels[i] != IGNORE {
                assert!((10..14).contains(&i));
                assert_eq!(s.tokens[i], Special::Mask.id());
                assert_eq!(s.labels[i], V.image_token((i - 9) as u32));
            }
        }
        assert!(s.labels.iter().any(|l| *l != IGNORE));
    }

    #[test]
    fn showo_generation_prompt_masks_the_whole_image_without_labels() {
        let s = cfg(Flavour::Showo).t2i(&V, &[20], None, None).unwrap();
        assert_eq!(s.tokens[10..14], [Special::Mask.id(); 4]);
        assert!(s.labels.iter().all(|l| *l == IGNORE));
    }

    #[test]
    fn showo_mmu_prefix_visible_and_answer_labels() {
        let f = cfg(Flavour::Showo);
        let s = f.mmu(&V, &[1, 2, 3, 4], &[30, 31], Some(&[40])).unwrap();
        assert_eq!(s.len(), f.seq_len());
        // [mmu] soi i i i i eoi bos 30 31 40 eos pad pad pad
        assert!(s.attn_upto[..7].iter().all(|&u| u == 6));
        assert_eq!(s.attn_upto[8], 8);
        assert_eq!(s.labels[9], 40); // 31 predicts the answer
        assert_eq!(s.labels[10], Special::Eos.id()); // the answer predicts eos
        assert_eq!(s.labels.iter().filter(|l| **l != IGNORE).count(), 2);
        assert_eq!(&s.segments[12..], &[Segment::Pad; 3]);
    }

    #[test]
    fn mmu_turns_label_every_answer_and_its_eos_and_start_as_one_question() {
        let f = cfg(Flavour::Showo);
        let one = f.mmu(&V, &[1, 2, 3, 4], &[30, 31], Some(&[40])).unwrap();
        let turns = f
            .mmu_turns(&V, &[1, 2, 3, 4], &[(&[30, 31], &[40]), (&[32], &[41])])
            .unwrap();
        // [mmu] soi i i i i eoi bos 30 31 40 eos 32 41 eos
        assert_eq!(turns.len(), f.seq_len());
        assert_eq!(&turns.tokens[..12], &one.tokens[..12]);
        assert_eq!(&turns.labels[..11], &one.labels[..11]);
        assert_eq!(
            turns.labels[11], IGNORE,
            "the next question is not predicted"
        );
        assert_eq!(turns.labels[12], 41);
        assert_eq!(turns.labels[13], Special::Eos.id());
        assert_eq!(turns.labels.iter().filter(|l| **l != IGNORE).count(), 4);
        assert_eq!(turns.segments[12], Segment::Question);
        assert_eq!(
            FormatConfig::mmu_text_len(&[(&[30, 31], &[40]), (&[32], &[41])]),
            8
        );
        let turn: (&[i64], &[i64]) = (&[30, 31], &[40]);
        let too_many = f.mmu_turns(&V, &[1, 2, 3, 4], &[turn; 3]);
        assert!(matches!(
            too_many,
            Err(FormatError::TooLong {
                len: 13,
                max: 8,
                ..
            })
        ));
    }

    #[test]
    fn emu3_is_causal_with_row_ends_and_shifted_image_labels() {
        let f = cfg(Flavour::Emu3);
        let s = f.t2i(&V, &[20], Some(&[1, 2, 3, 4]), None).unwrap();
        assert_eq!(s.len(), f.seq_len());
        assert!(s.attn_upto.iter().enumerate().all(|(i, &u)| u == i as i64));
        let soi = s
            .tokens
            .iter()
            .position(|t| *t == Special::Soi.id())
            .unwrap();
        assert_eq!(
            &s.tokens[soi + 1..],
            &[
                V.image_token(1),
                V.image_token(2),
                Special::Eol.id(),
                V.image_token(3),
                V.image_token(4),
                Special::Eol.id(),
                Special::Eoi.id()
            ]
        );
        assert_eq!(s.labels[soi], V.image_token(1));
        assert_eq!(s.labels[soi + 2], Special::Eol.id());
        assert_eq!(s.labels[s.len() - 2], Special::Eoi.id());
        assert_eq!(s.labels.iter().filter(|l| **l != IGNORE).count(), 7);
    }

    #[test]
    fn too_long_text_is_an_error_naming_the_limit() {
        let e = cfg(Flavour::Showo)
            .t2i(&V, &[1; 9], None, None)
            .unwrap_err();
        assert_eq!(
            e,
            FormatError::TooLong {
                what: "the T2I prompt",
                len: 11,
                max: 8
            }
        );
    }
}
