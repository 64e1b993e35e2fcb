//! Evaluation of a trained model: validation loss per task; T2I generation scored by the judge
//! (per category and overall); MMU exact-match accuracy per question type; and the agreement of
//! the causal routing decision with top-k. Generation uses the routing mode each task needs:
//! top-k for Show-o's parallel MaskGIT decoding, the causal decision for autoregressive decoding
//! (or top-k over the prefix decoded so far, `eval.decode_routing`, to price that decision).

use crate::RunConfig;
use crate::data;
use crate::train::RunContext;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};
use unimod_model::generate::{self, SamplingConfig};
use unimod_model::{ForwardOptions, UnifiedTransformer};
use unimod_tok::dataset::{Image, Qa, Split};
use unimod_tok::judge::JudgeReport;
use unimod_tok::{Flavour, Segment, Special, Task};

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Validation batches the losses are averaged over.
    pub val_batches: usize,
    /// Images generated and judged.
    pub t2i_samples: usize,
    /// Questions answered.
    pub mmu_samples: usize,
    /// The longest answer decoded.
    pub max_answer_tokens: usize,
    /// How routed layers decide in autoregressive decoding (MMU answers, Emu3 images).
    pub decode_routing: DecodeRouting,
    /// Which caption of each validation example prompts T2I.
    pub t2i_caption: CaptionChoice,
    /// How images are sampled.
    pub sampling: SamplingConfig,
}

/// `eval.decode_routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeRouting {
    /// `model.routing.causal_mode` with a KV cache: how a routed model decodes in use.
    #[default]
    Causal,
    /// Top-k over the prompt and the tokens decoded so far, recomputed at every token (no
    /// cache, quadratic): training's rule as far as decoding can run it, which never sees
    /// what follows. Against `causal` on the same checkpoint, it tells which of the two
    /// decisions answers better.
    TopKPrefix,
}

impl DecodeRouting {
    /// The routing mode and whether to cache, for decoding `task` with `model`.
    fn decoding(
        self,
        model: &UnifiedTransformer,
        task: Task,
    ) -> (unimod_router::RoutingMode, bool) {
        match self {
            DecodeRouting::Causal => (generate::mode_for(model, task), true),
            DecodeRouting::TopKPrefix => (unimod_router::RoutingMode::TopK, false),
        }
    }
}

/// `eval.t2i_caption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionChoice {
    /// Example `i` takes phrasing `i mod n` of its `n` fitting captions, so every phrasing of
    /// the world is scored in turn (in `shapes`: every object with its position; a count; a
    /// relation), as GenEval mixes prompt categories.
    #[default]
    Rotate,
    /// Always the first fitting caption (in `shapes`: every object with its position, 3–9
    /// facts).
    First,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            val_batches: 4,
            t2i_samples: 64,
            mmu_samples: 128,
            max_answer_tokens: 6,
            decode_routing: DecodeRouting::Causal,
            t2i_caption: CaptionChoice::Rotate,
            sampling: SamplingConfig::default(),
        }
    }
}

/// Precision and recall of a causal decision against top-k membership, over routable tokens.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Agreement {
    /// Share of the causal decision's picks that top-k picked.
    pub precision: f64,
    /// Share of top-k's picks that the causal decision picked.
    pub recall: f64,
}

/// What `unimod eval` measured (its `eval.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalReport {
    /// Validation loss per task.
    pub val_loss: BTreeMap<String, f64>,
    /// Share of generated images whose caption's facts all hold.
    pub t2i_overall: f64,
    /// Per fact category: the share of its facts that hold.
    pub t2i_per_category: BTreeMap<String, f64>,
    /// Share of all the captions' facts that hold (whole captions are all-or-nothing).
    #[serde(default)]
    pub t2i_facts: f64,
    /// `t2i_facts` of a perfect generator that ignores its prompt: the real validation images,
    /// each scored against the next example's caption. A model above it follows its prompts;
    /// the same for every model evaluated on the same captions.
    #[serde(default)]
    pub t2i_facts_prompt_blind: Option<f64>,
    /// `t2i_overall` and `t2i_facts` of the generated images scored under the next example's
    /// caption: what this generator gets when its prompt does not matter. A score is evidence
    /// of prompt following only above these.
    #[serde(default)]
    pub t2i_overall_scrambled: Option<f64>,
    /// See `t2i_overall_scrambled`.
    #[serde(default)]
    pub t2i_facts_scrambled: Option<f64>,
    /// `t2i_per_category` of the same prompt-scrambled control.
    #[serde(default)]
    pub t2i_per_category_scrambled: BTreeMap<String, f64>,
    /// Fréchet distance of the judge's features, generated vs the validation images of the
    /// same captions, where the judge has features (MNIST). With fewer samples than feature
    /// dimensions (128) it is biased upwards: compare runs with the same `t2i_samples`.
    #[serde(default)]
    pub t2i_frechet: Option<f64>,
    /// Exact match of greedy answers, decoded as `eval.decode_routing` says.
    pub mmu_accuracy: f64,
    /// The same per question kind.
    pub mmu_per_kind: BTreeMap<String, f64>,
    /// Exact match of an image-blind answerer on the same questions: the most common answer to
    /// each question text (by kind where the text is unseen) over the first 2048 training
    /// examples. The
    /// chance level of MMU accuracy, answer priors included.
    #[serde(default)]
    pub mmu_blind: Option<f64>,
    /// `mmu_blind` per question kind.
    #[serde(default)]
    pub mmu_blind_per_kind: BTreeMap<String, f64>,
    /// Causal router decision (sigmoid ≥ 0.5) and auxiliary predictor vs top-k.
    pub router_agreement: Option<Agreement>,
    /// The auxiliary predictor's decisions vs top-k.
    pub predictor_agreement: Option<Agreement>,
    /// MoMa's auxiliary routers vs the experts' choices, over each group's tokens and experts.
    #[serde(default)]
    pub expert_agreement: Option<Agreement>,
    /// Validation loss when every routing decision is the causal one that decoding uses
    /// (`routing.causal_mode` for MoD layers, the auxiliary routers for MoMa), on the same
    /// batches as `val_loss` (which decides by top-k / expert choice); empty for a model that
    /// routes nothing. The gap is the price of deciding without looking ahead.
    #[serde(default)]
    pub val_loss_causal: BTreeMap<String, f64>,
    /// The same questions as `mmu_accuracy`, teacher-forced: the true answer in place, right
    /// when every answer token (and the end) is the greedy prediction. Deciding by top-k as
    /// training does, and by the causal decisions decoding uses: the same model and inputs, so
    /// the gap is what the routing decision alone costs in answers. For models that route.
    #[serde(default)]
    pub mmu_teacher_forced: Option<TeacherForced>,
    /// Whether the validation forward (top-k / expert choice, as `val_loss`) looks ahead: the
    /// first answer token predicted with the true answer in place and with another planted.
    #[serde(default)]
    pub lookahead: Option<Lookahead>,
}

