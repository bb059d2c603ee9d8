//! Length-prefixed framing: `u32` little-endian body length, then a JSON body.

use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Largest body accepted or sent (1 MiB): bounds what a peer can make us allocate.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Errors of encoding, decoding and transporting frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame announced or needed a body over [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN} byte limit")]
    TooLong {
        /// Announced length.
        len: usize,
    },
    /// The body is not a valid message.
    #[error("malformed frame body")]
    Malformed(#[source] serde_json::Error),
    /// The connection ended inside a frame.
    #[error("connection closed inside a frame")]
    Truncated,
    /// Reading or writing the transport failed.
    #[error("frame transport failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` into one frame (header and body).
///
/// # Errors
/// [`FrameError::TooLong`] when the body exceeds [`MAX_FRAME_LEN`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut out, msg).map_err(FrameError::Malformed)?;
    let len = out.len() - HEADER_LEN;
    let len32 = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLong { len })?;
    out[..HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    Ok(out)
}

/// Reads the body length from a frame header, rejecting lengths over [`MAX_FRAME_LEN`].
///
/// # Errors
/// [`FrameError::TooLong`].
pub fn decode_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_le_bytes(header)).unwrap_or(usize::MAX);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong { len });
    }
    Ok(len)
}

/// Decodes a frame body.
///
/// # Errors
/// [`FrameError::Malformed`] when `body` is not a `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

#[cfg(feature = "tokio")]
mod io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Reads one message. `Ok(None)` when the peer closed the connection between frames.
    ///
    /// # Errors
    /// [`FrameError`] on transport errors, oversize, truncated or malformed frames.
    pub async fn read_message<T, R>(reader: &mut R) -> Result<Option<T>, FrameError>
    where
        T: DeserializeOwned,
        R: AsyncRead + Unpin,
    {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = reader.read(&mut header[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            got += n;
        }
        let mut body = vec![0u8; decode_len(header)?];
        reader
            .read_exact(&mut body)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
                _ => FrameError::Io(e),
            })?;
        decode_body(&body).map(Some)
    }

    /// Writes one message and flushes.
    ///
    /// # Errors
    /// [`FrameError`] on transport errors or oversize messages.
    pub async fn write_message<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
    where
        T: Serialize,
        W: AsyncWrite + Unpin,
    {
        writer.write_all(&encode(msg)?).await?;
        writer.flush().await?;
        Ok(())
    }
}

