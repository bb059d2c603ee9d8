//! containerd-shim-husk-v2 under a real containerd (Debian 12's 1.6), driven with `ctr` as a
//! user would. Each scenario runs first under `io.containerd.runc.v2`, the oracle, then under
//! `io.containerd.husk.v2` in a namespace of its own on the same containerd; where the
//! outcome is comparable (stdout, exit codes, task states) husk's must equal runc's. Without
//! `$HUSK_OUT/bin/containerd-shim-husk-v2` the husk half prints `SKIPPED: <reason>`.
//!
//! Scenarios: output and exit code of `ctr run --rm` (small and large outputs); `binary://`
//! and `file://` log URIs; a detached
//! task with exec, ps, kill and delete; `ps` naming a running exec by its exec id; piped stdin; a terminal; pause and resume; `task
//! update` of memory and CPU limits; metrics;
//! an OOM kill and its `/tasks/oom` event; a pod of two containers sharing a network
//! namespace (one VM for husk); a container whose process (runc) or VMM (husk) is killed from
//! the host; a shim killed with SIGKILL; a task whose create fails (a missing command, a
//! missing rootfs). The last three check that nothing is left behind.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::fmt::Debug;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_e2e::harness::containerd::{Containerd, Ctr, Runtime, Task, CTR_TIMEOUT};
use husk_e2e::harness::oci_image::IMAGE;
use husk_e2e::harness::procs::{self, Proc};
use husk_e2e::harness::{show, text, unique};

/// How long teardown (processes gone, mounts gone) may take after the fact.
const CLEANUP: Duration = Duration::from_secs(30);

