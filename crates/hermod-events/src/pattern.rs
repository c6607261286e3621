//! Topic and pattern syntax, and the subscription pattern matcher.
//!
//! Topics are `.`-separated, non-empty segments (`tui.tool.start`). A pattern
//! has the same shape, with two wildcard segments:
//!
//! * `*` matches exactly one segment: `tui.*` matches `tui.tool`, but neither
//!   `tui` nor `tui.tool.start`;
//! * `**` matches zero or more segments, anywhere in the pattern: `tui.**`
//!   matches `tui`, `tui.tool` and `tui.tool.start`; `a.**.z` matches `a.z`,
//!   `a.b.z` and `a.b.c.z`; `**` alone matches every topic.
//!
//! Every other segment matches itself literally (so `a*` is just a segment
//! named `a*`).
//!
//! [`Pattern::matches`] never allocates and runs in `O(pattern × topic)`
//! segment comparisons at worst (the classic two-pointer glob algorithm with a
//! single backtrack point), however many `**` the pattern holds.
//!
//! ```
//! use hermod_events::pattern::Pattern;
//!
//! let p = Pattern::parse("a.**.z").unwrap();
//! assert!(p.matches("a.z"));
//! assert!(p.matches("a.b.c.z"));
//! assert!(!p.matches("a.b.c"));
//! ```

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// One segment of a parsed [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Matches a topic segment equal to this text.
    Literal(Box<str>),
    /// `*`: matches exactly one topic segment.
    Star,
    /// `**`: matches zero or more topic segments.
    DoubleStar,
}

/// A parsed subscription pattern. Cheap to match against many topics.
///
/// Equality and hashing compare the parsed segments, so `a.**.**` equals
/// `a.**` (two adjacent `**` mean the same as one).
#[derive(Debug, Clone)]
pub struct Pattern {
    source: Box<str>,
    segments: Box<[Segment]>,
}

impl Pattern {
    /// Parses a pattern, splitting it into segments once.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyPattern`] for `""`, [`Error::EmptyPatternSegment`] when a
    /// segment is empty (`a..b`, `.a`, `a.`).
    pub fn parse(pattern: &str) -> Result<Self, Error> {
        if pattern.is_empty() {
            return Err(Error::EmptyPattern);
        }
        let mut segments: Vec<Segment> = Vec::new();
        for seg in pattern.split('.') {
            let seg = match seg {
                "" => return Err(Error::EmptyPatternSegment(pattern.to_owned())),
                "*" => Segment::Star,
                "**" => {
                    // `**.**` is the same as `**`: keep one, which also keeps
                    // the matcher's backtracking short.
                    if segments.last() == Some(&Segment::DoubleStar) {
                        continue;
                    }
                    Segment::DoubleStar
                }
                lit => Segment::Literal(lit.into()),
            };
            segments.push(seg);
        }
        Ok(Self {
            source: pattern.into(),
            segments: segments.into_boxed_slice(),
        })
    }

