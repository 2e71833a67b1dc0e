//! `[nat]` and `[[nat.map]]`: the same-LAN helper's address mappings and the hub's masquerade.

use super::raw::RawNat;
use super::{invalid, ConfigError, Nat, RulesMode};
use crate::prefix::Prefix;

pub(super) fn nat(raw: Option<RawNat>) -> Result<Nat, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Nat {
            maps: Vec::new(),
            masquerade: Vec::new(),
            rules: RulesMode::Off,
        });
    };
    let mut maps: Vec<crate::nat::NatMap> = Vec::new();
    for m in raw.map {
        let parse = |key: &str, v: &str| -> Result<Prefix, ConfigError> {
            let p: Prefix = v.parse().map_err(|e: crate::prefix::BadPrefix| {
                invalid(format!("nat.map.{key}"), format!("{v:?}"), e.to_string())
            })?;
            if !p.addr().is_ipv4() {
                return Err(invalid(
                    format!("nat.map.{key}"),
                    format!("{v:?}"),
                    "an IPv4 prefix: the NAT helper rewrites IPv4 only",
                ));
            }
            Ok(p)
        };
        let real = parse("real", &m.real)?;
        let alias = parse("alias", &m.alias)?;
        if real.len() != alias.len() {
            return Err(invalid(
                "nat.map.alias",
                format!("{:?}", m.alias),
                format!("a prefix of the same size as real = {real} (/{}): a host keeps its host part in the alias", real.len()),
            ));
        }
        let overlap = |a: &Prefix, b: &Prefix| a.contains(b.addr()) || b.contains(a.addr());
        if overlap(&real, &alias) {
            return Err(invalid(
                "nat.map.alias",
                format!("{:?}", m.alias),
                format!("a prefix that does not overlap real = {real}"),
            ));
        }
        for o in &maps {
            for (x, y) in [
                (real, o.real),
                (real, o.alias),
                (alias, o.real),
                (alias, o.alias),
            ] {
                if overlap(&x, &y) {
                    return Err(invalid(
                        "nat.map",
                        format!("{real} -> {alias}"),
                        format!(
                            "prefixes that do not overlap another map ({} -> {})",
                            o.real, o.alias
                        ),
                    ));
                }
            }
        }
        maps.push(crate::nat::NatMap { real, alias });
    }
    let mut masquerade = Vec::new();
    for m in &raw.masquerade {
        let p: Prefix = m.parse().map_err(|e: crate::prefix::BadPrefix| {
            invalid("nat.masquerade", format!("{m:?}"), e.to_string())
        })?;
        if !p.addr().is_ipv4() {
            return Err(invalid(
                "nat.masquerade",
                format!("{m:?}"),
                "an IPv4 source prefix (iptables MASQUERADE is IPv4)",
            ));
        }
        masquerade.push(p);
    }
    let rules = match raw.rules.as_deref() {
        None if maps.is_empty() && masquerade.is_empty() => RulesMode::Off,
        None | Some("apply") => RulesMode::Apply,
        Some("print") => RulesMode::Print,
        Some("off") => RulesMode::Off,
        Some(other) => {
            return Err(invalid("nat.rules", format!("{other:?}"), "\"apply\" (install on start, remove on stop), \"print\" (only show them) or \"off\""));
        }
    };
    Ok(Nat {
        maps,
        masquerade,
        rules,
    })
}
