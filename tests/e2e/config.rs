//! config.json honoured inside the guest: a busybox bundle whose config sets process limits
//! and privileges, mounts, masked and read-only paths, sysctls, cgroup resources, a seccomp
//! profile or namespaces runs through `husk run` in a real guest (QEMU door), and the
//! container reports what it sees from the inside (/proc/self/status, ulimit, /proc/mounts,
//! /sys/fs/cgroup); config husk cannot honour is refused with one line before a VM boots.

// An integration-test file is a crate of its own: its tests need no `cfg(test)` module.
#![allow(clippy::tests_outside_test_module)]

use std::process::{Command, Output};

use husk_e2e::harness::{stderr, stdout, Env, Husk, TestBundle};
use serde_json::json;

/// Runs `bundle` as container `id` and returns its output after checking exit code `code`.
fn run_expect(husk: &Husk, bundle: &TestBundle, id: &str, code: i32) -> Output {
    let out = husk.run(bundle, id, b"");
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Asserts that husk refused the bundle with one `husk: ...` line containing `needle`.
fn assert_refused(husk: &Husk, bundle: &TestBundle, needle: &str) {
    let out = husk.run(bundle, "refused", b"");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(
        err.starts_with("husk: ") && err.contains(needle),
        "{needle:?} not in {err:?}"
    );
    husk.assert_clean();
}

/// The values of `Key:` lines of /proc/self/status printed by the container.
fn status_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

const SHOW_PRIVILEGES: &str =
    "echo nofile=$(ulimit -n); echo oom=$(cat /proc/self/oom_score_adj); \
     grep -E '^(NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status";

#[test]
fn test_config_default_spec_privileges_as_runc() {
    let Some(env) = Env::get("test_config_default_spec_privileges_as_runc") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", SHOW_PRIVILEGES]);
    let out = run_expect(&husk, &bundle, "defaultprivs", 0);
    let text = stdout(&out);
    // `husk spec`: RLIMIT_NOFILE 1024, noNewPrivileges, AUDIT_WRITE+KILL+NET_BIND_SERVICE in
    // every set (bits 29, 5, 10); root keeps bounding | inheritable across execve.
    assert!(text.contains("nofile=1024\n"), "{text}");
    assert!(text.contains("oom=0\n"), "{text}");
    assert_eq!(status_field(&text, "NoNewPrivs"), Some("1"), "{text}");
    for set in ["CapEff", "CapBnd", "CapPrm", "CapAmb"] {
        assert_eq!(
            status_field(&text, set),
            Some("0000000020000420"),
            "{set}: {text}"
        );
    }
    husk.assert_clean();
}

#[test]
fn test_config_rlimits_caps_nnp_oom_applied_for_non_root_user() {
    let Some(env) = Env::get("test_config_rlimits_caps_nnp_oom_applied_for_non_root_user") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", SHOW_PRIVILEGES]);
    bundle.edit(|c| {
        let p = &mut c["process"];
        p["user"] = json!({"uid": 1000, "gid": 1000});
        p["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]);
        p["noNewPrivileges"] = true.into();
        p["oomScoreAdj"] = 500.into();
        let kept = json!(["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        p["capabilities"] = json!({
            "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": kept, "permitted": kept, "inheritable": kept, "ambient": kept,
        });
    });
    let out = run_expect(&husk, &bundle, "privs", 0);
    let text = stdout(&out);
    assert!(text.contains("nofile=123\n"), "{text}");
    assert!(text.contains("oom=500\n"), "{text}");
    assert_eq!(status_field(&text, "NoNewPrivs"), Some("1"), "{text}");
    // CHOWN (bit 0) stays in the bounding set only; KILL (5) and NET_BIND_SERVICE (10) were
    // kept across the switch to uid 1000 and execve through the ambient set.
    assert_eq!(
        status_field(&text, "CapBnd"),
        Some("0000000000000421"),
        "{text}"
    );
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(
            status_field(&text, set),
            Some("0000000000000420"),
            "{set}: {text}"
        );
    }
    husk.assert_clean();
}

#[test]
fn test_config_rlimit_soft_above_hard_refused() {
    let Some(env) = Env::get("test_config_rlimit_soft_above_hard_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| {
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}])
    });
    assert_refused(&husk, &bundle, "soft limit 10 is above the hard limit 5");
}

