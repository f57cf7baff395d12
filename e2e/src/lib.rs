//! kubemail's end-to-end support: the local real cluster's endpoints, the node agent that runs
//! pods as local processes, and shared test helpers.

pub mod agent;
pub mod bench;
pub mod hostile;
pub mod local_env;
