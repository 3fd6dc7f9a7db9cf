//! Speakable pieces of streamed text: a generating engine (an LLM) produces text a few
//! characters at a time; the call should start speaking as soon as a sentence (or a long enough
//! clause) is complete, never cut inside a number ("5.5", "$1,200.50"), an abbreviation ("Dr.",
//! "e.g."), a time ("10:30") or an address ("example.com"), and never wait for an endless
//! sentence (`max_chars`, cut at a space).

/// Words whose trailing period does not end a sentence (compared without case and dots).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc", "eg", "ie", "inc",
    "ltd", "co", "corp", "no", "nos", "approx", "dept", "est", "fig", "vol", "am", "pm", "jan",
    "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue",
    "tues", "wed", "thu", "thurs", "fri", "sat", "sun", "ave", "blvd", "rd", "apt", "ext",
];

/// Cuts streamed text into speakable pieces.
#[derive(Debug)]
pub struct PieceSplitter {
    buf: String,
    /// A clause (`,`, `:`, `;` or a dash) ends a piece only once the piece is this long.
    clause_min: usize,
    /// A piece never grows past this (cut at the last space before it).
    max_chars: usize,
}

impl PieceSplitter {
    pub fn new(clause_min: usize, max_chars: usize) -> Self {
        Self {
            buf: String::new(),
            clause_min: clause_min.max(1),
            max_chars: max_chars.max(clause_min.max(1) + 1),
        }
    }

    /// Adds streamed text; returns the pieces it completed, in order.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        while let Some(end) = self.boundary() {
            let rest = self.buf.split_off(end);
            let piece = std::mem::replace(&mut self.buf, rest);
            let piece = piece.trim();
            if !piece.is_empty() {
                out.push(piece.to_string());
            }
        }
        out
    }

    /// The stream ended: what is left, if anything.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let rest = rest.trim();
        (!rest.is_empty()).then(|| rest.to_string())
    }

    /// Where the first complete piece in the buffer ends (a byte index), if there is one.
    fn boundary(&self) -> Option<usize> {
        let b = &self.buf;
        let chars: Vec<(usize, char)> = b.char_indices().collect();
        let lead = chars.iter().take_while(|(_, c)| c.is_whitespace()).count();
        let mut last_space = None;
        for (k, &(i, c)) in chars.iter().enumerate() {
            if c.is_whitespace() {
                last_space = Some(i);
            }
            if k.saturating_sub(lead) >= self.max_chars {
                // Too long without an end: cut at the last space (never inside a word).
                if let Some(sp) = last_space.filter(|&sp| sp > 0) {
                    return Some(sp);
                }
            }
            // A boundary needs what follows it: a space after the mark (and closing quotes).
            let mut j = k + 1;
            while chars.get(j).is_some_and(|&(_, q)| "\"')]”’".contains(q)) {
                j += 1;
            }
            let Some(&(next_i, next)) = chars.get(j) else {
                continue;
            };
            if !next.is_whitespace() {
                continue;
            }
            let piece_len = k.saturating_sub(lead);
            // "5, 5, 4, 2, 1": digits read one by one are one number; wait for what follows.
            if c == ',' && k > 0 && chars[k - 1].1.is_ascii_digit() {
                match chars[j..].iter().find(|(_, q)| !q.is_whitespace()) {
                    None => return None,
                    Some((_, q)) if q.is_ascii_digit() => continue,
                    Some(_) => {}
                }
            }
            let ends = match c {
                '!' | '?' => true,
                '.' => !self.period_is_not_an_end(&b[..i]),
                ';' | ':' | ',' => piece_len >= self.clause_min,
                '—' | '–' => piece_len >= self.clause_min,
                _ => false,
            };
            if ends {
                return Some(next_i);
            }
        }
        None
    }

    /// The period after `before` belongs to a word, not to the sentence: an abbreviation, an
    /// initial ("J."), or a number's ordinal in a list would read wrong cut there.
    fn period_is_not_an_end(&self, before: &str) -> bool {
        let word = before
            .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
            .next()
            .unwrap_or("");
        let bare: String = word
            .chars()
            .filter(|c| *c != '.')
            .flat_map(char::to_lowercase)
            .collect();
        if ABBREVIATIONS.contains(&bare.as_str()) {
            return true;
        }
        // Dotted abbreviations: "U.S.", "e.g.", "a.m.".
        if word.trim_end_matches('.').contains('.')
            && word.chars().filter(|c| c.is_alphabetic()).count() <= 4
        {
            return true;
        }
        // An initial: one capital letter ("J. Smith").
        let mut letters = word.chars();
        matches!((letters.next(), letters.next()), (Some(l), None) if l.is_uppercase())
    }
}