#[test]
fn test_config_default_mounts_masked_and_readonly_paths_as_runc() {
    let Some(env) = Env::get("test_config_default_mounts_masked_and_readonly_paths_as_runc") else {
        return;
    };
    let husk = env.husk();
    let script =
        "grep -E ' /(proc|dev|dev/pts|dev/shm|dev/mqueue|sys|sys/fs/cgroup) ' /proc/mounts; \
         ls /dev; echo cmdline=$(wc -c < /proc/cmdline); \
         echo 1 > /proc/sys/kernel/ns_last_pid || echo sys-ro; \
         grep -E ' /proc/(sys|cmdline) ' /proc/mounts";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    // The default list names files this guest kernel does not have (skipped, as by runc);
    // /proc/cmdline is one it has.
    bundle.edit(|c| {
        c["linux"]["maskedPaths"]
            .as_array_mut()
            .expect("maskedPaths")
            .push("/proc/cmdline".into())
    });
    let out = run_expect(&husk, &bundle, "mounts", 0);
    let text = stdout(&out);
    let mounts: Vec<(&str, &str, &str)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6).then(|| (f[1], f[2], f[3]))
        })
        .collect();
    let find = |dest: &str| mounts.iter().find(|m| m.0 == dest).copied();
    // Each kernel file system shows the source config.json names (`shm`, ...), as under runc
    // (runtime-tools' mount check compares it).
    let sources: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6).then(|| (f[1], f[0]))
        })
        .collect();
    for (dest, source) in [
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "shm"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
    ] {
        let seen = sources.iter().find(|m| m.0 == dest).map(|m| m.1);
        assert_eq!(seen, Some(source), "source of {dest}: {text}");
    }
    // The default spec's mounts, with their options (as runc mounts them).
    let (_, fs, opts) = find("/dev").expect("/dev mounted");
    assert_eq!(fs, "tmpfs");
    assert!(
        opts.starts_with("rw,nosuid") && opts.contains("size=65536k"),
        "{opts}"
    );
    assert_eq!(find("/dev/pts").map(|m| m.1), Some("devpts"));
    assert_eq!(find("/dev/shm").map(|m| m.1), Some("tmpfs"));
    assert_eq!(find("/dev/mqueue").map(|m| m.1), Some("mqueue"));
    let (_, fs, opts) = find("/sys").expect("/sys mounted");
    assert_eq!(fs, "sysfs");
    assert!(opts.starts_with("ro,nosuid,nodev,noexec"), "{opts}");
    let (_, fs, opts) = find("/sys/fs/cgroup").expect("cgroup2 mounted");
    assert_eq!(fs, "cgroup2");
    assert!(opts.starts_with("ro,"), "{opts}");
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
    ] {
        assert!(
            text.lines().any(|l| l == node),
            "/dev/{node} missing: {text}"
        );
    }
    // maskedPaths: the container's /dev/null over a file; readonlyPaths: /proc/sys.
    assert!(text.contains("cmdline=0\n"), "{text}");
    assert!(text.contains("sys-ro\n"), "{text}");
    let (_, _, opts) = find("/proc/sys").expect("/proc/sys bound");
    assert!(opts.starts_with("ro,"), "{opts}");
    assert_eq!(find("/proc/cmdline").map(|m| m.1), Some("tmpfs"));
    husk.assert_clean();
}

#[test]
fn test_config_custom_tmpfs_mount_options_and_sysctl_applied() {
    let Some(env) = Env::get("test_config_custom_tmpfs_mount_options_and_sysctl_applied") else {
        return;
    };
    let husk = env.husk();
    let script = "grep ' /data ' /proc/mounts; touch /data/x && echo wrote; \
         cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmni; \
         grep -c ' /proc/acpi\\| /sys/firmware ' /proc/mounts";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/data", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "noexec", "ro", "size=1m", "mode=700"]
        }));
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1", "kernel.shmmni": "1234"});
        c["linux"]["maskedPaths"] = json!(["/sys/firmware", "/no/such/path"]);
    });
    let out = run_expect(&husk, &bundle, "tmpfs", 0);
    let text = stdout(&out);
    let line = text.lines().next().unwrap_or_default();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.get(2), Some(&"tmpfs"), "{text}");
    let opts = f.get(3).copied().unwrap_or_default();
    assert!(opts.starts_with("ro,nosuid,nodev,noexec"), "{opts}");
    assert!(
        opts.contains("size=1024k") && opts.contains("mode=700"),
        "{opts}"
    );
    assert!(
        !text.contains("wrote"),
        "read-only tmpfs was written: {text}"
    );
    assert!(text.contains("\n1\n1234\n"), "{text}");
    // A masked directory gets an empty tmpfs; a missing masked path is skipped.
    assert!(text.ends_with("1\n"), "{text}");
    husk.assert_clean();
}

