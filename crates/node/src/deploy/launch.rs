//! Which runtimes this machine can start, and the command line that starts one replica: llama.cpp's
//! `llama-server`, llama-cpp-python's server (`python -m llama_cpp.server`) or `vllm serve`.
//!
//! The agent's own arguments (model file, address, port, served name, concurrency) come first and the deployment's
//! `args` after them, so a deployment can add flags (`--n_ctx 512`) but the agent always knows where the runtime
//! listens and under which name it serves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use llm_router_protocol::{Assignment, RuntimeKind};

use crate::config::ManageConfig;

/// A program that serves a model on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// llama.cpp's `llama-server`.
    LlamaServer(PathBuf),
    /// A Python interpreter with llama-cpp-python's server.
    LlamaCppPython(PathBuf),
    /// vLLM's `vllm` command.
    Vllm(PathBuf),
}

/// The runtimes found on this machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launchers {
    pub llama_server: Option<PathBuf>,
    pub llama_cpp_python: Option<PathBuf>,
    pub vllm: Option<PathBuf>,
}

impl Launchers {
    /// Look the runtimes up: a path given by flag must be an executable file (else it is left out, with a warning);
    /// `llama-server` and `vllm` are otherwise looked for on `PATH`. The Python of `--llama-cpp-python` must import
    /// `llama_cpp.server`.
    pub async fn discover(config: &ManageConfig) -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let pick = |given: &Option<PathBuf>, name: &str, flag: &str| match given {
            Some(file) if is_executable(file) => Some(file.clone()),
            Some(file) => {
                tracing::warn!(file = %file.display(), "{flag}: not an executable file; left out");
                None
            }
            None => find_on_path(name, &path),
        };
        let llama_server = pick(&config.llama_server, "llama-server", "--llama-server (LLM_NODE_LLAMA_SERVER)");
        let vllm = pick(&config.vllm, "vllm", "--vllm (LLM_NODE_VLLM)");
        let llama_cpp_python = match &config.llama_cpp_python {
            Some(python) if has_llama_cpp_server(python).await => Some(python.clone()),
            Some(python) => {
                tracing::warn!(
                    python = %python.display(),
                    "--llama-cpp-python (LLM_NODE_LLAMA_CPP_PYTHON): this Python cannot import llama_cpp.server \
                     (pip install 'llama-cpp-python[server]'); left out"
                );
                None
            }
            None => None,
        };
        Launchers { llama_server, llama_cpp_python, vllm }
    }

    /// What starts `kind` here: `llama-server` before llama-cpp-python for llama.cpp.
    pub fn for_kind(&self, kind: RuntimeKind) -> Option<Launcher> {
        match kind {
            RuntimeKind::LlamaCpp => self
                .llama_server
                .clone()
                .map(Launcher::LlamaServer)
                .or_else(|| self.llama_cpp_python.clone().map(Launcher::LlamaCppPython)),
            RuntimeKind::Vllm => self.vllm.clone().map(Launcher::Vllm),
        }
    }

    /// The runtimes this machine can start, as `supported_runtimes` lists them (`managed:llama_cpp`).
    pub fn managed_names(&self) -> Vec<String> {
        RuntimeKind::ALL
            .into_iter()
            .filter(|kind| self.for_kind(*kind).is_some())
            .map(RuntimeKind::managed_name)
            .collect()
    }
}

/// The program and arguments that serve `assignment`'s model from `model_file` on `127.0.0.1:port`.
pub fn command_line(
    launcher: &Launcher,
    model_file: &Path,
    port: u16,
    assignment: &Assignment,
) -> (PathBuf, Vec<OsString>) {
    let mut args: Vec<OsString> = Vec::new();
    fn push(args: &mut Vec<OsString>, items: &[&str]) {
        args.extend(items.iter().map(OsString::from));
    }
    let port = port.to_string();
    let program = match launcher {
        Launcher::LlamaServer(program) => {
            push(&mut args, &["-m"]);
            args.push(model_file.into());
            push(&mut args, &["--host", "127.0.0.1", "--port", &port, "--alias", &assignment.model]);
            if let Some(n) = assignment.max_concurrency {
                args.extend(["--parallel".into(), n.to_string().into()]);
            }
            program.clone()
        }
        Launcher::LlamaCppPython(python) => {
            // llama-cpp-python's server computes one request at a time: it has no concurrency setting.
            push(&mut args, &["-m", "llama_cpp.server", "--model"]);
            args.push(model_file.into());
            push(&mut args, &["--host", "127.0.0.1", "--port", &port, "--model_alias", &assignment.model]);
            python.clone()
        }
        Launcher::Vllm(program) => {
            push(&mut args, &["serve"]);
            args.push(model_file.into());
            push(&mut args, &["--host", "127.0.0.1", "--port", &port, "--served-model-name", &assignment.model]);
            if let Some(n) = assignment.max_concurrency {
                args.extend(["--max-num-seqs".into(), n.to_string().into()]);
            }
            program.clone()
        }
    };
    args.extend(assignment.args.iter().map(OsString::from));
    (program, args)
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first executable `name` in the directories of `path` (a `PATH` value).
pub fn find_on_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path).map(|dir| dir.join(name)).find(|file| is_executable(file))
}

