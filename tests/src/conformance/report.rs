//! The report: one line per test with runc's and husk's verdicts, the summary line, and the
//! same table in markdown (for README).

use std::fmt::Write as _;

use super::tap::Verdict;

/// Both verdicts of one test.
#[derive(Debug, Clone)]
pub struct Row {
    /// The test's name (`validation/<name>/`).
    pub test: String,
    /// Its verdict under runc.
    pub runc: Verdict,
    /// Its verdict under husk.
    pub husk: Verdict,
}

fn word(v: &Verdict) -> &'static str {
    if v.passed() {
        "pass"
    } else {
        "fail"
    }
}

fn reason(v: &Verdict) -> &str {
    match v {
        Verdict::Pass => "",
        Verdict::Fail(r) => r,
    }
}

impl Row {
    /// `<name>  runc: pass|fail  husk: pass|fail  [husk's reason]`.
    pub fn line(&self) -> String {
        let line = format!(
            "{:<34} runc: {}  husk: {}  {}",
            self.test,
            word(&self.runc),
            word(&self.husk),
            reason(&self.husk)
        );
        line.trim_end().to_owned()
    }
}

/// The counts the summary and the minimum check use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Tests run.
    pub total: usize,
    /// Passed under runc.
    pub runc: usize,
    /// Passed under husk.
    pub husk: usize,
    /// Passed under husk, failed under runc.
    pub husk_only: usize,
    /// Passed under runc, failed under husk.
    pub runc_only: Vec<String>,
}

impl Summary {
    /// Counts `rows`.
    pub fn of(rows: &[Row]) -> Self {
        Self {
            total: rows.len(),
            runc: rows.iter().filter(|r| r.runc.passed()).count(),
            husk: rows.iter().filter(|r| r.husk.passed()).count(),
            husk_only: rows
                .iter()
                .filter(|r| r.husk.passed() && !r.runc.passed())
                .count(),
            runc_only: rows
                .iter()
                .filter(|r| r.runc.passed() && !r.husk.passed())
                .map(|r| r.test.clone())
                .collect(),
        }
    }

    /// `conformance: runc N/T passed, husk M/T passed; husk passes K that runc fails; husk
    /// fails J that runc passes: <names>`.
    pub fn line(&self) -> String {
        let names = if self.runc_only.is_empty() {
            "none".to_owned()
        } else {
            self.runc_only.join(", ")
        };
        format!(
            "conformance: runc {}/{t} passed, husk {}/{t} passed; husk passes {} that runc fails; \
             husk fails {} that runc passes: {names}",
            self.runc,
            self.husk,
            self.husk_only,
            self.runc_only.len(),
            t = self.total,
        )
    }
}

/// The summary and a `test | runc | husk | husk's first failure` table, in markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut md = format!("{}\n\n", Summary::of(rows).line());
    md.push_str("| test | runc | husk | husk's first failure |\n|---|---|---|---|\n");
    for r in rows {
        let why = reason(&r.husk).replace('|', "\\|");
        let why = if why.is_empty() {
            String::new()
        } else {
            format!("`{}`", why.replace('`', "'"))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {why} |",
            r.test,
            word(&r.runc),
            word(&r.husk)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(test: &str, runc: bool, husk: bool) -> Row {
        let v = |p: bool| {
            if p {
                Verdict::Pass
            } else {
                Verdict::Fail("x".into())
            }
        };
        Row {
            test: test.into(),
            runc: v(runc),
            husk: v(husk),
        }
    }

    #[test]
    fn test_summary_counts_both_directions() {
        let rows = [
            row("a", true, true),
            row("b", true, false),
            row("c", false, true),
        ];
        assert_eq!(
            Summary::of(&rows).line(),
            "conformance: runc 2/3 passed, husk 2/3 passed; husk passes 1 that runc fails; \
             husk fails 1 that runc passes: b"
        );
    }

    #[test]
    fn test_row_line_ends_with_husk_reason() {
        assert!(row("b", true, false)
            .line()
            .ends_with("runc: pass  husk: fail  x"));
    }

    #[test]
    fn test_markdown_escapes_pipes_in_reasons() {
        let mut r = row("a", true, false);
        r.husk = Verdict::Fail("a|b".into());
        assert!(markdown(&[r]).contains("| a | pass | fail | `a\\|b` |"));
    }
}