/// `mmu_teacher_forced`: exact match overall and per question kind, by routing decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TeacherForced {
    /// Deciding by top-k (MoMa: expert choice) over the whole sequence.
    pub top_k: f64,
    /// Deciding as decoding does (`model.routing.causal_mode`; MoMa: its auxiliary routers).
    pub causal: f64,
    /// `top_k` per question kind.
    pub top_k_per_kind: BTreeMap<String, f64>,
    /// `causal` per question kind.
    pub causal_per_kind: BTreeMap<String, f64>,
    /// `top_k` with the question as the first turn of a dialogue as training lays them out,
    /// the image's other questions and answers after it (as many as `format.mmu_turns` and
    /// `text_len` allow), the first answer judged. It cannot see them, so without look-ahead
    /// this is `top_k`; top-k sizes its choice by the whole sequence, so it may not be.
    pub top_k_followed: f64,
    /// `top_k_followed` per question kind.
    pub top_k_followed_per_kind: BTreeMap<String, f64>,
    /// `top_k_followed` with every token after the judged turn replaced by the question's
    /// first (segments kept, so top-k chooses among as many tokens): near `top_k_followed`,
    /// what later turns lend is their length; near `top_k`, their content.
    #[serde(default)]
    pub top_k_filled: f64,
    /// `top_k_filled` per question kind.
    #[serde(default)]
    pub top_k_filled_per_kind: BTreeMap<String, f64>,
}

/// Exact match overall and per question kind.
pub type Scores<'a> = (f64, &'a BTreeMap<String, f64>);

impl TeacherForced {
    /// Each decision's name, with its scores.
    pub fn decisions(&self) -> [(&'static str, Scores<'_>); 4] {
        [
            ("top-k", (self.top_k, &self.top_k_per_kind)),
            ("causal", (self.causal, &self.causal_per_kind)),
            (
                "top-k followed",
                (self.top_k_followed, &self.top_k_followed_per_kind),
            ),
            (
                "top-k filled",
                (self.top_k_filled, &self.top_k_filled_per_kind),
            ),
        ]
    }
}

/// `[B]` whether every labelled token of each row is its greedy prediction among `allowed`
/// (`[V]` bool) when routed layers decide by `mode`.
fn teacher_forced(
    model: &UnifiedTransformer,
    batch: &unimod_tok::Batch,
    mode: unimod_router::RoutingMode,
    allowed: &Tensor,
) -> Result<Tensor> {
    let opts = ForwardOptions {
        mode,
        ..Default::default()
    };
    let logits = model.forward(batch, &opts)?.logits;
    let unlabelled = batch.labels.eq(unimod_tok::IGNORE);
    let greedy = logits
        .masked_fill(
            &allowed.logical_not().to_device(logits.device()),
            f64::NEG_INFINITY,
        )
        .argmax(-1, false);
    Ok(greedy
        .eq_tensor(&batch.labels)
        .logical_or(&unlabelled)
        .all_dim(1, false))
}

/// Whether any layer of `model` decides which tokens it processes (routed MoD layers, MoMa).
fn decides(model: &UnifiedTransformer) -> bool {
    model.cfg.moma.is_some()
        || model
            .plans
            .iter()
            .any(|p| matches!(p, unimod_router::LayerPlan::Routed { .. }))
}