#[test]
fn test_config_non_namespaced_sysctl_refused() {
    let Some(env) = Env::get("test_config_non_namespaced_sysctl_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| c["linux"]["sysctl"] = json!({"vm.swappiness": "10"}));
    assert_refused(
        &husk,
        &bundle,
        "sysctl \"vm.swappiness\" is not in a separate kernel namespace",
    );
}

#[test]
fn test_config_bind_mounts_host_dir_written_and_file_read_only() {
    let Some(env) = Env::get("test_config_bind_mounts_host_dir_written_and_file_read_only") else {
        return;
    };
    let husk = env.husk();
    let host = tempfile::tempdir().expect("host dir");
    let data = host.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(host.path().join("greeting"), "hello from the host\n").expect("write");
    let script = "echo written-in-guest > /data/out.txt; cat /etc/greeting; \
         echo x >> /etc/greeting || echo greeting-ro; grep -E ' /(data|etc/greeting) ' /proc/mounts";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        mounts.push(json!({
            "destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]
        }));
        mounts.push(json!({
            "destination": "/etc/greeting", "type": "none",
            "source": host.path().join("greeting"), "options": ["bind", "ro", "nosuid"]
        }));
    });
    let out = run_expect(&husk, &bundle, "binds", 0);
    let text = stdout(&out);
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).expect("file written in the guest"),
        "written-in-guest\n"
    );
    assert!(
        text.starts_with("hello from the host\ngreeting-ro\n"),
        "{text}"
    );
    let opts = |dest: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(dest))
            .and_then(|l| l.split_whitespace().nth(3))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(opts("/data").starts_with("rw"), "{text}");
    assert!(opts("/etc/greeting").starts_with("ro,nosuid"), "{text}");
    assert_eq!(
        std::fs::read_to_string(host.path().join("greeting")).expect("read"),
        "hello from the host\n"
    );
    husk.assert_clean();
}

/// A directory bind's root in the container's mountinfo is the source's name (as under runc,
/// which the OCI runtime-tools `mounts` test checks), and its share holds that directory only:
/// a privileged container mounting the share's tag itself sees neither the source's siblings
/// nor a way to write a read-only bind.
#[test]
fn test_config_bind_mount_dir_root_is_source_name_and_siblings_unreachable() {
    let test = "test_config_bind_mount_dir_root_is_source_name_and_siblings_unreachable";
    let Some(env) = Env::get(test) else {
        return;
    };
    let husk = env.husk();
    let host = tempfile::tempdir().expect("host dir");
    for dir in ["ro-src", "rw-src"] {
        std::fs::create_dir(host.path().join(dir)).expect("mkdir");
        std::fs::write(host.path().join(dir).join("inside"), "in\n").expect("write");
    }
    std::fs::write(host.path().join("sibling"), "secret\n").expect("write");
    let script =
        "awk '$5 == \"/ro\" || $5 == \"/rw\" {print \"ROOT\", $5, $4}' /proc/self/mountinfo; \
         mount -t tmpfs t /tmp; \
         t=binds; mkdir /tmp/$t; mount -t virtiofs $t /tmp/$t; \
         echo LS $t: $(ls -A /tmp/$t) / $(ls -A /tmp/$t/0) / $(ls -A /tmp/$t/1); \
         cat /tmp/$t/*/*/../sibling /tmp/$t/*/*/../../sibling 2>/dev/null && echo SIBLING; \
         mount -o remount,rw /tmp/$t 2>/dev/null; \
         echo x > /tmp/$t/planted 2>/dev/null && echo WROTE $t; \
         echo x > /tmp/$t/0/planted 2>/dev/null && echo WROTE $t/0; \
         echo x > /tmp/$t/0/ro-src/planted 2>/dev/null && echo WROTE $t/0/ro-src; \
         echo x > /ro/new 2>/dev/null && echo WROTE /ro; echo x > /rw/new && echo WROTE /rw; true";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        let caps: Vec<_> = husk_sandbox::features::CAPABILITIES
            .iter()
            .map(|c| json!(c))
            .collect();
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = caps.clone().into();
        }
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        mounts.push(json!({
            "destination": "/ro", "type": "bind", "source": host.path().join("ro-src"),
            "options": ["rbind", "ro"]
        }));
        mounts.push(json!({
            "destination": "/rw", "type": "bind", "source": host.path().join("rw-src"),
            "options": ["bind", "rw"]
        }));
    });
    let out = run_expect(&husk, &bundle, "dirbinds", 0);
    let text = stdout(&out);
    let root = |dest: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("ROOT {dest} ")))
            .unwrap_or_default()
            .to_owned()
    };
    // The bind's root is a path ending in the source's name, as under runc (whose root is
    // the source's host path).
    assert!(root("/ro").ends_with("/ro-src"), "{text}");
    assert!(root("/rw").ends_with("/rw-src"), "{text}");
    let listed: Vec<&str> = text.lines().filter(|l| l.starts_with("LS ")).collect();
    assert_eq!(listed, ["LS binds: 0 1 / ro-src / rw-src"], "{text}");
    assert!(!text.contains("SIBLING"), "{text}");
    let wrote: Vec<&str> = text.lines().filter(|l| l.starts_with("WROTE ")).collect();
    assert_eq!(wrote, ["WROTE /rw"], "{text}");
    let mut left: Vec<_> = std::fs::read_dir(host.path())
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["ro-src", "rw-src", "sibling"]);
    assert!(!host.path().join("ro-src/new").exists());
    assert!(host.path().join("rw-src/new").exists());
    husk.assert_clean();
}

