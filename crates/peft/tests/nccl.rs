//! The NCCL engine on one GPU: a world of one sums nothing, so the all-reduce of a gradient
//! bucket must give it back unchanged, in every gradient dtype, through candle's CUDA stream.
//! Built only with `--features nccl`; without a CUDA device the test says so and returns.
#![cfg(feature = "nccl")]

use candle_core::{DType, Device, Tensor};
use peft::train::dist::nccl::Nccl;

#[test]
fn a_world_of_one_all_reduce_is_the_identity() {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("skipped: no CUDA device, so no NCCL communicator to build");
        return;
    }
    let gpu = Device::new_cuda(0).expect("CUDA device 0");
    let host = Tensor::arange(0f32, 3000.0, &Device::Cpu)
        .unwrap()
        .affine(1e-3, -1.0)
        .unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let bucket = host.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
        // A slice of a larger buffer: the op must honour the layout's offset.
        let part = bucket.narrow(0, 1000, 1500).unwrap();
        for t in [&bucket, &part] {
            let summed = Nccl::sum_alone(t).unwrap();
            assert_eq!(summed.dtype(), dtype);
            assert_eq!(summed.dims(), t.dims());
            let a = t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            let b = summed
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert_eq!(a, b, "{dtype:?}");
        }
    }
}