/// A probe of look-ahead in a forward pass. The token that predicts an answer's first token
/// cannot attend to it, so in a causal model its prediction cannot depend on it. Top-k over a
/// sequence (and expert choice) decides which earlier tokens a layer processes from every
/// token's score, the answer's included, so a model trained that way could read the answer
/// before it is given, and its teacher-forced validation loss would flatter it. The probe
/// replaces only each MMU sequence's first answer token, by the next answered sequence's, and
/// reads the prediction one position before. (What later tokens lend through their number
/// rather than their content, `TeacherForced::top_k_filled` measures.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Lookahead {
    /// Answered sequences probed.
    pub probed: usize,
    /// Of those, the ones whose planted token differs from their true one.
    pub differing: usize,
    /// Share of the probed whose greedy prediction changed: 0 exactly without look-ahead.
    pub moved: f64,
    /// Mean absolute change of the true token's log-probability: 0 exactly without
    /// look-ahead, and the size of what a routed model's top-k lets through when `moved` is 0.
    pub log_prob_shift: f64,
    /// Where the planted token differs from the true one, the share of predictions that
    /// changed to the planted token: how far the answer is read from the future, not the
    /// image (0 exactly without look-ahead).
    pub follows_planted: f64,
    /// Share of true first answer tokens predicted, with the true answer in place.
    pub accuracy: f64,
    /// The same with the other answer planted.
    pub accuracy_planted: f64,
}

impl Lookahead {
    /// Probes `batch` (its MMU sequences with answers; `None` without any) under `opts`.
    /// The batch is left as it was.
    pub fn probe(
        model: &UnifiedTransformer,
        batch: &mut unimod_tok::Batch,
        opts: &ForwardOptions,
    ) -> Result<Option<Lookahead>, unimod_model::ConfigError> {
        let answer = batch.segment.eq(Segment::Answer as i64);
        let rows = answer.any_dim(1, false).nonzero().squeeze_dim(1);
        let n = rows.size()[0];
        if n == 0 {
            return Ok(None);
        }
        // argmax returns the first of equal maxima: the first answer token of each row.
        let first = answer
            .index_select(0, &rows)
            .to_kind(Kind::Int64)
            .argmax(1, false);
        let tokens = batch.tokens.index_select(0, &rows);
        let truth = tokens.gather(1, &first.unsqueeze(1), false).squeeze_dim(1);
        let planted = truth.roll([1], [0]);
        let before = (&first - 1).unsqueeze(1);
        let predict = |model: &UnifiedTransformer, batch: &unimod_tok::Batch| {
            let logits = model.forward(batch, opts)?.logits.index_select(0, &rows);
            let v = logits.size()[2];
            Ok::<_, unimod_model::ConfigError>(
                logits
                    .gather(1, &before.unsqueeze(2).expand([n, 1, v], false), false)
                    .squeeze_dim(1)
                    .log_softmax(-1, Kind::Float),
            )
        };
        let seen = predict(model, batch)?;
        let swapped = batch.tokens.index_put(
            &[Some(rows.shallow_clone()), Some(first.shallow_clone())],
            &planted,
            false,
        );
        let original = std::mem::replace(&mut batch.tokens, swapped);
        let with_planted = predict(model, batch);
        batch.tokens = original;
        let with_planted = with_planted?;
        let of_truth = |l: &Tensor| l.gather(1, &truth.unsqueeze(1), false);
        let shift = (of_truth(&seen) - of_truth(&with_planted))
            .abs()
            .mean(Kind::Float);
        let (seen, with_planted) = (seen.argmax(-1, false), with_planted.argmax(-1, false));
        let count = |t: Tensor| t.sum(Kind::Float).double_value(&[]);
        let differs = planted.ne_tensor(&truth);
        let n_differs = count(differs.shallow_clone());
        Ok(Some(Lookahead {
            probed: n as usize,
            differing: n_differs as usize,
            moved: count(seen.ne_tensor(&with_planted)) / n as f64,
            log_prob_shift: shift.double_value(&[]),
            follows_planted: count(
                with_planted
                    .eq_tensor(&planted)
                    .logical_and(&seen.ne_tensor(&planted))
                    .logical_and(&differs),
            ) / n_differs.max(1.0),
            accuracy: count(seen.eq_tensor(&truth)) / n as f64,
            accuracy_planted: count(with_planted.eq_tensor(&truth)) / n as f64,
        }))
    }

    /// The probes of several batches as one.
    fn merge(parts: &[Lookahead]) -> Option<Lookahead> {
        let sum = |f: &dyn Fn(&Lookahead) -> f64| parts.iter().map(f).sum::<f64>();
        let (n, d) = (sum(&|p| p.probed as f64), sum(&|p| p.differing as f64));
        (n > 0.0).then(|| Lookahead {
            probed: n as usize,
            differing: d as usize,
            moved: sum(&|p| p.moved * p.probed as f64) / n,
            log_prob_shift: sum(&|p| p.log_prob_shift * p.probed as f64) / n,
            follows_planted: sum(&|p| p.follows_planted * p.differing as f64) / d.max(1.0),
            accuracy: sum(&|p| p.accuracy * p.probed as f64) / n,
            accuracy_planted: sum(&|p| p.accuracy_planted * p.probed as f64) / n,
        })
    }
}

