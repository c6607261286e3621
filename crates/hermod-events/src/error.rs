//! The crate's error type: what can be wrong with a topic, a pattern or a
//! payload handed to the bus.

/// Why a topic, pattern or payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic must have at least one segment.
    #[error("topic is empty")]
    EmptyTopic,
    /// A subscription pattern must have at least one segment.
    #[error("pattern is empty")]
    EmptyPattern,
    /// A topic had an empty segment (`a..b`, `.a`, `a.`).
    #[error("topic {0:?} has an empty segment")]
    EmptyTopicSegment(String),
    /// A pattern had an empty segment (`a..b`, `.a`, `a.`).
    #[error("pattern {0:?} has an empty segment")]
    EmptyPatternSegment(String),
    /// A JSON payload was neither an object nor `null`.
    #[error("payload must be a JSON object, got {0}")]
    PayloadNotObject(&'static str),
}