#[test]
fn test_config_bind_mount_missing_source_refused() {
    let Some(env) = Env::get("test_config_bind_mount_missing_source_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| {
        c["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]
        }))
    });
    assert_refused(&husk, &bundle, "bind mount /data: bind source /no/such/dir");
}

#[test]
fn test_config_resources_cgroup_limits_visible_and_pids_max_stops_forks() {
    let Some(env) =
        Env::get("test_config_resources_cgroup_limits_visible_and_pids_max_stops_forks")
    else {
        return;
    };
    let husk = env.husk();
    // The default spec has a cgroup namespace and mounts cgroup2 at /sys/fs/cgroup: the
    // container's own cgroup is the root it sees. `read` is a builtin: no fork at the limit.
    let script = "cd /sys/fs/cgroup; for f in memory.max cpu.max cpu.weight cpuset.cpus pids.max; \
         do read v < $f; echo $f=$v; done; \
         sh -c 'for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do sleep 30 & done' || echo fork-failed; \
         read n < pids.current; echo pids.current=$n; \
         while read k v; do [ $k = max ] && echo pids.events.max=$v; done < pids.events";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["linux"]["resources"] = json!({
            "memory": {"limit": 64 << 20},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
            "pids": {"limit": 10},
        })
    });
    let out = run_expect(&husk, &bundle, "limits", 0);
    let text = stdout(&out);
    for line in [
        "memory.max=67108864",
        "cpu.max=50000 100000",
        "cpu.weight=39",
        "cpuset.cpus=0",
        "pids.max=10",
        "fork-failed",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing: {text}");
    }
    assert!(stderr(&out).contains("can't fork"), "{}", stderr(&out));
    let value = |key: &str| -> u32 {
        let line = text.lines().find_map(|l| l.strip_prefix(key));
        line.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key}: {text}"))
    };
    assert!(value("pids.current=") <= 10, "{text}");
    assert!(value("pids.events.max=") >= 1, "{text}");
    husk.assert_clean();
}

