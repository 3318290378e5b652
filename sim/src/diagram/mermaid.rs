//! The Mermaid `sequenceDiagram`: the same arrows and marks as the SVG, in
//! send-time order, as text that Markdown viewers render.
//!
//! **Invariant:** every line is one Mermaid statement; run-derived text is
//! escaped so it can neither end a statement nor inject markup.

use super::{Arrow, DiagramError, End, Model, Options, clip, fmt_ms};
use crate::event::{Event, Node, What};
use std::fmt::Write as _;

/// Renders the Mermaid diagram of `events`.
pub fn mermaid(events: &[Event], opts: &Options) -> Result<String, DiagramError> {
    let m = Model::build(events, opts)?;
    Ok(render(&m))
}

/// Short participant ids: Mermaid keywords (`end`, `opt`, ...) cannot clash with them.
fn id(node: Node) -> &'static str {
    ["B", "O", "S", "P", "W", "C"].get(node).copied().unwrap_or("X")
}

/// `first,last`: a note spanning every lane.
fn all(lanes: &[Node]) -> String {
    let first = lanes.first().copied().unwrap_or(0);
    let last = lanes.last().copied().unwrap_or(0);
    format!("{},{}", id(first), id(last))
}

/// Message and note text: `#` and `;` are Mermaid syntax (entity codes and
/// statement ends), angle brackets would be read as HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '#' => out.push_str("#35;"),
            ';' => out.push_str("#59;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn render(m: &Model<'_>) -> String {
    let mut out = String::from("sequenceDiagram\n");
    for &n in &m.lanes {
        let _ = writeln!(out, "    participant {} as {}", id(n), esc(m.header.name(n)));
    }
    let verdict = match &m.header.verdict {
        None => "PASS: no invariant violated".to_string(),
        Some((kind, invariant, detail, t)) => format!(
            "FAIL: first violation [{kind}] {invariant} at t={}: {}",
            fmt_ms(*t),
            clip(detail, 160)
        ),
    };
    let _ = writeln!(
        out,
        "    Note over {}: {}<br/>{}<br/>fault profile: {}<br/>planned faults: {}",
        all(&m.lanes),
        esc(&m.header.command),
        esc(&verdict),
        esc(&m.header.profile),
        m.header.faults.len()
    );
    // Arrows at their send time, marks at theirs; marks first on a tie (a crash
    // at t happens before anything sent at t).
    let mut a = m.arrows.iter().peekable();
    let mut k = m.marks.iter().peekable();
    loop {
        let next_arrow = a.peek().map(|x| x.t_send);
        let next_mark = k.peek().map(|x| x.t_ns);
        match (next_arrow, next_mark) {
            (None, None) => break,
            (Some(ta), Some(tm)) if tm <= ta => mark(&mut out, &m.lanes, k.next().map(|x| x.what), tm),
            (None, Some(tm)) => mark(&mut out, &m.lanes, k.next().map(|x| x.what), tm),
            (Some(_), _) => {
                if let Some(x) = a.next() {
                    arrow(&mut out, x);
                }
            }
        }
    }
    out
}

fn arrow(out: &mut String, a: &Arrow<'_>) {
    let mut text = format!("{} {}", fmt_ms(a.t_send), a.msg.short);
    let op = match a.end {
        End::Received { copy, t_ns } => {
            if a.delay_ms() > 0 {
                text.push_str(&format!(" (delayed {}ms, arrives {})", a.delay_ms(), fmt_ms(t_ns)));
            }
            if copy > 0 {
                text.push_str(&format!(" (copy {})", copy + 1));
                "-->>"
            } else {
                if a.duplicated() {
                    text.push_str(" (duplicated)");
                }
                "->>"
            }
        }
        End::Lost(loss) => {
            text.push_str(&format!(" ✕ {}", loss.explain()));
            "-x"
        }
    };
    let _ = writeln!(out, "    {}{op}{}: {}", id(a.from), id(a.to), esc(&text));
    if let Some(hang) = a.callback_fault {
        let what = if hang { "never answered" } else { "answered 500" };
        let _ = writeln!(
            out,
            "    Note right of {}: fault: callback {what}, not processed",
            id(a.to)
        );
    }
}

fn mark(out: &mut String, lanes: &[Node], what: Option<&What>, t_ns: u64) {
    let Some(what) = what else { return };
    let at = fmt_ms(t_ns);
    match what {
        What::Crash { node, torn } => {
            let _ = writeln!(
                out,
                "    Note over {}: {at} CRASH: unsynced writes lost{}",
                id(*node),
                if *torn { ", last write torn" } else { "" }
            );
        }
        What::Restart { node } => {
            let _ = writeln!(out, "    Note over {}: {at} restart (recovers from disk)", id(*node));
        }
        What::PartitionStart { a, b, text, .. } | What::PartitionHeal { a, b, text, .. } => {
            let over = match b {
                Some(b) => format!("{},{}", id(*a), id(*b)),
                None => id(*a).to_string(),
            };
            let verb = if matches!(what, What::PartitionStart { .. }) {
                "cut"
            } else {
                "healed"
            };
            let _ = writeln!(out, "    Note over {over}: {at} {verb}: {}", esc(text));
        }
        What::HealPhase => {
            let _ = writeln!(
                out,
                "    Note over {}: {at} heal phase: faults off, partitions healed, crashed nodes restarted",
                all(lanes)
            );
        }
        What::Note { node, text } => {
            let _ = writeln!(out, "    Note over {}: {at} {}", id(*node), esc(text));
        }
        What::Violation {
            kind,
            invariant,
            detail,
            first,
        } => {
            let head = if *first { "FIRST VIOLATION" } else { "violation" };
            let _ = writeln!(out, "    rect rgb(255, 210, 210)");
            let _ = writeln!(
                out,
                "    Note over {}: {at} {head} [{kind}] {invariant}: {}",
                all(lanes),
                esc(&clip(detail, 300))
            );
            let _ = writeln!(out, "    end");
        }
        What::Plan { .. } | What::Send { .. } | What::Recv { .. } | What::CallbackFault { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn sample_renders_arrows_notes_and_escapes() {
        let s = mermaid(&sample(), &Options::default()).unwrap();
        assert!(s.starts_with("sequenceDiagram\n"));
        assert_eq!(s.matches("->>").count(), 3, "{s}"); // 2 first copies + 1 copy (-->> contains ->>)
        assert_eq!(s.matches("-->>").count(), 1);
        assert_eq!(s.matches("-x").count(), 2);
        assert!(s.contains("Note over S: 7.0ms CRASH"));
        assert!(s.contains("stock of #lt;p#gt; & \"q\""));
        assert_eq!(esc("a#b;c<d>"), "a#35;b#59;c#lt;d#gt;");
        // One statement per line: nothing run-derived contains a newline.
        assert!(s.lines().all(|l| !l.trim().is_empty()));
    }
}