/// Runs `scenario` under runc, then under husk (or prints `SKIPPED`), in namespaces
/// `<ns>-runc` and `<ns>-husk`; `check(observation, runtime)` asserts each observation right
/// after its run (runc's too: the oracle must see what the scenario expects, or the harness
/// is wrong). Returns runc's observation and husk's, if it ran.
fn runc_then_husk<T: Debug>(
    test: &str,
    ns: &str,
    scenario: impl Fn(&Ctr<'_>) -> T,
    check: impl Fn(&T, Runtime),
) -> Option<(T, Option<T>)> {
    let containerd = Containerd::get(test)?;
    let mut seen = Vec::new();
    for runtime in [Runtime::Runc, Runtime::Husk] {
        if let Some(reason) = runtime.missing() {
            println!("SKIPPED: {test} ({} half): {reason}", runtime.label());
            continue;
        }
        let observed = scenario(&containerd.ctr(runtime, ns));
        println!("{test}: {}: {observed:?}", runtime.label());
        check(&observed, runtime);
        seen.push(observed);
    }
    let mut seen = seen.into_iter();
    seen.next().map(|runc| (runc, seen.next()))
}

/// [`runc_then_husk`] where both runtimes must observe `expected`.
fn both_see<T: Debug + PartialEq>(
    test: &str,
    ns: &str,
    scenario: impl Fn(&Ctr<'_>) -> T,
    expected: &T,
) {
    runc_then_husk(test, ns, scenario, |seen, runtime| {
        assert_eq!(
            seen,
            expected,
            "{test}: {} (left, seen) differs from the expected outcome, what runc.v2 gives (right)",
            runtime.label()
        );
    });
}

/// Kills a task with SIGKILL, waits until it is STOPPED and deletes it and its container.
fn remove(ctr: &Ctr<'_>, id: &str) {
    let label = ctr.runtime().label();
    let kill = ctr.ctr(&["task", "kill", "-s", "KILL", id]);
    assert!(
        kill.status.success(),
        "{label}: task kill {id}: {}",
        show(&kill)
    );
    let status = ctr.await_status(id, |s| s == Some("STOPPED"), CTR_TIMEOUT);
    assert_eq!(
        status.as_deref(),
        Some("STOPPED"),
        "{label}: task {id} after kill -s KILL: expected STOPPED, seen {status:?}"
    );
    for args in [["task", "delete", id], ["container", "delete", id]] {
        let out = ctr.ctr(&args);
        assert!(out.status.success(), "{label}: {args:?}: {}", show(&out));
    }
}

/// Polls for up to [`CLEANUP`] until nothing of container `id` is left, and returns what
/// still is: any of `spawned` (what its shim had started), a VMM or virtiofsd mentioning
/// `id`, a mount mentioning `id`.
fn leftovers(id: &str, spawned: &[Proc]) -> Vec<String> {
    let deadline = Instant::now() + CLEANUP;
    loop {
        let mut left: Vec<String> = spawned
            .iter()
            .filter(|p| p.alive())
            .map(|p| format!("process {} {}", p.pid, p.name))
            .collect();
        left.extend(
            procs::all()
                .into_iter()
                .filter(|p| p.is_vmm_or_helper() && p.mentions(id))
                .map(|p| format!("process {} {}", p.pid, p.argv.join(" "))),
        );
        left.extend(
            procs::mounts_mentioning(id)
                .into_iter()
                .map(|m| format!("mount {m}")),
        );
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, PartialEq)]
struct RunOutput {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    seq_lines: usize,
    seq_last: Option<String>,
    dd_bytes: usize,
}

fn run_output(ctr: &Ctr<'_>) -> RunOutput {
    let label = ctr.runtime().label();
    let small = ctr.run(
        &["--rm"],
        "exit3",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(
        small.status.code(),
        Some(3),
        "{label}: ctr run exit code: expected 3, seen {}",
        show(&small)
    );
    let seq = ctr.run(&["--rm"], "seq", &["seq", "1", "100000"]);
    assert!(seq.status.success(), "{label}: seq: {}", show(&seq));
    let seq_out = text(&seq.stdout);
    let dd = ctr.run(
        &["--rm"],
        "dd",
        &["sh", "-c", "dd if=/dev/zero bs=64k count=16 2>/dev/null"],
    );
    assert!(dd.status.success(), "{label}: dd: {:?}", dd.status);
    RunOutput {
        code: small.status.code(),
        stdout: text(&small.stdout),
        stderr: text(&small.stderr),
        seq_lines: seq_out.lines().count(),
        seq_last: seq_out.lines().last().map(str::to_owned),
        dd_bytes: dd.stdout.len(),
    }
}

#[test]
fn test_containerd_run_output_and_exit_code_same_as_runc() {
    let test = "test_containerd_run_output_and_exit_code_same_as_runc";
    let expected = RunOutput {
        code: Some(3),
        stdout: "out\n".into(),
        stderr: "err\n".into(),
        seq_lines: 100_000,
        seq_last: Some("100000".into()),
        dd_bytes: 1 << 20,
    };
    both_see(test, "run-output", run_output, &expected);
}

/// What `ctr run --rm --log-uri` delivers to a `binary://` logger and to a `file://` log.
#[derive(Debug, PartialEq)]
struct LogUris {
    code: Option<i32>,
    /// The logger's arguments and environment: `<args> <CONTAINER_ID> <CONTAINER_NAMESPACE>`.
    logger_saw: String,
    logger_stdout: String,
    logger_stderr: String,
    /// The log file's lines, sorted.
    file_log: Vec<String>,
}

/// Reads `path` until it holds `lines` lines (a logger may still be writing after ctr
/// returns) or [`CLEANUP`] passed, and returns what it holds.
fn settled(path: &Path, lines: usize) -> String {
    let deadline = Instant::now() + CLEANUP;
    loop {
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now.lines().count() >= lines || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shell-script logger (containerd's binary logging protocol: args from the URI's query,
/// `CONTAINER_ID` and `CONTAINER_NAMESPACE`, stdout on fd 3, stderr on fd 4, ready when fd 5
/// closes), then a `file://` log.
fn log_uris(ctr: &Ctr<'_>) -> LogUris {
    let label = ctr.runtime().label();
    let dir = tempfile::tempdir().expect("temp dir");
    let logs = dir.path();
    let logger = logs.join("logger");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\ntrap '' TERM\necho \"$* $CONTAINER_ID $CONTAINER_NAMESPACE\" > {d}/saw\n\
             exec 5>&-\ncat <&3 > {d}/out.tmp & cat <&4 > {d}/err.tmp\nwait\n\
             mv {d}/out.tmp {d}/out; mv {d}/err.tmp {d}/err\n",
            d = logs.display()
        ),
    )
    .expect("write the logger");
    std::fs::set_permissions(&logger, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    let id = unique("binlog");
    let binary = format!("--log-uri=binary://{}?k=v", logger.display());
    let run = ctr.run(&["--rm", &binary], &id, &cmd);
    assert_eq!(
        run.status.code(),
        Some(3),
        "{label}: binary log: {}",
        show(&run)
    );
    // runc.v2 now and then drops stderr from a `--rm` task's file log (its copy ends with
    // the task): the oracle gets three tries; husk one.
    let tries = match ctr.runtime() {
        Runtime::Runc => 3,
        Runtime::Husk => 1,
    };
    let mut file_lines: Vec<String> = Vec::new();
    for attempt in 0..tries {
        let file = logs.join(format!("file{attempt}.log"));
        let file_uri = format!("--log-uri=file://{}", file.display());
        let run_file = ctr.run(&["--rm", &file_uri], &unique("filelog"), &cmd);
        assert_eq!(
            run_file.status.code(),
            Some(3),
            "{label}: file log: {}",
            show(&run_file)
        );
        // stdout and stderr reach one file through two streams: their order is not kept.
        file_lines = settled(&file, 2).lines().map(str::to_owned).collect();
        file_lines.sort();
        if file_lines.len() >= 2 {
            break;
        }
    }
    // The logger wrote what it saw before it got ready, before the task was created.
    let saw = std::fs::read_to_string(logs.join("saw")).unwrap_or_default();
    LogUris {
        code: run.status.code(),
        logger_saw: saw.replace(&id, "<id>").replace(ctr.namespace(), "<ns>"),
        logger_stdout: settled(&logs.join("out"), 1),
        logger_stderr: settled(&logs.join("err"), 1),
        file_log: file_lines,
    }
}

#[test]
fn test_containerd_binary_and_file_log_uris_same_as_runc() {
    let test = "test_containerd_binary_and_file_log_uris_same_as_runc";
    let expected = LogUris {
        code: Some(3),
        logger_saw: "k v <id> <ns>\n".into(),
        logger_stdout: "out\n".into(),
        logger_stderr: "err\n".into(),
        file_log: vec!["err".into(), "out".into()],
    };
    both_see(test, "log-uris", log_uris, &expected);
}

/// A detached task: exec, ps, kill (TERM, trapped), STOPPED, delete; one line per step.
fn detached_lifecycle(ctr: &Ctr<'_>) -> Vec<String> {
    let id = "lc";
    let script = "trap 'exit 0' TERM; sleep 1000 & wait";
    ctr.run_detached(&[], id, &["sh", "-c", script]);
    let mut steps = Vec::new();
    let exec = ctr.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo in-exec; exit 5",
    ]);
    steps.push(format!(
        "exec: {:?} {:?}",
        exec.status.code(),
        text(&exec.stdout)
    ));
    let ps = ctr.ctr(&["task", "ps", id]);
    let processes = text(&ps.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|p| p.parse::<u32>().is_ok())
        })
        .count();
    steps.push(format!("ps: {:?}, {processes} processes", ps.status.code()));
    let kill = ctr.ctr(&["task", "kill", id]);
    steps.push(format!("kill (TERM): {:?}", kill.status.code()));
    let status = ctr.await_status(id, |s| s == Some("STOPPED"), CTR_TIMEOUT);
    steps.push(format!("after kill: {status:?}"));
    let delete = ctr.ctr(&["task", "delete", id]);
    steps.push(format!("task delete: {}", show(&delete)));
    steps.push(format!("after delete: {:?}", ctr.task(id)));
    let delete = ctr.ctr(&["container", "delete", id]);
    steps.push(format!("container delete: {}", show(&delete)));
    steps
}

#[test]
fn test_containerd_detached_exec_ps_kill_delete_same_as_runc() {
    let test = "test_containerd_detached_exec_ps_kill_delete_same_as_runc";
    let expected = [
        r#"exec: Some(5) "in-exec\n""#,
        "ps: Some(0), 2 processes",
        "kill (TERM): Some(0)",
        r#"after kill: Some("STOPPED")"#,
        r#"task delete: Some(0) stdout "" stderr """#,
        "after delete: None",
        r#"container delete: Some(0) stdout "" stderr """#,
    ]
    .map(String::from)
    .to_vec();
    both_see(test, "lifecycle", detached_lifecycle, &expected);
}

/// `ctr task ps` of a task with a detached exec running: each process's INFO column, sorted
/// (the pids differ: runc's shim reports host pids, husk's the guest's).
fn ps_exec_ids(ctr: &Ctr<'_>) -> Vec<String> {
    let id = &unique("psexec");
    let label = ctr.runtime().label();
    ctr.run_detached(&[], id, &["sleep", "1000"]);
    let exec = ctr.ctr(&[
        "task",
        "exec",
        "--detach",
        "--exec-id",
        "sleeper",
        id,
        "sleep",
        "1000",
    ]);
    assert!(exec.status.success(), "{label}: exec -d: {}", show(&exec));
    let ps = ctr.ctr(&["task", "ps", id]);
    assert!(ps.status.success(), "{label}: task ps: {}", show(&ps));
    remove(ctr, id);
    let mut infos: Vec<String> = text(&ps.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().split_once(char::is_whitespace))
        .map(|(_, info)| info.trim().to_owned())
        .collect();
    infos.sort();
    infos
}

#[test]
fn test_containerd_ps_shows_exec_id_same_as_runc() {
    let test = "test_containerd_ps_shows_exec_id_same_as_runc";
    let expected = ["&ProcessDetails{ExecID:sleeper,XXX_unrecognized:[],}", "-"]
        .map(String::from)
        .to_vec();
    both_see(test, "ps-exec", ps_exec_ids, &expected);
}

/// `hello\n` into `ctr run --rm ... cat`; stdin closes only once the echo came back.
///
/// ctr 1.6 closes the task's stdin (CloseIO) on EOF only if the EOF arrives after the task
/// was created: input that is complete before (`printf hello | ctr run ...`) leaves `cat`
/// waiting forever, under runc as well.
fn piped_stdin(ctr: &Ctr<'_>) -> (bool, Option<i32>, String) {
    let args = ctr.run_args(&["--rm"], "stdin", &["cat"]);
    let mut run = ctr.spawn(&args, Stdio::piped());
    let mut stdin = run.child.stdin.take().expect("stdin");
    stdin.write_all(b"hello\n").expect("write stdin");
    let echoed = run.await_stdout("hello\n", CTR_TIMEOUT);
    drop(stdin);
    let out = run.wait_for(CTR_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{}: ctr run cat did not end after stdin closed",
            ctr.runtime().label()
        )
    });
    (echoed, out.status.code(), text(&out.stdout))
}