/// A short name for an evaluation under `overrides` (`--set` values): 8 hex digits of their
/// SHA-256, so that the same settings land in the same folder.
pub fn overrides_digest(overrides: &[String]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(overrides.join("\n").as_bytes());
    hash.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Validation losses, T2I by the judge and MMU by exact match, with their controls, for the
/// model `model` of a run.
pub fn evaluate(
    ctx: &RunContext,
    cfg: &RunConfig,
    model: &UnifiedTransformer,
    out: &Path,
) -> Result<EvalReport> {
    let Validation {
        loss: val_loss,
        loss_causal: val_loss_causal,
        router: router_agreement,
        predictor: predictor_agreement,
        experts: expert_agreement,
        lookahead,
    } = tch::no_grad(|| validation(ctx, cfg, model))?;
    let T2i {
        overall: t2i_overall,
        facts: t2i_facts,
        facts_prompt_blind: t2i_facts_prompt_blind,
        scrambled,
        per_category: t2i_per_category,
        frechet: t2i_frechet,
    } = text_to_image(ctx, cfg, model, out)?;
    let Mmu {
        accuracy: mmu_accuracy,
        per_kind: mmu_per_kind,
        blind: mmu_blind,
        blind_per_kind: mmu_blind_per_kind,
        teacher_forced: mmu_teacher_forced,
    } = understanding(ctx, cfg, model)?;
    Ok(EvalReport {
        val_loss,
        t2i_overall,
        t2i_per_category,
        t2i_facts,
        t2i_facts_prompt_blind,
        t2i_overall_scrambled: scrambled.as_ref().map(JudgeReport::overall),
        t2i_facts_scrambled: scrambled.as_ref().map(JudgeReport::facts),
        t2i_per_category_scrambled: scrambled.as_ref().map_or_else(BTreeMap::new, per_category),
        t2i_frechet,
        mmu_accuracy,
        mmu_per_kind,
        mmu_blind: Some(mmu_blind),
        mmu_blind_per_kind,
        mmu_teacher_forced,
        router_agreement,
        predictor_agreement,
        expert_agreement,
        val_loss_causal,
        lookahead,
    })
}

struct Validation {
    loss: BTreeMap<String, f64>,
    loss_causal: BTreeMap<String, f64>,
    router: Option<Agreement>,
    predictor: Option<Agreement>,
    experts: Option<Agreement>,
    lookahead: Option<Lookahead>,
}

fn validation(ctx: &RunContext, cfg: &RunConfig, model: &UnifiedTransformer) -> Result<Validation> {
    let (mut sums, mut sums_causal) = (BTreeMap::new(), BTreeMap::new());
    let add = |sums: &mut BTreeMap<String, f64>, l: &unimod_model::Losses| {
        for (t, v) in &l.per_task {
            *sums.entry(t.name().to_string()).or_default() +=
                v.double_value(&[]) / cfg.eval.val_batches as f64;
        }
    };
    let causal = ForwardOptions {
        mode: model.cfg.routing.causal_mode,
        ..Default::default()
    };
    let decides = decides(model);
    // [router tp, router predicted, predictor tp, predictor predicted, actual]
    let mut counts = [0f64; 5];
    // MoMa: [auxiliary router and expert agree on taking, auxiliary router takes, expert takes]
    let mut experts = [0f64; 3];
    let mut routed = false;
    let mut probes = Vec::new();
    for k in 0..cfg.eval.val_batches {
        // Masking and caption choice are seeded by the batch index: the same for every model.
        let mut b = ctx.batch(cfg, Split::Val, 1_000_000 + k as u64, true)?;
        let o = model.forward(&b, &ForwardOptions::default())?;
        add(&mut sums, &model.losses(&b, &o));
        probes.extend(Lookahead::probe(model, &mut b, &ForwardOptions::default())?);
        if decides {
            let oc = model.forward(&b, &causal)?;
            add(&mut sums_causal, &model.losses(&b, &oc));
        }
        for t in o.experts.iter().flatten() {
            let count = |t: &Tensor| t.sum(Kind::Float).double_value(&[]);
            let aux = t.aux_logits.gt(0.0).logical_and(&t.member);
            experts[0] += count(&aux.logical_and(&t.taken));
            experts[1] += count(&aux);
            experts[2] += count(&t.taken);
        }
        for s in &o.routing {
            routed = true;
            let actual = s.processed_mask.logical_and(&s.routable);
            let count = |t: &Tensor| t.sum(Kind::Float).double_value(&[]);
            let router = s.scores.gt(0.0).logical_and(&s.routable);
            counts[0] += count(&router.logical_and(&actual));
            counts[1] += count(&router);
            if let Some(p) = &s.predictor_logits {
                let pred = p.gt(0.0).logical_and(&s.routable);
                counts[2] += count(&pred.logical_and(&actual));
                counts[3] += count(&pred);
            }
            counts[4] += count(&actual);
        }
    }
    let agree = |tp: f64, predicted: f64| Agreement {
        precision: tp / predicted.max(1.0),
        recall: tp / counts[4].max(1.0),
    };
    let router = routed.then(|| agree(counts[0], counts[1]));
    let predictor = (routed && counts[3] + counts[2] > 0.0).then(|| agree(counts[2], counts[3]));
    Ok(Validation {
        loss: sums,
        loss_causal: sums_causal,
        lookahead: Lookahead::merge(&probes),
        router,
        predictor,
        experts: (experts[2] > 0.0).then(|| Agreement {
            precision: experts[0] / experts[1].max(1.0),
            recall: experts[0] / experts[2],
        }),
    })
}

/// Images generated from tokenised prompts: MaskGIT with guidance (Show-o, top-k routing) or
/// autoregressive decoding under the row grammar (Emu3, routed as `eval.decode_routing` says).
pub fn images(
    ctx: &RunContext,
    cfg: &RunConfig,
    model: &UnifiedTransformer,
    prompts: &[Vec<i64>],
) -> Result<Vec<Image>> {
    let layout = ctx.tokenizers.layout();
    let codes = match cfg.format.flavour {
        Flavour::Showo => {
            let cond: Vec<_> = prompts
                .iter()
                .map(|p| cfg.format.t2i(&layout, p, None, None))
                .collect::<Result<_, _>>()?;
            let uncond: Vec<_> = prompts
                .iter()
                .map(|_| cfg.format.t2i(&layout, &[], None, None))
                .collect::<Result<_, _>>()?;
            let guidance = (cfg.eval.sampling.guidance > 0.0).then_some(uncond.as_slice());
            generate::maskgit(
                model,
                &cond,
                guidance,
                &layout,
                &cfg.eval.sampling,
                ctx.device,
            )?
        }
        Flavour::Emu3 => {
            let side = cfg.format.image_side;
            let prefix: Vec<_> = prompts
                .iter()
                .map(|p| cfg.format.t2i_prefix(&layout, p))
                .collect::<Result<_, _>>()?;
            let uncond: Vec<_> = prompts
                .iter()
                .map(|_| cfg.format.t2i_prefix(&layout, &[]))
                .collect::<Result<_, _>>()?;
            let guidance = cfg.eval.sampling.guidance;
            tch::manual_seed(cfg.eval.sampling.seed);
            let grammar = generate::image_grammar(&layout, side);
            let (mode, cache) = cfg.eval.decode_routing.decoding(model, Task::T2I);
            let rows = generate::autoregressive(
                model,
                &prefix,
                &generate::Decoding {
                    max_new: side * (side + 1),
                    segment: Segment::Image,
                    allowed: &grammar,
                    stop: None,
                    temperature: cfg.eval.sampling.temperature,
                    mode,
                    cache,
                    guidance: (guidance > 0.0).then_some((uncond.as_slice(), guidance)),
                    guidance_schedule: cfg.eval.sampling.guidance_schedule,
                },
                ctx.device,
            )?;
            let codes: Vec<i64> = rows
                .iter()
                .flat_map(|r| {
                    r.iter()
                        .filter(|t| **t != Special::Eol.id())
                        .map(|t| t - layout.image_offset())
                })
                .collect();
            Tensor::from_slice(&codes)
                .view([prompts.len() as i64, -1])
                .to_device(ctx.device)
        }
    };
    Ok(Image::batch_from_tensor(&ctx.tokenizers.vq.decode(&codes)))
}

/// Greedy answers to questions about tokenised images, routed as `eval.decode_routing` says.
pub fn answers(
    ctx: &RunContext,
    cfg: &RunConfig,
    model: &UnifiedTransformer,
    items: &[(&[u32], String)],
) -> Result<Vec<String>> {
    let layout = ctx.tokenizers.layout();
    let allowed = generate::text_only(&layout);
    let prompts: Vec<_> = items
        .iter()
        .map(|(codes, q)| -> Result<_> {
            Ok(cfg
                .format
                .mmu(&layout, codes, &ctx.tokenizers.text.encode(q)?, None)?)
        })
        .collect::<Result<_>>()?;
    let (mode, cache) = cfg.eval.decode_routing.decoding(model, Task::MMU);
    let ids = generate::autoregressive(
        model,
        &prompts,
        &generate::Decoding {
            max_new: cfg.eval.max_answer_tokens,
            segment: Segment::Answer,
            allowed: &|_| allowed.shallow_clone(),
            stop: Some(Special::Eos.id()),
            temperature: 0.0,
            mode,
            cache,
            guidance: None,
            guidance_schedule: Default::default(),
        },
        ctx.device,
    )?;
    ids.iter()
        .map(|a| Ok(ctx.tokenizers.text.decode(a)?))
        .collect()
}

struct T2i {
    overall: f64,
    facts: f64,
    facts_prompt_blind: Option<f64>,
    scrambled: Option<JudgeReport>,
    per_category: BTreeMap<String, f64>,
    frechet: Option<f64>,
}

fn per_category(report: &JudgeReport) -> BTreeMap<String, f64> {
    report
        .per_category
        .keys()
        .map(|k| (k.clone(), report.category(k).unwrap_or(0.0)))
        .collect()
}

fn text_to_image(
    ctx: &RunContext,
    cfg: &RunConfig,
    model: &UnifiedTransformer,
    out: &Path,
) -> Result<T2i> {
    let world = &ctx.world;
    let n = cfg.eval.t2i_samples.min(ctx.val.codes.len());
    // Each validation example with one of its captions that fit the text segment.
    let mut examples = Vec::new();
    for i in 0..n as u64 {
        let e = world.example(Split::Val, i);
        let fitting = data::fitting_captions(&ctx.tokenizers.text, &cfg.format, &e)?;
        let pick = match cfg.eval.t2i_caption {
            CaptionChoice::First => 0,
            CaptionChoice::Rotate => i as usize % fitting.len().max(1),
        };
        if let Some((c, ids)) = fitting.into_iter().nth(pick) {
            examples.push((e.captions[c].clone(), ids, e.image));
        }
    }
    let mut report = JudgeReport::default();
    let mut generated = Vec::new();
    for chunk in examples.chunks(32) {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|(_, ids, _)| ids.clone()).collect();
        let decoded = images(ctx, cfg, model, &prompts)?;
        let captions: Vec<_> = chunk.iter().map(|(c, _, _)| c).collect();
        report.add(ctx.judge.as_ref(), &captions, &decoded);
        generated.extend(decoded);
    }
    let shown: Vec<(&Image, &Image, &str)> = generated
        .iter()
        .zip(&examples)
        .take(16)
        .map(|(g, (c, _, real))| (g, real, c.text.as_str()))
        .collect();
    crate::plots::captioned_samples(&out.join("t2i-samples.png"), &shown, 4)?;
    let per = per_category(&report);
    let real: Vec<Image> = examples.iter().map(|(_, _, img)| img.clone()).collect();
    let captions: Vec<_> = examples.iter().map(|(c, _, _)| c).collect();
    let judge = ctx.judge.as_ref();
    Ok(T2i {
        overall: report.overall(),
        facts: report.facts(),
        facts_prompt_blind: JudgeReport::scrambled(judge, &captions, &real).map(|r| r.facts()),
        scrambled: JudgeReport::scrambled(judge, &captions, &generated),
        per_category: per,
        frechet: (generated.len() > 1)
            .then(|| ctx.judge.frechet(&generated, &real))
            .flatten(),
    })
}

