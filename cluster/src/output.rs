//! How `lmskv` prints results: the output format switch, aligned tables for
//! people, compact JSON for scripts, and the one way keys and values become
//! text (`lmskv_proto::keys::escape`, which `parse_escaped` reverses).
//!
//! JSON output is an interface: scripts and tests parse it, so every JSON
//! shape is a serde struct with a fixed field order, and fields are only ever
//! added, never renamed or removed.

use std::io::{self, IsTerminal, Write};

use serde::Serialize;

use crate::cmd::CmdError;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

impl OutputFormat {
    /// The format asked for, or the default: a table when stdout is a
    /// terminal, JSON when it is a pipe or a file.
    pub fn resolve(explicit: Option<OutputFormat>) -> OutputFormat {
        explicit.unwrap_or_else(|| {
            if io::stdout().is_terminal() {
                OutputFormat::Table
            } else {
                OutputFormat::Json
            }
        })
    }
}

/// Renders key or value bytes as printable text (`\xNN` for bytes that are
/// not printable ASCII, `\\` for a backslash).
pub fn bytes_text(bytes: &[u8]) -> String {
    lmskv_proto::keys::escape(bytes)
}

/// A table with a header row and left-aligned columns separated by two spaces.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Starts a table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; it should have one cell per header.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(
            row.len(),
            self.headers.len(),
            "a table row needs one cell per column"
        );
        self.rows.push(row);
    }

    /// Renders the table, one line per row, each line ending in a newline.
    /// The last column is not padded, so lines carry no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(self.rows.iter()) {
            let mut line = String::new();
            // Padding after the last non-empty cell is dropped; spaces inside
            // a cell are content and stay.
            let mut content_end = 0;
            for (i, cell) in row.iter().enumerate().take(columns) {
                line.push_str(cell);
                if !cell.is_empty() {
                    content_end = line.len();
                }
                if i + 1 < columns {
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.truncate(content_end);
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// Serializes `value` as compact one-line JSON.
pub fn json<T: Serialize>(value: &T) -> Result<String, CmdError> {
    serde_json::to_string(value)
        .map_err(|e| CmdError::Failed(format!("cannot encode JSON output: {e}")))
}

/// Writes `text` to stdout, adding a final newline when it lacks one.
///
/// A closed pipe (`lmskv kv scan | head`) is not an error: the reader has what
/// it wanted, so the command still succeeds.
pub fn print(text: &str) -> Result<(), CmdError> {
    let mut out = io::stdout().lock();
    let result = out
        .write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|()| out.flush());
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CmdError::Failed(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints `value` as JSON or, for a table, the text `table` renders.
pub fn emit<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), CmdError> {
    match format {
        OutputFormat::Json => print(&json(value)?),
        OutputFormat::Table => print(&table(value)),
    }
}

/// Writes progress text for people to stderr, as is (no newline added).
///
/// Failures are ignored: progress is a courtesy, and a closed stderr must not
/// stop a running command.
pub fn progress(text: &str) {
    let mut err = io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// Prints `lmskv: warning: <message>` on one line of stderr.
pub fn warn(message: &str) {
    progress(&format!("lmskv: warning: {}\n", one_line(message)));
}

/// Prints `lmskv: <message>` on one line of stderr: how every failure ends.
pub fn error(message: &str) {
    progress(&format!("lmskv: {}\n", one_line(message)));
}

/// Joins the lines of `text` with spaces so that an error stays on one line.
pub fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["KEY", "VALUE", "VERSION"]);
        t.push(vec!["a".into(), "hello".into(), "7".into()]);
        t.push(vec!["longer-key".into(), "".into(), "12".into()]);
        assert_eq!(
            t.render(),
            "KEY         VALUE  VERSION\n\
             a           hello  7\n\
             longer-key         12\n"
        );
    }

    #[test]
    fn errors_fit_on_one_line() {
        assert_eq!(one_line("a\n  b\r\n\nc "), "a b c");
    }

    #[test]
    fn bytes_are_escaped() {
        assert_eq!(bytes_text(b"user/\x00\\"), "user/\\x00\\\\");
    }
}