#[test]
fn test_containerd_piped_stdin_same_as_runc() {
    let test = "test_containerd_piped_stdin_same_as_runc";
    let expected = (true, Some(0), "hello\n".to_owned());
    both_see(test, "stdin", piped_stdin, &expected);
}

/// `ctr run -t` on a pty of 33 rows and 77 columns: (exit code, saw /dev/pts/, saw `33 77`).
fn terminal(ctr: &Ctr<'_>) -> (Option<i32>, bool, bool, String) {
    let size = nix::pty::Winsize {
        ws_row: 33,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(&size, None).expect("openpty");
    // ctr sets the size (ResizePty) only after the task started: wait for it. busybox's
    // `stty size` prints nothing and exits 0 while the size is 0x0.
    let script = "tty; for i in $(seq 200); do s=$(stty size 2>/dev/null); \
        case \"$s\" in [1-9]*) break;; esac; sleep 0.05; done; echo \"$s\"";
    let args = ctr.run_args(&["-t", "--rm"], "tty", &["sh", "-c", script]);
    let mut cmd = ctr.command(&args);
    cmd.stdin(pty.slave.try_clone().expect("dup pty"))
        .stdout(pty.slave.try_clone().expect("dup pty"))
        .stderr(pty.slave);
    let mut child = cmd.spawn().expect("spawn ctr");
    // The Command holds our copies of the slave: without dropping it, reads never see EIO.
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once ctr, the last holder of the slave, has exited.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(seen);
    });
    let deadline = Instant::now() + CTR_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait ctr") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{}: ctr run -t did not end", ctr.runtime().label());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen = text(&rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default());
    (
        status.code(),
        seen.contains("/dev/pts/"),
        seen.contains("33 77"),
        seen,
    )
}

