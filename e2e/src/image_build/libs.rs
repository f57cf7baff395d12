//! The shared libraries a dynamically linked program loads, found the way the dynamic loader
//! finds them (`ldd`: the `DT_NEEDED` entries, transitively, plus the loader itself), and put
//! into an image at the paths their Debian packages ship them at, symlinks included.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::ImageBuildError;
use crate::oci::layer::LayerBuilder;

/// Longest chain of symlinks followed for one library (the loader's own is one link).
const MAX_SYMLINKS: usize = 8;

/// A library as it goes into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// Absolute path, as packaged.
    pub path: PathBuf,
    /// `package=version` of the Debian package that ships it, when dpkg knows it.
    pub package: Option<String>,
}

/// The libraries `binary` needs at run time, loader included, sorted by path.
pub fn shared_libraries(binary: &Path) -> Result<Vec<Library>, ImageBuildError> {
    let output = Command::new("ldd")
        .arg(binary)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ImageBuildError::RunTool {
            tool: "ldd",
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // ldd exits 1 for a static binary ("not a dynamic executable"): nothing to copy.
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("not a dynamic executable") || stdout.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(ImageBuildError::Ldd {
            binary: binary.to_path_buf(),
            message: stderr.trim().to_string(),
        });
    }
    let paths = parse_ldd(&stdout).map_err(|library| ImageBuildError::LibraryNotFound {
        binary: binary.to_path_buf(),
        library,
    })?;
    let mut libs: Vec<Library> = paths.iter().map(|p| packaged(p)).collect();
    libs.sort_by(|a, b| a.path.cmp(&b.path));
    libs.dedup();
    Ok(libs)
}

/// The library paths in `ldd` output; `Err(name)` for a library the loader cannot find.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
        // "linux-vdso.so.1 (0x…)" (in the kernel, nothing to copy), "libx.so => not found".
        let (name, resolved) = match line.split_once("=>") {
            Some((name, rest)) => (name.trim(), rest.trim()),
            None => (line, line),
        };
        if resolved.starts_with("not found") {
            return Err(name.to_string());
        }
        let path = resolved.split(" (").next().unwrap_or(resolved).trim();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// Adds the library at `path` to `layer`: a symlink stays a symlink (with its target added
/// too), a file is copied with its mode.
pub fn add_library(layer: &mut LayerBuilder, path: &Path) -> Result<(), ImageBuildError> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        let read_err = |source| ImageBuildError::ReadHostFile {
            path: current.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&current).map_err(read_err)?;
        let image_path = current.to_string_lossy().into_owned();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&current).map_err(read_err)?;
            layer
                .symlink(&image_path, &target.to_string_lossy())
                .map_err(ImageBuildError::Layer)?;
            // A relative target must stay next to its link; an absolute one may be named by
            // either of its merged-/usr paths.
            current = if target.is_absolute() {
                packaged(&target).path
            } else {
                current.parent().unwrap_or(Path::new("/")).join(target)
            };
            continue;
        }
        let data = std::fs::read(&current).map_err(read_err)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        layer
            .file(&image_path, data, mode)
            .map_err(ImageBuildError::Layer)?;
        return Ok(());
    }
    Err(ImageBuildError::SymlinkLoop {
        path: path.to_path_buf(),
    })
}

/// The path Debian packages `path` under (on a merged-/usr host `/usr/lib/…` and `/lib/…` are
/// the same file; dpkg knows one of them) and the package, when dpkg is there to ask.
fn packaged(path: &Path) -> Library {
    let text = path.to_string_lossy();
    let alternative = match text.strip_prefix("/usr") {
        Some(rest) if rest.starts_with("/lib") => Some(PathBuf::from(rest)),
        _ if text.starts_with("/lib") => Some(PathBuf::from(format!("/usr{text}"))),
        _ => None,
    };
    for candidate in std::iter::once(path.to_path_buf()).chain(alternative) {
        if let Some(package) = debian_package(&candidate) {
            return Library {
                path: candidate,
                package: Some(package),
            };
        }
    }
    Library {
        path: path.to_path_buf(),
        package: None,
    }
}

/// `package=version` of the installed Debian package that ships `path`.
fn debian_package(path: &Path) -> Option<String> {
    let owner = Command::new("dpkg-query")
        .arg("--search")
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    // "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6"; diversions are listed differently.
    let line = String::from_utf8_lossy(&owner.stdout)
        .lines()
        .next()?
        .to_string();
    let (package, listed) = line.rsplit_once(": ")?;
    if Path::new(listed.trim()) != path || package.contains(' ') {
        return None;
    }
    let version = Command::new("dpkg-query")
        .args(["--show", "--showformat=${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    Some(format!("{package}={version}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed_into_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc1b5e5000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0d)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "libfoo.so.1"
        );
    }

    #[test]
    fn a_host_program_brings_its_libraries_and_the_loader() {
        let sleep =
            crate::agent::process::find_on_path("sleep", "/usr/bin:/bin").expect("coreutils sleep");
        let libs = shared_libraries(&sleep).unwrap();
        assert!(
            libs.iter()
                .any(|l| l.path.file_name().is_some_and(|n| n == "libc.so.6")),
            "{libs:?}"
        );
        let mut layer = LayerBuilder::new(0);
        for lib in &libs {
            add_library(&mut layer, &lib.path).unwrap();
        }
        // Whatever the loader's path is, it is in the layer as a file or as a link to one.
        let files = layer
            .entries()
            .filter(|(_, n)| matches!(n.kind, crate::oci::layer::NodeKind::File(_)))
            .count();
        assert!(files >= 2, "libc and the loader at least");
    }
}
