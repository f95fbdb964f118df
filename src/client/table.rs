//! Plain-text tables for the CLI: every column as wide as its widest cell (header included),
//! numbers right-aligned, text left-aligned, two spaces between columns, no trailing blanks.

/// How a column's cells line up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Renders `rows` under `headers`; a row shorter than the headers is padded with blanks.
pub fn render(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, ((_, align), width)) in headers.iter().zip(&widths).enumerate() {
            let cell = cells.get(i).copied().unwrap_or("");
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            match align {
                Align::Left => {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.iter().map(|(h, _)| *h).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each column starts on every line: the same for short and long values.
    #[test]
    fn columns_line_up_for_short_and_long_values() {
        let text = render(
            &[
                ("RANK", Align::Right),
                ("STATE", Align::Left),
                ("PID", Align::Right),
            ],
            &[
                vec!["0".into(), "running".into(), "7".into()],
                vec!["1234".into(), "backoff".into(), "4194304".into()],
                vec!["12".into(), "succeeded-long-state".into(), "-".into()],
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "RANK  STATE                     PID");
        assert_eq!(lines[1], "   0  running                     7");
        assert_eq!(lines[2], "1234  backoff               4194304");
        assert_eq!(lines[3], "  12  succeeded-long-state        -");
        // Right-aligned columns end together, left-aligned ones start together.
        let ends: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        assert!(ends.iter().all(|&e| e == ends[0]), "{text}");
        let starts: Vec<usize> = lines
            .iter()
            .map(|l| l.find(['S', 'r', 'b', 's']).unwrap())
            .collect();
        assert!(starts.iter().all(|&s| s == 6), "{text}");
    }
}