#[test]
fn test_containerd_terminal_size_same_as_runc() {
    let test = "test_containerd_terminal_size_same_as_runc";
    runc_then_husk(test, "tty", terminal, |seen, runtime| {
        assert_eq!(
            (seen.0, seen.1, seen.2),
            (Some(0), true, true),
            "{}: expected (exit 0, a /dev/pts/ name, `33 77`) as runc gives, seen {:?}",
            runtime.label(),
            seen.3
        );
    });
}

/// Task states through pause and resume.
fn pause_resume(ctr: &Ctr<'_>) -> Vec<Option<String>> {
    let id = "pause";
    ctr.run_detached(&[], id, &["sleep", "1000"]);
    let mut states = vec![ctr.task(id).map(|t| t.status)];
    for (op, want) in [("pause", "PAUSED"), ("resume", "RUNNING")] {
        let out = ctr.ctr(&["task", op, id]);
        assert!(
            out.status.success(),
            "{}: task {op}: {}",
            ctr.runtime().label(),
            show(&out)
        );
        states.push(ctr.await_status(id, |s| s == Some(want), CTR_TIMEOUT));
    }
    remove(ctr, id);
    states
}

#[test]
fn test_containerd_pause_resume_same_as_runc() {
    let test = "test_containerd_pause_resume_same_as_runc";
    let expected = ["RUNNING", "PAUSED", "RUNNING"]
        .map(|s| Some(s.to_owned()))
        .to_vec();
    both_see(test, "pause", pause_resume, &expected);
}

/// Prints `<memory limit> <cpu quota or max> <cpu period>` from the container's cgroup, v2
/// (husk's guest, a v2 host) or v1 (runc on a v1 host).
const LIMITS: &str = "cd /sys/fs/cgroup; if [ -e memory.max ]; then cat memory.max cpu.max; \
    else q=$(cat cpu/cpu.cfs_quota_us); [ \"$q\" = -1 ] && q=max; \
    echo $(cat memory/memory.limit_in_bytes) $q $(cat cpu/cpu.cfs_period_us); fi";