#[cfg(test)]
mod digit_tests {
    use super::*;

    fn all(text: &str) -> Vec<String> {
        let mut s = PieceSplitter::new(10, 200);
        let mut out = Vec::new();
        for c in text.chars() {
            out.extend(s.push(&c.to_string()));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn digits_read_one_by_one_stay_together_and_us_ends_a_sentence() {
        assert_eq!(
            all("Thanks, your order number is 5, 5, 4, 2, 1, and it shipped."),
            [
                "Thanks, your order number is 5, 5, 4, 2, 1,",
                "and it shipped."
            ]
        );
        assert_eq!(
            all("Thank you for calling us. Your order is here. We ship to the U.S. and Canada."),
            [
                "Thank you for calling us.",
                "Your order is here.",
                "We ship to the U.S. and Canada."
            ]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in chunks of `n` characters, as a stream would.
    fn split(text: &str, n: usize) -> Vec<String> {
        let mut s = PieceSplitter::new(40, 160);
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for chunk in chars.chunks(n) {
            out.extend(s.push(&chunk.iter().collect::<String>()));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn sentences_come_out_as_soon_as_they_end() {
        let mut s = PieceSplitter::new(40, 160);
        assert!(s.push("Sure, let me check").is_empty());
        assert!(
            s.push(" that for you.").is_empty(),
            "the end needs what follows"
        );
        assert_eq!(s.push(" Your"), vec!["Sure, let me check that for you."]);
        assert_eq!(s.push(" order shipped! It"), vec!["Your order shipped!"]);
        assert_eq!(s.finish().as_deref(), Some("It"));
    }

    #[test]
    fn numbers_times_and_addresses_are_never_cut() {
        for n in [1, 3, 7, 100] {
            assert_eq!(
                split(
                    "The total is $1,200.50 and the rate is 5.5 percent. We open at 10:30 tomorrow. Visit example.com/help or mail help@shop.example.com today.",
                    n
                ),
                vec![
                    "The total is $1,200.50 and the rate is 5.5 percent.",
                    "We open at 10:30 tomorrow.",
                    "Visit example.com/help or mail help@shop.example.com today.",
                ],
                "chunks of {n}"
            );
        }
    }

    #[test]
    fn abbreviations_and_initials_do_not_end_a_sentence() {
        assert_eq!(
            split(
                "Dr. Smith will call, e.g. on Mon. at 9 a.m. with J. Doe. Thanks!",
                4
            ),
            vec![
                "Dr. Smith will call, e.g. on Mon. at 9 a.m. with J. Doe.",
                "Thanks!"
            ]
        );
    }

    #[test]
    fn long_clauses_end_a_piece_short_ones_do_not() {
        assert_eq!(
            split(
                "Yes, I can help. I found your order from last Tuesday morning, and it is on its way to you now.",
                5
            ),
            vec![
                "Yes, I can help.",
                "I found your order from last Tuesday morning,",
                "and it is on its way to you now.",
            ]
        );
    }

    #[test]
    fn a_sentence_without_an_end_is_cut_at_a_space_when_too_long() {
        let text = "word ".repeat(60);
        let pieces = split(&text, 9);
        assert!(pieces.len() >= 2, "{pieces:?}");
        for p in &pieces {
            assert!(p.chars().count() <= 160, "{p}");
            assert!(
                p.split(' ').all(|w| w == "word"),
                "never inside a word: {p}"
            );
        }
        assert_eq!(pieces.join(" "), text.trim());
    }

    #[test]
    fn quotes_after_the_mark_stay_with_their_sentence() {
        assert_eq!(
            split("She said \"done.\" Then she left.", 2),
            vec!["She said \"done.\"", "Then she left."]
        );
    }
}
