//! Checks on a deployment an administrator asks for (SPEC §15), and on what an agent reports of its replicas.

use llm_router_protocol::ReplicaReport;

use super::{Checked, MAX_GPU_COUNT, MAX_MEMORY_BYTES, Text, bad_request, item, list, text};
use crate::model::deployment::DeploymentSpec;

/// Most replicas of one deployment.
pub const MAX_REPLICAS: u32 = 1_000;
/// Most arguments for the runtime, and the longest one in characters.
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_CHARS: usize = 4_096;
/// Longest source URL or path, in characters.
pub const MAX_SOURCE_CHARS: usize = 2_048;
/// Most replicas one heartbeat may report, and the longest reason in characters (longer ones are cut).
pub const MAX_REPORTED_REPLICAS: usize = 256;
pub const MAX_REASON_CHARS: usize = 1_000;
/// Highest `max_concurrency` of a deployment.
pub const MAX_CONCURRENCY: u32 = 100_000;

/// A deployment's fields as the API received them, checked and normalised (trimmed source, lowercase hash), or 400
/// naming the field.
pub fn deployment(fields: DeploymentSpec) -> Checked<DeploymentSpec> {
    let model = item("model", fields.model)?;
    let source = fields.source.trim().to_owned();
    if source.chars().count() > MAX_SOURCE_CHARS {
        return Err(bad_request(format!("`source` must be at most {MAX_SOURCE_CHARS} characters.")));
    }
    text("source", &source, Text::Line)?;
    let sha256 = fields.sha256.map(|hash| hash.trim().to_ascii_lowercase()).filter(|hash| !hash.is_empty());
    if let Some(hash) = &sha256
        && (hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad_request("`sha256` must be 64 hexadecimal digits."));
    }
    source_kind(&source, sha256.is_some())?;
    if fields.args.len() > MAX_ARGS {
        return Err(bad_request(format!("`args` has more than {MAX_ARGS} entries.")));
    }
    for (i, arg) in fields.args.iter().enumerate() {
        if arg.chars().count() > MAX_ARG_CHARS {
            return Err(bad_request(format!("`args[{i}]` must be at most {MAX_ARG_CHARS} characters.")));
        }
        text(format_args!("args[{i}]"), arg, Text::Line)?;
    }
    if fields.replicas > MAX_REPLICAS {
        return Err(bad_request(format!("`replicas` must be 0 to {MAX_REPLICAS}, not {}.", fields.replicas)));
    }
    if let Some(bytes) = fields.gpu_memory_bytes
        && !(1..=MAX_MEMORY_BYTES).contains(&bytes)
    {
        return Err(bad_request(format!("`gpu_memory_bytes` must be 1 to {MAX_MEMORY_BYTES}, not {bytes}.")));
    }
    if let Some(n) = fields.max_concurrency
        && !(1..=MAX_CONCURRENCY).contains(&n)
    {
        return Err(bad_request(format!("`max_concurrency` must be 1 to {MAX_CONCURRENCY}, not {n}.")));
    }
    let selector_tags = list("node_selector.tags", Some(fields.selector_tags))?;
    Ok(DeploymentSpec {
        model,
        source,
        sha256,
        runtime: fields.runtime,
        args: fields.args,
        replicas: fields.replicas,
        gpu_memory_bytes: fields.gpu_memory_bytes,
        selector_tags,
        max_concurrency: fields.max_concurrency,
    })
}

/// `file:///absolute/path`, or an `http(s)://host/…` URL that comes with its sha256.
fn source_kind(source: &str, has_sha256: bool) -> Checked<()> {
    if let Some(path) = source.strip_prefix("file://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(bad_request(
                "`source` `file://` must name an absolute path on the node: file:///models/m.gguf.",
            ));
        }
        return Ok(());
    }
    let rest = source.strip_prefix("https://").or_else(|| source.strip_prefix("http://"));
    match rest {
        Some(rest) if rest.split('/').next().is_some_and(|host| !host.is_empty()) => {
            if has_sha256 {
                Ok(())
            } else {
                Err(bad_request(
                    "`sha256` is required with an http(s) `source`: the agent checks the download against it.",
                ))
            }
        }
        _ => Err(bad_request(
            "`source` must be file:///path/on/the/node or an http:// or https:// URL of the model file.",
        )),
    }
}