/// `Task.Update` of container `id` with OCI `resources`, sent straight to its shim over ttrpc,
/// the message containerd would pass on (ctr 1.6 has no `task update`).
fn shim_update(ctr: &Ctr<'_>, id: &str, resources: &serde_json::Value) -> Result<(), String> {
    use containerd_shim_protos::{api::UpdateTaskRequest, protobuf, ttrpc, TaskClient};
    let address_file = ctr.bundle(id).join("address");
    let address = std::fs::read_to_string(&address_file)
        .map_err(|e| format!("{}: {e}", address_file.display()))?;
    let client = ttrpc::Client::connect(address.trim()).map_err(|e| format!("{address}: {e}"))?;
    let mut context =
        ttrpc::context::with_timeout(i64::try_from(CTR_TIMEOUT.as_nanos()).unwrap_or(i64::MAX));
    context.add("containerd-namespace-ttrpc".into(), ctr.namespace().into());
    let request = UpdateTaskRequest {
        id: id.into(),
        resources: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: resources.to_string().into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    TaskClient::new(client)
        .update(context, &request)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `Task.Update` of a running task's memory limit and CPU quota, as the container sees
/// them in its cgroup (bound at /sys/fs/cgroup), before and after; then whether an exec
/// shares the first process's cgroup.
fn update(ctr: &Ctr<'_>) -> Vec<String> {
    let id = "update";
    let label = ctr.runtime().label();
    let flags = [
        "--memory-limit",
        "268435456",
        "--mount",
        "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro",
    ];
    ctr.run_detached(&flags, id, &["sleep", "1000"]);
    let limits = |exec_id: &str| {
        exec_line(ctr, id, exec_id, &["sh", "-c", LIMITS])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let before = limits("before");
    let resources = serde_json::json!({
        "memory": { "limit": 134_217_728 },
        "cpu": { "quota": 50_000, "period": 100_000 },
    });
    if let Err(e) = shim_update(ctr, id, &resources) {
        panic!("{label}: Task.Update of {id}: {e}");
    }
    let after = limits("after");
    // An exec is held by the container's limits: it is in its first process's cgroup.
    let cgroup = exec_line(
        ctr,
        id,
        "cgroup",
        &[
            "sh",
            "-c",
            "[ \"$(cat /proc/self/cgroup)\" = \"$(cat /proc/1/cgroup)\" ] && echo same cgroup",
        ],
    );
    remove(ctr, id);
    vec![before, after, cgroup]
}

#[test]
fn test_containerd_update_limits_same_as_runc() {
    let test = "test_containerd_update_limits_same_as_runc";
    let expected = vec![
        "268435456 max 100000".to_owned(),
        "134217728 50000 100000".to_owned(),
        "same cgroup".to_owned(),
    ];
    both_see(test, "update", update, &expected);
}

/// `ctr task metrics`' table of a running task, as (metric, value) rows.
fn metrics(ctr: &Ctr<'_>) -> Vec<(String, String)> {
    let id = "metrics";
    ctr.run_detached(&[], id, &["sleep", "1000"]);
    let out = ctr.ctr(&["task", "metrics", id]);
    assert!(
        out.status.success(),
        "{}: task metrics: {}",
        ctr.runtime().label(),
        show(&out)
    );
    remove(ctr, id);
    text(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("METRIC"))
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            Some((cols.next()?.to_owned(), cols.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// Whether the rows have a memory usage (cgroup v1 `memory.usage_in_bytes`, v2
/// `memory.usage`) above 0 and a `pids.current`.
fn has_memory_and_pids(rows: &[(String, String)]) -> (bool, bool) {
    let memory = rows
        .iter()
        .any(|(k, v)| k.starts_with("memory.usage") && v.parse::<u64>().is_ok_and(|v| v > 0));
    (memory, rows.iter().any(|(k, _)| k == "pids.current"))
}

#[test]
fn test_containerd_metrics_show_memory_and_pids_as_runc() {
    let test = "test_containerd_metrics_show_memory_and_pids_as_runc";
    let check = |seen: &Vec<(String, String)>, runtime: Runtime| {
        assert_eq!(
            has_memory_and_pids(seen),
            (true, true),
            "{}: expected a memory usage line above 0 and pids.current as runc gives, seen {seen:?}",
            runtime.label()
        );
    };
    if let Some((runc, Some(husk))) = runc_then_husk(test, "metrics", metrics, check) {
        let common: Vec<&String> = husk
            .iter()
            .map(|(k, _)| k)
            .filter(|k| runc.iter().any(|(r, _)| r == *k))
            .collect();
        println!("metrics in both (runc: cgroup v1 host; husk: cgroup v2 guest): {common:?}");
    }
}

/// `tail /dev/zero` under a 32 MiB limit: (ctr's exit code, a `/tasks/oom` event seen).
fn oom(ctr: &Ctr<'_>) -> (Option<i32>, bool) {
    let id = "oom";
    let ns = ctr.namespace();
    let events = ctr.spawn(&["events"], Stdio::null());
    // The subscription is live once an event of ours shows up: label the namespace until
    // ctr events prints the update.
    let update = format!(" {ns} /namespaces/update ");
    let deadline = Instant::now() + CTR_TIMEOUT;
    for n in 0.. {
        let label = ctr.ctr(&["namespaces", "label", ns, &format!("subscribed={n}")]);
        assert!(label.status.success(), "namespaces label: {}", show(&label));
        if events.await_stdout(&update, Duration::from_millis(200)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ctr events showed no /namespaces/update: {:?}",
            events.stdout()
        );
    }
    let flags = ["--rm", "--memory-limit", "33554432"];
    let out = ctr.run(&flags, id, &["sh", "-c", "tail /dev/zero"]);
    let event = format!(" {ns} /tasks/oom {{\"container_id\":\"{id}\"");
    let oom = events.await_stdout(&event, Duration::from_secs(10));
    if !oom {
        println!("{}: events: {}", ctr.runtime().label(), events.stdout());
    }
    (out.status.code(), oom)
}

#[test]
fn test_containerd_oom_event_and_exit_137_same_as_runc() {
    let test = "test_containerd_oom_event_and_exit_137_same_as_runc";
    both_see(test, "oom", oom, &(Some(137), true));
}

#[derive(Debug, PartialEq)]
struct Pod {
    same_netns: bool,
    same_boot_id: bool,
    shims: usize,
    vmms: usize,
    /// `exit <code> <stdout>` of a `ctr run --rm` in the pod reusing a deleted container's id.
    id_reused: String,
}

/// One line of `ctr task exec` in `id`.
fn exec_line(ctr: &Ctr<'_>, id: &str, exec_id: &str, cmd: &[&str]) -> String {
    let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
    args.extend_from_slice(cmd);
    let out = ctr.ctr(&args);
    assert!(
        out.status.success(),
        "{}: exec {cmd:?} in {id}: {}",
        ctr.runtime().label(),
        show(&out)
    );
    text(&out.stdout).trim().to_owned()
}

/// A sandbox and a container in it joining its network namespace.
fn pod(ctr: &Ctr<'_>) -> Pod {
    let pod = unique("pod");
    let sandbox_id = format!("io.kubernetes.cri.sandbox-id={pod}");
    let flags = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        &sandbox_id,
    ];
    ctr.run_detached(&flags, &pod, &["sleep", "1000"]);
    let pid = ctr.task(&pod).expect("sandbox task").pid;
    let netns = format!("network:/proc/{pid}/ns/net");
    let app = unique("app");
    let flags = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &sandbox_id,
        "--with-ns",
        &netns,
    ];
    ctr.run_detached(&flags, &app, &["sleep", "1000"]);
    let netns = ["readlink", "/proc/self/ns/net"];
    let boot_id = ["cat", "/proc/sys/kernel/random/boot_id"];
    let shims = ctr.shims();
    let vmms = shims
        .iter()
        .flat_map(|s| procs::descendants(s.pid))
        .filter(Proc::is_vmm)
        .count();
    let seen = Pod {
        same_netns: exec_line(ctr, &pod, "n", &netns) == exec_line(ctr, &app, "n", &netns),
        same_boot_id: exec_line(ctr, &pod, "b", &boot_id) == exec_line(ctr, &app, "b", &boot_id),
        shims: shims.len(),
        vmms,
        id_reused: String::new(),
    };
    remove(ctr, &app);
    // The pod goes on after a container's delete, and its id is free again in it.
    let again = ctr.run(
        &["--rm", flags[0], flags[1], flags[2], flags[3]],
        &app,
        &["echo", "again"],
    );
    let seen = Pod {
        id_reused: format!(
            "exit {} {}",
            again.status.code().unwrap_or(-1),
            text(&again.stdout).trim()
        ),
        ..seen
    };
    remove(ctr, &pod);
    seen
}

#[test]
fn test_containerd_pod_shares_netns_one_shim_one_vm() {
    let test = "test_containerd_pod_shares_netns_one_shim_one_vm";
    runc_then_husk(test, "pod", pod, |seen, runtime| {
        let expected = Pod {
            same_netns: true,
            same_boot_id: true,
            shims: 1,
            vmms: usize::from(runtime == Runtime::Husk),
            id_reused: "exit 0 again".into(),
        };
        assert_eq!(
            seen,
            &expected,
            "{} (left, seen): expected a shared netns and boot_id, one shim for the pod (and one VMM for husk), a deleted container's id usable again",
            runtime.label()
        );
    });
}

#[derive(Debug, PartialEq)]
struct Crash {
    code: Option<i32>,
    status_after: Option<String>,
    left: Vec<String>,
}

/// A foreground `ctr run --rm` whose container process (runc) or VMM (husk) is SIGKILLed.
fn crash(ctr: &Ctr<'_>) -> Crash {
    let label = ctr.runtime().label();
    let id = unique("crash");
    let args = ctr.run_args(&["--rm"], &id, &["sleep", "1000"]);
    let mut run = ctr.spawn(&args, Stdio::null());
    let status = ctr.await_status(&id, |s| s == Some("RUNNING"), CTR_TIMEOUT);
    assert_eq!(
        status.as_deref(),
        Some("RUNNING"),
        "{label}: task {id}: expected RUNNING, seen {status:?}; {}",
        run.stderr()
    );
    let shim = ctr
        .shim(&id)
        .unwrap_or_else(|| panic!("{label}: no shim for {id}"));
    let spawned = procs::descendants(shim.pid);
    let victim = match ctr.runtime() {
        Runtime::Runc => Proc::read(ctr.task(&id).expect("task").pid),
        Runtime::Husk => spawned.iter().find(|p| p.is_vmm()).cloned(),
    };
    let victim = victim.unwrap_or_else(|| {
        let names: Vec<&str> = spawned.iter().map(|p| p.name.as_str()).collect();
        panic!("{label}: expected the container's process (runc) or a VMM (husk) under shim {}, seen {names:?}", shim.pid)
    });
    victim.kill();
    let out = run.wait_for(CTR_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{label}: ctr run did not return after {} was killed",
            victim.name
        )
    });
    Crash {
        code: out.status.code(),
        status_after: ctr.task(&id).map(|t| t.status),
        left: leftovers(&id, &spawned),
    }
}

#[test]
fn test_containerd_killed_container_or_vmm_exits_137_leaves_nothing() {
    let test = "test_containerd_killed_container_or_vmm_exits_137_leaves_nothing";
    let expected = Crash {
        code: Some(137),
        status_after: None,
        left: Vec::new(),
    };
    both_see(test, "crash", crash, &expected);
}

/// What a `ctr run --rm` whose task could not be created (or started) leaves behind.
#[derive(Debug, PartialEq)]
struct FailedCreate {
    /// ctr's exit status was not 0.
    failed: bool,
    /// `ctr containers ls -q`.
    containers: String,
    /// `ctr task ls`.
    tasks: Vec<Task>,
    /// A snapshot keyed by the container's id in `ctr snapshots ls`.
    snapshot: bool,
    /// Shims, VMMs and helpers, mounts and directories of the container still there.
    left: Vec<String>,
}

/// `ctr run --rm` with `args` (those after `--rm`, the container id and the command included)
/// for container `id`, which fails to create or start its task.
fn failed_create(ctr: &Ctr<'_>, id: &str, args: &[&str]) -> FailedCreate {
    let mut all = vec!["run", "--runtime", ctr.runtime().type_name(), "--rm"];
    all.extend_from_slice(args);
    let out = ctr.ctr(&all);
    println!("{}: {}", ctr.runtime().label(), show(&out));
    // The namespace's shims still alive once ctr returned must go too.
    let mut left = leftovers(id, &ctr.shims());
    let pod_dir = Path::new("/run/husk-shim").join(ctr.namespace()).join(id);
    for dir in [ctr.bundle(id), pod_dir] {
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
    }
    let snapshots = ctr.ctr(&["snapshots", "ls"]);
    FailedCreate {
        failed: !out.status.success(),
        containers: text(&ctr.ctr(&["containers", "ls", "-q"]).stdout),
        tasks: ctr.tasks(),
        snapshot: text(&snapshots.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id)),
        left,
    }
}

/// What both runtimes must leave after a failed create or start: nothing; ctr fails.
fn nothing_left() -> FailedCreate {
    FailedCreate {
        failed: true,
        containers: String::new(),
        tasks: Vec::new(),
        snapshot: false,
        left: Vec::new(),
    }
}

/// A command that does not exist in the image: runc fails the create (the program is looked
/// up before the container waits for start); husk must too, and leave no VM behind.
#[test]
fn test_containerd_missing_command_fails_create_leaves_nothing() {
    let test = "test_containerd_missing_command_fails_create_leaves_nothing";
    let scenario = |ctr: &Ctr<'_>| {
        let id = unique("nocmd");
        failed_create(ctr, &id, &[IMAGE, &id, "/no/such/cmd"])
    };
    both_see(test, "nocmd", scenario, &nothing_left());
}

