//! The husk host <-> husk-agent protocol: wire types and framing.
//!
//! The agent listens on vsock port [`AGENT_PORT`]. Every connection starts with one
//! framed [`Request`] from the host:
//! - a *control* connection begins with [`Request::Hello`] and then carries any number of
//!   request/response pairs, strictly alternating;
//! - a *stdio* connection begins with [`Request::AttachStdio`]; after the agent's
//!   [`Response::Ok`] it carries the raw bytes of one stream of one process, so that vsock
//!   credit gives backpressure for free. The agent shuts the write side down once the
//!   process's stream reached end of file and every byte was written.
//!
//! A frame is a 4-byte little-endian body length followed by the body, UTF-8 JSON of one
//! message. Frames longer than [`MAX_FRAME_LEN`] are rejected before anything is allocated.
//! See README.md beside this crate for the sequence of a container's life.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod frame;
mod hooks;
mod identity;
mod linux;
mod messages;
pub mod mux;
mod network;
mod process;
mod resources;
mod seccomp;

pub use frame::{decode_body, decode_len, encode, FrameError, HEADER_LEN, MAX_FRAME_LEN};
#[cfg(feature = "tokio")]
pub use frame::{read_message, write_message};
pub use hooks::{GuestHook, GuestHooks, MAX_HOOKS, MAX_HOOK_STATE};
pub use identity::{GuestIdentity, MAX_SEED_LEN, MIN_SEED_LEN};
pub use linux::{
    sysctl_namespace, BindSource, Device, DeviceKind, IdMapping, JoinNamespace, Mount, MountFlag,
    MountKind, Namespace, Propagation, RecursiveAttrs, RootPropagation, SysctlNamespace,
};
pub use messages::{
    valid_serial, validate_id, ContainerSpec, ErrorKind, ExecInit, Personality, ProcessInfo,
    ProcessSpec, Request, Response, Rootfs, Stats, StdioStream, User, AGENT_PORT,
    MAX_ADDITIONAL_GIDS, PROTOCOL_VERSION, SAVE_PORT,
};
pub use network::{IpPrefix, Network, Route};
pub use process::{Capabilities, Rlimit, MAX_SET_NAMES, OOM_SCORE_ADJ_RANGE, RLIMIT_NAMES};
pub use resources::{
    blkio_weight_to_io_weight, cpu_shares_to_weight, Resources, DEFAULT_CPU_PERIOD_US, MAX_UNIFIED,
};
pub use seccomp::{ArgOp, Seccomp, SeccompAction, SyscallArg, SyscallRule, DEFAULT_SECCOMP_ERRNO};