#[cfg(feature = "tokio")]
pub use io::{read_message, write_message};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ContainerSpec, ErrorKind, Request, Response, StdioStream, User};

    fn all_requests() -> Vec<Request> {
        let spec = ContainerSpec {
            personality: None,
            id: "c".into(),
            rootfs: crate::Rootfs::VirtioFs {
                tag: "rootfs".into(),
                path: Some("pod/c/rootfs".into()),
            },
            rootfs_readonly: true,
            rootfs_propagation: None,
            hostname: None,
            args: vec!["sh".into(), "-c".into(), "echo \u{1F600}".into()],
            env: vec![],
            cwd: "/".into(),
            user: User {
                uid: 1,
                gid: 2,
                additional_gids: vec![3],
                umask: Some(0o22),
            },
            rlimits: vec![crate::Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 10,
                hard: u64::MAX,
            }],
            no_new_privileges: true,
            oom_score_adj: Some(-5),
            capabilities: Some(crate::Capabilities {
                ambient: vec!["CAP_KILL".into()],
                ..Default::default()
            }),
            devices: Vec::new(),
            mounts: vec![crate::Mount {
                destination: "/dev".into(),
                kind: crate::MountKind::Tmpfs,
                flags: vec![crate::MountFlag::Nosuid],
                data: vec!["mode=755".into()],
                source: None,
                device: None,
                recursive: Default::default(),
            }],
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            sysctl: [("net.ipv4.ip_forward".to_owned(), "1".to_owned())].into(),
            namespaces: vec![crate::Namespace::Mount, crate::Namespace::User],
            join_namespaces: vec![crate::JoinNamespace {
                kind: crate::Namespace::Net,
                container: "sandbox".into(),
            }],
            vm_network: false,
            uid_mappings: vec![crate::IdMapping {
                container_id: 0,
                host_id: 1000,
                size: 10,
            }],
            gid_mappings: vec![crate::IdMapping {
                container_id: 0,
                host_id: 1000,
                size: 10,
            }],
            resources: crate::Resources {
                memory_max: Some(1 << 25),
                cpu_quota_us: Some(50_000),
                ..Default::default()
            },
            terminal: false,
            seccomp: Some(crate::Seccomp {
                default_action: crate::SeccompAction::Allow,
                default_errno: None,
                architectures: vec!["SCMP_ARCH_X86_64".into()],
                syscalls: vec![crate::SyscallRule {
                    names: vec!["mkdir".into()],
                    action: crate::SeccompAction::Errno,
                    errno: Some(1),
                    args: vec![crate::SyscallArg {
                        index: 1,
                        value: 0o700,
                        value_two: 0,
                        op: crate::ArgOp::Eq,
                    }],
                }],
            }),
            hooks: crate::GuestHooks {
                create_container: vec![crate::GuestHook {
                    path: "/bin/hook".into(),
                    args: vec!["hook".into(), "create".into()],
                    env: vec!["A=b".into()],
                    timeout_secs: Some(3),
                }],
                start_container: Vec::new(),
                state: r#"{"id":"c"}"#.into(),
            },
        };
        vec![
            Request::Hello { version: 1 },
            Request::CreateContainer {
                spec: Box::new(spec),
            },
            Request::StartContainer { id: "c".into() },
            Request::WaitContainer { id: "c".into() },
            Request::SignalContainer {
                id: "c".into(),
                signal: 9,
                all: true,
            },
            Request::AttachStdio {
                id: "c".into(),
                stream: StdioStream::Stderr,
                exec_id: Some("e".into()),
            },
            Request::ExecProcess {
                id: "c".into(),
                exec_id: "e".into(),
                process: crate::ProcessSpec {
                    console_size: None,
                    args: vec!["ls".into()],
                    env: vec![],
                    cwd: "/".into(),
                    user: crate::User::default(),
                    terminal: false,
                    rlimits: vec![crate::Rlimit {
                        kind: "RLIMIT_NOFILE".into(),
                        soft: 1,
                        hard: 2,
                    }],
                    no_new_privileges: true,
                    capabilities: Some(crate::Capabilities {
                        bounding: vec!["CAP_KILL".into()],
                        ..crate::Capabilities::default()
                    }),
                },
                detach: false,
            },
            Request::WaitProcess {
                id: "c".into(),
                exec_id: "e".into(),
            },
            Request::ListProcesses { id: "c".into() },
            Request::DeleteContainer { id: "c".into() },
            Request::ConfigureNetwork {
                network: crate::Network {
                    mac: "0a:58:0a:fe:4d:02".into(),
                    mtu: 1500,
                    addresses: Vec::new(),
                    routes: Vec::new(),
                },
            },
            Request::Shutdown,
        ]
    }

    fn roundtrip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
        let bytes = encode(msg).unwrap();
        let len = decode_len(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - HEADER_LEN);
        decode_body(&bytes[HEADER_LEN..]).unwrap()
    }

    #[test]
    fn test_encode_requests_roundtrip_equal() {
        for req in all_requests() {
            assert_eq!(roundtrip(&req), req);
        }
    }

    #[test]
    fn test_encode_responses_roundtrip_equal() {
        let responses = [
            Response::Hello {
                version: 1,
                agent: "a".into(),
            },
            Response::Ok,
            Response::Started { pid: 7 },
            Response::Exited {
                code: 137,
                oom_killed: true,
            },
            Response::Error {
                kind: ErrorKind::NotFound,
                message: "no".into(),
            },
        ];
        for resp in responses {
            assert_eq!(roundtrip(&resp), resp);
        }
    }

    #[test]
    fn test_decode_len_oversize_rejected() {
        let header = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_le_bytes();
        assert!(matches!(
            decode_len(header),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            decode_len([0xff; 4]),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn test_encode_oversize_rejected() {
        let req = Request::StartContainer {
            id: "x".repeat(MAX_FRAME_LEN),
        };
        assert!(matches!(encode(&req), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn test_decode_body_malformed_rejected() {
        for body in [
            &b"not json"[..],
            b"{}",
            b"{\"type\":\"nope\"}",
            b"{\"type\":\"hello\"}",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(decode_body::<Request>(body), Err(FrameError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[tokio::test]
    async fn test_read_message_stream_of_frames_all_read() {
        let mut wire = Vec::new();
        for req in all_requests() {
            write_message(&mut wire, &req).await.unwrap();
        }
        let mut reader = &wire[..];
        for req in all_requests() {
            assert_eq!(
                read_message::<Request, _>(&mut reader).await.unwrap(),
                Some(req)
            );
        }
        assert!(read_message::<Request, _>(&mut reader)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn test_read_message_truncated_rejected() {
        let wire = encode(&Request::Shutdown).unwrap();
        for cut in [1, HEADER_LEN, wire.len() - 1] {
            let mut reader = &wire[..cut];
            let got = read_message::<Request, _>(&mut reader).await;
            assert!(
                matches!(got, Err(FrameError::Truncated)),
                "cut at {cut}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn test_read_message_oversize_header_rejected_without_alloc() {
        let mut reader = &[0xff, 0xff, 0xff, 0x7f][..];
        let got = read_message::<Request, _>(&mut reader).await;
        assert!(matches!(got, Err(FrameError::TooLong { .. })));
    }
}