/// A program found but not executable by the kernel (a script whose interpreter is missing,
/// bound in): the create passes the lookup and the exec fails at start; both runtimes fail
/// the run and leave nothing.
#[test]
fn test_containerd_unexecutable_program_fails_run_leaves_nothing() {
    let test = "test_containerd_unexecutable_program_fails_run_leaves_nothing";
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("script");
    std::fs::write(&script, "#!/no/such/interpreter\n").expect("write the script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mount = format!(
        "type=bind,src={},dst=/x,options=rbind:ro",
        dir.path().display()
    );
    let scenario = |ctr: &Ctr<'_>| {
        let id = unique("noexec");
        failed_create(ctr, &id, &["--mount", &mount, IMAGE, &id, "/x/script"])
    };
    both_see(test, "noexec", scenario, &nothing_left());
}

/// A rootfs that does not exist (`ctr run --rootfs`): the create fails before any VM.
#[test]
fn test_containerd_missing_rootfs_fails_create_leaves_nothing() {
    let test = "test_containerd_missing_rootfs_fails_create_leaves_nothing";
    let scenario = |ctr: &Ctr<'_>| {
        let id = unique("norootfs");
        let rootfs = format!("/no/such/rootfs-{id}");
        failed_create(ctr, &id, &["--rootfs", &rootfs, &id, "/bin/sh"])
    };
    both_see(test, "norootfs", scenario, &nothing_left());
}

