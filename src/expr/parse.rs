//! Text → [`Expr`]: a hand-written lexer and recursive-descent parser for the segment language.
//!
//! The whole input is lexed first and a lexing error becomes the last token, so whichever error
//! comes first in the text is the one reported. The parser recurses only through parentheses and
//! `NOT` (AND and OR chains are loops), and both count against a depth limit, so hostile input
//! gets an error instead of a stack overflow.

use super::{
    CompareOp, Duration, DurationUnit, Expr, Literal, Predicate, SignedDuration, Value, Window,
};

/// The nesting limit of [`parse`]: deep enough for any hand-written segment, shallow enough that
/// the recursion stays far from the end of a thread's stack.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Why a text is not a valid expression, and where (1-based line and column, in characters).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The text nests deeper than the limit: a size limit hit, not a syntax error.
    pub too_deep: bool,
    /// The text holds more tokens than the limit: a size limit hit, found before the rest of
    /// the text is read.
    pub too_long: bool,
}

/// Parses `text` with the [`DEFAULT_MAX_DEPTH`] nesting limit.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    parse_with_limit(text, DEFAULT_MAX_DEPTH)
}

/// Parses `text`, rejecting input that nests parentheses and `NOT`s more than `max_depth` deep.
///
/// AND and OR can only nest through parentheses, so this also bounds their nesting. The printed
/// text of any tree with `depth() <= max_depth + 1` stays within the limit. Each level costs a
/// few KiB of stack in debug builds, so keep `max_depth` in the low hundreds at most.
pub fn parse_with_limit(text: &str, max_depth: usize) -> Result<Expr, ParseError> {
    parse_bounded(text, max_depth, usize::MAX)
}

/// [`parse_with_limit`] that also stops reading after `max_tokens` tokens, so that a huge text
/// costs what its first `max_tokens` tokens cost, not a token list of the whole text.
pub fn parse_bounded(text: &str, max_depth: usize, max_tokens: usize) -> Result<Expr, ParseError> {
    let (tokens, end) = Lexer::new(text).run(max_tokens)?;
    Parser {
        src: text,
        tokens,
        end,
        next: 0,
        depth: 0,
        max_depth,
    }
    .document()
}

/// A place in the input: the byte offset for slicing, line and column for messages.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pos {
    offset: usize,
    line: usize,
    column: usize,
}

impl Pos {
    fn error(self, message: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            column: self.column,
            message: message.into(),
            too_deep: false,
            too_long: false,
        }
    }
}

/// A reserved word; matched case-insensitively, so none of them can name an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    And,
    Or,
    Not,
    In,
    Has,
    Any,
    All,
    Between,
    Is,
    Null,
    Did,
    At,
    Least,
    Times,
    Segment,
    Now,
    True,
    False,
    Last,
}

const KEYWORDS: [(&str, Kw); 19] = [
    ("AND", Kw::And),
    ("OR", Kw::Or),
    ("NOT", Kw::Not),
    ("IN", Kw::In),
    ("HAS", Kw::Has),
    ("ANY", Kw::Any),
    ("ALL", Kw::All),
    ("BETWEEN", Kw::Between),
    ("IS", Kw::Is),
    ("NULL", Kw::Null),
    ("DID", Kw::Did),
    ("AT", Kw::At),
    ("LEAST", Kw::Least),
    ("TIMES", Kw::Times),
    ("SEGMENT", Kw::Segment),
    ("NOW", Kw::Now),
    ("TRUE", Kw::True),
    ("FALSE", Kw::False),
    ("LAST", Kw::Last),
];

/// Whether `word` reads back as an identifier (the identifier rule, and not a keyword).
pub(crate) fn is_plain_identifier(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && keyword(word).is_none()
}

