//! The SVG sequence diagram: a header (command, verdict, fault profile and
//! plan, legend), one vertical lane per node, simulated time running down the
//! page, one arrow per message copy from its send time to its receive time.
//!
//! Time is drawn as an ordered sequence of points (sends, receives, marks),
//! each given the room its label needs, plus a stretch proportional to the
//! simulated time since the previous point, capped: a long quiet stretch
//! becomes a short grey band labelled with its length. A very long run is
//! squeezed to a height cap (labels hidden, hover titles kept).
//!
//! **Invariant:** the output is well-formed, self-contained XML (no external
//! references); every piece of run-derived text goes through [`escape`].

use super::xml::escape;
use super::{Arrow, DiagramError, End, Loss, Model, Options, clip, fmt_ms, partition_nodes};
use crate::event::{Event, MsgKind, Node, What};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The width for five lanes (a sixth, `custom`, widens the page).
const WIDTH_MIN: f64 = 1320.0;
const AXIS_W: f64 = 100.0;
const LANE_W: f64 = 240.0;
const MARGIN: f64 = 12.0;
/// Simulated milliseconds to pixels, before the cap on one stretch.
const PX_PER_MS: f64 = 1.0;
/// The longest a quiet stretch is drawn; longer ones are collapsed into a band.
const GAP_PX_MAX: f64 = 28.0;
/// Above this body height the diagram is squeezed (and labels hidden if they no longer fit).
const BODY_PX_MAX: f64 = 30_000.0;
/// Characters that fit across the header at 12px monospace.
const HEADER_CHARS: usize = 176;
const LABEL_CHARS: usize = 46;
const PLAN_LINES_MAX: usize = 4;

/// Where each node's lane is, and how wide the page is.
struct Lanes<'a> {
    order: &'a [Node],
    width: f64,
    /// Names the lanes (the custom node by its client id).
    header: &'a crate::diagram::Header,
}

impl Lanes<'_> {
    /// A node as the diagram names it, in labels and hover titles alike.
    fn name(&self, node: Node) -> &str {
        self.header.name(node)
    }
    fn x(&self, node: Node) -> f64 {
        let col = self.order.iter().position(|&n| n == node).unwrap_or(0);
        AXIS_W + LANE_W * col as f64 + LANE_W / 2.0
    }
    fn is_last(&self, node: Node) -> bool {
        self.order.last() == Some(&node)
    }
}

fn kind_color(kind: MsgKind) -> &'static str {
    match kind {
        MsgKind::CreateOrder | MsgKind::OrderAnswer => "#7b3fa0",
        MsgKind::Publish | MsgKind::PublishReply => "#1f5fbf",
        MsgKind::Callback | MsgKind::CallbackAnswer => "#2e7d32",
        MsgKind::Subscribe | MsgKind::SubscribeReply => "#8a8a8a",
    }
}

const KINDS: [MsgKind; 8] = [
    MsgKind::Publish,
    MsgKind::PublishReply,
    MsgKind::Subscribe,
    MsgKind::SubscribeReply,
    MsgKind::Callback,
    MsgKind::CallbackAnswer,
    MsgKind::CreateOrder,
    MsgKind::OrderAnswer,
];

const RED: &str = "#d62728";
const ORANGE: &str = "#e07b00";
const GREEN: &str = "#2e7d32";

/// A point on the time axis and the vertical room it needs above and below.
#[derive(Clone, Copy, Debug)]
struct Point {
    t_ns: u64,
    /// Ties at one instant: receives, then marks, then sends (a node receives, then answers).
    rank: u8,
    above: f64,
    below: f64,
    /// Whether the time axis may print this point's time.
    axis: bool,
}

/// A quiet stretch drawn shorter than its simulated length.
struct Gap {
    y0: f64,
    y1: f64,
    ms: u64,
}

/// Renders the SVG diagram of `events`.
pub fn svg(events: &[Event], opts: &Options) -> Result<String, DiagramError> {
    let model = Model::build(events, opts)?;
    Ok(render(&model))
}

