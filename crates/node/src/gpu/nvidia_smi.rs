//! GPU detection through the `nvidia-smi` command, for machines where NVML cannot be loaded by the agent.
//!
//! The command is run as
//! `nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,uuid,
//! ecc.errors.uncorrected.volatile.total,power.draw,clocks_throttle_reasons.active --format=csv,noheader,nounits`,
//! which prints one line per GPU such as
//! `0, NVIDIA H100 80GB HBM3, 81559, 1, 0, 33, GPU-5d2c…, 0, 71.38, 0x0000000000000001`. Memory is in MiB, power in
//! W, the throttle reasons a hexadecimal bitmask; any figure may read `[N/A]` or `[Not Supported]` and is then left
//! out. An `nvidia-smi` too old to know the health fields refuses the whole query: the agent then asks only the six
//! first ones ([`Query::Basic`]) from then on. XID errors are not available this way. [`parse`] is the pure part and
//! never panics, whatever it is given.

use std::ffi::OsString;
use std::io;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{GpuSample, SourceError, throttle_reason_names};

/// Name of this detection path, for logs and errors.
pub const NAME: &str = "nvidia-smi";

/// Which columns are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// Load, memory and temperature, then uuid, uncorrectable ECC count, power and throttle reasons.
    Full,
    /// Load, memory and temperature only, for an `nvidia-smi` that does not know the health fields.
    Basic,
}

impl Query {
    /// The command's arguments for this query.
    pub fn args(self) -> [&'static str; 2] {
        match self {
            Query::Full => [
                "--query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,uuid,\
                 ecc.errors.uncorrected.volatile.total,power.draw,clocks_throttle_reasons.active",
                "--format=csv,noheader,nounits",
            ],
            Query::Basic => [
                "--query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu",
                "--format=csv,noheader,nounits",
            ],
        }
    }

    /// Columns after the name.
    fn figures(self) -> usize {
        match self {
            Query::Full => 8,
            Query::Basic => 4,
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// Runs `nvidia-smi` (found on `PATH` unless another program is given).
#[derive(Debug, Clone)]
pub struct NvidiaSmi {
    program: OsString,
    timeout: Duration,
    /// Set once the full query was refused and the basic one answered.
    basic_only: Arc<AtomicBool>,
}

impl Default for NvidiaSmi {
    fn default() -> Self {
        NvidiaSmi::new("nvidia-smi", Duration::from_secs(10))
    }
}

impl NvidiaSmi {
    fn new(program: impl Into<OsString>, timeout: Duration) -> Self {
        NvidiaSmi { program: program.into(), timeout, basic_only: Arc::default() }
    }

    /// Run the command once (twice the first time an old `nvidia-smi` refuses the health fields) and read its
    /// figures.
    pub async fn sample(&self) -> Result<Vec<GpuSample>, SourceError> {
        if !self.basic_only.load(Ordering::Relaxed) {
            let full = match self.run(Query::Full).await {
                Ok(stdout) => return parse(&stdout, Query::Full).map_err(SourceError::Invalid),
                Err(e) => e,
            };
            let stdout = self.run(Query::Basic).await?;
            tracing::info!(cause = %full, "nvidia-smi does not answer the GPU health query; reading load and memory only");
            self.basic_only.store(true, Ordering::Relaxed);
            return parse(&stdout, Query::Basic).map_err(SourceError::Invalid);
        }
        let stdout = self.run(Query::Basic).await?;
        parse(&stdout, Query::Basic).map_err(SourceError::Invalid)
    }

    /// Run the command with `query` and return what it printed, or why it failed.
    async fn run(&self, query: Query) -> Result<String, SourceError> {
        let child = tokio::process::Command::new(&self.program)
            .args(query.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(self.timeout, child).await {
            Err(_) => {
                return Err(SourceError::Unavailable(format!(
                    "the command did not answer within {} s",
                    self.timeout.as_secs()
                )));
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SourceError::Unavailable("the command was not found on PATH".into()));
            }
            Ok(Err(e)) => return Err(SourceError::Unavailable(format!("the command could not be run: {e}"))),
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let said = first_line(&stderr).or_else(|| first_line(&stdout));
            let status = match output.status.code() {
                Some(code) => format!("exit status {code}"),
                None => "a signal".to_owned(),
            };
            return Err(SourceError::Unavailable(match said {
                Some(line) => format!("the command ended with {status}: {line}"),
                None => format!("the command ended with {status}"),
            }));
        }
        Ok(stdout)
    }
}

fn first_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).find(|l| !l.is_empty())
}

/// Read the output of `query`. Blank lines are skipped; a line that does not have the expected columns or whose
/// index is not a number makes the whole output invalid (it is then not the output of this query).
pub fn parse(output: &str, query: Query) -> Result<Vec<GpuSample>, String> {
    let mut gpus = Vec::new();
    for (number, line) in output.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        gpus.push(parse_line(line, query).map_err(|why| format!("line {}: {why}: `{}`", number + 1, shorten(line)))?);
    }
    Ok(gpus)
}