fn keyword(word: &str) -> Option<Kw> {
    KEYWORDS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map(|&(_, kw)| kw)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Kw(Kw),
    Str(String),
    Int(i64),
    Float(f64),
    /// `30d`, or `-30d` when a minus sign touches it (as in `NOW-30d`).
    Duration(SignedDuration),
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    End,
    /// A lexing error; always the last token.
    Error(ParseError),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    start: Pos,
    /// Byte offset just past the token, so messages can quote it as written.
    end: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

struct Lexer<'a> {
    src: &'a str,
    pos: Pos,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer {
            src,
            pos: Pos {
                offset: 0,
                line: 1,
                column: 1,
            },
        }
    }

    /// All tokens, then the final `End` or `Error` token kept apart so it can be returned forever.
    fn run(mut self, max_tokens: usize) -> Result<(Vec<Token>, Token), ParseError> {
        let mut tokens = Vec::new();
        loop {
            let token = self.token();
            if matches!(token.tok, Tok::End | Tok::Error(_)) {
                return Ok((tokens, token));
            }
            if tokens.len() == max_tokens {
                let message = format!("expression is longer than {max_tokens} tokens");
                return Err(ParseError {
                    too_long: true,
                    ..token.start.error(message)
                });
            }
            tokens.push(token);
        }
    }

    fn rest(&self) -> &'a str {
        self.src.get(self.pos.offset..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos.offset += c.len_utf8();
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }

    fn bump_if(&mut self, expected: char) -> bool {
        let hit = self.peek() == Some(expected);
        if hit {
            self.bump();
        }
        hit
    }

    fn since(&self, start: Pos) -> &'a str {
        self.src.get(start.offset..self.pos.offset).unwrap_or("")
    }

    fn token(&mut self) -> Token {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        let start = self.pos;
        let tok = self.scan(start).unwrap_or_else(Tok::Error);
        Token {
            tok,
            start,
            end: self.pos.offset,
        }
    }

    fn scan(&mut self, start: Pos) -> Result<Tok, ParseError> {
        let Some(c) = self.peek() else {
            return Ok(Tok::End);
        };
        let signed_digit = c == '-' && self.peek_second().is_some_and(|d| d.is_ascii_digit());
        if c == '"' {
            self.string(start)
        } else if c.is_ascii_digit() || signed_digit {
            self.number(start)
        } else if c.is_ascii_alphabetic() || c == '_' {
            Ok(self.word(start))
        } else {
            self.bump();
            self.symbol(c)
                .ok_or_else(|| start.error(unexpected_char_message(c)))
        }
    }

    fn symbol(&mut self, c: char) -> Option<Tok> {
        Some(match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            '+' => Tok::Plus,
            '-' => Tok::Minus,
            '=' => Tok::Eq,
            '!' if self.bump_if('=') => Tok::Ne,
            '<' if self.bump_if('=') => Tok::Le,
            '<' => Tok::Lt,
            '>' if self.bump_if('=') => Tok::Ge,
            '>' => Tok::Gt,
            _ => return None,
        })
    }

    fn string(&mut self, start: Pos) -> Result<Tok, ParseError> {
        self.bump();
        let mut value = String::new();
        loop {
            let here = self.pos;
            match self.bump() {
                None => return Err(start.error("unterminated string")),
                Some('"') => return Ok(Tok::Str(value)),
                Some('\\') => value.push(self.escape(start, here)?),
                Some(c) => value.push(c),
            }
        }
    }

    /// Only `\"` and `\\` exist, so that every other backslash is a visible mistake.
    fn escape(&mut self, start: Pos, backslash: Pos) -> Result<char, ParseError> {
        match self.bump() {
            Some(c @ ('"' | '\\')) => Ok(c),
            Some(c) => Err(backslash.error(format!(
                "invalid escape '\\{}' in string (only \\\" and \\\\ are allowed)",
                c.escape_debug()
            ))),
            None => Err(start.error("unterminated string")),
        }
    }

    /// Takes the whole run of number-like characters so that `30x` or `1.2.3` is one bad token.
    fn number(&mut self, start: Pos) -> Result<Tok, ParseError> {
        let mut prev = '-';
        self.bump_if('-');
        while let Some(c) = self.peek() {
            let exponent_sign = matches!(c, '+' | '-') && matches!(prev, 'e' | 'E');
            if !(is_ident_char(c) || exponent_sign) {
                break;
            }
            self.bump();
            prev = c;
        }
        number_token(self.since(start)).map_err(|message| start.error(message))
    }

    fn word(&mut self, start: Pos) -> Tok {
        while self.peek().is_some_and(is_ident_char) {
            self.bump();
        }
        let text = self.since(start);
        keyword(text).map_or_else(|| Tok::Ident(text.to_owned()), Tok::Kw)
    }
}

fn unexpected_char_message(c: char) -> String {
    let hint = if c == '!' {
        " (did you mean '!='?)"
    } else {
        ""
    };
    format!("unexpected character '{}'{hint}", c.escape_debug())
}

fn skip_digits(s: &str) -> &str {
    s.trim_start_matches(|c: char| c.is_ascii_digit())
}

/// Classifies `-?digits` followed by `rest`: an integer, a duration, a float or an error.
fn number_token(text: &str) -> Result<Tok, String> {
    let negative = text.starts_with('-');
    let body = text.strip_prefix('-').unwrap_or(text);
    let rest = skip_digits(body);
    let digits = body.strip_suffix(rest).unwrap_or(body);
    match rest {
        "" => text
            .parse()
            .map(Tok::Int)
            .map_err(|_| format!("integer {text} does not fit in 64 bits")),
        "d" | "h" | "m" => duration_token(text, digits, rest, negative),
        _ if is_fraction_or_exponent(rest) => float_token(text),
        _ if is_unit_like(rest) => Err(format!(
            "unknown duration unit '{rest}' in '{text}' (expected d, h or m)"
        )),
        _ => Err(format!("malformed number '{text}'")),
    }
}

/// `.5`, `e9`, `.5e-3`: what may follow the integer digits of a float.
fn is_fraction_or_exponent(rest: &str) -> bool {
    let after_fraction = match rest.strip_prefix('.') {
        Some(fraction) if skip_digits(fraction).len() == fraction.len() => return false,
        Some(fraction) => skip_digits(fraction),
        None => rest,
    };
    if after_fraction.is_empty() {
        return true;
    }
    let Some(exponent) = after_fraction.strip_prefix(['e', 'E']) else {
        return false;
    };
    let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    !exponent.is_empty() && skip_digits(exponent).is_empty()
}

/// Letters after an integer look like a unit (`30s`), unless they start an exponent (`1e`).
fn is_unit_like(rest: &str) -> bool {
    !rest.starts_with(['e', 'E']) && rest.chars().all(|c| c.is_ascii_alphabetic())
}

fn duration_token(text: &str, digits: &str, unit: &str, negative: bool) -> Result<Tok, String> {
    let amount = digits
        .parse()
        .map_err(|_| format!("duration {text} is too large"))?;
    let unit = match unit {
        "d" => DurationUnit::Days,
        "h" => DurationUnit::Hours,
        _ => DurationUnit::Minutes,
    };
    Ok(Tok::Duration(SignedDuration {
        negative,
        duration: Duration { amount, unit },
    }))
}

fn float_token(text: &str) -> Result<Tok, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(Tok::Float(value)),
        Ok(_) => Err(format!("number {text} is too large")),
        Err(_) => Err(format!("malformed number '{text}'")),
    }
}

