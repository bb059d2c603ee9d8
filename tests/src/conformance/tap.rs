//! The verdict of one validation test from its TAP output (TAP 13, as the suite's `tap` package
//! prints it) and its exit status.
//!
//! A run passes when no assertion is `not ok`, no YAML diagnostic carries an `error` (the hook
//! tests report a violation only that way, under a `1..0` plan), the plan matches the number of
//! assertions, and the program exited 0 (the `*_fail` tests report only through their exit
//! status). Otherwise the first failure seen is the reason, cut to [`REASON_CHARS`].

/// Longest reason kept, in characters.
pub const REASON_CHARS: usize = 100;

/// How a test program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It ran past its deadline and its process group was killed.
    TimedOut {
        /// The deadline, in seconds.
        secs: u64,
    },
}

/// One run's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every check held.
    Pass,
    /// The first failure seen.
    Fail(String),
}

impl Verdict {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        matches!(self, Self::Pass)
    }
}

/// What a test's TAP output says. A test may print several streams, each from its
/// `TAP version 13` line to its plan (linux_cgroups_cpus prints `1..112`, then `1..0`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tap {
    /// Streams seen.
    pub streams: u32,
    /// The first stream whose plan is missing or does not match its assertions.
    pub plan_failure: Option<String>,
    /// The first `not ok` line.
    pub first_not_ok: Option<String>,
    /// The first `error` of a YAML diagnostic block that belongs to no assertion.
    pub first_error: Option<String>,
    /// A `Bail out!` line.
    pub bail_out: Option<String>,
}

/// The stream being read.
#[derive(Debug, Default)]
struct Stream {
    /// Whether any line of it was read.
    open: bool,
    /// `1..N`: N.
    plan: Option<u32>,
    /// `ok` and `not ok` lines.
    assertions: u32,
    /// Whether the last TAP line was an assertion whose diagnostic may follow: a diagnostic
    /// after one describes it (an `error` there may be the error the assertion expected), any
    /// other stands alone. Free text (the suite's `Refer to:` lines) changes nothing.
    after_assertion: bool,
}

impl Tap {
    /// Parses a test's output; lines that are not TAP (a runtime's own output) are skipped.
    pub fn parse(text: &str) -> Self {
        let mut tap = Self::default();
        let mut stream = Stream::default();
        let mut block: Option<Vec<&str>> = None;
        for line in text.lines() {
            let trimmed = line.trim_end();
            if let Some(lines) = block.as_mut() {
                if trimmed.trim_start() == "..." {
                    if !stream.after_assertion {
                        let error = diagnostic_error(lines);
                        tap.first_error = tap.first_error.take().or(error);
                    }
                    stream.after_assertion = false;
                    block = None;
                } else {
                    lines.push(line);
                }
            } else if trimmed.trim_start() == "---" {
                block = Some(Vec::new());
            } else if trimmed.starts_with("TAP version") {
                tap.end(&mut stream);
                stream.open = true;
            } else {
                tap.line(trimmed, &mut stream);
            }
        }
        tap.end(&mut stream);
        tap
    }

    /// Checks the plan of the stream that ends here (if one was open) and starts a new one.
    fn end(&mut self, stream: &mut Stream) {
        if !stream.open {
            return;
        }
        let failure = match stream.plan {
            None => Some("no TAP plan".to_owned()),
            Some(n) if n != stream.assertions => {
                Some(format!("plan 1..{n} but {} assertions", stream.assertions))
            }
            Some(_) => None,
        };
        self.plan_failure = self.plan_failure.take().or(failure);
        self.streams = self.streams.saturating_add(1);
        *stream = Stream::default();
    }

    /// Reads one line outside diagnostics.
    fn line(&mut self, line: &str, stream: &mut Stream) {
        if let Some(n) = line.strip_prefix("1..") {
            stream.plan = n.trim().parse().ok();
            stream.after_assertion = false;
        } else if line.starts_with("Bail out!") {
            self.bail_out.get_or_insert_with(|| line.to_owned());
            stream.after_assertion = false;
        } else if line.starts_with("not ok") || line == "ok" || line.starts_with("ok ") {
            if line.starts_with("not ok") {
                self.first_not_ok.get_or_insert_with(|| line.to_owned());
            }
            stream.assertions = stream.assertions.saturating_add(1);
            stream.after_assertion = true;
        } else {
            return;
        }
        stream.open = true;
    }

    /// The verdict for this output and the program's exit; `hint` (the runtime's error line
    /// from stderr) is added to a failure seen only in the exit status.
    pub fn verdict(&self, exit: Exit, hint: Option<&str>) -> Verdict {
        let reason = self
            .first_not_ok
            .clone()
            .or_else(|| self.first_error.clone())
            .or_else(|| self.bail_out.clone())
            .or_else(|| exit_failure(exit, hint))
            .or_else(|| self.plan_failure.clone());
        match reason {
            None => Verdict::Pass,
            Some(r) => Verdict::Fail(cut(&r)),
        }
    }
}

