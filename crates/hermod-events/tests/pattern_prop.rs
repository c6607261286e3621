//! Property test: `Pattern::matches` agrees with a plain recursive reference
//! matcher on random small patterns and topics.

use hermod_events::pattern::{is_valid_topic, Pattern};
use proptest::prelude::*;

/// The obviously-correct (and exponential) definition, segment by segment.
fn reference(pattern: &[&str], topic: &[&str]) -> bool {
    match pattern.split_first() {
        None => topic.is_empty(),
        Some((&"**", rest)) => (0..=topic.len()).any(|skip| reference(rest, &topic[skip..])),
        Some((&"*", rest)) => !topic.is_empty() && reference(rest, &topic[1..]),
        Some((lit, rest)) => topic.first() == Some(lit) && reference(rest, &topic[1..]),
    }
}

fn pattern_segments() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "*", "**"]), 1..8)
}

fn topic_segments() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn matches_agrees_with_reference(pattern in pattern_segments(), topic in topic_segments()) {
        let p = Pattern::parse(&pattern.join(".")).unwrap();
        prop_assert_eq!(
            p.matches(&topic.join(".")),
            reference(&pattern, &topic),
            "pattern {:?} topic {:?}", pattern.join("."), topic.join(".")
        );
    }

    /// Topics with empty segments (`a..b`, `.a`, `a.`, ``) match nothing.
    #[test]
    fn invalid_topics_never_match(
        pattern in pattern_segments(),
        topic in prop::collection::vec(prop::sample::select(vec!["a", "b", ""]), 1..6),
    ) {
        let joined = topic.join(".");
        let want = is_valid_topic(&joined) && reference(&pattern, &topic);
        prop_assert_eq!(topic.iter().all(|s| !s.is_empty()), is_valid_topic(&joined));
        prop_assert_eq!(Pattern::parse(&pattern.join(".")).unwrap().matches(&joined), want);
    }

    /// A pattern made from a topic by replacing segments with `*` or
    /// inserting `**` always matches it (positive cases are rare above).
    #[test]
    fn generalised_topic_matches(
        topic in topic_segments(),
        edits in prop::collection::vec((0usize..3, any::<prop::sample::Index>()), 0..4),
    ) {
        let mut pattern: Vec<&str> = topic.clone();
        for (kind, at) in edits {
            match kind {
                0 => {
                    // `*` generalises a literal, not a `**` (which may stand for nothing).
                    let i = at.index(pattern.len());
                    if pattern[i] != "**" { pattern[i] = "*"; }
                }
                1 => { let i = at.index(pattern.len() + 1); pattern.insert(i, "**"); }
                _ => { let i = at.index(pattern.len()); pattern[i] = "**"; }
            }
        }
        prop_assert!(reference(&pattern, &topic));
        prop_assert!(Pattern::parse(&pattern.join(".")).unwrap().matches(&topic.join(".")));
    }
}
