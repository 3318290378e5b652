//! XML text escaping for the SVG writer. **Invariant:** whatever a message or
//! detail contains, the escaped text is valid XML 1.0 character data and
//! attribute content (markup characters escaped, forbidden control characters
//! replaced).

/// Escapes `s` for use as element text or inside a double- or single-quoted attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Newlines and tabs are legal; keep them (hover titles use newlines).
            '\n' | '\t' => out.push(c),
            '\r' => out.push_str("&#13;"),
            // XML 1.0 forbids the other C0 controls even as character references,
            // and the noncharacters U+FFFE/U+FFFF.
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_controls() {
        assert_eq!(escape(r#"a<b>&"c"'d'"#), "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;");
        assert_eq!(escape("x\u{1}y\nz\r"), "x\u{FFFD}y\nz&#13;");
        assert_eq!(escape("plain-text 12ms"), "plain-text 12ms");
    }
}