    /// The pattern as it was written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The parsed segments (adjacent `**` collapsed into one).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True if the pattern has no wildcard, i.e. it matches one topic only.
    pub fn is_literal(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// True if `topic` matches this pattern. A topic that is not valid (see
    /// [`validate_topic`]) matches nothing. Never allocates.
    pub fn matches(&self, topic: &str) -> bool {
        let segs = &*self.segments;
        let bytes = topic.as_bytes();
        let len = bytes.len();
        // End (exclusive) of the topic segment starting at byte `t`.
        let seg_end = |t: usize| {
            bytes[t..]
                .iter()
                .position(|&b| b == b'.')
                .map_or(len, |i| t + i)
        };

        // `p`: next pattern segment; `t`: byte offset where the next topic
        // segment starts (`t > len` once the topic is used up). `retry` is the
        // most recent `**`: the pattern index after it, and the topic offset
        // it would resume from if it swallowed one more segment.
        //
        // Every topic segment passes the top of the loop before a `true`
        // answer, so checking for empty segments there rejects invalid
        // topics without a separate pass.
        let mut p = 0;
        let mut t = 0;
        let mut retry: Option<(usize, usize)> = None;
        while t <= len {
            let end = seg_end(t);
            if end == t {
                return false; // empty segment: `""`, `.a`, `a.`, `a..b`
            }
            match segs.get(p) {
                Some(Segment::DoubleStar) => {
                    // Try zero segments first; remember where to come back.
                    retry = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                Some(Segment::Star) => {
                    p += 1;
                    t = end + 1;
                    continue;
                }
                Some(Segment::Literal(lit)) if lit.as_bytes() == &bytes[t..end] => {
                    p += 1;
                    t = end + 1;
                    continue;
                }
                _ => {}
            }
            // Mismatch: let the last `**` swallow one more topic segment.
            // Earlier `**`s never need revisiting: the last one can absorb
            // anything they could have.
            match retry {
                Some((rp, rt)) => {
                    let next = seg_end(rt) + 1;
                    retry = Some((rp, next));
                    p = rp;
                    t = next;
                }
                None => return false,
            }
        }
        // Topic used up: what is left of the pattern must match nothing.
        segs[p..].iter().all(|s| *s == Segment::DoubleStar)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.segments == other.segments
    }
}

impl Eq for Pattern {}

impl std::hash::Hash for Pattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.segments.hash(state);
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for Pattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Pattern {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// Checks that `topic` is a valid topic: non-empty, no empty segment.
///
/// # Errors
///
/// [`Error::EmptyTopic`] for `""`, [`Error::EmptyTopicSegment`] for `a..b`,
/// `.a` or `a.`.
pub fn validate_topic(topic: &str) -> Result<(), Error> {
    if topic.is_empty() {
        Err(Error::EmptyTopic)
    } else if !is_valid_topic(topic) {
        Err(Error::EmptyTopicSegment(topic.to_owned()))
    } else {
        Ok(())
    }
}

/// True if `topic` is valid (see [`validate_topic`]).
pub fn is_valid_topic(topic: &str) -> bool {
    let b = topic.as_bytes();
    !b.is_empty() && b[0] != b'.' && b[b.len() - 1] != b'.' && !b.windows(2).any(|w| w == b"..")
}

/// One-off convenience: parses `pattern` and matches `topic` against it.
/// An invalid pattern matches nothing. Parse once with [`Pattern::parse`] to
/// match many topics.
pub fn matches(pattern: &str, topic: &str) -> bool {
    Pattern::parse(pattern).is_ok_and(|p| p.matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (pattern, topic, expected)
    const CASES: &[(&str, &str, bool)] = &[
        // PROTOCOLS examples, verbatim.
        ("tui.*", "tui.tool", true),
        ("tui.*", "tui.tool.start", false),
        ("tui.*", "tui", false),
        ("tui.**", "tui", true),
        ("tui.**", "tui.tool", true),
        ("tui.**", "tui.tool.start", true),
        ("**", "tui", true),
        ("**", "tui.tool", true),
        ("**", "tui.tool.start", true),
        ("**", "x", true),
        // `**` in the middle.
        ("a.**.z", "a.z", true),
        ("a.**.z", "a.b.z", true),
        ("a.**.z", "a.b.c.z", true),
        ("a.**.z", "a.b.c", false),
        ("a.**.z", "b.z", false),
        ("a.**.z", "a", false),
        ("a.**.z", "z", false),
        ("a.**.z", "a.z.z", true),
        ("a.**.z", "a.z.y", false),
        // Literals.
        ("a", "a", true),
        ("a", "b", false),
        ("a", "a.b", false),
        ("a.b", "a", false),
        ("a.b", "a.b", true),
        ("a.b", "a.c", false),
        ("a.b.c", "a.b.c", true),
        ("tool", "tools", false),
        ("tools", "tool", false),
        ("a*", "ab", false),
        ("a*", "a*", true),
        // Single `*`.
        ("*", "a", true),
        ("*", "a.b", false),
        ("*.*", "a.b", true),
        ("*.*", "a", false),
        ("*.*", "a.b.c", false),
        ("*.b", "a.b", true),
        ("*.b", "a.c", false),
        ("a.*.c", "a.b.c", true),
        ("a.*.c", "a.c", false),
        // Leading / trailing `**`.
        ("a.**", "a", true),
        ("a.**", "a.b", true),
        ("a.**", "a.b.c.d", true),
        ("a.**", "b", false),
        ("a.**", "b.a", false),
        ("**.z", "z", true),
        ("**.z", "a.z", true),
        ("**.z", "a.b.z", true),
        ("**.z", "a.z.b", false),
        ("**.z", "a", false),
        ("**.**", "a", true),
        ("**.**", "a.b.c", true),
        ("**.**.**", "a", true),
        ("**.a.**", "a", true),
        ("**.a.**", "x.a.y", true),
        ("**.a.**", "x.b.y", false),
        // `**` next to `*`: at least one segment.
        ("**.*", "a", true),
        ("*.**", "a", true),
        ("*.**", "a.b.c", true),
        ("**.*.**", "a", true),
        ("*.**.*", "a", false),
        ("*.**.*", "a.b", true),
        ("*.**.*", "a.b.c.d", true),
        // Several `**` that need backtracking.
        ("a.**.b.**.c", "a.b.c", true),
        ("a.**.b.**.c", "a.x.b.y.c", true),
        ("a.**.b.**.c", "a.b.b.c.c", true),
        ("a.**.b.**.c", "a.c.b", false),
        ("**.a.b", "a.a.b", true),
        ("**.a.b", "a.a.a.b", true),
        ("**.a.b", "a.b.a", false),
        ("a.b.**.b.c", "a.b.b.c", true),
        ("a.b.**.b.c", "a.b.c", false),
    ];

    #[test]
    fn table() {
        for &(pattern, topic, want) in CASES {
            let p = Pattern::parse(pattern).unwrap();
            assert_eq!(p.matches(topic), want, "{pattern:?} vs {topic:?}");
            assert_eq!(matches(pattern, topic), want, "{pattern:?} vs {topic:?}");
        }
    }

    #[test]
    fn long_topics() {
        let segs: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
        let topic = segs.join(".");
        let cases = [
            ("**", true),
            ("s0.**", true),
            ("**.s199", true),
            ("s0.**.s199", true),
            ("s0.**.s100.**.s199", true),
            ("s0.**.s100.**.s100", false),
            ("**.s5.s6.**", true),
            ("**.s6.s5.**", false),
            ("*.**", true),
            ("s0.*", false),
        ];
        for (pattern, want) in cases {
            assert_eq!(
                Pattern::parse(pattern).unwrap().matches(&topic),
                want,
                "{pattern}"
            );
        }
        let exact = Pattern::parse(&topic).unwrap();
        assert!(exact.matches(&topic));
        assert!(!exact.matches(&segs[..199].join(".")));
        let stars = Pattern::parse(&vec!["*"; 200].join(".")).unwrap();
        assert!(stars.matches(&topic));
        assert!(!stars.matches(&segs[..199].join(".")));
    }

    #[test]
    fn many_double_stars_do_not_blow_up() {
        // Naive recursion is exponential here; the two-pointer matcher is
        // quadratic at worst.
        let pattern = format!("{}.b", vec!["a.**"; 60].join("."));
        let topic = vec!["a"; 400].join(".");
        let p = Pattern::parse(&pattern).unwrap();
        let start = std::time::Instant::now();
        assert!(!p.matches(&topic));
        assert!(p.matches(&format!("{topic}.b")));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn invalid_topics_match_nothing() {
        let any = Pattern::parse("**").unwrap();
        for topic in ["", ".", "a.", ".a", "a..b"] {
            assert!(!any.matches(topic), "{topic:?}");
            assert!(!Pattern::parse("*").unwrap().matches(topic), "{topic:?}");
        }
    }

    #[test]
    fn parse_errors() {
        assert_eq!(Pattern::parse(""), Err(Error::EmptyPattern));
        for bad in [".", "a..b", ".a", "a.", "**..*"] {
            assert_eq!(
                Pattern::parse(bad),
                Err(Error::EmptyPatternSegment(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert!(!matches("", "a"));
        assert!(!matches("a..b", "a..b"));
    }

    #[test]
    fn topic_validation() {
        assert_eq!(validate_topic(""), Err(Error::EmptyTopic));
        for bad in [".", "a..b", ".a", "a."] {
            assert_eq!(
                validate_topic(bad),
                Err(Error::EmptyTopicSegment(bad.to_owned()))
            );
            assert!(!is_valid_topic(bad));
        }
        for good in ["a", "a.b", "tui.tool.start", "*", "a.**"] {
            assert_eq!(validate_topic(good), Ok(()));
        }
    }

    #[test]
    fn segments_and_equality() {
        let p = Pattern::parse("a.*.**.**.b").unwrap();
        assert_eq!(
            p.segments(),
            &[
                Segment::Literal("a".into()),
                Segment::Star,
                Segment::DoubleStar,
                Segment::Literal("b".into()),
            ]
        );
        assert_eq!(p.as_str(), "a.*.**.**.b");
        assert_eq!(p.to_string(), "a.*.**.**.b");
        assert_eq!(p, "a.*.**.b".parse().unwrap());
        assert!(!p.is_literal());
        assert!(Pattern::parse("a.b").unwrap().is_literal());
    }
}