fn literal_of(tok: &Tok) -> Option<Literal> {
    Some(match tok {
        Tok::Str(s) => Literal::String(s.clone()),
        Tok::Int(i) => Literal::Int(*i),
        Tok::Float(f) => Literal::Float(*f),
        Tok::Kw(Kw::True) => Literal::Bool(true),
        Tok::Kw(Kw::False) => Literal::Bool(false),
        _ => return None,
    })
}

fn compare_op(tok: &Tok) -> Option<CompareOp> {
    Some(match tok {
        Tok::Lt => CompareOp::Lt,
        Tok::Le => CompareOp::Le,
        Tok::Gt => CompareOp::Gt,
        Tok::Ge => CompareOp::Ge,
        _ => return None,
    })
}

/// One child is itself; several become the n-ary node built by `node`.
fn collapse(mut items: Vec<Expr>, node: fn(Vec<Expr>) -> Expr) -> Expr {
    match items.pop() {
        Some(only) if items.is_empty() => only,
        Some(last) => {
            items.push(last);
            node(items)
        }
        None => node(items),
    }
}

/// The longest token text quoted in a message, so a huge string literal cannot flood a log.
const MAX_QUOTED_CHARS: usize = 40;

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    /// `End` or the lexing error; what every read past the last token sees.
    end: Token,
    next: usize,
    depth: usize,
    max_depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        self.tokens.get(self.next).unwrap_or(&self.end)
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        self.next = (self.next + 1).min(self.tokens.len());
        token
    }

    fn eat(&mut self, kw: Kw) -> Option<Token> {
        (self.peek().tok == Tok::Kw(kw)).then(|| self.advance())
    }

    fn text(&self, token: &Token) -> &str {
        self.src.get(token.start.offset..token.end).unwrap_or("")
    }

    fn describe(&self, token: &Token) -> String {
        if token.tok == Tok::End {
            return "end of input".to_owned();
        }
        let text = self.text(token);
        match text.char_indices().nth(MAX_QUOTED_CHARS) {
            Some((cut, _)) => format!("'{}...'", text.get(..cut).unwrap_or(text)),
            None => format!("'{text}'"),
        }
    }

    /// The error for meeting `token` where `expected` belongs; a lexing error wins, since it is
    /// the real reason the token is not what was expected.
    fn unexpected(&self, token: &Token, expected: &str) -> ParseError {
        if let Tok::Error(error) = &token.tok {
            return error.clone();
        }
        token.start.error(format!(
            "expected {expected}, found {}",
            self.describe(token)
        ))
    }

    fn document(mut self) -> Result<Expr, ParseError> {
        if self.peek().tok == Tok::End {
            return Err(self.unexpected(self.peek(), "an expression"));
        }
        let expr = self.expr()?;
        let after = self.advance();
        match after.tok {
            Tok::End => Ok(expr),
            _ => Err(self.unexpected(&after, "AND, OR or end of input")),
        }
    }

    fn expr(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.term()?];
        while self.eat(Kw::Or).is_some() {
            terms.push(self.term()?);
        }
        Ok(collapse(terms, Expr::Or))
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        let mut factors = vec![self.factor()?];
        while self.eat(Kw::And).is_some() {
            factors.push(self.factor()?);
        }
        Ok(collapse(factors, Expr::And))
    }

    fn factor(&mut self) -> Result<Expr, ParseError> {
        if let Some(not) = self.eat(Kw::Not) {
            let inner = self.nested(&not, Self::factor)?;
            return Ok(Expr::Not(Box::new(inner)));
        }
        if self.peek().tok == Tok::LParen {
            return self.group();
        }
        self.predicate().map(Expr::Predicate)
    }

    /// Runs `inner` one level deeper; the only way the parser recurses, so the only check needed.
    fn nested<T>(
        &mut self,
        opener: &Token,
        inner: fn(&mut Self) -> Result<T, ParseError>,
    ) -> Result<T, ParseError> {
        if self.depth >= self.max_depth {
            let message = format!("expression nests deeper than {} levels", self.max_depth);
            return Err(ParseError {
                too_deep: true,
                ..opener.start.error(message)
            });
        }
        self.depth += 1;
        let result = inner(self);
        self.depth -= 1;
        result
    }

    fn group(&mut self) -> Result<Expr, ParseError> {
        let open = self.advance();
        let inner = self.nested(&open, Self::expr)?;
        let close = self.advance();
        if close.tok == Tok::RParen {
            return Ok(inner);
        }
        let (line, column) = (open.start.line, open.start.column);
        Err(self.unexpected(&close, &format!("')' to close the '(' at {line}:{column}")))
    }

    fn predicate(&mut self) -> Result<Predicate, ParseError> {
        let first = self.advance();
        match &first.tok {
            Tok::Ident(name) => self.attribute_test(name.clone()),
            Tok::Kw(Kw::Segment) => self.segment(&first),
            Tok::Kw(Kw::Did) => self.did(&first),
            _ => Err(self.unexpected(&first, "an attribute name")),
        }
    }

    /// `DID event [AT LEAST k TIMES] [IN LAST d | BETWEEN v AND v]`.
    fn did(&mut self, did: &Token) -> Result<Predicate, ParseError> {
        let name = self.advance();
        let event = match name.tok {
            Tok::Ident(event) | Tok::Str(event) => event,
            _ => {
                let expected = format!("an event name after '{}'", self.text(did));
                return Err(self.unexpected(&name, &expected));
            }
        };
        let at_least = match self.eat(Kw::At) {
            Some(at) => Some(self.at_least(&at)?),
            None => None,
        };
        let window = if let Some(in_kw) = self.eat(Kw::In) {
            let Some(last) = self.eat(Kw::Last) else {
                let expected = format!("'LAST' after '{}'", self.text(&in_kw));
                return Err(self.unexpected(self.peek(), &expected));
            };
            Some(Window::Last(self.unsigned_duration_after(&last)?))
        } else if let Some(between) = self.eat(Kw::Between) {
            let start = self.value_after(&between)?;
            let Some(and) = self.eat(Kw::And) else {
                let expected = format!("'AND' after the start of '{}'", self.text(&between));
                return Err(self.unexpected(self.peek(), &expected));
            };
            let end = self.value_after(&and)?;
            Some(Window::Between { start, end })
        } else {
            None
        };
        Ok(Predicate::Did {
            event,
            at_least,
            window,
        })
    }

    /// `LEAST k TIMES` after `AT`, with `k >= 1`.
    fn at_least(&mut self, at: &Token) -> Result<u64, ParseError> {
        let Some(least) = self.eat(Kw::Least) else {
            let expected = format!("'LEAST' after '{}'", self.text(at));
            return Err(self.unexpected(self.peek(), &expected));
        };
        let count = self.advance();
        let k = match count.tok {
            Tok::Int(k) if k >= 1 => k as u64,
            Tok::Int(_) => return Err(count.start.error("AT LEAST needs a count of 1 or more")),
            _ => {
                let expected = format!("a count after '{}'", self.text(&least));
                return Err(self.unexpected(&count, &expected));
            }
        };
        if self.eat(Kw::Times).is_none() {
            return Err(self.unexpected(self.peek(), "'TIMES' after the count"));
        }
        Ok(k)
    }

    fn segment(&mut self, keyword: &Token) -> Result<Predicate, ParseError> {
        let id = self.advance();
        match id.tok {
            Tok::Str(id) => Ok(Predicate::Segment { id }),
            _ => {
                let expected = format!("a segment id string after '{}'", self.text(keyword));
                Err(self.unexpected(&id, &expected))
            }
        }
    }

    fn attribute_test(&mut self, attribute: String) -> Result<Predicate, ParseError> {
        let op = self.advance();
        if let Some(cmp) = compare_op(&op.tok) {
            let value = self.value_after(&op)?;
            return Ok(Predicate::Compare {
                attribute,
                op: cmp,
                value,
            });
        }
        match op.tok {
            Tok::Eq | Tok::Ne => Ok(Predicate::Equals {
                value: self.literal_after(&op)?,
                negated: op.tok == Tok::Ne,
                attribute,
            }),
            Tok::Kw(Kw::In) => Ok(Predicate::In {
                values: self.list_after(&op)?,
                negated: false,
                attribute,
            }),
            Tok::Kw(Kw::Not) => self.not_in(attribute, &op),
            Tok::Kw(Kw::Has) => self.has(attribute, &op),
            Tok::Kw(Kw::Between) => self.between(attribute, &op),
            Tok::Kw(Kw::Is) => self.is_null(attribute, &op),
            _ => {
                let expected = format!(
                    "an operator (=, !=, <, <=, >, >=, IN, NOT IN, HAS, BETWEEN or IS) \
                     after '{attribute}'"
                );
                Err(self.unexpected(&op, &expected))
            }
        }
    }

    fn not_in(&mut self, attribute: String, not: &Token) -> Result<Predicate, ParseError> {
        let Some(in_kw) = self.eat(Kw::In) else {
            let expected = format!("'IN' after '{}'", self.text(not));
            return Err(self.unexpected(self.peek(), &expected));
        };
        Ok(Predicate::In {
            values: self.list_after(&in_kw)?,
            negated: true,
            attribute,
        })
    }

    fn has(&mut self, attribute: String, has: &Token) -> Result<Predicate, ParseError> {
        if let Some(any) = self.eat(Kw::Any) {
            let values = self.list_after(&any)?;
            return Ok(Predicate::HasAny { attribute, values });
        }
        if let Some(all) = self.eat(Kw::All) {
            let values = self.list_after(&all)?;
            return Ok(Predicate::HasAll { attribute, values });
        }
        let value = self.literal_after(has)?;
        Ok(Predicate::Has { attribute, value })
    }

    /// The `AND` between the bounds belongs to BETWEEN, so it is consumed here, not by `term`.
    fn between(&mut self, attribute: String, between: &Token) -> Result<Predicate, ParseError> {
        let low = self.value_after(between)?;
        let Some(and) = self.eat(Kw::And) else {
            let expected = format!("'AND' after the lower bound of '{}'", self.text(between));
            return Err(self.unexpected(self.peek(), &expected));
        };
        let high = self.value_after(&and)?;
        Ok(Predicate::Between {
            attribute,
            low,
            high,
        })
    }

    fn is_null(&mut self, attribute: String, is: &Token) -> Result<Predicate, ParseError> {
        let negated = self.eat(Kw::Not).is_some();
        if self.eat(Kw::Null).is_some() {
            return Ok(Predicate::IsNull { attribute, negated });
        }
        let expected = if negated {
            format!("'NULL' after '{} NOT'", self.text(is))
        } else {
            format!("'NULL' or 'NOT NULL' after '{}'", self.text(is))
        };
        Err(self.unexpected(self.peek(), &expected))
    }

    fn literal_after(&mut self, op: &Token) -> Result<Literal, ParseError> {
        let token = self.advance();
        literal_of(&token.tok).ok_or_else(|| {
            let expected = format!("a value after '{}'", self.text(op));
            self.unexpected(&token, &expected)
        })
    }

    /// `( lit, lit, ... )` after `IN`, `ANY` or `ALL`; never empty.
    fn list_after(&mut self, op: &Token) -> Result<Vec<Literal>, ParseError> {
        let open = self.advance();
        if open.tok != Tok::LParen {
            let expected = format!("'(' after '{}'", self.text(op));
            return Err(self.unexpected(&open, &expected));
        }
        let mut values = vec![self.literal_after(&open)?];
        loop {
            let token = self.advance();
            match token.tok {
                Tok::Comma => values.push(self.literal_after(&token)?),
                Tok::RParen => return Ok(values),
                _ => return Err(self.unexpected(&token, "',' or ')' in the list")),
            }
        }
    }

    fn value_after(&mut self, op: &Token) -> Result<Value, ParseError> {
        if self.eat(Kw::Now).is_some() {
            return Ok(Value::Now {
                offset: self.now_offset()?,
            });
        }
        self.literal_after(op).map(Value::Literal)
    }

    /// The optional `- 30d` / `+ 12h` after `NOW`; `NOW-30d` lexes its sign into the duration.
    fn now_offset(&mut self) -> Result<Option<SignedDuration>, ParseError> {
        match self.peek().tok {
            Tok::Duration(offset) if offset.negative => {
                self.advance();
                Ok(Some(offset))
            }
            Tok::Minus | Tok::Plus => {
                let sign = self.advance();
                let duration = self.unsigned_duration_after(&sign)?;
                Ok(Some(SignedDuration {
                    negative: sign.tok == Tok::Minus,
                    duration,
                }))
            }
            _ => Ok(None),
        }
    }

    fn unsigned_duration_after(&mut self, sign: &Token) -> Result<Duration, ParseError> {
        let token = self.advance();
        match token.tok {
            Tok::Duration(SignedDuration {
                negative: false,
                duration,
            }) => Ok(duration),
            _ => {
                let expected = format!("a duration such as 30d after '{}'", self.text(sign));
                Err(self.unexpected(&token, &expected))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(text: &str) -> Expr {
        match parse(text) {
            Ok(expr) => expr,
            Err(error) => panic!("{text:?} failed to parse: {error}"),
        }
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(expr) => panic!("{text:?} parsed as {expr:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn pred(p: Predicate) -> Expr {
        Expr::Predicate(p)
    }

    fn eq(attribute: &str, value: Literal) -> Expr {
        pred(Predicate::Equals {
            attribute: attribute.into(),
            value,
            negated: false,
        })
    }

    fn int(attribute: &str, value: i64) -> Expr {
        eq(attribute, Literal::Int(value))
    }

    fn s(value: &str) -> Literal {
        Literal::String(value.into())
    }

    fn days(amount: u64, negative: bool) -> Option<SignedDuration> {
        Some(SignedDuration {
            negative,
            duration: Duration {
                amount,
                unit: DurationUnit::Days,
            },
        })
    }

    #[test]
    fn equals_and_not_equals() {
        assert_eq!(ok(r#"country = "US""#), eq("country", s("US")));
        assert_eq!(
            ok("age != 5"),
            pred(Predicate::Equals {
                attribute: "age".into(),
                value: Literal::Int(5),
                negated: true,
            })
        );
        assert_eq!(ok("vip = TRUE"), eq("vip", Literal::Bool(true)));
        assert_eq!(ok("vip = false"), eq("vip", Literal::Bool(false)));
    }

    #[test]
    fn in_and_not_in() {
        let values = vec![s("US"), s("GB")];
        assert_eq!(
            ok(r#"country IN ("US", "GB")"#),
            pred(Predicate::In {
                attribute: "country".into(),
                values: values.clone(),
                negated: false,
            })
        );
        assert_eq!(
            ok(r#"country not in ("US","GB")"#),
            pred(Predicate::In {
                attribute: "country".into(),
                values,
                negated: true,
            })
        );
    }

    #[test]
    fn has_forms() {
        assert_eq!(
            ok(r#"tags HAS "a""#),
            pred(Predicate::Has {
                attribute: "tags".into(),
                value: s("a"),
            })
        );
        assert_eq!(
            ok("tags HAS ANY (1, 2.5)"),
            pred(Predicate::HasAny {
                attribute: "tags".into(),
                values: vec![Literal::Int(1), Literal::Float(2.5)],
            })
        );
        assert_eq!(
            ok("tags has all (true)"),
            pred(Predicate::HasAll {
                attribute: "tags".into(),
                values: vec![Literal::Bool(true)],
            })
        );
    }

    #[test]
    fn comparisons() {
        let cases = [
            ("<", CompareOp::Lt),
            ("<=", CompareOp::Le),
            (">", CompareOp::Gt),
            (">=", CompareOp::Ge),
        ];
        for (symbol, op) in cases {
            assert_eq!(
                ok(&format!("age {symbol} -3")),
                pred(Predicate::Compare {
                    attribute: "age".into(),
                    op,
                    value: Value::Literal(Literal::Int(-3)),
                })
            );
        }
    }

    #[test]
    fn now_values() {
        let compare = |value| {
            pred(Predicate::Compare {
                attribute: "seen".into(),
                op: CompareOp::Gt,
                value,
            })
        };
        assert_eq!(ok("seen > NOW"), compare(Value::Now { offset: None }));
        assert_eq!(
            ok("seen > now - 30d"),
            compare(Value::Now {
                offset: days(30, true)
            })
        );
        assert_eq!(
            ok("seen > NOW-30d"),
            compare(Value::Now {
                offset: days(30, true)
            })
        );
        assert_eq!(
            ok("seen > NOW +12h"),
            compare(Value::Now {
                offset: Some(SignedDuration {
                    negative: false,
                    duration: Duration {
                        amount: 12,
                        unit: DurationUnit::Hours,
                    },
                })
            })
        );
        let minutes = ok("seen > NOW + 90m");
        let Expr::Predicate(Predicate::Compare {
            value: Value::Now {
                offset: Some(offset),
            },
            ..
        }) = minutes
        else {
            panic!("{minutes:?}");
        };
        assert_eq!(offset.duration.unit, DurationUnit::Minutes);
    }

    #[test]
    fn between_owns_its_and() {
        let between = pred(Predicate::Between {
            attribute: "age".into(),
            low: Value::Literal(Literal::Int(25)),
            high: Value::Literal(Literal::Int(34)),
        });
        assert_eq!(ok("age BETWEEN 25 AND 34"), between);
        assert_eq!(
            ok("age BETWEEN 25 AND 34 AND x = 1"),
            Expr::And(vec![between, int("x", 1)])
        );
        assert_eq!(
            ok("t between now - 1d and now"),
            pred(Predicate::Between {
                attribute: "t".into(),
                low: Value::Now {
                    offset: days(1, true)
                },
                high: Value::Now { offset: None },
            })
        );
    }

    #[test]
    fn is_null_and_segment() {
        assert_eq!(
            ok("email IS NULL"),
            pred(Predicate::IsNull {
                attribute: "email".into(),
                negated: false,
            })
        );
        assert_eq!(
            ok("email is not null"),
            pred(Predicate::IsNull {
                attribute: "email".into(),
                negated: true,
            })
        );
        assert_eq!(
            ok(r#"SEGMENT "seg-1""#),
            pred(Predicate::Segment { id: "seg-1".into() })
        );
    }

    #[test]
    fn numbers() {
        let value = |text: &str| match ok(&format!("x = {text}")) {
            Expr::Predicate(Predicate::Equals { value, .. }) => value,
            other => panic!("{other:?}"),
        };
        assert_eq!(value("0"), Literal::Int(0));
        assert_eq!(value("-9223372036854775808"), Literal::Int(i64::MIN));
        assert_eq!(value("9223372036854775807"), Literal::Int(i64::MAX));
        assert_eq!(value("1.5"), Literal::Float(1.5));
        assert_eq!(value("-2.5e3"), Literal::Float(-2500.0));
        assert_eq!(value("1e9"), Literal::Float(1e9));
        assert_eq!(value("1E-7"), Literal::Float(1e-7));
        assert_eq!(value("2.0e+2"), Literal::Float(200.0));
    }

    #[test]
    fn did_takes_every_form_of_the_grammar() {
        let did = |event: &str, at_least, window| {
            pred(Predicate::Did {
                event: event.into(),
                at_least,
                window,
            })
        };
        let days = |amount| Duration {
            amount,
            unit: DurationUnit::Days,
        };
        assert_eq!(ok("DID purchase"), did("purchase", None, None));
        assert_eq!(
            ok(r#"did "add to cart" at least 3 times in last 14d"#),
            did("add to cart", Some(3), Some(Window::Last(days(14))))
        );
        assert_eq!(
            ok(r#"DID x BETWEEN "2026-01-01T00:00:00Z" AND NOW - 1d AND a = 1"#),
            Expr::And(vec![
                did(
                    "x",
                    None,
                    Some(Window::Between {
                        start: Value::Literal(Literal::String("2026-01-01T00:00:00Z".into())),
                        end: Value::Now {
                            offset: Some(SignedDuration {
                                negative: true,
                                duration: days(1),
                            }),
                        },
                    }),
                ),
                eq("a", Literal::Int(1)),
            ])
        );
        assert_eq!(
            ok("NOT DID purchase IN LAST 90m"),
            Expr::Not(Box::new(did(
                "purchase",
                None,
                Some(Window::Last(Duration {
                    amount: 90,
                    unit: DurationUnit::Minutes,
                })),
            )))
        );
    }

    #[test]
    fn identifiers_keep_case_and_dots() {
        assert_eq!(ok("User.Profile_2.Age = 1"), int("User.Profile_2.Age", 1));
        assert_eq!(ok("_x = 1"), int("_x", 1));
        assert_eq!(ok("nowhere = 1"), int("nowhere", 1));
    }

    #[test]
    fn escapes() {
        assert_eq!(
            ok(r#"a = "say \"hi\" \\ there""#),
            eq("a", s(r#"say "hi" \ there"#))
        );
        assert_eq!(ok("a = \"é\n😀\""), eq("a", s("é\n😀")));
    }

    #[test]
    fn precedence_not_and_or() {
        let (a, b, c) = (int("a", 1), int("b", 2), int("c", 3));
        let not = |e: Expr| Expr::Not(Box::new(e));
        assert_eq!(
            ok("a = 1 OR b = 2 AND c = 3"),
            Expr::Or(vec![a.clone(), Expr::And(vec![b.clone(), c.clone()])])
        );
        assert_eq!(
            ok("NOT a = 1 AND b = 2"),
            Expr::And(vec![not(a.clone()), b.clone()])
        );
        assert_eq!(
            ok("NOT (a = 1 OR b = 2)"),
            not(Expr::Or(vec![a.clone(), b.clone()]))
        );
        assert_eq!(ok("not not a = 1"), not(not(a.clone())));
        assert_eq!(
            ok("a = 1 AND b = 2 AND c = 3"),
            Expr::And(vec![a.clone(), b.clone(), c.clone()])
        );
        assert_eq!(
            ok("(a = 1 AND b = 2) AND c = 3"),
            Expr::And(vec![Expr::And(vec![a.clone(), b.clone()]), c.clone()])
        );
        assert_eq!(ok("((a = 1))"), a);
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(ok("a = 1 or b = 2"), ok("a = 1 OR b = 2"));
        assert_eq!(ok("a iS nOt NuLl"), ok("a IS NOT NULL"));
        assert_eq!(ok("segment \"x\""), ok("SEGMENT \"x\""));
    }

    #[test]
    fn errors_name_expected_and_found() {
        let cases = [
            (
                r#"country = "US" AND = 5"#,
                "1:20: expected an attribute name, found '='",
            ),
            (
                "age = AND x = 1",
                "1:7: expected a value after '=', found 'AND'",
            ),
            (
                "age = 1 AND",
                "1:12: expected an attribute name, found end of input",
            ),
            ("", "1:1: expected an expression, found end of input"),
            ("  \n ", "2:2: expected an expression, found end of input"),
            (
                "a = 1 b = 2",
                "1:7: expected AND, OR or end of input, found 'b'",
            ),
            (
                "(a = 1",
                "1:7: expected ')' to close the '(' at 1:1, found end of input",
            ),
            ("a = 1)", "1:6: expected AND, OR or end of input, found ')'"),
            ("a IN 1", "1:6: expected '(' after 'IN', found '1'"),
            ("a IN ()", "1:7: expected a value after '(', found ')'"),
            (
                "a IN (1 2)",
                "1:9: expected ',' or ')' in the list, found '2'",
            ),
            ("a IN (1,)", "1:9: expected a value after ',', found ')'"),
            ("a not 5", "1:7: expected 'IN' after 'not', found '5'"),
            (
                "a IS 5",
                "1:6: expected 'NULL' or 'NOT NULL' after 'IS', found '5'",
            ),
            (
                "a IS NOT 5",
                "1:10: expected 'NULL' after 'IS NOT', found '5'",
            ),
            (
                "a BETWEEN 1 OR 2",
                "1:13: expected 'AND' after the lower bound of 'BETWEEN', found 'OR'",
            ),
            ("a HAS ANY 1", "1:11: expected '(' after 'ANY', found '1'"),
            (
                "a HAS",
                "1:6: expected a value after 'HAS', found end of input",
            ),
            ("a < b", "1:5: expected a value after '<', found 'b'"),
            ("a < 30d", "1:5: expected a value after '<', found '30d'"),
            (
                "a < NOW - 5",
                "1:11: expected a duration such as 30d after '-', found '5'",
            ),
            (
                "a < NOW + -5d",
                "1:11: expected a duration such as 30d after '+', found '-5d'",
            ),
            (
                "SEGMENT seg",
                "1:9: expected a segment id string after 'SEGMENT', found 'seg'",
            ),
            ("NOW = 1", "1:1: expected an attribute name, found 'NOW'"),
            ("a = - 1", "1:5: expected a value after '=', found '-'"),
            ("a = NaN", "1:5: expected a value after '=', found 'NaN'"),
            ("a = -inf", "1:5: expected a value after '=', found '-'"),
            ("a ~ 1", "1:3: unexpected character '~'"),
            (
                "DID",
                "1:4: expected an event name after 'DID', found end of input",
            ),
            (
                "DID x AT 2 TIMES",
                "1:10: expected 'LEAST' after 'AT', found '2'",
            ),
            (
                "DID x AT LEAST 0 TIMES",
                "1:16: AT LEAST needs a count of 1 or more",
            ),
            (
                "DID x AT LEAST 2",
                "1:17: expected 'TIMES' after the count, found end of input",
            ),
            (
                "DID x IN 30d",
                "1:10: expected 'LAST' after 'IN', found '30d'",
            ),
            (
                "DID x IN LAST 30",
                "1:15: expected a duration such as 30d after 'LAST', found '30'",
            ),
            (
                "DID x BETWEEN NOW - 1d",
                "1:23: expected 'AND' after the start of 'BETWEEN', found end of input",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(err(text), expected, "input {text:?}");
        }
    }

    #[test]
    fn operator_error_lists_the_operators() {
        assert_eq!(
            err("age 5"),
            "1:5: expected an operator (=, !=, <, <=, >, >=, IN, NOT IN, HAS, BETWEEN or IS) \
             after 'age', found '5'"
        );
    }

    #[test]
    fn lexical_errors() {
        let cases = [
            (r#"a = "open"#, "1:5: unterminated string"),
            (r#"a = "ends in \"#, "1:5: unterminated string"),
            (
                r#"a = "tab\t""#,
                r#"1:9: invalid escape '\t' in string (only \" and \\ are allowed)"#,
            ),
            (
                "a ! 1",
                "1:3: unexpected character '!' (did you mean '!='?)",
            ),
            ("a = é", "1:5: unexpected character 'é'"),
            (
                "a = 99999999999999999999",
                "1:5: integer 99999999999999999999 does not fit in 64 bits",
            ),
            (
                "a = -9223372036854775809",
                "1:5: integer -9223372036854775809 does not fit in 64 bits",
            ),
            ("a = 1e400", "1:5: number 1e400 is too large"),
            ("a = 1.", "1:5: malformed number '1.'"),
            ("a = 1.2.3", "1:5: malformed number '1.2.3'"),
            ("a = 1e", "1:5: malformed number '1e'"),
            ("a = 1.5d", "1:5: malformed number '1.5d'"),
            (
                "a < NOW - 30s",
                "1:11: unknown duration unit 's' in '30s' (expected d, h or m)",
            ),
            (
                "a < NOW - 30D",
                "1:11: unknown duration unit 'D' in '30D' (expected d, h or m)",
            ),
            (
                "a < NOW - 99999999999999999999d",
                "1:11: duration 99999999999999999999d is too large",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(err(text), expected, "input {text:?}");
        }
    }

    #[test]
    fn first_error_in_the_text_wins() {
        // The parse error comes before the lexing error, so it is the one reported.
        assert_eq!(
            err("a = = \"open"),
            "1:5: expected a value after '=', found '='"
        );
        assert_eq!(err("a = 1 AND b ~"), "1:13: unexpected character '~'");
    }

    #[test]
    fn multi_line_positions() {
        let text = "country = \"US\"\n  AND (age > 5\n  OR ) ";
        assert_eq!(err(text), "3:6: expected an attribute name, found ')'");
        let with_string = "a = \"line one\nline two\" AND\n\tb ? 1";
        assert_eq!(err(with_string), "3:4: unexpected character '?'");
        let error = parse("a = 1\r\n  OR b").err();
        assert_eq!(
            error.map(|e| (e.line, e.column)),
            Some((2, 7)),
            "CRLF counts as one line break"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(
            err("a = \"ééé\" AND ="),
            "1:15: expected an attribute name, found '='"
        );
    }

    #[test]
    fn long_tokens_are_truncated_in_messages() {
        let long = "x".repeat(100);
        let message = err(&format!("a = 1 {long}"));
        assert_eq!(
            message,
            format!(
                "1:7: expected AND, OR or end of input, found '{}...'",
                "x".repeat(MAX_QUOTED_CHARS)
            )
        );
    }

    #[test]
    fn depth_limit_allows_exactly_the_limit() {
        let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(ok(&nested(DEFAULT_MAX_DEPTH)), int("a", 1));
        assert_eq!(
            err(&nested(DEFAULT_MAX_DEPTH + 1)),
            "1:65: expression nests deeper than 64 levels"
        );
        assert!(parse_with_limit("a = 1", 0).is_ok());
        assert!(parse_with_limit("NOT a = 1", 0).is_err());
    }

    #[test]
    fn token_limit_allows_exactly_the_limit_and_stops_reading_past_it() {
        // `a IN (1, 2)`: 7 tokens.
        assert!(parse_bounded("a IN (1, 2)", 8, 7).is_ok());
        let error = parse_bounded("a IN (1, 2)", 8, 6).unwrap_err();
        assert!(error.too_long && !error.too_deep, "{error:?}");
        assert!(
            error.message.contains("longer than 6 tokens"),
            "{}",
            error.message
        );
        // A syntax error past the limit is never reached: the limit is what is reported.
        let hostile = format!("a IN ({}", "1, ".repeat(1_000_000));
        assert!(parse_bounded(&hostile, 8, 100).unwrap_err().too_long);
    }

    #[test]
    fn depth_limit_stops_hostile_input() {
        let parens = format!("{}a = 1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(err(&parens), "1:65: expression nests deeper than 64 levels");
        let nots = format!("{}a = 1", "NOT ".repeat(100_000));
        assert_eq!(err(&nots), "1:257: expression nests deeper than 64 levels");
        let mixed = "NOT (".repeat(50_000);
        assert_eq!(err(&mixed), "1:161: expression nests deeper than 64 levels");
        let unclosed = "(".repeat(100_000);
        assert_eq!(
            err(&unclosed),
            "1:65: expression nests deeper than 64 levels"
        );
    }

    #[test]
    fn long_flat_chains_do_not_recurse() {
        let text = vec!["a = 1"; 100_000].join(" AND ");
        match ok(&text) {
            Expr::And(children) => assert_eq!(children.len(), 100_000),
            other => panic!("{other:?}"),
        }
    }

    const VOCABULARY: &[&str] = &[
        "AND", "or", "NOT", "IN", "HAS", "ANY", "ALL", "BETWEEN", "IS", "NULL", "DID", "AT",
        "LEAST", "TIMES", "SEGMENT", "NOW", "TRUE", "false", "LAST", "(", ")", ",", "=", "!=", "<",
        "<=", ">", ">=", "-", "+", "!", "a", "b.c", "\"s\"", "\"", "\\", "\"\\\"\"", "1", "-1",
        "2.5", "1e9", "30d", "-12h", "90m", "30x", "1.", "\n", " ",
    ];

    fn token_soup() -> impl Strategy<Value = String> {
        let word = proptest::sample::select(VOCABULARY);
        let separator = prop_oneof![Just(""), Just(" "), Just("\n")];
        proptest::collection::vec((word, separator), 0..40).prop_map(|parts| {
            parts
                .into_iter()
                .flat_map(|(word, separator)| [word, separator])
                .collect()
        })
    }

    /// Parsed trees never hold an And/Or with fewer than two children.
    fn well_formed(expr: &Expr) -> bool {
        match expr {
            Expr::And(children) | Expr::Or(children) => {
                children.len() >= 2 && children.iter().all(well_formed)
            }
            Expr::Not(child) => well_formed(child),
            Expr::Predicate(_) => true,
        }
    }

    /// Whatever parses must be well formed and print back to the same tree.
    fn check_any_input(text: &str) -> Result<(), TestCaseError> {
        if let Ok(expr) = parse(text) {
            prop_assert!(well_formed(&expr));
            let printed = crate::expr::print::to_text(&expr);
            prop_assert_eq!(parse(&printed), Ok(expr));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            check_any_input(&text)?;
        }

        #[test]
        fn token_soup_never_panics(text in token_soup()) {
            check_any_input(&text)?;
        }
    }
}