struct Mmu {
    accuracy: f64,
    per_kind: BTreeMap<String, f64>,
    blind: f64,
    blind_per_kind: BTreeMap<String, f64>,
    teacher_forced: Option<TeacherForced>,
}

/// Training examples the image-blind answerer learns its answer priors from.
const BLIND_PRIOR_EXAMPLES: u64 = 2048;

/// The image-blind answerer: the most common training answer to each question text, and to
/// each question kind for texts never seen.
struct BlindAnswerer {
    by_question: BTreeMap<String, String>,
    by_kind: BTreeMap<String, String>,
}

impl BlindAnswerer {
    fn fit(world: &dyn unimod_tok::dataset::Dataset) -> BlindAnswerer {
        type Counts = BTreeMap<String, BTreeMap<String, usize>>;
        let (mut q, mut k): (Counts, Counts) = Default::default();
        let n = world
            .len(Split::Train)
            .map_or(BLIND_PRIOR_EXAMPLES, |n| BLIND_PRIOR_EXAMPLES.min(n as u64));
        for i in 0..n {
            for qa in world.example(Split::Train, i).qa {
                *q.entry(qa.question.clone())
                    .or_default()
                    .entry(qa.answer.clone())
                    .or_default() += 1;
                *k.entry(kind_name(&qa))
                    .or_default()
                    .entry(qa.answer)
                    .or_default() += 1;
            }
        }
        let majority = |c: Counts| {
            c.into_iter()
                .filter_map(|(key, answers)| {
                    let best = answers
                        .into_iter()
                        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))?;
                    Some((key, best.0))
                })
                .collect()
        };
        BlindAnswerer {
            by_question: majority(q),
            by_kind: majority(k),
        }
    }

    fn answer(&self, qa: &unimod_tok::dataset::Qa) -> Option<&String> {
        self.by_question
            .get(&qa.question)
            .or_else(|| self.by_kind.get(&kind_name(qa)))
    }
}