fn parse_line(line: &str, query: Query) -> Result<GpuSample, &'static str> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let count = query.figures();
    if fields.len() < count + 2 {
        return Err(match query {
            Query::Full => "expected 10 comma-separated columns",
            Query::Basic => "expected 6 comma-separated columns",
        });
    }
    // A name with a comma in it would split into more columns: the name is everything between the index and the
    // figures.
    let figures = &fields[fields.len() - count..];
    let index = fields[0].parse::<u32>().map_err(|_| "the GPU index is not a number")?;
    let model = fields[1..fields.len() - count].join(", ");
    if model.is_empty() || is_missing(&model) {
        return Err("the GPU name is missing");
    }
    let mut gpu = GpuSample {
        index,
        model,
        memory_total_bytes: number(figures[0]).and_then(mib_to_bytes),
        memory_used_bytes: number(figures[1]).and_then(mib_to_bytes),
        utilization: number(figures[2]).map(|u| u.clamp(0.0, 100.0)),
        temperature_c: number(figures[3]),
        ..GpuSample::default()
    };
    if query == Query::Full {
        gpu.uuid = (!is_missing(figures[4])).then(|| figures[4].to_owned());
        gpu.ecc_uncorrected = number(figures[5]).filter(|n| n.fract() == 0.0 && *n < u64::MAX as f64).map(|n| n as u64);
        gpu.power_watts = number(figures[6]);
        gpu.throttle_reasons = bitmask(figures[7]).map(throttle_reason_names);
    }
    Ok(gpu)
}

/// A hexadecimal bitmask such as `0x0000000000000004`, or `None` for a missing or unreadable one.
fn bitmask(field: &str) -> Option<u64> {
    let digits = field.strip_prefix("0x").or_else(|| field.strip_prefix("0X"))?;
    u64::from_str_radix(digits, 16).ok()
}

/// `[N/A]`, `[Not Supported]`, `N/A` and friends: the driver does not know this figure.
fn is_missing(field: &str) -> bool {
    let field = field.trim_matches(|c| c == '[' || c == ']').trim();
    field.eq_ignore_ascii_case("n/a") || field.eq_ignore_ascii_case("not supported") || field.is_empty()
}

/// A finite, non-negative number, or `None` for a missing or unreadable figure.
fn number(field: &str) -> Option<f64> {
    if is_missing(field) {
        return None;
    }
    // Tolerate a unit left in by a `nvidia-smi` that ignores `nounits`.
    let field = field.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '%' || c == ' ');
    field.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
}

