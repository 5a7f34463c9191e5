//! Whether an MPI launcher started this process, read from the environment it sets (before any
//! MPI call, so that a build without MPI can still say what is wrong).

/// The environment variables launchers set to the job's process count: Open MPI's `mpirun`,
/// MPICH / Intel MPI (Hydra, PMI), MVAPICH2, and Slurm's `srun` for a PMIx job step.
const SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"];

/// How many processes a launcher started for this job, and the variable that says so; `None`
/// outside a launcher. Under PMIx (`srun --mpi=pmix`, which sets `PMIX_RANK` but no size of its
/// own) the size is Slurm's `SLURM_STEP_NUM_TASKS`.
pub fn launcher_world_size() -> Option<(usize, &'static str)> {
    launcher_world_size_in(|k| std::env::var(k).ok())
}

/// [`launcher_world_size`] over any environment (`get` reads one variable).
pub fn launcher_world_size_in(
    get: impl Fn(&str) -> Option<String>,
) -> Option<(usize, &'static str)> {
    let parse = |k: &'static str| {
        get(k)
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|n| (n, k))
    };
    SIZE_VARS.into_iter().find_map(parse).or_else(|| {
        get("PMIX_RANK")
            .is_some()
            .then(|| parse("SLURM_STEP_NUM_TASKS"))
            .flatten()
    })
}

/// This process's rank as its launcher numbered it (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`,
/// `PMIX_RANK`, `MV2_COMM_WORLD_RANK`), before MPI starts: decides early who logs.
pub fn launcher_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "MV2_COMM_WORLD_RANK",
    ]
    .into_iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The error for a job launched with several processes on a build without MPI: each process
/// would train alone and they would overwrite each other's output.
pub fn without_mpi_error(size: usize, var: &str) -> crate::Error {
    crate::Error::Config(format!(
        "launched as one of {size} processes ({var} = {size}) but this peft was built without \
         MPI, so each process would train alone on the whole data and overwrite the others' \
         output. Rebuild with `cargo build --release -p peft-cli --features mpi` (needs Open MPI: \
         `apt-get install openmpi-bin libopenmpi-dev`), or run one process"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn reads_the_launchers_variables() {
        assert_eq!(launcher_world_size_in(env(&[])), None);
        assert_eq!(
            launcher_world_size_in(env(&[("OMPI_COMM_WORLD_SIZE", "4")])),
            Some((4, "OMPI_COMM_WORLD_SIZE"))
        );
        assert_eq!(
            launcher_world_size_in(env(&[("PMI_SIZE", "2")])),
            Some((2, "PMI_SIZE"))
        );
        // Slurm's task count alone (a batch script) is not a launch; with PMIx it is.
        assert_eq!(
            launcher_world_size_in(env(&[("SLURM_STEP_NUM_TASKS", "8")])),
            None
        );
        assert_eq!(
            launcher_world_size_in(env(&[("SLURM_STEP_NUM_TASKS", "8"), ("PMIX_RANK", "3")])),
            Some((8, "SLURM_STEP_NUM_TASKS"))
        );
    }
}
