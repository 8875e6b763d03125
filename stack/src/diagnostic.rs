//! Problems found in a stack file, each pinned to a line and column.

use std::fmt;
use std::ops::Range;

/// Byte range in the stack file's text.
pub type Span = Range<usize>;

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Legal, but probably not what was meant.
    Warning,
    /// The stack cannot be used until this is fixed.
    Error,
}

/// One problem in a stack file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Warning or error.
    pub severity: Severity,
    /// Dotted key path of the offending item (`stages.prod.domain`), empty for the whole file.
    pub key: String,
    /// Where it is in the text.
    #[serde(skip)]
    pub span: Span,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong, naming the offending key or value.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Maps byte offsets to 1-based line and column numbers.
pub struct LineIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Index the line starts of `text`.
    pub fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, line_starts }
    }

    /// 1-based (line, column) of a byte offset; columns count characters.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, column + 1)
    }
}

/// Collects diagnostics while a stack file is decoded and validated.
pub struct Diagnostics<'a> {
    index: LineIndex<'a>,
    items: Vec<Diagnostic>,
}

impl<'a> Diagnostics<'a> {
    /// An empty collection for the given text.
    pub fn new(text: &'a str) -> Self {
        Diagnostics {
            index: LineIndex::new(text),
            items: Vec::new(),
        }
    }

    /// Record an error at `span`.
    pub fn error(&mut self, key: &str, span: Span, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Error, key, span, message.into())
    }

    /// Record a warning at `span`.
    pub fn warning(
        &mut self,
        key: &str,
        span: Span,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.push(Severity::Warning, key, span, message.into())
    }

    fn push(
        &mut self,
        severity: Severity,
        key: &str,
        span: Span,
        message: String,
    ) -> &mut Diagnostic {
        let (line, column) = self.index.position(span.start);
        self.items.push(Diagnostic {
            severity,
            key: key.to_string(),
            span,
            line,
            column,
            message,
            hint: None,
        });
        self.items.last_mut().expect("just pushed")
    }

    /// True when at least one error was recorded.
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    /// All diagnostics, in file order.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by(|a, b| {
            (a.span.start, a.severity, &a.message).cmp(&(b.span.start, b.severity, &b.message))
        });
        self.items.dedup();
        self.items
    }
}

impl Diagnostic {
    /// Attach a hint.
    pub fn hint(&mut self, hint: impl Into<String>) -> &mut Self {
        self.hint = Some(hint.into());
        self
    }

    /// Render as `path:line:col: severity: message`, with the hint on the next line.
    pub fn render(&self, path: &str) -> String {
        let mut out = format!(
            "{path}:{}:{}: {}: {}",
            self.line, self.column, self.severity, self.message
        );
        if let Some(hint) = &self.hint {
            out.push_str("\n  hint: ");
            out.push_str(hint);
        }
        out
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn closest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let idx = LineIndex::new("ab\ncé d\n");
        assert_eq!(idx.position(0), (1, 1));
        assert_eq!(idx.position(3), (2, 1));
        // 'd' follows a two-byte character.
        assert_eq!(idx.position(7), (2, 4));
    }

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(closest("regoin", ["region", "domain"]), Some("region"));
        assert_eq!(closest("zzz", ["region", "domain"]), None);
    }
}