fn mib_to_bytes(mib: f64) -> Option<u64> {
    let bytes = (mib * MIB as f64).round();
    // Anything beyond u64 is not a real memory size.
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

fn shorten(line: &str) -> String {
    const MAX: usize = 120;
    if line.chars().count() <= MAX { line.to_owned() } else { line.chars().take(MAX).collect::<String>() + "…" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_gpu() {
        let gpus = parse("0, NVIDIA GeForce RTX 4090, 24564, 1234, 7, 45\n", Query::Basic).expect("valid");
        assert_eq!(
            gpus,
            vec![GpuSample {
                index: 0,
                model: "NVIDIA GeForce RTX 4090".into(),
                memory_total_bytes: Some(24564 * MIB),
                memory_used_bytes: Some(1234 * MIB),
                utilization: Some(7.0),
                temperature_c: Some(45.0),
                ..GpuSample::default()
            }]
        );
    }

    #[test]
    fn eight_gpus() {
        let output = "\
0, NVIDIA H100 80GB HBM3, 81559, 76012, 98, 61
1, NVIDIA H100 80GB HBM3, 81559, 76012, 97, 63
2, NVIDIA H100 80GB HBM3, 81559, 76012, 99, 60
3, NVIDIA H100 80GB HBM3, 81559, 76012, 96, 59
4, NVIDIA H100 80GB HBM3, 81559, 3, 0, 33
5, NVIDIA H100 80GB HBM3, 81559, 3, 0, 32
6, NVIDIA H100 80GB HBM3, 81559, 3, 0, 34
7, NVIDIA H100 80GB HBM3, 81559, 3, 0, 31
";
        let gpus = parse(output, Query::Basic).expect("valid");
        assert_eq!(gpus.len(), 8);
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        assert!(gpus.iter().all(|g| g.model == "NVIDIA H100 80GB HBM3"));
        assert!(gpus.iter().all(|g| g.memory_total_bytes == Some(81559 * MIB)));
        assert_eq!(gpus[0].memory_used_bytes, Some(76012 * MIB));
        assert_eq!(gpus[7].temperature_c, Some(31.0));
        let groups = crate::gpu::group_devices(&gpus);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].count, 8);
        assert_eq!(groups[0].memory_bytes, Some(85_520_809_984));
    }

    #[test]
    fn unavailable_figures_are_absent_not_zero() {
        let output = "0, NVIDIA A10G, 23028, 0, [N/A], [Not Supported]\n\
                      1, Tesla T4, [N/A], [N/A], [Not Supported], N/A\n";
        let gpus = parse(output, Query::Basic).expect("valid");
        assert_eq!(gpus[0].memory_total_bytes, Some(23028 * MIB));
        assert_eq!(gpus[0].memory_used_bytes, Some(0));
        assert_eq!(gpus[0].utilization, None);
        assert_eq!(gpus[0].temperature_c, None);
        assert_eq!(gpus[1].model, "Tesla T4");
        assert_eq!(gpus[1].memory_total_bytes, None);
        assert_eq!(gpus[1].memory_used_bytes, None);
        assert_eq!(gpus[1].utilization, None);
        assert_eq!(gpus[1].temperature_c, None);
    }

    #[test]
    fn units_left_in_and_windows_line_ends_are_tolerated() {
        let gpus = parse("0, Tesla V100-SXM2-16GB, 16384 MiB, 512 MiB, 12 %, 38\r\n", Query::Basic).expect("valid");
        assert_eq!(gpus[0].memory_total_bytes, Some(16384 * MIB));
        assert_eq!(gpus[0].memory_used_bytes, Some(512 * MIB));
        assert_eq!(gpus[0].utilization, Some(12.0));
        assert_eq!(gpus[0].temperature_c, Some(38.0));
    }

    #[test]
    fn a_name_with_a_comma_keeps_its_figures() {
        let gpus = parse("2, Odd, Name, 1024, 1, 5, 40", Query::Basic).expect("valid");
        assert_eq!(gpus[0].index, 2);
        assert_eq!(gpus[0].model, "Odd, Name");
        assert_eq!(gpus[0].memory_total_bytes, Some(1024 * MIB));
        assert_eq!(gpus[0].temperature_c, Some(40.0));
    }

    #[test]
    fn empty_output_lists_no_gpu() {
        assert_eq!(parse("", Query::Basic), Ok(vec![]));
        assert_eq!(parse("\n  \n", Query::Basic), Ok(vec![]));
    }

    #[test]
    fn other_output_is_refused_with_the_line() {
        let err = parse("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", Query::Basic)
            .expect_err("not a query answer");
        assert!(err.starts_with("line 1:"), "{err}");
        let err = parse("0, A, 1, 1, 1, 1\nx, B, 1, 1, 1, 1", Query::Basic).expect_err("bad index");
        assert!(err.contains("line 2: the GPU index is not a number"), "{err}");
        assert!(parse("0, [N/A], 1, 1, 1, 1", Query::Basic).is_err());
        assert!(parse("0, , 1, 1, 1, 1", Query::Basic).is_err());
    }

    #[test]
    fn nonsense_figures_are_absent() {
        let gpus = parse("0, X, -5, NaN, 250, inf", Query::Basic).expect("valid line");
        assert_eq!(gpus[0].memory_total_bytes, None);
        assert_eq!(gpus[0].memory_used_bytes, None);
        assert_eq!(gpus[0].utilization, Some(100.0));
        assert_eq!(gpus[0].temperature_c, None);
    }

    #[test]
    fn health_columns_are_read() {
        let output = "\
0, NVIDIA H100 80GB HBM3, 81559, 1024, 35, 41, GPU-5d2c0e8a-6f35-4b6e-9a0c-3f1e2d4c5b6a, 0, 312.45, 0x0000000000000004
1, Odd, Name, 1024, 1, 5, 40, GPU-00000000-0000-0000-0000-000000000001, 3, 70, 0x0000000000000028
";
        let gpus = parse(output, Query::Full).expect("valid");
        assert_eq!(gpus[0].uuid.as_deref(), Some("GPU-5d2c0e8a-6f35-4b6e-9a0c-3f1e2d4c5b6a"));
        assert_eq!(gpus[0].ecc_uncorrected, Some(0));
        assert_eq!(gpus[0].power_watts, Some(312.45));
        assert_eq!(gpus[0].throttle_reasons, Some(vec!["sw_power_cap".to_owned()]));
        assert_eq!(gpus[0].xid, None, "nvidia-smi cannot tell XID errors");
        assert_eq!(gpus[0].temperature_c, Some(41.0));
        assert_eq!(gpus[1].model, "Odd, Name");
        assert_eq!(gpus[1].memory_total_bytes, Some(1024 * MIB));
        assert_eq!(gpus[1].ecc_uncorrected, Some(3));
        assert_eq!(gpus[1].throttle_reasons, Some(vec!["hw_slowdown".to_owned(), "sw_thermal_slowdown".to_owned()]));
        let idle = parse("0, A, 1, 1, 1, 1, GPU-1, 0, 20, 0x0000000000000000", Query::Full).expect("valid");
        assert_eq!(idle[0].throttle_reasons, Some(vec![]), "no active reason is an empty list, not an absent one");
    }

    #[test]
    fn unavailable_health_figures_are_absent_not_zero() {
        let output = "0, NVIDIA A10G, 23028, 0, 5, 40, [N/A], [N/A], [Not Supported], [Not Supported]\n\
                      1, Tesla T4, 15360, 0, 0, 30, , N/A, [N/A], \n\
                      2, Tesla T4, 15360, 0, 0, 30, GPU-2, -1, NaN, 0xZZ\n";
        let gpus = parse(output, Query::Full).expect("valid");
        for gpu in &gpus {
            assert_eq!(gpu.ecc_uncorrected, None, "{gpu:?}");
            assert_eq!(gpu.power_watts, None, "{gpu:?}");
            assert_eq!(gpu.throttle_reasons, None, "{gpu:?}");
        }
        assert_eq!(gpus[0].uuid, None);
        assert_eq!(gpus[1].uuid, None);
        assert_eq!(gpus[2].uuid.as_deref(), Some("GPU-2"));
        assert_eq!(gpus[0].memory_total_bytes, Some(23028 * MIB));
    }

    #[test]
    fn the_full_query_needs_its_ten_columns() {
        let err = parse("0, NVIDIA A10G, 23028, 0, 5, 40", Query::Full).expect_err("basic answer");
        assert!(err.contains("expected 10 comma-separated columns"), "{err}");
    }

    /// A stand-in `nvidia-smi` in a fresh directory, running `body`.
    fn stand_in(body: &str) -> (tempfile::TempDir, NvidiaSmi) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let script = dir.path().join("nvidia-smi");
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, NvidiaSmi::new(script, Duration::from_secs(5)))
    }

    #[tokio::test]
    async fn an_nvidia_smi_without_the_health_fields_is_asked_the_basic_query() {
        let basic = Query::Basic.args()[0];
        let (_dir, smi) = stand_in(&format!(
            "if [ \"$1\" = \"{basic}\" ]; then echo '0, Tesla K80, 11441, 0, 0, 30'; \
             else echo 'Field \"uuid\" is not a valid field to query.' >&2; exit 2; fi"
        ));
        for _ in 0..2 {
            let gpus = smi.sample().await.expect("basic figures");
            assert_eq!((gpus[0].model.as_str(), gpus[0].uuid.as_ref()), ("Tesla K80", None));
        }
        assert!(smi.basic_only.load(Ordering::Relaxed));
        let (_dir, smi) = stand_in("echo 'driver not loaded'; exit 9");
        let err = smi.sample().await.expect_err("both queries fail");
        assert!(err.to_string().contains("exit status 9"), "{err}");
        assert!(!smi.basic_only.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_missing_command_is_reported_as_unavailable() {
        let smi = NvidiaSmi::new("/nonexistent/nvidia-smi", Duration::from_secs(5));
        let err = smi.sample().await.expect_err("no such command");
        assert_eq!(err, SourceError::Unavailable("the command was not found on PATH".into()));
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in any::<String>()) {
            let _ = parse(&input, Query::Basic);
            let _ = parse(&input, Query::Full);
        }

        #[test]
        fn parse_never_panics_on_near_miss_lines(
            line in r"[0-9\[\]NA/ ,.\-a-zA-Z%]{0,80}(\n[0-9\[\]NA/ ,.\-]{0,40}){0,3}"
        ) {
            let _ = parse(&line, Query::Basic);
            let _ = parse(&line, Query::Full);
        }

        #[test]
        fn well_formed_rows_round_trip(
            rows in proptest::collection::vec((0u32..64, "[A-Za-z][A-Za-z0-9 \\-]{0,30}", 0u32..200_000,
                                                0u32..200_000, 0u32..=100, 0u32..120), 1..9)
        ) {
            let text: String = rows
                .iter()
                .map(|(i, name, total, used, util, temp)| format!("{i}, {name}, {total}, {used}, {util}, {temp}\n"))
                .collect();
            let gpus = parse(&text, Query::Basic).expect("well-formed output parses");
            prop_assert_eq!(gpus.len(), rows.len());
            for (gpu, (i, name, total, used, util, temp)) in gpus.iter().zip(&rows) {
                prop_assert_eq!(gpu.index, *i);
                prop_assert_eq!(&gpu.model, name.trim());
                prop_assert_eq!(gpu.memory_total_bytes, Some(u64::from(*total) * MIB));
                prop_assert_eq!(gpu.memory_used_bytes, Some(u64::from(*used) * MIB));
                prop_assert_eq!(gpu.utilization, Some(f64::from(*util)));
                prop_assert_eq!(gpu.temperature_c, Some(f64::from(*temp)));
            }
        }
    }
}