/// A self-contained HTML page embedding `svg` inline (browsers show its hover
/// titles, which an `<img>` embedding does not).
pub fn html_page(svg: &str, title: &str) -> String {
    let body = svg
        .strip_prefix(r#"<?xml version="1.0" encoding="UTF-8"?>"#)
        .unwrap_or(svg);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>{}</title></head>\n<body style=\"margin:0;background:#fff\">{}</body>\n</html>\n",
        escape(title),
        body.trim_start()
    )
}

fn render(m: &Model<'_>) -> String {
    let ln = Lanes {
        order: &m.lanes,
        width: (AXIS_W + LANE_W * m.lanes.len() as f64 + 20.0).max(WIDTH_MIN),
        header: &m.header,
    };
    let width = ln.width;
    // Points: one per send (copies of a duplicated message share it), one per receive, one per mark.
    let mut points: Vec<Point> = Vec::new();
    let mut send_pt: Vec<usize> = Vec::with_capacity(m.arrows.len());
    let mut recv_pt: Vec<Option<usize>> = Vec::with_capacity(m.arrows.len());
    let mut first_copy: BTreeMap<u32, usize> = BTreeMap::new();
    for a in &m.arrows {
        let s = match (a.copy(), first_copy.get(&a.seq.0)) {
            (c, Some(&p)) if c > 0 => p,
            _ => {
                points.push(Point {
                    t_ns: a.t_send,
                    rank: 2,
                    above: 14.0,
                    below: if matches!(a.end, End::Lost(_)) { 12.0 } else { 2.0 },
                    axis: true,
                });
                first_copy.insert(a.seq.0, points.len() - 1);
                points.len() - 1
            }
        };
        send_pt.push(s);
        recv_pt.push(match a.end {
            End::Received { t_ns, copy } => {
                let labelled = a.callback_fault.is_some() || copy > 0;
                points.push(Point {
                    t_ns,
                    rank: 0,
                    above: if labelled { 12.0 } else { 2.0 },
                    below: 2.0,
                    axis: false,
                });
                Some(points.len() - 1)
            }
            End::Lost(_) => None,
        });
    }
    let mut mark_pt = Vec::with_capacity(m.marks.len());
    for mk in &m.marks {
        let (above, below) = match mk.what {
            What::Violation { .. } => (22.0, 6.0),
            What::HealPhase => (16.0, 4.0),
            _ => (10.0, 9.0),
        };
        points.push(Point {
            t_ns: mk.t_ns,
            rank: 1,
            above,
            below,
            axis: true,
        });
        mark_pt.push(points.len() - 1);
    }

    // Time order, then y for each point.
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (points[i].t_ns, points[i].rank, i));
    let mut ys = vec![0.0f64; points.len()];
    let mut gaps = Vec::new();
    let mut y = 0.0;
    for (k, &i) in order.iter().enumerate() {
        if k > 0 {
            let p = order[k - 1];
            let dt_ns = points[i].t_ns.saturating_sub(points[p].t_ns);
            let stretch_natural = dt_ns as f64 / 1e6 * PX_PER_MS;
            let stretch = stretch_natural.min(GAP_PX_MAX);
            let room = (points[p].below + points[i].above).max(4.0);
            if stretch_natural > GAP_PX_MAX {
                gaps.push(Gap {
                    y0: y + points[p].below,
                    y1: y + points[p].below + stretch,
                    ms: dt_ns / 1_000_000,
                });
                y += points[p].below + stretch + points[i].above;
            } else {
                y += room + stretch;
            }
        }
        ys[i] = y;
    }
    let body_natural = y;
    let squeeze = if body_natural > BODY_PX_MAX {
        BODY_PX_MAX / body_natural
    } else {
        1.0
    };
    let labels = squeeze > 0.75;

    let header = header_lines(m, labels);
    let header_h = 16.0 + 18.0 * header.len() as f64 + 34.0;
    let lanes_top = header_h + 8.0;
    let body_top = lanes_top + 54.0;
    for y in &mut ys {
        *y = body_top + *y * squeeze;
    }
    for g in &mut gaps {
        g.y0 = body_top + g.y0 * squeeze;
        g.y1 = body_top + g.y1 * squeeze;
    }
    let body_bottom = body_top + body_natural * squeeze + 24.0;
    let height = body_bottom + 40.0;

    let mut out = String::with_capacity(256 * (m.arrows.len() + 40));
    let _ = write!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">