/// What a heartbeat reports of its replicas, bounded; reasons longer than [`MAX_REASON_CHARS`] are cut.
pub fn replica_reports(reports: Vec<ReplicaReport>) -> Checked<Vec<ReplicaReport>> {
    if reports.len() > MAX_REPORTED_REPLICAS {
        return Err(bad_request(format!("`replicas` has more than {MAX_REPORTED_REPLICAS} entries.")));
    }
    reports
        .into_iter()
        .enumerate()
        .map(|(i, mut report)| {
            if let Some(reason) = report.reason.take() {
                let reason = crate::model::cut(&reason, MAX_REASON_CHARS).into_owned();
                text(format_args!("replicas[{i}].reason"), &reason, Text::Lines)?;
                report.reason = Some(reason);
            }
            if report.revision < 1 {
                return Err(bad_request(format!("`replicas[{i}].revision` must be at least 1.")));
            }
            if let Some(gpus) = &mut report.gpus {
                if gpus.len() as i64 > MAX_GPU_COUNT || gpus.iter().any(|index| i64::from(*index) >= MAX_GPU_COUNT) {
                    return Err(bad_request(format!(
                        "`replicas[{i}].gpus` must list at most {MAX_GPU_COUNT} GPU indices below {MAX_GPU_COUNT}."
                    )));
                }
                gpus.sort_unstable();
                gpus.dedup();
            }
            Ok(report)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_router_protocol::RuntimeKind;

    fn fields() -> DeploymentSpec {
        DeploymentSpec {
            model: "tiny".into(),
            source: "https://models.example/tiny.gguf".into(),
            sha256: Some("AB".repeat(32)),
            runtime: RuntimeKind::LlamaCpp,
            args: vec!["--n_ctx".into(), "512".into()],
            replicas: 2,
            gpu_memory_bytes: None,
            selector_tags: vec![],
            max_concurrency: None,
        }
    }

    #[test]
    fn a_url_needs_its_sha256_and_a_file_does_not() {
        let spec = deployment(fields()).expect("valid");
        assert_eq!(spec.sha256.as_deref(), Some("ab".repeat(32).as_str()));
        let err = deployment(DeploymentSpec { sha256: None, ..fields() }).expect_err("no hash");
        assert!(err.to_string().contains("`sha256` is required"), "{err}");
        assert!(deployment(DeploymentSpec { sha256: None, source: "file:///m/tiny.gguf".into(), ..fields() }).is_ok());
        for bad in ["file://relative", "ftp://x/y", "https:///nohost", "", "/models/x.gguf"] {
            assert!(deployment(DeploymentSpec { source: bad.into(), ..fields() }).is_err(), "{bad}");
        }
        assert!(deployment(DeploymentSpec { sha256: Some("xyz".into()), ..fields() }).is_err());
    }

    #[test]
    fn numbers_and_args_are_bounded() {
        assert!(deployment(DeploymentSpec { replicas: MAX_REPLICAS + 1, ..fields() }).is_err());
        assert!(deployment(DeploymentSpec { replicas: 0, ..fields() }).is_ok());
        assert!(deployment(DeploymentSpec { gpu_memory_bytes: Some(0), ..fields() }).is_err());
        assert!(deployment(DeploymentSpec { max_concurrency: Some(0), ..fields() }).is_err());
        assert!(deployment(DeploymentSpec { args: vec!["a\u{0}b".into()], ..fields() }).is_err());
        assert!(deployment(DeploymentSpec { model: " ".into(), ..fields() }).is_err());
        let err = deployment(DeploymentSpec { selector_tags: vec!["".into()], ..fields() }).expect_err("blank tag");
        assert!(err.to_string().contains("node_selector.tags[0]"), "{err}");
    }
}
