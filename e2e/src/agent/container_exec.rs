//! `container-exec`, the last step of starting a container from an image. The launch script runs
//! it inside the container's mount namespace once the root is assembled: it chroots into the
//! root, changes to the working directory, takes the container's groups, gid and uid (in that
//! order, so it can still change them), sets no_new_privs when asked, and execs the program,
//! found on the container's PATH inside the root. Its own process image is replaced, so the
//! pid the agent started stays the container's main process.
//!
//! A helper process rather than `pre_exec` in the agent because the workspace forbids `unsafe`,
//! and util-linux cannot do all of it in one step (`unshare --root --setuid` drops the
//! supplementary groups a pod's fsGroup needs; coreutils `chroot` always starts in `/`).

use std::convert::Infallible;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::unistd::{AccessFlags, Gid, Uid};

/// PATH when the container's environment has none (the runtimes' default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub root: PathBuf,
    /// Inside the root.
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub no_new_privs: bool,
    pub argv: Vec<String>,
}

/// Why the program could not be started; the exit code follows shell conventions (125 set-up,
/// 126 cannot execute, 127 not found).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("enter root {root}")]
    Chroot {
        root: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("change to working directory {dir}")]
    Chdir {
        dir: String,
        #[source]
        source: nix::Error,
    },
    #[error("set user {uid}, group {gid}, groups {groups:?}")]
    SetIds {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        #[source]
        source: nix::Error,
    },
    #[error("set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    #[error("no command to run")]
    EmptyArgv,
    #[error("argument contains a NUL byte")]
    NulByte,
    #[error("exec: {program:?}: executable file not found in $PATH")]
    NotFound { program: String },
    #[error("exec {program}")]
    Exec {
        program: String,
        #[source]
        source: nix::Error,
    },
}

impl ExecError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::NotFound { .. } => 127,
            ExecError::Exec { .. } => 126,
            _ => 125,
        }
    }
}

/// Enters the root as the container's user and execs its program; returns only on failure.
pub fn exec(request: &ExecRequest) -> Result<Infallible, ExecError> {
    let program = request.argv.first().ok_or(ExecError::EmptyArgv)?;
    let argv: Vec<CString> = request
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| ExecError::NulByte))
        .collect::<Result<_, _>>()?;
    nix::unistd::chroot(&request.root).map_err(|source| ExecError::Chroot {
        root: request.root.clone(),
        source,
    })?;
    let chdir = |dir: &str| {
        nix::unistd::chdir(dir).map_err(|source| ExecError::Chdir {
            dir: dir.to_string(),
            source,
        })
    };
    chdir("/")?;
    chdir(&request.workdir)?;
    let ids_err = |source| ExecError::SetIds {
        uid: request.uid,
        gid: request.gid,
        groups: request.groups.clone(),
        source,
    };
    let groups: Vec<Gid> = request.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).map_err(ids_err)?;
    nix::unistd::setgid(Gid::from_raw(request.gid)).map_err(ids_err)?;
    nix::unistd::setuid(Uid::from_raw(request.uid)).map_err(ids_err)?;
    if request.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(ExecError::NoNewPrivs)?;
    }
    // Looked up after the user change, so "found" means this user may run it.
    let path_var = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
    let resolved = find_program(program, &path_var).ok_or_else(|| ExecError::NotFound {
        program: program.clone(),
    })?;
    let path =
        CString::new(resolved.as_os_str().as_encoded_bytes()).map_err(|_| ExecError::NulByte)?;
    nix::unistd::execv(&path, &argv).map_err(|source| ExecError::Exec {
        program: program.clone(),
        source,
    })
}

/// `program` itself when it names a path, else the first executable file of that name on
/// `path_var` (in the current root).
pub fn find_program(program: &str, path_var: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path_var
        .split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file() && nix::unistd::access(p, AccessFlags::X_OK).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_taken_as_paths() {
        assert_eq!(
            find_program("/usr/local/bin/x", "/nope"),
            Some(PathBuf::from("/usr/local/bin/x"))
        );
        let sleep = find_program("sleep", "/nope:/usr/bin:/bin").expect("coreutils sleep");
        assert!(sleep.ends_with("sleep"));
        assert_eq!(find_program("surely-not-a-program", "/usr/bin:/bin"), None);
        assert_eq!(
            ExecError::NotFound {
                program: "x".into()
            }
            .exit_code(),
            127
        );
    }
}