#[derive(Debug, PartialEq)]
struct ShimKilled {
    noticed: bool,
    task_gone: bool,
    container_deleted: bool,
    left: Vec<String>,
    socket_left: bool,
}

/// A detached task whose shim is SIGKILLed: containerd must notice and clean up.
fn shim_killed(ctr: &Ctr<'_>) -> ShimKilled {
    let label = ctr.runtime().label();
    let id = unique("shimkill");
    ctr.run_detached(&[], &id, &["sleep", "1000"]);
    let shim = ctr
        .shim(&id)
        .unwrap_or_else(|| panic!("{label}: no shim for {id}"));
    let spawned = procs::descendants(shim.pid);
    let address = std::fs::read_to_string(ctr.bundle(&id).join("address")).unwrap_or_default();
    let socket = address.trim().trim_start_matches("unix://").to_owned();
    assert!(!socket.is_empty(), "{label}: no shim address in the bundle");
    shim.kill();
    let stopped = |s: Option<&str>| matches!(s, None | Some("STOPPED"));
    let after = ctr.await_status(&id, stopped, CTR_TIMEOUT);
    println!("{label}: task after the shim's SIGKILL: {after:?}");
    let task_gone = after.is_none() || ctr.ctr(&["task", "delete", &id]).status.success();
    let deleted = ctr.ctr(&["container", "delete", &id]);
    let left = leftovers(&id, &spawned);
    let socket_left = std::path::Path::new(&socket).exists();
    println!("{label}: shim socket {socket} left after the shim's SIGKILL: {socket_left}");
    if socket_left && ctr.runtime() == Runtime::Runc {
        // runc's shim leaves it (see the test); we don't.
        let _ = std::fs::remove_file(&socket);
    }
    ShimKilled {
        noticed: stopped(after.as_deref()),
        task_gone,
        container_deleted: deleted.status.success(),
        left,
        socket_left,
    }
}

