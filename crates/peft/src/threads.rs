//! How many CPU threads the kernels use, decided once.

/// The CPU threads the kernels split work over: candle's count (`RAYON_NUM_THREADS`, else the
/// physical cores), asked once. candle computes it anew on every call, and without
/// `RAYON_NUM_THREADS` that reads and parses `/proc/cpuinfo` each time.
pub fn num_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Fixes candle's CPU thread count for the rest of the process, for a program to call at the
/// start of `main`, before it starts threads (it sets an environment variable).
///
/// candle asks for its thread count on every CPU matrix product, and unless
/// `RAYON_NUM_THREADS` is set each ask reads and parses `/proc/cpuinfo`: 13 % of the CPU time
/// of batch-1 decoding on SmolLM2. This sets `RAYON_NUM_THREADS` to the count candle would find,
/// after starting rayon's global pool, which so keeps its own default size (the logical CPUs).
/// A value the user set is left alone.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let n = num_threads();
    // Fails only when the global pool already runs, which leaves its size as it was.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}
