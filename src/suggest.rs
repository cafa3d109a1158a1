//! "Did you mean …?": the closest of a few known names to a mistyped one (a profile key, a
//! profile name, an ssh config alias), by edit distance. Pure; no I/O.

/// The candidate closest to `typed`, if one is close enough to be a likely typo: about one
/// edit in three letters (none below three letters), or `typed` is a prefix of it (`cidr`
/// for `cidrs`). Case is ignored. `None` when `typed` is itself a candidate.
pub fn did_you_mean<'a, I>(typed: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let typed_l = typed.to_ascii_lowercase();
    let len = typed.chars().count();
    if len < 3 {
        return None;
    }
    let limit = (len / 3).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let c_l = c.to_ascii_lowercase();
        if c_l == typed_l {
            return None;
        }
        let d = if c_l.starts_with(&typed_l) {
            // A prefix counts as close, but an exact-distance match wins over it.
            limit
        } else {
            distance(&typed_l, &c_l)
        };
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Levenshtein distance, with a swap of two neighbours counting as one edit.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows: two back (for swaps), the previous one, the current one.
    let mut back2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(back2[j - 2] + 1);
            }
        }
        std::mem::swap(&mut back2, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: [&str; 5] = ["cidrs", "excludes", "dns_domains", "proxy", "connections"];

    #[test]
    fn likely_typos_are_matched() {
        assert_eq!(did_you_mean("cidr", KEYS), Some("cidrs"));
        assert_eq!(did_you_mean("cdirs", KEYS), Some("cidrs"), "a swap");
        assert_eq!(did_you_mean("prxy", KEYS), Some("proxy"));
        assert_eq!(did_you_mean("dns_domain", KEYS), Some("dns_domains"));
        assert_eq!(did_you_mean("conections", KEYS), Some("connections"));
        assert_eq!(did_you_mean("uxjmp", ["uxjump", "db"]), Some("uxjump"));
        assert_eq!(did_you_mean("PROXY2", KEYS), Some("proxy"));
    }

    #[test]
    fn unrelated_names_and_exact_ones_are_not() {
        assert_eq!(did_you_mean("mtu", KEYS), None);
        assert_eq!(did_you_mean("bastion", ["uxjump", "db"]), None);
        assert_eq!(did_you_mean("proxy", KEYS), None, "not a typo");
        assert_eq!(did_you_mean("x", KEYS), None);
        assert_eq!(did_you_mean("anything", []), None);
    }

    #[test]
    fn distances() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("ab", "ba"), 1);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}