#[test]
fn test_containerd_killed_shim_noticed_leaves_nothing() {
    let test = "test_containerd_killed_shim_noticed_leaves_nothing";
    runc_then_husk(test, "shimkill", shim_killed, |seen, runtime| {
        let expected = ShimKilled {
            noticed: true,
            task_gone: true,
            container_deleted: true,
            left: Vec::new(),
            // runc's shim leaves its socket in /run/containerd/s behind (as a rule, not a
            // promise); husk's must not.
            socket_left: runtime == Runtime::Runc && seen.socket_left,
        };
        assert_eq!(
            seen,
            &expected,
            "{} (left, seen): after its shim was SIGKILLed",
            runtime.label()
        );
    });
}

/// Pods in the shim start their VM from the boot snapshot (husk only: runc has no VM): with
/// a store of its own, the first pod's shim makes the snapshot and every pod's VM is restored
/// from it, each guest with its own boot id; the `io.husk.snapshot=false` annotation boots
/// cold.
#[test]
fn test_containerd_pods_start_from_the_boot_snapshot() {
    let test = "test_containerd_pods_start_from_the_boot_snapshot";
    if let Some(reason) = Runtime::Husk.missing() {
        println!("SKIPPED: {test}: {reason}");
        return;
    }
    let store = tempfile::tempdir().expect("store");
    std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod store");
    let Some(containerd) = Containerd::get_with_store(test, store.path()) else {
        return;
    };
    let ctr = containerd.ctr(Runtime::Husk, "snapshot");
    let boot_id = ["cat", "/proc/sys/kernel/random/boot_id"];
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = ctr.run(&["--rm"], &unique("snap"), &boot_id);
        assert!(out.status.success(), "ctr run: {}", show(&out));
        ids.push(text(&out.stdout).trim().to_owned());
    }
    let cold = ctr.run(
        &["--rm", "--annotation", "io.husk.snapshot=false"],
        &unique("cold"),
        &boot_id,
    );
    assert!(cold.status.success(), "ctr run (cold): {}", show(&cold));
    let log = containerd.log();
    let count = |needle: &str| log.matches(needle).count();
    assert_eq!(
        (
            count("boot snapshot made"),
            count("VM restored from its boot snapshot")
        ),
        (1, 3),
        "one snapshot made, three pods restored from it, the annotated one cold:\n{log}"
    );
    ids.push(text(&cold.stdout).trim().to_owned());
    let mut unique_ids = ids.clone();
    unique_ids.sort();
    unique_ids.dedup();
    assert_eq!(unique_ids.len(), 4, "every guest its own boot id: {ids:?}");
}
