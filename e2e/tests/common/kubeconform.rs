//! kubeconform with the offline schemas e2e/tools/setup.sh builds (Kubernetes' kinds from the
//! pinned swagger.json, third-party CRDs) plus kubemail's own CRDs from `crds/`, converted by
//! e2e/tools/kube-schemas.py.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kubemail_e2e::local_env::workspace_root;
use serde::Deserialize;

use crate::mail::{run, run_ok};

/// The `.yaml`/`.yml` files of a directory by name, with their bytes.
pub fn yaml_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// kubeconform and its offline schemas, as e2e/tools/setup.sh built them.
pub struct Kubeconform {
    bin: PathBuf,
    /// Kubernetes' kinds: `<group>/<kind>_<version>.json`.
    k8s: PathBuf,
    /// Custom resources' schemas, converted from kubemail's and the third-party CRDs.
    crds: tempfile::TempDir,
}

impl Kubeconform {
    pub fn new() -> Self {
        let root = workspace_root();
        let env = run_ok(&root.join("e2e/tools/setup.sh"), &["--print-env"]);
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("setup.sh --print-env has no {name}:\n{env}"))
        };
        let bin = var("KUBECONFORM_BIN").join("kubeconform");
        let schemas = var("KUBE_SCHEMAS");
        assert!(
            bin.is_file() && schemas.join("k8s/apps/deployment_v1.json").is_file(),
            "kubeconform or its schemas are missing; run e2e/tools/setup.sh --tools-only"
        );
        let crds = tempfile::tempdir().unwrap();
        let mut args = vec![
            root.join("e2e/tools/kube-schemas.py")
                .to_string_lossy()
                .into_owned(),
            "crds".to_owned(),
            crds.path().to_string_lossy().into_owned(),
        ];
        // As JSON, so the converter needs no YAML library.
        let json = tempfile::tempdir().unwrap();
        for dir in [root.join("crds"), schemas.join("crds")] {
            for (name, bytes) in yaml_files(&dir) {
                for doc in serde_yaml::Deserializer::from_slice(&bytes) {
                    let crd = serde_json::Value::deserialize(doc).unwrap();
                    if crd["kind"] != "CustomResourceDefinition" {
                        continue;
                    }
                    let path = json.path().join(format!("{name}-{}.json", args.len()));
                    std::fs::write(&path, serde_json::to_vec(&crd).unwrap()).unwrap();
                    args.push(path.to_string_lossy().into_owned());
                }
            }
        }
        run_ok(
            Path::new("python3"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        Self {
            bin,
            k8s: schemas.join("k8s"),
            crds,
        }
    }

    /// Validates the files with -strict (unknown fields refused, no kind without a schema);
    /// returns kubeconform's output and whether every resource was valid.
    pub fn validate(&self, files: &[&Path]) -> (bool, String) {
        let location = |dir: &Path| {
            format!(
                "{}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
                dir.display()
            )
        };
        let (k8s, crds) = (location(&self.k8s), location(self.crds.path()));
        let mut args = vec![
            "-strict",
            "-summary",
            "-schema-location",
            k8s.as_str(),
            "-schema-location",
            crds.as_str(),
        ];
        let files: Vec<String> = files
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        args.extend(files.iter().map(String::as_str));
        let out = run(&self.bin, &args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}