<style>text{{font-family:'DejaVu Sans Mono',Menlo,Consolas,monospace;font-size:11px}} .lbl{{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}} .hd{{font-size:12px}}</style>
<defs>
"##,
        w = f(width),
        h = f(height)
    );
    for k in KINDS {
        let _ = writeln!(
            out,
            r#"<marker id="ah-{}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{}"/></marker>"#,
            k.as_str(),
            kind_color(k)
        );
    }
    out.push_str("</defs>\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n");

    // Header.
    out.push_str("<g class=\"header\">\n");
    for (n, (text, color, bold)) in header.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text class="hd" x="{}" y="{}" fill="{}"{}>{}</text>"#,
            MARGIN,
            f(24.0 + 18.0 * n as f64),
            color,
            if *bold { r#" font-weight="bold""# } else { "" },
            escape(text)
        );
    }
    legend(&mut out, 16.0 + 18.0 * header.len() as f64 + 14.0);
    out.push_str("</g>\n");

    // Collapsed quiet stretches, under everything else (their length is
    // written only where there is room for it).
    for g in &gaps {
        let _ = write!(
            out,
            r##"<g class="gap"><title>{ms} ms of simulated time drawn short</title><rect x="{x}" y="{y}" width="{w}" height="{h}" fill="#f0f0f0"/>"##,
            ms = g.ms,
            x = f(AXIS_W - 90.0),
            y = f(g.y0),
            w = f(width - AXIS_W + 80.0),
            h = f((g.y1 - g.y0).max(1.0)),
        );
        if labels {
            let _ = write!(
                out,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#888" font-style="italic">+{}ms</text>"##,
                f(AXIS_W - 8.0),
                f((g.y0 + g.y1) / 2.0 + 4.0),
                g.ms
            );
        }
        out.push_str("</g>\n");
    }

    // Lanes.
    for &node in ln.order {
        let x = ln.x(node);
        let name = crate::diagram::xml::escape(m.header.name(node));
        let _ = writeln!(
            out,
            r##"<g class="lane" data-node="{name}"><line x1="{x}" y1="{y0}" x2="{x}" y2="{y1}" stroke="#b0b0b0" stroke-width="1.5"/><rect x="{bx}" y="{by}" width="120" height="26" rx="4" fill="#263238"/><text x="{x}" y="{ty}" text-anchor="middle" fill="#ffffff" font-size="13px" font-weight="bold">{name}</text><text x="{x}" y="{fy}" text-anchor="middle" fill="#263238" font-weight="bold">{name}</text></g>"##,
            x = f(x),
            y0 = f(lanes_top + 26.0),
            y1 = f(body_bottom),
            bx = f(x - 60.0),
            by = f(lanes_top),
            ty = f(lanes_top + 18.0),
            fy = f(body_bottom + 16.0),
        );
    }

    // Node states spanning time: down (crash..restart) and partitioned.
    intervals(&mut out, &ln, m, &mark_pt, &ys, body_bottom);

    // Time axis.
    let mut last_axis = f64::NEG_INFINITY;
    for &i in &order {
        if points[i].axis && ys[i] - last_axis >= 22.0 {
            last_axis = ys[i];
            let _ = writeln!(
                out,
                r##"<text class="axis" x="{}" y="{}" text-anchor="end" fill="#666">{}</text>"##,
                f(AXIS_W - 8.0),
                f(ys[i] + 4.0),
                fmt_ms(points[i].t_ns)
            );
        }
    }

    // Messages.
    for (n, a) in m.arrows.iter().enumerate() {
        let y1 = ys[send_pt[n]];
        let y2 = recv_pt[n].map(|p| ys[p].max(y1 + 1.0));
        arrow(&mut out, &ln, a, y1, y2, labels && a.copy() == 0);
    }

    // Marks on lanes and across the diagram.
    for (n, mk) in m.marks.iter().enumerate() {
        mark(&mut out, &ln, mk.what, mk.t_ns, ys[mark_pt[n]]);
    }

    out.push_str("</svg>\n");
    out
}

