//! What the CLI writes to a terminal: text from the server (a rank's error message, its log
//! lines, a job's name) may hold terminal escapes; they are shown escaped, never obeyed.

/// `text` with every control character but newline and tab written as a visible escape
/// (`\x1b`, `\u{9b}`), and the bidirectional overrides that reorder what a terminal shows.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() || is_bidi_control(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// JSON text (from `serde_json`, which escapes C0 controls inside strings already) with DEL,
/// the C1 controls and the bidirectional overrides escaped as `\uXXXX`: they can only occur
/// inside strings, so the document stays the same value. Newlines are the pretty printer's.
pub fn printable_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if (c.is_control() && c != '\n') || is_bidi_control(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Embedding, override and isolate controls (the "Trojan Source" characters).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A number as the CLI shows it: `digits` decimals, and never `-0.0` (a sum of nothing, or a
/// rounding of a tiny negative, is shown as zero).
pub fn number(f: f64, digits: usize) -> String {
    let text = format!("{f:.digits$}");
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_reach_the_terminal_as_text() {
        let red = "boom \x1b[31mred\x1b[0m\r\x07 \u{9b}2J \u{202e}txt\u{7f}";
        assert_eq!(
            printable(red),
            "boom \\x1b[31mred\\x1b[0m\\x0d\\x07 \\u{9b}2J \\u{202e}txt\\x7f"
        );
        assert_eq!(printable("two\nlines\tand tabs"), "two\nlines\tand tabs");
        let json = serde_json::to_string_pretty(&serde_json::json!({"m": red})).unwrap();
        let safe = printable_json(&json);
        assert!(!safe.chars().any(|c| c.is_control() && c != '\n'), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["m"], red, "the same value");
    }

    #[test]
    fn negative_zero_is_zero() {
        assert_eq!(number(-0.0, 1), "0.0");
        assert_eq!(number(-0.04, 1), "0.0");
        assert_eq!(number(-0.06, 1), "-0.1");
        assert_eq!(number(2.25, 2), "2.25");
        assert_eq!(number(-0.0, 0), "0");
    }
}
