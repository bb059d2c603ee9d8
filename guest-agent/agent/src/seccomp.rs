//! The container's seccomp profile compiled to BPF with seccompiler and installed by
//! container-init right before execve.
//!
//! seccompiler builds filters with one action for every matching rule, while a profile gives
//! each rule its own. The profile is therefore split into filters the kernel stacks (it runs
//! all of them and keeps the most severe result, seccomp(2)): one filter per non-allow
//! action (its rules -> that action, anything else -> allow), and, when the default action
//! is not allow, one that allows every syscall some rule matches and gives the default to the
//! rest. A call matching an `errno` rule is thus allowed by the default filter and refused by
//! its action's filter: the profile's meaning. Syscall names this architecture lacks are
//! skipped, as runc does.

use std::collections::BTreeMap;

use husk_protocol::{
    ArgOp, Seccomp, SeccompAction as Action, SyscallArg, SyscallRule, DEFAULT_SECCOMP_ERRNO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::syscalls;

/// syscall number -> its rules (an empty list matches every call of it).
type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Compiles `profile` into the BPF programs to install, in order.
pub fn compile(profile: &Seccomp) -> Result<Vec<BpfProgram>, String> {
    let mut groups: BTreeMap<(Action, u32), RuleMap> = BTreeMap::new();
    let mut matched = RuleMap::new();
    for rule in &profile.syscalls {
        let errno = rule.errno.unwrap_or(DEFAULT_SECCOMP_ERRNO);
        for nr in rule.names.iter().filter_map(|n| syscalls::number(n)) {
            let conditions = conditions(rule)?;
            add(&mut matched, nr, conditions.clone());
            if rule.action != Action::Allow {
                add(
                    groups.entry((rule.action, errno)).or_default(),
                    nr,
                    conditions,
                );
            }
        }
    }
    let mut filters = Vec::new();
    if profile.default_action != Action::Allow {
        let errno = profile.default_errno.unwrap_or(DEFAULT_SECCOMP_ERRNO);
        let default = action(profile.default_action, errno);
        filters.push(filter(matched, default, SeccompAction::Allow)?);
    }
    for ((act, errno), rules) in groups {
        filters.push(filter(rules, SeccompAction::Allow, action(act, errno))?);
    }
    Ok(filters)
}

fn filter(
    rules: RuleMap,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatch, on_match, TargetArch::x86_64)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("seccomp filter: {e}"))
}

/// Adds a rule for `nr`: `None` conditions match every call, and win over conditional rules
/// (in a [`RuleMap`], an empty list is unconditional).
fn add(map: &mut RuleMap, nr: i64, conditions: Option<Vec<SeccompRule>>) {
    use std::collections::btree_map::Entry;
    match (map.entry(nr), conditions) {
        (Entry::Vacant(v), conditions) => {
            v.insert(conditions.unwrap_or_default());
        }
        (Entry::Occupied(mut o), None) => o.get_mut().clear(),
        (Entry::Occupied(mut o), Some(rules)) if !o.get().is_empty() => o.get_mut().extend(rules),
        (Entry::Occupied(_), Some(_)) => {}
    }
}

/// The seccompiler rules of one profile rule: `None` when it has no argument conditions.
/// Conditions on distinct arguments must all hold; when an argument repeats, each
/// condition is a rule of its own (any may hold), as runc does.
fn conditions(rule: &SyscallRule) -> Result<Option<Vec<SeccompRule>>, String> {
    if rule.args.is_empty() {
        return Ok(None);
    }
    let conds = rule
        .args
        .iter()
        .map(condition)
        .collect::<Result<Vec<_>, _>>()?;
    let distinct = rule
        .args
        .iter()
        .enumerate()
        .all(|(i, a)| rule.args.iter().skip(i + 1).all(|b| b.index != a.index));
    let rules = match distinct {
        true => vec![SeccompRule::new(conds)],
        false => conds
            .into_iter()
            .map(|c| SeccompRule::new(vec![c]))
            .collect(),
    };
    rules
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(|e| format!("seccomp rule: {e}"))
}

fn condition(arg: &SyscallArg) -> Result<SeccompCondition, String> {
    let (op, value) = match arg.op {
        ArgOp::Ne => (SeccompCmpOp::Ne, arg.value),
        ArgOp::Lt => (SeccompCmpOp::Lt, arg.value),
        ArgOp::Le => (SeccompCmpOp::Le, arg.value),
        ArgOp::Eq => (SeccompCmpOp::Eq, arg.value),
        ArgOp::Ge => (SeccompCmpOp::Ge, arg.value),
        ArgOp::Gt => (SeccompCmpOp::Gt, arg.value),
        ArgOp::MaskedEq => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
    };
    SeccompCondition::new(arg.index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("seccomp condition on argument {}: {e}", arg.index))
}

fn action(action: Action, errno: u32) -> SeccompAction {
    match action {
        Action::KillProcess => SeccompAction::KillProcess,
        Action::KillThread => SeccompAction::KillThread,
        Action::Trap => SeccompAction::Trap,
        Action::Errno => SeccompAction::Errno(errno),
        Action::Trace => SeccompAction::Trace(errno),
        Action::Log => SeccompAction::Log,
        Action::Allow => SeccompAction::Allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(names: &[&str], action: Action, args: Vec<SyscallArg>) -> SyscallRule {
        SyscallRule {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            action,
            errno: None,
            args,
        }
    }

    fn profile(default_action: Action, syscalls: Vec<SyscallRule>) -> Seccomp {
        Seccomp {
            default_action,
            default_errno: None,
            architectures: vec![],
            syscalls,
        }
    }

    #[test]
    fn test_compile_default_allow_one_filter_per_action() {
        let p = profile(
            Action::Allow,
            vec![
                rule(&["mkdir", "no_such_call"], Action::Errno, vec![]),
                rule(&["reboot"], Action::KillProcess, vec![]),
                rule(&["read"], Action::Allow, vec![]),
            ],
        );
        assert_eq!(compile(&p).unwrap().len(), 2);
    }

    #[test]
    fn test_compile_default_errno_adds_allow_list_filter() {
        let arg = |index, op| SyscallArg {
            index,
            value: 1,
            value_two: 0,
            op,
        };
        let p = profile(
            Action::Errno,
            vec![
                rule(&["read", "write"], Action::Allow, vec![]),
                // Repeated index: two alternative rules; distinct: one rule with both.
                rule(
                    &["personality"],
                    Action::Allow,
                    vec![arg(0, ArgOp::Eq), arg(0, ArgOp::Gt)],
                ),
                rule(
                    &["clone"],
                    Action::Allow,
                    vec![arg(0, ArgOp::MaskedEq), arg(1, ArgOp::Ne)],
                ),
            ],
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn test_add_unconditional_wins_over_conditions() {
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 1).unwrap();
        let mut map = RuleMap::new();
        add(
            &mut map,
            1,
            Some(vec![SeccompRule::new(vec![cond.clone()]).unwrap()]),
        );
        add(&mut map, 1, None);
        add(
            &mut map,
            1,
            Some(vec![SeccompRule::new(vec![cond]).unwrap()]),
        );
        assert!(map.get(&1).is_some_and(Vec::is_empty));
    }
}
