//! Operators per training step (≈ GPU kernel launches), dense against routed. Alone in its
//! process: operator counts see every thread.

use tch::Device;
use unimod_model::bench::{self, Shape};

#[test]
fn routing_adds_operators_and_the_table_reads_them() {
    let shape = Shape {
        d_model: 64,
        n_layers: 3,
        per_task: 1,
        image_side: 4,
    };
    let (b, vs) = bench::variants(shape, &[0.5], Device::Cpu).unwrap();
    let counts = bench::op_counts(&vs, &b).unwrap();
    // Scores, top-k, gathers, scatters and router losses come on top of the same blocks.
    assert!(counts[1].kernels > counts[0].kernels, "{counts:?}");
    // Counting twice gives the same count: a step dispatches a fixed set of operators.
    assert_eq!(bench::op_counts(&vs, &b).unwrap(), counts);
    let rows = bench::op_rows("t", &vs, &counts);
    assert!(rows[0].ends_with("| 1.00× |"), "{rows:?}");
    assert!(rows[1].contains("unimod-c0.5"), "{rows:?}");
}