/// `linux.resources` as Docker and Podman send it (swap at twice the memory limit, kernel
/// memory, swappiness, block I/O weight and per-device throttles, realtime zeros) plus the
/// v2-only fields (idle, burst, unified): accepted; what the guest honours is in the
/// container's cgroup, what it cannot is named in husk's debug log.
#[test]
fn test_config_resources_engine_fields_accepted_tuning_applied() {
    let Some(env) = Env::get("test_config_resources_engine_fields_accepted_tuning_applied") else {
        return;
    };
    let husk = env.husk();
    // `read` is a builtin: pids.max 7 leaves room for nothing but this shell.
    let script = "cd /sys/fs/cgroup; \
         for f in memory.max memory.high cpu.max cpu.max.burst cpu.idle cpu.weight pids.max; \
         do read v < $f; echo $f=$v; done; \
         if [ -e io.weight ]; then read v w < io.weight; echo io.weight=$w; \
         else echo io.weight=absent; fi";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["linux"]["resources"] = json!({
            "memory": {"limit": 64 << 20, "swap": 128 << 20, "kernel": 32 << 20,
                       "kernelTCP": 16 << 20, "swappiness": 10, "disableOOMKiller": false},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "burst": 20000,
                    "idle": 0, "realtimeRuntime": 0, "realtimePeriod": 0},
            "blockIO": {"weight": 500,
                        "weightDevice": [{"major": 8, "minor": 0, "weight": 200}],
                        "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1 << 20}]},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "network": {"classID": 1_048_577},
            "pids": {"limit": 100},
            "unified": {"pids.max": "7", "memory.high": "50331648"},
        })
    });
    let log = tempfile::NamedTempFile::new().expect("log file");
    let log_path = log.path().to_str().expect("utf-8 path");
    let child = husk.spawn_run(&bundle, "engine", &["--debug", "--log", log_path]);
    let out = child.wait_with_output().expect("husk run");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    for line in [
        "memory.max=67108864",
        "memory.high=50331648",
        "cpu.max=50000 100000",
        "cpu.max.burst=20000",
        "cpu.idle=0",
        "cpu.weight=39",
        "pids.max=7",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing: {text}");
    }
    // The guest kernel has no block cgroup (kernel-config/fragments/cgroups.config): the
    // weight is skipped there; a kernel with one gets runc's conversion of 500.
    assert!(
        text.lines()
            .any(|l| l == "io.weight=absent" || l == "io.weight=4950"),
        "{text}"
    );
    let log = std::fs::read_to_string(log.path()).expect("husk log");
    for field in [
        "memory.swap",
        "memory.kernel",
        "memory.kernelTCP",
        "memory.swappiness",
        "blockIO.weightDevice",
        "blockIO.throttleReadBpsDevice",
        "hugepageLimits",
        "network",
    ] {
        let needle = format!("linux.resources.{field} ");
        assert!(
            log.lines()
                .any(|l| l.contains("resource field ignored") && l.contains(&needle)),
            "{field} not logged as ignored: {log}"
        );
    }
    husk.assert_clean();
}

#[test]
fn test_config_memory_limit_exceeded_oom_killed_137_and_reported() {
    let Some(env) = Env::get("test_config_memory_limit_exceeded_oom_killed_137_and_reported")
    else {
        return;
    };
    let husk = env.husk();
    // tail keeps the last "line" of stdin in memory: 100 MiB of zeros is one line.
    let bundle = TestBundle::busybox(
        &husk,
        &["sh", "-c", "dd if=/dev/zero bs=1M count=100 | tail"],
    );
    bundle.edit(|c| c["linux"]["resources"] = json!({"memory": {"limit": 32 << 20}}));
    let out = run_expect(&husk, &bundle, "oom", 137);
    let err = stderr(&out);
    assert!(
        err.lines().any(|l| l
            == "husk: container oom was killed by the OOM killer: its memory limit was reached"),
        "{err}"
    );
    husk.assert_clean();
}

#[test]
fn test_config_exit_137_without_oom_not_reported_as_oom() {
    let Some(env) = Env::get("test_config_exit_137_without_oom_not_reported_as_oom") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", "exit 137"]);
    bundle.edit(|c| c["linux"]["resources"] = json!({"memory": {"limit": 32 << 20}}));
    let out = run_expect(&husk, &bundle, "nooom", 137);
    assert!(!stderr(&out).contains("OOM"), "{}", stderr(&out));
    husk.assert_clean();
}