fn kind_name(qa: &unimod_tok::dataset::Qa) -> String {
    format!("{:?}", qa.kind).to_lowercase()
}

fn understanding(ctx: &RunContext, cfg: &RunConfig, model: &UnifiedTransformer) -> Result<Mmu> {
    let world = &ctx.world;
    let n = cfg.eval.mmu_samples.min(ctx.val.codes.len());
    // (model right, blind right, asked) per kind.
    let mut per: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    // Teacher-forced right per kind, for models that route: [top-k, causal, top-k followed by
    // more turns, top-k followed by filler].
    let mut forced: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    let layout = ctx.tokenizers.layout();
    let allowed = generate::text_only(&layout);
    let blind = BlindAnswerer::fit(world.as_ref());
    // Each question asked, with the image's other questions (teacher-forced dialogues).
    let items: Vec<(usize, Qa, Vec<Qa>)> = (0..n)
        .map(|i| {
            let mut qa = world.example(Split::Val, i as u64).qa;
            let asked = qa.remove(i % qa.len());
            (i, asked, qa)
        })
        .collect();
    for chunk in items.chunks(32) {
        let questions: Vec<(&[u32], String)> = chunk
            .iter()
            .map(|(i, qa, _)| (ctx.val.codes[*i].as_slice(), qa.question.clone()))
            .collect();
        for ((_, qa, _), text) in chunk.iter().zip(answers(ctx, cfg, model, &questions)?) {
            let e = per.entry(kind_name(qa)).or_default();
            e.0 += (text == qa.answer) as usize;
            e.1 += (blind.answer(qa) == Some(&qa.answer)) as usize;
            e.2 += 1;
        }
        if decides(model) {
            let text = &ctx.tokenizers.text;
            let (mut alone, mut followed, mut filled) = (Vec::new(), Vec::new(), Vec::new());
            for (i, qa, others) in chunk {
                let encode = |qa: &Qa| -> Result<(Vec<i64>, Vec<i64>)> {
                    Ok((text.encode(&qa.question)?, text.encode(&qa.answer)?))
                };
                let others = others.iter().filter(|o| o.question != qa.question);
                let encoded = std::iter::once(qa)
                    .chain(others)
                    .take(cfg.format.mmu_turns.max(1))
                    .map(encode)
                    .collect::<Result<Vec<_>>>()?;
                let turns = cfg.format.fitting_turns(&encoded);
                let codes = &ctx.val.codes[*i];
                let first = cfg.format.mmu_turns(&layout, codes, &turns[..1])?;
                let mut more = cfg.format.mmu_turns(&layout, codes, &turns)?;
                // The first turn sits where it does alone: judge it, and nothing after it.
                more.labels.clone_from(&first.labels);
                let end = first.segments.iter().position(|g| *g == Segment::Pad);
                let mut filler = more.clone();
                if let Some(&fill) = turns[0].0.first() {
                    for j in end.unwrap_or(filler.len())..filler.len() {
                        if filler.segments[j] != Segment::Pad {
                            filler.tokens[j] = fill;
                        }
                    }
                }
                alone.push(first);
                followed.push(more);
                filled.push(filler);
            }
            let right = |seqs: &[unimod_tok::Sequence], mode| -> Result<Vec<bool>> {
                let batch = unimod_tok::Batch::from_sequences(seqs, ctx.device)?;
                let t = teacher_forced(model, &batch, mode, &allowed)?;
                Ok(Vec::<bool>::try_from(t.to_device(tch::Device::Cpu))?)
            };
            use unimod_router::RoutingMode::TopK;
            let top_k = right(&alone, TopK)?;
            let causal = right(&alone, model.cfg.routing.causal_mode)?;
            let top_k_followed = right(&followed, TopK)?;
            let top_k_filled = right(&filled, TopK)?;
            for (j, (_, qa, _)) in chunk.iter().enumerate() {
                let e = forced.entry(kind_name(qa)).or_default();
                let judged = [&top_k, &causal, &top_k_followed, &top_k_filled];
                for (n, right) in e.iter_mut().zip(judged) {
                    *n += right[j] as usize;
                }
            }
        }
    }
    let (ok, blind_ok, total) = per
        .values()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let share = |n: usize, t: usize| n as f64 / t.max(1) as f64;
    Ok(Mmu {
        accuracy: share(ok, total),
        blind: share(blind_ok, total),
        per_kind: per
            .iter()
            .map(|(k, v)| (k.clone(), share(v.0, v.2)))
            .collect(),
        teacher_forced: (!forced.is_empty()).then(|| {
            let asked = |k: &String| per[k].2;
            let of = |i: usize| -> (f64, BTreeMap<String, f64>) {
                let right = forced.values().map(|v| v[i]).sum();
                let by_kind = forced
                    .iter()
                    .map(|(k, v)| (k.clone(), share(v[i], asked(k))));
                (share(right, total), by_kind.collect())
            };
            let ((top_k, top_k_per_kind), (causal, causal_per_kind)) = (of(0), of(1));
            let (top_k_followed, top_k_followed_per_kind) = of(2);
            let (top_k_filled, top_k_filled_per_kind) = of(3);
            TeacherForced {
                top_k,
                causal,
                top_k_per_kind,
                causal_per_kind,
                top_k_followed,
                top_k_followed_per_kind,
                top_k_filled,
                top_k_filled_per_kind,
            }
        }),
        blind_per_kind: per.into_iter().map(|(k, v)| (k, share(v.1, v.2))).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn::VarStore};
    use unimod_model::ModelConfig;
    use unimod_router::RoutingMode;
    use unimod_tok::{Batch, FormatConfig, VocabLayout};

    fn model(schedule: &str) -> (VarStore, UnifiedTransformer) {
        let mut cfg = ModelConfig {
            vocab: VocabLayout {
                n_text: 40,
                n_codes: 16,
            },
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 4,
            d_ffn: 64,
            ..Default::default()
        };
        cfg.routing.schedule = toml::from_str(schedule).unwrap();
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let m = UnifiedTransformer::new(&vs.root(), &cfg).unwrap();
        // Mixed router decisions, so that a swapped token can move the top-k boundary.
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains("router") {
                    v.copy_(&(Tensor::randn(v.size(), tch::kind::FLOAT_CPU) * 2.0));
                }
            }
        });
        (vs, m)
    }

    /// Eight image-question-answer sequences, each with another first answer token.
    fn answered() -> Batch {
        let f = FormatConfig {
            text_len: 10,
            image_side: 2,
            ..Default::default()
        };
        let vocab = VocabLayout {
            n_text: 40,
            n_codes: 16,
        };
        let seqs: Vec<_> = (0..8)
            .map(|i| {
                f.mmu(
                    &vocab,
                    &[i, 1, 2, 3],
                    &[20, 21, 22],
                    Some(&[10 + i as i64, 30]),
                )
                .unwrap()
            })
            .collect();
        Batch::from_sequences(&seqs, Device::Cpu).unwrap()
    }

    /// Without look-ahead a first answer is judged the same whatever turns follow it; top-k
    /// sizes its choice by the whole sequence, so later turns reach back.
    #[test]
    fn teacher_forced_first_answers_ignore_later_turns_only_without_look_ahead() {
        let f = FormatConfig {
            text_len: 12,
            image_side: 2,
            mmu_turns: 3,
            ..Default::default()
        };
        let vocab = VocabLayout {
            n_text: 40,
            n_codes: 16,
        };
        let (mut alone, mut followed) = (Vec::new(), Vec::new());
        for i in 0..32u32 {
            let (q, a) = ([20 + (i % 5) as i64], [10 + (i % 7) as i64]);
            let more: [(&[i64], &[i64]); 3] = [(&q, &a), (&[25, 26], &[11]), (&[27], &[12, 13])];
            let first = f.mmu_turns(&vocab, &[i % 16, 1, 2, 3], &more[..1]).unwrap();
            let mut all = f.mmu_turns(&vocab, &[i % 16, 1, 2, 3], &more).unwrap();
            all.labels.clone_from(&first.labels);
            alone.push(first);
            followed.push(all);
        }
        let text = generate::text_only(&vocab);
        // Labels made the model's own greedy answers alone, so that alone every row is right.
        let judged = |m: &UnifiedTransformer, mode| -> Vec<bool> {
            let mut a = Batch::from_sequences(&alone, Device::Cpu).unwrap();
            let mut b = Batch::from_sequences(&followed, Device::Cpu).unwrap();
            let opts = ForwardOptions {
                mode,
                ..Default::default()
            };
            let greedy = tch::no_grad(|| m.forward(&a, &opts).unwrap().logits)
                .masked_fill(&text.logical_not(), f64::NEG_INFINITY)
                .argmax(-1, false);
            let labels = greedy.where_self(&a.labels.ne(unimod_tok::IGNORE), &a.labels);
            (a.labels, b.labels) = (labels.shallow_clone(), labels);
            let right = |b: &Batch| {
                let t = tch::no_grad(|| teacher_forced(m, b, mode, &text)).unwrap();
                Vec::<bool>::try_from(t).unwrap()
            };
            assert!(right(&a).iter().all(|r| *r));
            right(&b)
        };
        let (_vs, dense) = model("kind = 'dense'");
        assert!(judged(&dense, RoutingMode::TopK).iter().all(|r| *r));
        let (_vs, routed) = model("kind = 'mod'\ncapacity = 0.5");
        assert!(
            judged(&routed, RoutingMode::ThresholdRouter)
                .iter()
                .all(|r| *r)
        );
        assert!(
            judged(&routed, RoutingMode::TopK).iter().any(|r| !*r),
            "later turns never moved a top-k answer: the test cannot tell look-ahead apart"
        );
    }

    #[test]
    fn lookahead_is_zero_exactly_without_it_and_seen_through_top_k() {
        let probe = |m: &UnifiedTransformer, mode| {
            let mut b = answered();
            let tokens = b.tokens.copy();
            let opts = ForwardOptions {
                mode,
                ..Default::default()
            };
            let l = tch::no_grad(|| Lookahead::probe(m, &mut b, &opts))
                .unwrap()
                .unwrap();
            assert!(b.tokens.equal(&tokens), "the batch is left as it was");
            assert_eq!((l.probed, l.differing), (8, 8));
            l
        };
        let (_vs, dense) = model("kind = 'dense'");
        let l = probe(&dense, RoutingMode::TopK);
        assert_eq!(
            (l.moved, l.log_prob_shift, l.follows_planted),
            (0.0, 0.0, 0.0),
            "{l:?}"
        );
        assert_eq!(l.accuracy, l.accuracy_planted);
        let (_vs, routed) = model("kind = 'mod'\ncapacity = 0.5");
        let l = probe(&routed, RoutingMode::TopK);
        assert!(
            l.log_prob_shift > 0.0,
            "top-k lets the answer through: {l:?}"
        );
        // The causal decision decides each token from itself and what precedes it.
        let l = probe(&routed, RoutingMode::ThresholdRouter);
        assert_eq!((l.moved, l.log_prob_shift), (0.0, 0.0), "{l:?}");
        let merged = Lookahead::merge(&[l, probe(&routed, RoutingMode::TopK)]).unwrap();
        assert_eq!((merged.probed, merged.differing), (16, 16));
    }
}
