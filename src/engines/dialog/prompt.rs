//! Prompt text with SSML-like pauses: `<break time="500ms"/>` (or `1s`) splits a prompt into
//! segments separated by silence. Each segment is synthesized and marked on its own.

use std::sync::LazyLock;

use regex::Regex;

/// A piece of a reply: text to speak, then silence.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub pause_after_ms: u64,
}

static BREAK: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r#"<break\s+time\s*=\s*["']?(\d+(?:\.\d+)?)\s*(ms|s)["']?\s*/?>"#).ok()
});

/// Fills each `{name}` in `template` with `value(name)`; a name it does not know (`None`) stays
/// as written. A `{` without its `}` is text. One loop for flows, agent prompts and webhook
/// URLs.
pub fn fill(template: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        match value(&rest[open + 1..open + close]) {
            Some(v) => out.push_str(&v),
            None => out.push_str(&rest[open..=open + close]),
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// Splits `text` at break tags and at sentence ends, so playout marks follow sentences.
pub fn segments(text: &str) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let push_text = |t: &str, out: &mut Vec<Segment>| {
        for sentence in split_sentences(t) {
            out.push(Segment {
                text: sentence,
                pause_after_ms: 0,
            });
        }
    };
    let mut last = 0;
    if let Some(re) = BREAK.as_ref() {
        for cap in re.captures_iter(text) {
            let Some(m) = cap.get(0) else { continue };
            push_text(&text[last..m.start()], &mut out);
            let value: f64 = cap
                .get(1)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0.0);
            let ms = if cap.get(2).is_some_and(|u| u.as_str() == "s") {
                value * 1000.0
            } else {
                value
            };
            let ms = ms.clamp(0.0, 10_000.0) as u64;
            match out.last_mut() {
                Some(seg) => seg.pause_after_ms += ms,
                None => out.push(Segment {
                    text: String::new(),
                    pause_after_ms: ms,
                }),
            }
            last = m.end();
        }
    }
    push_text(&text[last..], &mut out);
    out
}

fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        cur.push(c);
        let boundary =
            matches!(c, '.' | '?' | '!') && chars.get(i + 1).is_none_or(|n| n.is_whitespace());
        if boundary {
            let s = cur.trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    let s = cur.trim().to_string();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// The whole text of a reply, for records.
pub fn joined(segs: &[Segment]) -> String {
    segs.iter()
        .map(|s| s.text.as_str())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaks_and_sentences() {
        let s = segments(
            r#"Hello. <break time="500ms"/> Your order is 5-5-4-2-1. Bye! <break time='1s'/>"#,
        );
        assert_eq!(
            s,
            vec![
                Segment {
                    text: "Hello.".into(),
                    pause_after_ms: 500
                },
                Segment {
                    text: "Your order is 5-5-4-2-1.".into(),
                    pause_after_ms: 0
                },
                Segment {
                    text: "Bye!".into(),
                    pause_after_ms: 1000
                },
            ]
        );
        assert_eq!(joined(&s), "Hello. Your order is 5-5-4-2-1. Bye!");
    }

    #[test]
    fn decimals_do_not_split() {
        assert_eq!(segments("It costs 12.50 dollars.").len(), 1);
        assert_eq!(segments("").len(), 0);
    }
}
