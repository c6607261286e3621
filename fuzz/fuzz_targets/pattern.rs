//! The topic pattern matcher against an obviously-correct reference.
//!
//! Input: a pattern and a topic, each either an arbitrary string or a string
//! built from the tokens `a`, `b`, `.`, `*` and any char (so wildcards and
//! empty segments are common). Properties:
//!
//! * `Pattern::parse` fails exactly for `""` (`EmptyPattern`) and for a
//!   pattern with an empty segment (`EmptyPatternSegment`);
//! * a parsed pattern keeps its source, and its segments are the split
//!   pattern with adjacent `**` collapsed;
//! * `matches` equals a memoized recursive reference matcher (`*` = one
//!   segment, `**` = zero or more), and `pattern::matches` agrees;
//! * `validate_topic` / `is_valid_topic` agree with each other and with
//!   whether the topic can be matched at all (`**` and the topic as a
//!   literal pattern match it iff it is valid; an invalid topic matches no
//!   pattern);
//! * a literal pattern matches only its own text;
//! * the daemon's checks of what a client gives (`model::check_topic`,
//!   `model::parse_pattern`) refuse more than 256 characters first
//!   (`invalid_request`), then what `validate_topic` / `Pattern::parse`
//!   refuse (`invalid_topic`), and accept the rest.
#![no_main]

use arbitrary::Arbitrary;
use hermod_events::pattern::{self, Pattern, Segment};
use hermod_events::Error;
use hermod_proto::model::{self, MAX_FIELD_LEN};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Tok {
    A,
    B,
    Dot,
    Star,
    Char(char),
}

#[derive(Arbitrary, Debug)]
enum Text {
    Raw(String),
    Tokens(Vec<Tok>),
}