/// Pixel coordinates with one decimal: enough precision, stable text.
fn f(v: f64) -> String {
    format!("{v:.1}")
}

fn header_lines(m: &Model<'_>, labels: bool) -> Vec<(String, &'static str, bool)> {
    let mut lines = vec![(m.header.command.clone(), "#111111", true)];
    match &m.header.verdict {
        None => lines.push(("PASS: no invariant violated".to_string(), GREEN, true)),
        Some((kind, invariant, detail, t)) => lines.push((
            clip(
                &format!(
                    "FAIL: first violation [{kind}] {invariant} at t={}: {detail}",
                    fmt_ms(*t)
                ),
                HEADER_CHARS,
            ),
            RED,
            true,
        )),
    }
    lines.push((
        clip(&format!("fault profile: {}", m.header.profile), HEADER_CHARS),
        "#333333",
        false,
    ));
    // The planned faults, wrapped; clock skews are summarised (they draw nothing).
    let mut plan = format!("planned faults ({}): ", m.header.faults.len());
    if m.header.faults.is_empty() {
        plan.push_str("none");
    }
    let mut plan_lines = Vec::new();
    for (n, fault) in m.header.faults.iter().enumerate() {
        let piece = if n + 1 < m.header.faults.len() {
            format!("{fault}; ")
        } else {
            fault.clone()
        };
        if plan.chars().count() + piece.chars().count() > HEADER_CHARS {
            plan_lines.push(std::mem::take(&mut plan));
            plan.push_str("  ");
            if plan_lines.len() == PLAN_LINES_MAX - 1 {
                let rest = m.header.faults.len() - n;
                plan.push_str(&format!("... and {rest} more (the trace lists them all)"));
                break;
            }
        }
        plan.push_str(&piece);
    }
    plan_lines.push(plan);
    for l in plan_lines {
        lines.push((l, "#333333", false));
    }
    let (msgs, lost, dup, delayed) = m.message_counts();
    let crashes = m.count_marks(|w| matches!(w, What::Crash { .. }));
    let parts = m.count_marks(|w| matches!(w, What::PartitionStart { .. }));
    let shown = format!(
        "shown: {msgs} messages ({lost} lost, {dup} duplicated, {delayed} delayed), {crashes} crashes, {parts} partitions. Time runs down; quiet stretches over {}ms drawn short (grey). Hover for details.",
        (GAP_PX_MAX / PX_PER_MS) as u64
    );
    lines.push((clip(&shown, HEADER_CHARS), "#555555", false));
    if !labels {
        let note = format!(
            "{} arrows squeezed into {}px: labels hidden (hover titles kept). Follow one saga with --order ID.",
            m.arrows.len(),
            BODY_PX_MAX
        );
        lines.push((note, RED, false));
    }
    lines
}