#[test]
fn test_config_seccomp_errno_rule_mkdir_operation_not_permitted() {
    let Some(env) = Env::get("test_config_seccomp_errno_rule_mkdir_operation_not_permitted") else {
        return;
    };
    let husk = env.husk();
    // The default rootfs is read-only (EROFS): EPERM can only come from the filter.
    let script = "mkdir /tmp/x; echo mkdir=$?; touch /dev/shm/y && echo touch-ok; \
         grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        // Without no_new_privs the filter goes in while CAP_SYS_ADMIN is still held.
        c["process"]["noNewPrivileges"] = false.into();
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"},
            ]
        })
    });
    let out = run_expect(&husk, &bundle, "seccomp", 0);
    let text = stdout(&out);
    assert!(
        stderr(&out).contains("mkdir: can't create directory '/tmp/x': Operation not permitted"),
        "{}",
        stderr(&out)
    );
    assert!(
        text.contains("mkdir=1\n") && text.contains("touch-ok\n"),
        "{text}{}",
        stderr(&out)
    );
    assert_eq!(status_field(&text, "NoNewPrivs"), Some("0"), "{text}");
    // Mode 2 (filter); an errno filter only: the unknown name was skipped, as by runc.
    assert_eq!(status_field(&text, "Seccomp"), Some("2"), "{text}");
    assert_eq!(status_field(&text, "Seccomp_filters"), Some("1"), "{text}");
    husk.assert_clean();
}

#[test]
fn test_config_seccomp_default_errno_allow_list_and_arg_condition() {
    let Some(env) = Env::get("test_config_seccomp_default_errno_allow_list_and_arg_condition")
    else {
        return;
    };
    let husk = env.husk();
    // Default: ENOSYS (38) for everything not listed: mkdir is not. uname is allowed; kill
    // only with signal (argument 1) 0 and personality only with the query 0xffffffff.
    let script =
        "uname -s; kill -0 $$ && echo kill0-ok; kill -TERM 99999 || echo kill-term-refused; \
         mkdir /dev/shm/d || echo mkdir-refused";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        let allowed = json!([
            "read",
            "write",
            "writev",
            "open",
            "openat",
            "close",
            "fstat",
            "newfstatat",
            "stat",
            "lseek",
            "mmap",
            "munmap",
            "mprotect",
            "brk",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "ioctl",
            "access",
            "pipe",
            "pipe2",
            "dup2",
            "dup3",
            "fcntl",
            "getpid",
            "getppid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "wait4",
            "exit",
            "exit_group",
            "execve",
            "clone",
            "clone3",
            "fork",
            "vfork",
            "uname",
            "arch_prctl",
            "set_tid_address",
            "set_robust_list",
            "rseq",
            "prlimit64",
            "getrandom",
            "readlink",
            "getcwd",
            "chdir",
            "sysinfo",
            "futex",
            "getdents64",
            "statx",
            "sigaltstack"
        ]);
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "syscalls": [
                {"names": allowed, "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 4294967295u64, "op": "SCMP_CMP_EQ"}]},
                {"names": ["kill"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]},
            ]
        })
    });
    let out = run_expect(&husk, &bundle, "seccompdefault", 0);
    let text = stdout(&out);
    assert_eq!(
        text,
        "Linux\nkill0-ok\nkill-term-refused\nmkdir-refused\n",
        "{}",
        stderr(&out)
    );
    // ENOSYS from the filter, not ESRCH from the kernel, for the signal the rule leaves out.
    let err = stderr(&out);
    assert!(
        err.contains("can't kill pid 99999: Function not implemented"),
        "{err}"
    );
    assert!(
        err.contains("can't create directory '/dev/shm/d': Function not implemented"),
        "{err}"
    );
    husk.assert_clean();
}

#[test]
fn test_config_seccomp_notify_refused() {
    let Some(env) = Env::get("test_config_seccomp_notify_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        })
    });
    assert_refused(&husk, &bundle, "SCMP_ACT_NOTIFY is not supported");
}

/// config.json `linux.namespaces` of the default spec without `kind`.
fn drop_namespace(bundle: &TestBundle, kind: &str) {
    bundle.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .retain(|ns| ns["type"] != kind)
    });
}

