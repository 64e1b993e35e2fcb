/// Why an analysis cannot run on a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error(
        "layer {layer} is routed: attention, ARank and redundancy analyses need the dense model's full attention maps (analyse a dense checkpoint)"
    )]
    RoutedLayer { layer: usize },
    #[error(
        "the competition probe needs routed layers whose router is shared by T2I and MMU (schedule kind `mod` or `gamma_mod`, or routers = \"shared\"); this checkpoint has {found}"
    )]
    NoSharedRouter { found: String },
    #[error("the batch holds no {task} samples")]
    MissingTask { task: unimod_tok::Task },
    #[error(transparent)]
    Model(#[from] unimod_model::ConfigError),
    #[error("{what}: {value} is outside {range}")]
    OutOfRange {
        what: &'static str,
        value: f64,
        range: &'static str,
    },
}
