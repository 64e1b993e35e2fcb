/// Why an analysis cannot run on a checkpoint.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum AnalysisError {
    /// A routed layer where the analysis needs every token's attention.
    #[error(
        "layer {layer} is routed: attention, ARank and redundancy analyses need the dense model's full attention maps (analyse a dense checkpoint)"
    )]
    RoutedLayer { layer: usize },
    /// The competition probe on a checkpoint without a router shared by the tasks.
    #[error(
        "the competition probe needs routed layers whose router is shared by T2I and MMU (schedule kind `mod` or `gamma_mod`, or routers = \"shared\"); this checkpoint has {found}"
    )]
    NoSharedRouter { found: String },
    /// A batch without the task the analysis reads.
    #[error("the batch holds no {task} samples")]
    MissingTask { task: unimod_tok::Task },
    /// The model could not be built or run as the analysis needs.
    #[error(transparent)]
    Model(#[from] unimod_model::ConfigError),
    /// A parameter outside its range.
    #[error("{what}: {value} is outside {range}")]
    OutOfRange {
        what: &'static str,
        value: f64,
        range: &'static str,
    },
}
