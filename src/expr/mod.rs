//! Segment expressions: the syntax tree shared by the text language and the protobuf tree.
//!
//! The tree is purely syntactic: attribute names are not resolved and `NOW` is not anchored.
//! [`crate::engine`] binds a tree to a dataset (checking names and kinds) before evaluating it.
//!
//! # Layout
//! - [`parse`]: text → tree, with `line:column` errors.
//! - [`print`]: tree → canonical text; `parse(print(e)) == e` for every parsed tree (and every
//!   built tree whose AND/OR have two or more operands, lists are non-empty, names are valid
//!   identifiers and floats are finite).

pub mod parse;
pub mod print;

pub use parse::{parse, parse_bounded, parse_with_limit, ParseError, DEFAULT_MAX_DEPTH};

/// A boolean expression over one dataset's users.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Expr {
    /// All children hold. Never empty once parsed.
    And(Vec<Expr>),
    /// At least one child holds. Never empty once parsed.
    Or(Vec<Expr>),
    /// The complement among the dataset's live users.
    Not(Box<Expr>),
    /// A leaf test.
    Predicate(Predicate),
}

/// A leaf test on one attribute, one saved segment or (later) one event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Predicate {
    /// `attr = lit`, or `attr != lit` when `negated`.
    Equals {
        attribute: String,
        value: Literal,
        negated: bool,
    },
    /// `attr IN (lits)`, or `attr NOT IN (lits)` when `negated`.
    In {
        attribute: String,
        values: Vec<Literal>,
        negated: bool,
    },
    /// `attr HAS lit`.
    Has { attribute: String, value: Literal },
    /// `attr HAS ANY (lits)`.
    HasAny {
        attribute: String,
        values: Vec<Literal>,
    },
    /// `attr HAS ALL (lits)`.
    HasAll {
        attribute: String,
        values: Vec<Literal>,
    },
    /// `attr < value` and friends.
    Compare {
        attribute: String,
        op: CompareOp,
        value: Value,
    },
    /// `attr BETWEEN low AND high`, both ends inclusive.
    Between {
        attribute: String,
        low: Value,
        high: Value,
    },
    /// `attr IS NULL`, or `attr IS NOT NULL` when `negated`.
    IsNull { attribute: String, negated: bool },
    /// `SEGMENT "id"`: the members of a saved segment.
    Segment { id: String },
    /// `DID event [AT LEAST k TIMES] [window]`: users with at least `at_least` (default 1)
    /// events named `event` in the window (default: all retained history).
    Did {
        event: String,
        /// `None` when the text has no `AT LEAST` (kept apart from `Some(1)` to round-trip).
        at_least: Option<u64>,
        window: Option<Window>,
    },
}

/// The time window of a DID predicate: always half-open, `[start, end)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Window {
    /// `IN LAST 30d`: `[as_of - 30d, as_of)`.
    Last(Duration),
    /// `BETWEEN start AND end`: `[start, end)`.
    Between { start: Value, end: Value },
}

/// The operator of a [`Predicate::Compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    /// The operator as written in the text language.
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }
}

/// A constant written in an expression.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Literal {
    String(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// The right-hand side of a comparison: a constant or a time relative to the request's `as_of`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Literal(Literal),
    /// `NOW`, `NOW - 30d`, `NOW + 12h`: `as_of` shifted by `offset` (which may be absent).
    Now {
        offset: Option<SignedDuration>,
    },
}

/// `- 30d` or `+ 12h` after `NOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedDuration {
    /// True for `NOW - d`.
    pub negative: bool,
    pub duration: Duration,
}

/// A duration as written (`30d`, `12h`, `90m`); the unit is kept so that text round-trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Duration {
    pub amount: u64,
    pub unit: DurationUnit,
}

/// The unit of a [`Duration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DurationUnit {
    Days,
    Hours,
    Minutes,
}

impl Duration {
    /// The duration in milliseconds, saturating on overflow (a window larger than time itself).
    pub fn as_millis(self) -> i64 {
        let unit_ms: i64 = match self.unit {
            DurationUnit::Days => 86_400_000,
            DurationUnit::Hours => 3_600_000,
            DurationUnit::Minutes => 60_000,
        };
        i64::try_from(self.amount)
            .unwrap_or(i64::MAX)
            .saturating_mul(unit_ms)
    }
}

impl SignedDuration {
    /// The signed offset in milliseconds.
    pub fn as_millis(self) -> i64 {
        let ms = self.duration.as_millis();
        if self.negative {
            -ms
        } else {
            ms
        }
    }
}

impl Expr {
    /// The depth of the tree: 1 for a lone predicate.
    pub fn depth(&self) -> usize {
        match self {
            Expr::And(children) | Expr::Or(children) => {
                1 + children.iter().map(Expr::depth).max().unwrap_or(0)
            }
            Expr::Not(child) => 1 + child.depth(),
            Expr::Predicate(_) => 1,
        }
    }

    /// The number of nodes in the tree, each literal of an `IN`, `HAS ANY` or `HAS ALL` list
    /// counted as one: a list of a million values costs what a million predicates cost.
    pub fn size(&self) -> usize {
        match self {
            Expr::And(children) | Expr::Or(children) => {
                1 + children.iter().map(Expr::size).sum::<usize>()
            }
            Expr::Not(child) => 1 + child.size(),
            Expr::Predicate(
                Predicate::In { values, .. }
                | Predicate::HasAny { values, .. }
                | Predicate::HasAll { values, .. },
            ) => 1 + values.len(),
            Expr::Predicate(_) => 1,
        }
    }

    /// Every saved segment id this expression names directly.
    pub fn segment_refs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_segment_refs(&mut out);
        out
    }

    fn collect_segment_refs<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::And(children) | Expr::Or(children) => {
                children.iter().for_each(|c| c.collect_segment_refs(out))
            }
            Expr::Not(child) => child.collect_segment_refs(out),
            Expr::Predicate(Predicate::Segment { id }) => out.push(id),
            Expr::Predicate(_) => {}
        }
    }

    /// Every leaf predicate, depth first.
    pub fn predicates(&self) -> Vec<&Predicate> {
        let mut out = Vec::new();
        let mut stack = vec![self];
        while let Some(expr) = stack.pop() {
            match expr {
                Expr::And(children) | Expr::Or(children) => stack.extend(children.iter().rev()),
                Expr::Not(child) => stack.push(child),
                Expr::Predicate(p) => out.push(p),
            }
        }
        out
    }
}

impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&print::to_text(self))
    }
}
