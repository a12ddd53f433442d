//! What the kernel says about a process: resident memory from `/proc/<pid>/status`, CPU time from
//! `/proc/<pid>/stat`, and the open-file limit that 10,000 connections need.

use anyhow::Context;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the highest resident size so far.
    pub peak: u64,
}

impl Memory {
    pub fn rss_mb(&self) -> f64 {
        self.rss as f64 / 1e6
    }

    pub fn peak_mb(&self) -> f64 {
        self.peak as f64 / 1e6
    }
}

/// Reads the memory figures of process `pid`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_memory(&text).with_context(|| format!("no VmRSS/VmHWM in {path}"))
}

/// Extracts `VmRSS` and `VmHWM` (given in kB) from the text of `/proc/<pid>/status`.
pub fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let value = line[name.len()..].trim().strip_suffix("kB")?.trim();
        value.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some(Memory { rss: field("VmRSS:")?, peak: field("VmHWM:")? })
}

/// CPU time (user + system) process `pid` has used so far, in seconds; `None` for this process itself.
pub fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<f64> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |pid| format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&text).with_context(|| format!("malformed {path}"))?;
    Ok(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// `utime + stime` (fields 14 and 15) from the text of `/proc/<pid>/stat`. The command name, field 2, may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Raises this process's open-file soft limit to its hard limit; child processes inherit it. Returns the new limit.
pub fn raise_open_file_limit() -> anyhow::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit cannot be the soft one for open files; the kernel's usual ceiling can.
    let target = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|current| current >= target) {
        return Ok(target);
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: limit.maximum })
        .with_context(|| format!("raising the open-file limit to {target}"))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_peak_in_bytes() {
        let status = "Name:\tllm-router\nVmPeak:\t  900000 kB\nVmHWM:\t   61440 kB\nVmRSS:\t   40960 kB\nThreads:\t3\n";
        assert_eq!(parse_memory(status), Some(Memory { rss: 40960 * 1024, peak: 61440 * 1024 }));
        assert_eq!(parse_memory("Name:\tx\nVmRSS:\t12 kB\n"), None);
        assert_eq!(parse_memory("VmRSS:\tlots\nVmHWM:\t1 kB\n"), None);
    }

    #[test]
    fn counts_cpu_fields_after_the_command_name() {
        // Command name with a space and a parenthesis; utime 250, stime 50.
        let stat = "4242 (llm (router) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_figures() {
        let memory = memory(std::process::id()).expect("own memory");
        assert!(memory.rss > 0 && memory.peak >= memory.rss);
        assert!(cpu_seconds(None).expect("own CPU time") >= 0.0);
    }
}