/// Whether `python` can import llama-cpp-python's server (the import loads the library: up to a few seconds).
async fn has_llama_cpp_server(python: &Path) -> bool {
    let check = tokio::process::Command::new(python)
        .args(["-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('llama_cpp.server') is None)"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    matches!(tokio::time::timeout(Duration::from_secs(30), check).await, Ok(Ok(status)) if status.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn assignment(runtime: RuntimeKind, max_concurrency: Option<u32>, args: &[&str]) -> Assignment {
        Assignment {
            deployment_id: Uuid::nil(),
            revision: 1,
            model: "qwen-0.5b".into(),
            source: "file:///m/q.gguf".into(),
            sha256: None,
            runtime,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            max_concurrency,
            gpu_memory_bytes: None,
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn llama_server_serves_the_file_under_the_models_name() {
        let a = assignment(RuntimeKind::LlamaCpp, Some(4), &["--ctx-size", "4096"]);
        let (program, args) =
            command_line(&Launcher::LlamaServer("/usr/bin/llama-server".into()), Path::new("/c/abc"), 41000, &a);
        assert_eq!(program, PathBuf::from("/usr/bin/llama-server"));
        assert_eq!(
            strings(args),
            [
                "-m",
                "/c/abc",
                "--host",
                "127.0.0.1",
                "--port",
                "41000",
                "--alias",
                "qwen-0.5b",
                "--parallel",
                "4",
                "--ctx-size",
                "4096"
            ]
        );
        let a = assignment(RuntimeKind::LlamaCpp, None, &[]);
        let (_, args) = command_line(&Launcher::LlamaServer("llama-server".into()), Path::new("/c/abc"), 1, &a);
        assert!(!strings(args).contains(&"--parallel".to_owned()));
    }

    #[test]
    fn llama_cpp_python_takes_its_own_flag_names() {
        let a = assignment(RuntimeKind::LlamaCpp, Some(4), &["--n_ctx", "512", "--n_threads", "2"]);
        let (program, args) =
            command_line(&Launcher::LlamaCppPython("/venv/bin/python".into()), Path::new("/c/t.gguf"), 5000, &a);
        assert_eq!(program, PathBuf::from("/venv/bin/python"));
        assert_eq!(
            strings(args),
            [
                "-m",
                "llama_cpp.server",
                "--model",
                "/c/t.gguf",
                "--host",
                "127.0.0.1",
                "--port",
                "5000",
                "--model_alias",
                "qwen-0.5b",
                "--n_ctx",
                "512",
                "--n_threads",
                "2"
            ]
        );
    }

    #[test]
    fn vllm_serves_with_a_served_model_name() {
        let a = assignment(RuntimeKind::Vllm, Some(16), &["--gpu-memory-utilization", "0.5"]);
        let (program, args) = command_line(&Launcher::Vllm("vllm".into()), Path::new("/m/dir"), 8100, &a);
        assert_eq!(program, PathBuf::from("vllm"));
        assert_eq!(
            strings(args),
            [
                "serve",
                "/m/dir",
                "--host",
                "127.0.0.1",
                "--port",
                "8100",
                "--served-model-name",
                "qwen-0.5b",
                "--max-num-seqs",
                "16",
                "--gpu-memory-utilization",
                "0.5"
            ]
        );
    }

    #[test]
    fn llama_server_is_preferred_and_names_are_managed() {
        let none = Launchers::default();
        assert!(none.managed_names().is_empty());
        assert_eq!(none.for_kind(RuntimeKind::LlamaCpp), None);

        let python_only = Launchers { llama_cpp_python: Some("/py".into()), ..Launchers::default() };
        assert_eq!(python_only.for_kind(RuntimeKind::LlamaCpp), Some(Launcher::LlamaCppPython("/py".into())));
        assert_eq!(python_only.managed_names(), ["managed:llama_cpp"]);

        let all = Launchers {
            llama_server: Some("/ls".into()),
            llama_cpp_python: Some("/py".into()),
            vllm: Some("/vllm".into()),
        };
        assert_eq!(all.for_kind(RuntimeKind::LlamaCpp), Some(Launcher::LlamaServer("/ls".into())));
        assert_eq!(all.managed_names(), ["managed:llama_cpp", "managed:vllm"]);
    }

    #[test]
    fn programs_are_found_on_path() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("vllm");
        std::fs::write(&file, "#!/bin/sh\n").expect("write");
        assert_eq!(find_on_path("vllm", dir.path().as_os_str()), None, "not executable yet");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).expect("path");
        assert_eq!(find_on_path("vllm", &path), Some(file));
    }
}