impl Text {
    fn build(&self) -> String {
        match self {
            Text::Raw(s) => s.clone(),
            Text::Tokens(toks) => toks
                .iter()
                .map(|t| match t {
                    Tok::A => 'a',
                    Tok::B => 'b',
                    Tok::Dot => '.',
                    Tok::Star => '*',
                    Tok::Char(c) => *c,
                })
                .collect(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    pattern: Text,
    topic: Text,
}

#[derive(Clone, Copy, PartialEq)]
enum Ref<'a> {
    Lit(&'a str),
    One,
    Any,
}

fn ref_segments(pattern: &str) -> Vec<Ref<'_>> {
    pattern
        .split('.')
        .map(|s| match s {
            "*" => Ref::One,
            "**" => Ref::Any,
            lit => Ref::Lit(lit),
        })
        .collect()
}

/// Recursive segment matching, memoized on (pattern index, topic index).
fn ref_match(p: &[Ref<'_>], t: &[&str]) -> bool {
    fn go(p: &[Ref<'_>], t: &[&str], i: usize, j: usize, memo: &mut [Option<bool>]) -> bool {
        let cell = i * (t.len() + 1) + j;
        if let Some(v) = memo[cell] {
            return v;
        }
        let v = match p.get(i) {
            None => j == t.len(),
            // `**`: zero segments, or swallow one and stay on `**`.
            Some(Ref::Any) => go(p, t, i + 1, j, memo) || (j < t.len() && go(p, t, i, j + 1, memo)),
            Some(Ref::One) => j < t.len() && go(p, t, i + 1, j + 1, memo),
            Some(Ref::Lit(l)) => j < t.len() && t[j] == *l && go(p, t, i + 1, j + 1, memo),
        };
        memo[cell] = Some(v);
        v
    }
    let mut memo = vec![None; (p.len() + 1) * (t.len() + 1)];
    go(p, t, 0, 0, &mut memo)
}

fn ref_valid_topic(topic: &str) -> bool {
    topic.split('.').all(|s| !s.is_empty())
}

/// Reference matcher on whole strings: invalid topics match nothing.
fn reference(pattern: &str, topic: &str) -> bool {
    if !ref_valid_topic(topic) {
        return false;
    }
    let t: Vec<&str> = topic.split('.').collect();
    ref_match(&ref_segments(pattern), &t)
}

/// Keeps the recursion depth and memo size small.
const MAX_SEGMENTS: usize = 512;

fuzz_target!(|input: Input| {
    let pat = input.pattern.build();
    let topic = input.topic.build();

    // Topic validity: the two checks and the matcher agree.
    let valid = ref_valid_topic(&topic);
    assert_eq!(
        pattern::is_valid_topic(&topic),
        valid,
        "is_valid_topic({topic:?})"
    );
    match pattern::validate_topic(&topic) {
        Ok(()) => assert!(valid),
        Err(Error::EmptyTopic) => assert!(topic.is_empty()),
        Err(Error::EmptyTopicSegment(t)) => {
            assert!(!valid && !topic.is_empty());
            assert_eq!(t, topic);
        }
        Err(e) => panic!("validate_topic: unexpected {e:?}"),
    }
    let any = Pattern::parse("**").unwrap();
    assert_eq!(any.matches(&topic), valid, "`**` vs {topic:?}");
    if valid {
        let own = Pattern::parse(&topic).expect("a valid topic parses as a pattern");
        assert!(own.matches(&topic), "{topic:?} does not match itself");
    }

    let parsed = Pattern::parse(&pat);
    let should_parse = !pat.is_empty() && pat.split('.').all(|s| !s.is_empty());

    // The daemon's checks: the 256-character cap, then the rules above.
    let capped = |s: &str| s.chars().count() > MAX_FIELD_LEN;
    let code = |ok: bool, s: &str| match (capped(s), ok) {
        (true, _) => Some("invalid_request"),
        (false, false) => Some("invalid_topic"),
        (false, true) => None,
    };
    assert_eq!(
        model::check_topic(&topic).err().map(|e| e.code()),
        code(valid, &topic),
        "check_topic({topic:?})"
    );
    assert_eq!(
        model::parse_pattern(&pat).err().map(|e| e.code()),
        code(should_parse, &pat),
        "parse_pattern({pat:?})"
    );
    let p = match parsed {
        Err(Error::EmptyPattern) => {
            assert!(pat.is_empty());
            assert!(!pattern::matches(&pat, &topic));
            return;
        }
        Err(Error::EmptyPatternSegment(s)) => {
            assert!(!should_parse, "{pat:?} refused");
            assert_eq!(s, pat);
            assert!(!pattern::matches(&pat, &topic));
            return;
        }
        Err(e) => panic!("Pattern::parse: unexpected {e:?}"),
        Ok(p) => p,
    };
    assert!(should_parse, "{pat:?} accepted");
    assert_eq!(p.as_str(), pat);
    assert_eq!(p.to_string(), pat);

    // Segments: the split pattern, adjacent `**` collapsed.
    let mut want: Vec<Ref<'_>> = ref_segments(&pat);
    want.dedup_by(|b, a| *a == Ref::Any && *b == Ref::Any);
    assert_eq!(p.segments().len(), want.len(), "segments of {pat:?}");
    for (s, w) in p.segments().iter().zip(&want) {
        match (s, w) {
            (Segment::Literal(l), Ref::Lit(r)) => assert_eq!(&**l, *r),
            (Segment::Star, Ref::One) | (Segment::DoubleStar, Ref::Any) => {}
            _ => panic!("segment mismatch in {pat:?}: {s:?}"),
        }
    }
    assert_eq!(
        p.is_literal(),
        want.iter().all(|w| matches!(w, Ref::Lit(_)))
    );
    // Equality follows the collapsed segments.
    let collapsed: Vec<&str> = want
        .iter()
        .map(|w| match w {
            Ref::Lit(l) => *l,
            Ref::One => "*",
            Ref::Any => "**",
        })
        .collect();
    assert_eq!(p, Pattern::parse(&collapsed.join(".")).unwrap());

    let got = p.matches(&topic);
    assert_eq!(got, pattern::matches(&pat, &topic));
    if !valid {
        assert!(!got, "{pat:?} matched the invalid topic {topic:?}");
    }
    if p.is_literal() {
        assert_eq!(got, valid && topic == pat, "literal {pat:?} vs {topic:?}");
    }
    if want.len() <= MAX_SEGMENTS && topic.split('.').count() <= MAX_SEGMENTS {
        assert_eq!(got, reference(&pat, &topic), "{pat:?} vs {topic:?}");
    }
});