#[test]
fn test_config_user_namespace_ids_mapped() {
    let Some(env) = Env::get("test_config_user_namespace_ids_mapped") else {
        return;
    };
    let husk = env.husk();
    // The rootfs belongs to guest uid 0, which the mapping leaves out: inside it shows as the
    // overflow id 65534, while the container's root is guest uid 100000.
    let script = "echo uid=$(id -u) gid=$(id -g); cat /proc/self/uid_map /proc/self/gid_map; \
         stat -c owner=%u /bin/busybox; hostname; \
         grep -E '^CapEff:' /proc/self/status; echo > /dev/null && echo devnull-ok";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .push(json!({"type": "user"}));
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
        c["hostname"] = "userns".into();
    });
    let out = run_expect(&husk, &bundle, "userns", 0);
    let text = stdout(&out);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.first(), Some(&vec!["uid=0", "gid=0"]), "{text}");
    assert_eq!(lines.get(1), Some(&vec!["0", "100000", "65536"]), "{text}");
    assert_eq!(lines.get(2), Some(&vec!["0", "200000", "65536"]), "{text}");
    assert_eq!(lines.get(3), Some(&vec!["owner=65534"]), "{text}");
    assert_eq!(lines.get(4), Some(&vec!["userns"]), "{text}");
    assert_eq!(
        status_field(&text, "CapEff"),
        Some("0000000020000420"),
        "{text}"
    );
    assert!(text.contains("devnull-ok"), "{text}");
    husk.assert_clean();
}

#[test]
fn test_config_without_pid_and_net_namespaces_sees_guest() {
    let Some(env) = Env::get("test_config_without_pid_and_net_namespaces_sees_guest") else {
        return;
    };
    let husk = env.husk();
    let script = "echo pid=$$; cat /proc/1/comm; ls /sys/class/net";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    drop_namespace(&bundle, "pid");
    drop_namespace(&bundle, "network");
    let out = run_expect(&husk, &bundle, "hostns", 0);
    let text = stdout(&out);
    // Without its own pid namespace the container sees the agent as PID 1.
    assert!(!text.starts_with("pid=1\n"), "{text}");
    assert!(text.lines().nth(1).is_some_and(|l| l != "sh"), "{text}");
    assert!(text.lines().any(|l| l == "lo"), "{text}");
    husk.assert_clean();
}

#[test]
fn test_config_namespace_path_refused() {
    let Some(env) = Env::get("test_config_namespace_path_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| c["linux"]["namespaces"][0]["path"] = "/proc/1/ns/pid".into());
    assert_refused(
        &husk,
        &bundle,
        "joining the pid namespace at /proc/1/ns/pid is not supported",
    );
}

#[test]
fn test_config_without_mount_namespace_refused() {
    let Some(env) = Env::get("test_config_without_mount_namespace_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    drop_namespace(&bundle, "mount");
    assert_refused(
        &husk,
        &bundle,
        "linux.namespaces must include a mount namespace",
    );
}

#[test]
fn test_config_unknown_namespace_type_refused() {
    let Some(env) = Env::get("test_config_unknown_namespace_type_refused") else {
        return;
    };
    let husk = env.husk();
    let bundle = TestBundle::busybox(&husk, &["true"]);
    bundle.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .push(json!({"type": "bogus"}))
    });
    assert_refused(&husk, &bundle, "config.json");
}

#[test]
fn test_config_linux_devices_made_with_type_numbers_mode_owner() {
    let Some(env) = Env::get("test_config_linux_devices_made_with_type_numbers_mode_owner") else {
        return;
    };
    let husk = env.husk();
    // Writing needs the mode (the default capabilities hold no CAP_DAC_OVERRIDE, as runc).
    let script =
        "stat -c '%F %t:%T %a %u:%g' /dev/mynull /dev/sub/fifo; echo x > /dev/open && echo wrote";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 416, "uid": 1, "gid": 2},
            {"path": "/dev/sub/fifo", "type": "p", "major": 0, "minor": 0, "fileMode": 384},
            {"path": "/dev/open", "type": "c", "major": 1, "minor": 3}
        ]);
    });
    let out = run_expect(&husk, &bundle, "devices", 0);
    assert_eq!(
        stdout(&out),
        "character special file 1:3 640 1:2\nfifo 0:0 600 0:0\nwrote\n"
    );
    husk.assert_clean();
}

