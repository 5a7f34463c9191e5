//! The cost of one optimizer step's gradient exchange, alone: `reduce_step` (the step totals,
//! then the gradient buckets) over a model's adapter gradients, timed after a barrier so that
//! no rank waits for a slower one's backward. Default: the default job's LoRA (MiniLM, r = 8 on
//! query and value of 6 layers, plus the 2-class head: 74,498 f32 values).
//!
//! ```sh
//! cargo build --release -p peft --features mpi --example allreduce_bench
//! mpirun -np 2 target/release/examples/allreduce_bench [values] [iterations]
//! ```

use candle_core::{Device, Tensor};
use peft::train::dist::ProcessGroup;
use std::time::Instant;

fn main() -> peft::Result<()> {
    let mut args = std::env::args().skip(1);
    let values: usize = args.next().map_or(74_498, |s| s.parse().expect("values"));
    let iterations: usize = args.next().map_or(200, |s| s.parse().expect("iterations"));
    let group = ProcessGroup::from_env()?;
    // LoRA-shaped gradients: A (r x d) and B (d x r) per module, then the head.
    let (d, r) = (384usize, 8usize);
    let mut shapes = Vec::new();
    let mut left = values;
    while left >= 2 * d * r {
        shapes.push(vec![r, d]);
        shapes.push(vec![d, r]);
        left -= 2 * d * r;
    }
    if left > 0 {
        shapes.push(vec![left]);
    }
    let grads: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::ones(s.as_slice(), candle_core::DType::F32, &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations + 10 {
        group.sum(0.0)?; // a barrier: every rank starts the exchange together
        let t = Instant::now();
        let (out, _) = group.reduce_step(
            grads.iter().cloned().map(Some).collect(),
            &grads,
            1.0,
            8,
            false,
        )?;
        let dt = t.elapsed().as_secs_f64();
        if i >= 10 {
            times.push(dt);
        }
        assert_eq!(out.len(), grads.len());
    }
    times.sort_by(f64::total_cmp);
    if group.is_main() {
        println!(
            "{} processes, {values} f32 gradient values ({} KiB) in {} tensors: median {:.1} us, \
             p90 {:.1} us per step's exchange",
            group.world_size(),
            values * 4 / 1024,
            shapes.len(),
            1e6 * times[times.len() / 2],
            1e6 * times[times.len() * 9 / 10],
        );
    }
    Ok(())
}