fn legend(out: &mut String, y: f64) {
    let line = |x: f64, color: &str, extra: &str| {
        format!(
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="1.4"{extra}/>"#,
            f(x),
            f(x + 24.0),
            y = f(y)
        )
    };
    let swatch = |x: f64, color: &str, opacity: &str| {
        format!(
            r#"<rect x="{}" y="{}" width="24" height="10" fill="{color}" fill-opacity="{opacity}"/>"#,
            f(x),
            f(y - 5.0)
        )
    };
    let kind = |x: f64, k: MsgKind| line(x, kind_color(k), &format!(r#" marker-end="url(#ah-{})""#, k.as_str()));
    let blue = kind_color(MsgKind::Publish);
    type Sample<'a> = &'a dyn Fn(f64) -> String;
    let items: [(Sample<'_>, &str, f64); 12] = [
        (&|x| kind(x, MsgKind::CreateOrder), "client", 96.0),
        (&|x| kind(x, MsgKind::Publish), "publish", 104.0),
        (&|x| kind(x, MsgKind::Callback), "callback", 112.0),
        (&|x| kind(x, MsgKind::Subscribe), "subscribe", 112.0),
        (&|x| line(x, blue, r#" stroke-dasharray="6 3""#), "delayed", 104.0),
        (&|x| line(x, blue, r#" stroke-dasharray="1.5 2.5""#), "2nd copy", 112.0),
        (
            &|x| format!("{}{}", line(x - 4.0, RED, ""), cross(x + 20.0, y)),
            "lost",
            72.0,
        ),
        (&|x| swatch(x, RED, "0.35"), "node down", 112.0),
        (&|x| swatch(x, ORANGE, "0.3"), "partitioned", 128.0),
        (
            &|x| {
                format!(
                    r#"<rect x="{}" y="{}" width="10" height="10" fill="{ORANGE}"/>"#,
                    f(x + 7.0),
                    f(y - 5.0)
                )
            },
            "callback fault",
            150.0,
        ),
        (
            &|x| {
                format!(
                    r##"<rect x="{}" y="{}" width="10" height="10" fill="#555"/>"##,
                    f(x + 7.0),
                    f(y - 5.0)
                )
            },
            "note",
            104.0,
        ),
        (
            &|x| {
                format!(
                    r#"{}<line x1="{}" y1="{yy}" x2="{}" y2="{yy}" stroke="{RED}" stroke-width="2"/>"#,
                    swatch(x, RED, "0.3"),
                    f(x),
                    f(x + 24.0),
                    yy = f(y)
                )
            },
            "violation",
            100.0,
        ),
    ];
    let mut x = MARGIN;
    for (sample, text, w) in items {
        let _ = writeln!(
            out,
            r##"{}<text x="{}" y="{}" fill="#333">{}</text>"##,
            sample(x),
            f(x + 30.0),
            f(y + 4.0),
            escape(text)
        );
        x += w;
    }
}

fn cross(x: f64, y: f64) -> String {
    format!(
        r#"<path d="M{} {} L{} {} M{} {} L{} {}" stroke="{RED}" stroke-width="2.2"/>"#,
        f(x - 4.5),
        f(y - 4.5),
        f(x + 4.5),
        f(y + 4.5),
        f(x - 4.5),
        f(y + 4.5),
        f(x + 4.5),
        f(y - 4.5)
    )
}

fn arrow(out: &mut String, ln: &Lanes<'_>, a: &Arrow<'_>, y1: f64, y2: Option<f64>, label: bool) {
    let x1 = ln.x(a.from);
    let xt = ln.x(a.to);
    let dir = if xt >= x1 { 1.0 } else { -1.0 };
    let color = kind_color(a.msg.kind);
    let mut class = format!("msg {}", a.msg.kind.as_str());
    let dash = if a.copy() > 0 {
        class.push_str(" copy");
        r#" stroke-dasharray="1.5 2.5""#
    } else if a.delay_ms() > 0 {
        class.push_str(" delayed");
        r#" stroke-dasharray="6 3""#
    } else {
        ""
    };
    if a.duplicated() && a.copy() == 0 {
        class.push_str(" duplicated");
    }
    let _ = write!(out, r#"<g class="{class}"#);
    if let End::Lost(loss) = a.end {
        let _ = write!(
            out,
            " lost {}",
            match loss {
                Loss::Dropped => "dropped",
                Loss::AnswerLost => "answer-lost",
                Loss::Network => "network",
            }
        );
    }
    let _ = write!(out, "\"><title>{}</title>", escape(&a.title(ln.header)));
    match (a.end, y2) {
        (End::Received { .. }, Some(y2)) => {
            let x2 = xt - dir * 1.5;
            let _ = write!(
                out,
                r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="1.3"{dash} marker-end="url(#ah-{})"/>"#,
                f(x1),
                f(y1),
                f(x2),
                f(y2),
                a.msg.kind.as_str()
            );
            if a.copy() > 0 {
                let _ = write!(
                    out,
                    r##"<text class="lbl" x="{}" y="{}" text-anchor="{}" fill="#a0309a" font-size="10px">copy {}</text>"##,
                    f(x2 - dir * 8.0),
                    f(y2 - 3.0),
                    if dir > 0.0 { "end" } else { "start" },
                    a.copy() + 1
                );
            }
            if let Some(hang) = a.callback_fault {
                let _ = write!(
                    out,
                    r##"<rect class="cbfault" x="{}" y="{}" width="10" height="10" fill="{ORANGE}"/><text class="lbl" x="{}" y="{}" text-anchor="{}" fill="{ORANGE}" font-weight="bold">{}</text>"##,
                    f(x2 - 5.0),
                    f(y2 - 5.0),
                    f(x2 + dir * 9.0),
                    f(y2 - 2.0),
                    if dir > 0.0 { "start" } else { "end" },
                    if hang {
                        "fault: never answered"
                    } else {
                        "fault: answered 500"
                    }
                );
            }
        }
        (End::Lost(_), _) | (End::Received { .. }, None) => {
            let loss = match a.end {
                End::Lost(l) => l,
                End::Received { .. } => Loss::Network,
            };
            let frac = if loss == Loss::Network { 0.8 } else { 0.4 };
            let x2 = x1 + (xt - x1) * frac;
            let y2 = y1 + 9.0;
            let _ = write!(
                out,
                r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{RED}" stroke-width="1.3"{dash}/>{}"#,
                f(x1),
                f(y1),
                f(x2),
                f(y2),
                cross(x2, y2)
            );
        }
    }
    if label {
        let mut text = clip(&a.msg.short, LABEL_CHARS);
        if a.delay_ms() > 0 {
            text.push_str(&format!(" +{}ms", a.delay_ms()));
        }
        if a.duplicated() {
            text.push_str(" x2");
        }
        let fill = match a.end {
            End::Lost(loss) => {
                text.push_str(&format!(" ✕ {}", loss.word()));
                RED
            }
            End::Received { .. } => color,
        };
        let _ = write!(
            out,
            r#"<text class="lbl" x="{}" y="{}" text-anchor="{}" fill="{fill}">{}</text>"#,
            f(x1 + dir * 6.0),
            f(y1 - 4.0),
            if dir > 0.0 { "start" } else { "end" },
            escape(&text)
        );
    }
    out.push_str("</g>\n");
}

/// Down intervals (crash..restart) and partitioned intervals, as bands on the lanes.
fn intervals(out: &mut String, ln: &Lanes<'_>, m: &Model<'_>, mark_pt: &[usize], ys: &[f64], bottom: f64) {
    let mut down_since: BTreeMap<Node, f64> = BTreeMap::new();
    let mut parts: BTreeMap<usize, (f64, Node, Option<Node>, &str)> = BTreeMap::new();
    let mut bands: Vec<(Node, f64, f64, &'static str, &'static str, String)> = Vec::new();
    for (n, mk) in m.marks.iter().enumerate() {
        let y = ys[mark_pt[n]];
        match mk.what {
            What::Crash { node, .. } => {
                down_since.entry(*node).or_insert(y);
            }
            What::Restart { node } => {
                if let Some(y0) = down_since.remove(node) {
                    bands.push((*node, y0, y, "down", RED, format!("{} down", ln.name(*node))));
                }
            }
            What::PartitionStart { id, a, b, text } => {
                parts.insert(*id, (y, *a, *b, text));
            }
            What::PartitionHeal { id, .. } => {
                if let Some((y0, a, b, text)) = parts.remove(id) {
                    for node in partition_nodes(a, b) {
                        bands.push((node, y0, y, "partitioned", ORANGE, text.to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    for (node, y0) in down_since {
        bands.push((node, y0, bottom, "down", RED, format!("{} down", ln.name(node))));
    }
    for (_, (y0, a, b, text)) in parts {
        for node in partition_nodes(a, b) {
            bands.push((node, y0, bottom, "partitioned", ORANGE, text.to_string()));
        }
    }
    for (node, y0, y1, class, color, title) in bands {
        let (w, opacity) = if class == "down" { (12.0, 0.35) } else { (22.0, 0.25) };
        let _ = writeln!(
            out,
            r#"<g class="band {class}"><title>{}</title><rect x="{}" y="{}" width="{w}" height="{}" fill="{color}" fill-opacity="{opacity}"/></g>"#,
            escape(&title),
            f(ln.x(node) - w / 2.0),
            f(y0),
            f((y1 - y0).max(1.0))
        );
    }
}

fn mark(out: &mut String, ln: &Lanes<'_>, what: &What, t_ns: u64, y: f64) {
    let width = ln.width;
    let at = format!("t={}", sagamq::Time(t_ns));
    match what {
        What::Crash { node, torn } => {
            let text = if *torn { "CRASH (torn write)" } else { "CRASH" };
            let title = format!(
                "{at} {} crashes: unsynced writes lost{}",
                ln.name(*node),
                if *torn { ", last write torn" } else { "" }
            );
            lane_box(out, ln, "mark crash", *node, y, text, RED, &title);
        }
        What::Restart { node } => {
            let title = format!("{at} {} restarts and recovers from its disk", ln.name(*node));
            lane_box(out, ln, "mark restart", *node, y, "restart", GREEN, &title);
        }
        What::PartitionStart { a, b, text, .. } => {
            partition_mark(out, ln, "mark partition", *a, *b, y, &format!("cut: {text}"), &at)
        }
        What::PartitionHeal { a, b, text, .. } => {
            partition_mark(
                out,
                ln,
                "mark partition-heal",
                *a,
                *b,
                y,
                &format!("healed: {text}"),
                &at,
            );
        }
        What::Note { node, text } => {
            let x = ln.x(*node);
            let _ = writeln!(
                out,
                r##"<g class="mark note"><title>{} {}</title><rect x="{}" y="{}" width="10" height="10" fill="#555"/><text class="lbl" x="{}" y="{}" fill="#333">{}</text></g>"##,
                escape(&at),
                escape(text),
                f(x - 5.0),
                f(y - 5.0),
                f(x + 10.0),
                f(y + 4.0),
                escape(&clip(text, 60))
            );
        }
        What::HealPhase => {
            let _ = writeln!(
                out,
                r#"<g class="mark heal-phase"><title>{} heal phase: faults off, partitions healed, crashed nodes restarted; liveness is required from here</title><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{GREEN}" stroke-width="2" stroke-dasharray="8 4"/><text class="lbl" x="{}" y="{}" fill="{GREEN}" font-weight="bold">heal phase: faults off, partitions healed, crashed nodes restarted</text></g>"#,
                escape(&at),
                f(AXIS_W),
                f(y),
                f(width - MARGIN),
                f(y),
                f(AXIS_W + 4.0),
                f(y - 5.0)
            );
        }
        What::Violation {
            kind,
            invariant,
            detail,
            first,
        } => {
            let head = if *first { "FIRST VIOLATION" } else { "violation" };
            let text = clip(
                &format!("{head} [{kind}] {invariant} at {}: {detail}", fmt_ms(t_ns)),
                HEADER_CHARS - 12,
            );
            let _ = writeln!(
                out,
                r##"<g class="mark violation{}"><title>{} {head} [{kind}] {invariant}: {}</title><rect x="{}" y="{}" width="{}" height="18" fill="{RED}" fill-opacity="{}"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{RED}" stroke-width="{}"/><text x="{}" y="{}" fill="#8b0000" font-weight="bold">{}</text></g>"##,
                if *first { " first" } else { "" },
                escape(&at),
                escape(detail),
                f(AXIS_W - 4.0),
                f(y - 18.0),
                f(width - AXIS_W + 4.0 - MARGIN),
                if *first { "0.3" } else { "0.12" },
                f(AXIS_W - 4.0),
                f(y),
                f(width - MARGIN),
                f(y),
                if *first { "2.5" } else { "1" },
                f(AXIS_W + 4.0),
                f(y - 5.0),
                escape(&text)
            );
        }
        What::Plan { .. } | What::Send { .. } | What::Recv { .. } | What::CallbackFault { .. } => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn lane_box(out: &mut String, ln: &Lanes<'_>, class: &str, node: Node, y: f64, text: &str, color: &str, title: &str) {
    let x = ln.x(node);
    let w = 7.0 * text.chars().count() as f64 + 12.0;
    let _ = writeln!(
        out,
        r##"<g class="{class}"><title>{}</title><rect x="{}" y="{}" width="{}" height="16" rx="3" fill="{color}"/><text x="{x}" y="{}" text-anchor="middle" fill="#ffffff" font-weight="bold">{}</text></g>"##,
        escape(title),
        f(x - w / 2.0),
        f(y - 8.0),
        f(w),
        f(y + 4.0),
        escape(text),
        x = f(x)
    );
}

#[allow(clippy::too_many_arguments)]
fn partition_mark(
    out: &mut String,
    ln: &Lanes<'_>,
    class: &str,
    a: Node,
    b: Option<Node>,
    y: f64,
    text: &str,
    at: &str,
) {
    let xa = ln.x(a);
    let _ = write!(
        out,
        r#"<g class="{class}"><title>{} {}</title>"#,
        escape(at),
        escape(text)
    );
    if let Some(b) = b {
        let xb = ln.x(b);
        let _ = write!(
            out,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{ORANGE}" stroke-width="1.5" stroke-dasharray="4 3"/>"#,
            f(xa),
            f(y),
            f(xb),
            f(y)
        );
    }
    let nodes = partition_nodes(a, b);
    for node in &nodes {
        let x = ln.x(*node);
        let _ = write!(
            out,
            r#"<path d="M{} {} L{} {} L{} {} L{} {} z" fill="{ORANGE}"/>"#,
            f(x),
            f(y - 6.0),
            f(x + 6.0),
            f(y),
            f(x),
            f(y + 6.0),
            f(x - 6.0),
            f(y)
        );
    }
    // A pair's label sits on the dashed link between its lanes; a lone lane's
    // label beside it, on the side with room.
    let (x, y, anchor) = match b {
        Some(b) => ((xa + ln.x(b)) / 2.0, y - 5.0, "middle"),
        None if ln.is_last(a) => (xa - 12.0, y + 4.0, "end"),
        None => (xa + 12.0, y + 4.0, "start"),
    };
    let _ = writeln!(
        out,
        r#"<text class="lbl" x="{}" y="{}" text-anchor="{anchor}" fill="{ORANGE}" font-weight="bold">{}</text></g>"#,
        f(x),
        f(y),
        escape(&clip(text, 70))
    );
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn sample_has_lanes_arrows_marks_and_escaped_text() {
        let s = svg(&sample(), &Options::default()).unwrap();
        assert_eq!(
            s.matches(r#"<g class="lane""#).count(),
            5,
            "no custom lane: the custom node took no part"
        );
        assert_eq!(s.matches(r#"<g class="msg "#).count(), 5);
        assert_eq!(s.matches(" lost dropped\"").count(), 1);
        assert_eq!(s.matches(" lost network\"").count(), 1);
        assert_eq!(s.matches(r#"class="msg publish copy""#).count(), 1);
        assert_eq!(s.matches(r#"class="mark crash""#).count(), 1);
        assert_eq!(s.matches(r#"class="mark violation first""#).count(), 1);
        assert_eq!(s.matches(r#"class="band partitioned""#).count(), 2);
        assert_eq!(s.matches(r#"class="band down""#).count(), 1);
        assert!(s.contains("stock of &lt;p&gt; &amp; &quot;q&quot;"));
        assert!(!s.contains("<p>"));
        // The 480ms between the restart and the heal phase is drawn short.
        assert!(s.contains("+479ms"), "{s}");
    }
}
