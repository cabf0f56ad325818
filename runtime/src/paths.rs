//! Well-known paths that a client needs before it can ask the agent anything. The agent
//! discovers everything else (cgroup2 mount, bpffs) at run time.

/// The agent's local API socket (`corral-agent --socket`, `corral --socket`).
pub const AGENT_SOCKET: &str = "/run/corral/agent.sock";
/// The SPIFFE Workload API's socket (`corral-agent --workload-socket`).
pub const WORKLOAD_SOCKET: &str = "/run/corral/workload.sock";