/// `linux.rootfsPropagation` is set on the container's root: mountinfo shows it, a `shared`
/// root's copy sees a mount made later under the root, an `unbindable` root cannot be bound.
#[test]
fn test_config_rootfs_propagation_shared_and_unbindable() {
    let Some(env) = Env::get("test_config_rootfs_propagation_shared_and_unbindable") else {
        return;
    };
    let husk = env.husk();
    // As the suite's runtimetest: bind the root recursively, then mount on a directory of the
    // root (its /tmp; the root is read-only); through a shared root's peer the copy gets it.
    let script = "grep -E '^[0-9]+ [0-9]+ [^ ]+ / / ' /proc/self/mountinfo; \
         mkdir -p /dev/copy && mount --rbind / /dev/copy && echo bound; \
         mount -t tmpfs later /tmp; grep -c ' /dev/copy/tmp ' /proc/self/mountinfo; true";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["process"]["capabilities"] = json!({
            "bounding": ["CAP_SYS_ADMIN"], "effective": ["CAP_SYS_ADMIN"],
            "permitted": ["CAP_SYS_ADMIN"], "inheritable": [], "ambient": []
        });
    });
    bundle.edit(|c| c["linux"]["rootfsPropagation"] = "shared".into());
    let text = stdout(&run_expect(&husk, &bundle, "propshared", 0));
    let root = text.lines().next().unwrap_or_default();
    assert!(root.contains(" shared:"), "{text}");
    assert!(
        text.ends_with("bound\n1\n"),
        "the mount did not propagate: {text}"
    );
    bundle.edit(|c| c["linux"]["rootfsPropagation"] = "unbindable".into());
    let text = stdout(&run_expect(&husk, &bundle, "propunbind", 0));
    assert!(
        text.lines()
            .next()
            .unwrap_or_default()
            .contains(" unbindable"),
        "{text}"
    );
    assert!(
        !text.contains("bound\n"),
        "an unbindable root was bound: {text}"
    );
    bundle.edit(|c| c["linux"]["rootfsPropagation"] = "sideways".into());
    assert_refused(&husk, &bundle, "linux.rootfsPropagation \"sideways\"");
}

/// `linux.personality`: `LINUX32` makes the container's `uname -m` the 32-bit machine, as
/// personality(2) does for a runc container on runc versions that apply it (1.1 ignores it);
/// `LINUX` leaves it as it is.
#[test]
fn test_config_personality_linux32_uname_i686() {
    let Some(env) = Env::get("test_config_personality_linux32_uname_i686") else {
        return;
    };
    let husk = env.husk();
    for (domain, machine) in [("LINUX32", "i686"), ("LINUX", "x86_64")] {
        let bundle = TestBundle::busybox(&husk, &["uname", "-m"]);
        bundle.edit(|c| c["linux"]["personality"] = json!({ "domain": domain }));
        let out = run_expect(&husk, &bundle, &format!("pers-{}", domain.len()), 0);
        assert_eq!(stdout(&out).trim(), machine, "{domain}");
    }
    husk.assert_clean();
}

/// The recursive mount options (`rro`, `rnosuid`, `rnodev`, `rnoexec`, `rnoatime`; then `rrw`
/// after `rro`, which stays read-only under runc, and `rrw` alone): the bind's flags in the
/// container's mountinfo and whether it can be written are runc's.
#[test]
fn test_config_recursive_mount_options_as_runc() {
    let Some(env) = Env::get("test_config_recursive_mount_options_as_runc") else {
        return;
    };
    let husk = env.husk();
    let host = tempfile::tempdir().expect("host dir");
    let script = "for d in /ro /ro-rw /rw; do echo $d $(awk -v d=$d '$5 == d {print $6}' \
                  /proc/self/mountinfo); touch $d/x 2>/dev/null && echo WROTE $d; done; true";
    let bundle = TestBundle::busybox(&husk, &["sh", "-c", script]);
    bundle.edit(|c| {
        c["process"]["terminal"] = false.into();
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        let all = ["rbind", "rro", "rnosuid", "rnodev", "rnoexec", "rnoatime"];
        for (dest, options) in [
            ("/ro", all.to_vec()),
            ("/ro-rw", [&all[..], &["rrw"]].concat()),
            ("/rw", vec!["rbind", "rrw", "rnoexec"]),
        ] {
            mounts.push(json!({
                "destination": dest, "type": "bind", "source": host.path(), "options": options
            }));
        }
    });
    let got = stdout(&run_expect(&husk, &bundle, "recursive", 0));
    let root = tempfile::tempdir().expect("runc root");
    let runc = Command::new("runc")
        .arg("--root")
        .arg(root.path())
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg("recursive")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runc");
    assert_eq!(got, stdout(&runc), "runc: {}", stderr(&runc));
    assert!(
        got.contains("/ro ro,nosuid,nodev,noexec,noatime\n"),
        "{got}"
    );
    assert!(got.contains("/rw rw,noexec"), "{got}");
    assert!(got.contains("WROTE /rw"), "{got}");
    husk.assert_clean();
}