fn exit_failure(exit: Exit, hint: Option<&str>) -> Option<String> {
    match exit {
        Exit::Code(0) => None,
        Exit::Code(c) => Some(match hint {
            Some(h) => format!("exit status {c}: {h}"),
            None => format!("exit status {c}"),
        }),
        Exit::Signal(s) => Some(format!("killed by signal {s}")),
        Exit::TimedOut { secs } => Some(format!("timed out after {secs} s")),
    }
}

/// The `error` of one diagnostic block: the suite prints JSON (`"error": "..."`), plain YAML
/// (`error: ...`) is read too. Only its first line is kept (the rest is the spec reference).
fn diagnostic_error(lines: &[&str]) -> Option<String> {
    let body = lines.join("\n");
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&body) {
        return map.get("error").map(|e| match e {
            serde_json::Value::String(s) => first_line(s),
            other => other.to_string(),
        });
    }
    lines.iter().find_map(|l| {
        let rest = l.trim_start().strip_prefix("error:")?;
        Some(first_line(rest.trim().trim_matches('"')))
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// `s` on one line, at most [`REASON_CHARS`] characters (an ellipsis marks a cut).
pub fn cut(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= REASON_CHARS {
        return one_line;
    }
    let mut out: String = one_line.chars().take(REASON_CHARS - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_verdict_all_ok_with_plan_passes() {
        let tap = Tap::parse("TAP version 13\nok 1 - a\nok 2 # SKIP b\n1..2\n");
        assert_eq!(tap.verdict(Exit::Code(0), None), Verdict::Pass);
    }

    #[test]
    fn test_verdict_not_ok_reports_first_not_ok_line() {
        let tap = Tap::parse("ok 1 - a\nnot ok 2 - mounts\nnot ok 3 - other\n1..3\n");
        assert_eq!(
            tap.verdict(Exit::Code(0), None),
            Verdict::Fail("not ok 2 - mounts".into())
        );
    }

    #[test]
    fn test_verdict_json_error_diagnostic_fails_with_its_first_line() {
        let out = "TAP version 13\nRefer to: x\n  ---\n  {\n    \"error\": \"hook failed\\nRefer to: x\"\n  }\n  ...\n1..0\n";
        let tap = Tap::parse(out);
        assert_eq!(
            tap.verdict(Exit::Code(0), None),
            Verdict::Fail("hook failed".into())
        );
    }

    #[test]
    fn test_verdict_yaml_error_diagnostic_fails() {
        let tap = Tap::parse("  ---\n  error: \"bad state\"\n  ...\n1..0\n");
        assert_eq!(
            tap.verdict(Exit::Code(0), None),
            Verdict::Fail("bad state".into())
        );
    }

    #[test]
    fn test_verdict_error_diagnostic_of_an_ok_assertion_passes() {
        let out = "ok 1 - create without id fails\nRefer to: x\n  ---\n  {\"error\": \"exit status 1\"}\n  ...\n1..1\n";
        assert_eq!(Tap::parse(out).verdict(Exit::Code(0), None), Verdict::Pass);
    }

    #[test]
    fn test_verdict_diagnostic_without_error_passes() {
        let tap = Tap::parse("ok 1 - a\n  ---\n  {\"expected\": 1}\n  ...\n1..1\n");
        assert_eq!(tap.verdict(Exit::Code(0), None), Verdict::Pass);
    }

    #[test]
    fn test_verdict_nonzero_exit_with_clean_tap_fails() {
        let tap = Tap::parse("1..0\n");
        assert_eq!(
            tap.verdict(Exit::Code(1), None),
            Verdict::Fail("exit status 1".into())
        );
    }

    #[test]
    fn test_verdict_timeout_fails() {
        let tap = Tap::parse("ok 1 - a\n");
        assert_eq!(
            tap.verdict(Exit::TimedOut { secs: 120 }, None),
            Verdict::Fail("timed out after 120 s".into())
        );
    }

    #[test]
    fn test_verdict_two_streams_each_with_its_plan_pass() {
        let tap = Tap::parse("TAP version 13\nok 1 - a\nok 2 - b\n1..2\nTAP version 13\n1..0\n");
        assert_eq!(tap.verdict(Exit::Code(0), None), Verdict::Pass);
    }

    #[test]
    fn test_verdict_no_output_and_exit_zero_passes() {
        assert_eq!(Tap::parse("").verdict(Exit::Code(0), None), Verdict::Pass);
    }

    #[test]
    fn test_verdict_nonzero_exit_adds_the_hint() {
        assert_eq!(
            Tap::parse("").verdict(Exit::Code(1), Some("husk: refused")),
            Verdict::Fail("exit status 1: husk: refused".into())
        );
    }

    #[test]
    fn test_verdict_missing_plan_fails() {
        let tap = Tap::parse("ok 1 - a\n");
        assert_eq!(
            tap.verdict(Exit::Code(0), None),
            Verdict::Fail("no TAP plan".into())
        );
    }

    #[test]
    fn test_verdict_plan_mismatch_fails() {
        let tap = Tap::parse("ok 1 - a\n1..3\n");
        assert_eq!(
            tap.verdict(Exit::Code(0), None),
            Verdict::Fail("plan 1..3 but 1 assertions".into())
        );
    }

    #[test]
    fn test_cut_long_reason_keeps_limit() {
        let long = "x".repeat(300);
        assert_eq!(cut(&long).chars().count(), REASON_CHARS);
    }
}
