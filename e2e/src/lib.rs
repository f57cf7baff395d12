//! kubemail's end-to-end support: the local real cluster's endpoints, the node agent that runs
//! pods as local processes (from kubemail's OCI images), the image builder behind
//! `make images`, and shared test helpers.

pub mod agent;
pub mod bench;
pub mod hostile;
pub mod image_build;
pub mod local_env;
pub mod oci;
