//! `pin_thread_count` (its own test binary: it changes the process's environment and starts
//! rayon's global pool). candle counts its threads on every CPU matrix product, reading
//! `/proc/cpuinfo` unless `RAYON_NUM_THREADS` is set; pinning must fix the count candle would
//! have found, leave rayon's own pool at rayon's default size, and leave a user's setting alone.

#[test]
fn pinning_fixes_candles_count_and_keeps_rayons_pool() {
    let before = std::env::var("RAYON_NUM_THREADS").ok();
    let candle = candle_core::utils::get_num_threads();
    peft::threads::pin_thread_count();
    let after = std::env::var("RAYON_NUM_THREADS").ok();
    match before {
        // The user's value wins and rayon sizes its pool from it, as always.
        Some(v) => {
            assert_eq!(after.as_deref(), Some(v.as_str()));
            assert_eq!(rayon::current_num_threads().to_string(), v);
        }
        None => {
            assert_eq!(after, Some(candle.to_string()));
            let logical = std::thread::available_parallelism().unwrap().get();
            assert_eq!(rayon::current_num_threads(), logical);
        }
    }
    assert_eq!(candle_core::utils::get_num_threads(), candle);
    assert_eq!(peft::threads::num_threads(), candle.max(1));
    // A second call changes nothing.
    peft::threads::pin_thread_count();
    assert_eq!(std::env::var("RAYON_NUM_THREADS").ok(), after);
}
