//! The keypad digit collector: digits accumulate until the terminator key, the maximum count,
//! or an inter-digit timeout, then the entry goes to the dialog as one string.

use crate::engines::dialog::DigitSpec;

/// A finished keypad entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub digits: String,
    /// Why it finished: "terminator", "max_digits" or "timeout".
    pub reason: &'static str,
}

/// Collects digits for one call.
#[derive(Debug)]
pub struct DigitCollector {
    buf: String,
    last_ms: u64,
    inter_digit_ms: u64,
    default_max: usize,
    default_terminator: Option<char>,
    spec: Option<DigitSpec>,
}

impl DigitCollector {
    pub fn new(inter_digit_ms: u64, max: usize, terminator: Option<char>) -> Self {
        Self {
            buf: String::new(),
            last_ms: 0,
            inter_digit_ms,
            default_max: max,
            default_terminator: terminator,
            spec: None,
        }
    }

    /// What the dialog expects now (None: any digits, default limits).
    pub fn expect(&mut self, spec: Option<DigitSpec>) {
        self.spec = spec;
    }

    /// Nothing collected yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Digits collected so far.
    pub fn pending(&self) -> &str {
        &self.buf
    }

    /// The key that ends an entry now, if any.
    pub fn terminator(&self) -> Option<char> {
        self.limits().1
    }

    fn limits(&self) -> (usize, Option<char>) {
        match &self.spec {
            Some(s) => (
                s.max.min(self.default_max.max(1)).max(1),
                s.terminator.or(self.default_terminator),
            ),
            None => (self.default_max.max(1), self.default_terminator),
        }
    }

    /// Adds a key pressed at `now_ms`; returns the entry when it is complete.
    pub fn push(&mut self, key: char, now_ms: u64) -> Option<Entry> {
        let (max, term) = self.limits();
        self.last_ms = now_ms;
        if Some(key) == term {
            if self.buf.is_empty() {
                return None;
            }
            return Some(Entry {
                digits: std::mem::take(&mut self.buf),
                reason: "terminator",
            });
        }
        self.buf.push(key);
        if self.buf.chars().count() >= max {
            return Some(Entry {
                digits: std::mem::take(&mut self.buf),
                reason: "max_digits",
            });
        }
        None
    }

    /// Completes an entry that already fills what is expected now (keys typed ahead, before
    /// the dialog said how many it wants).
    pub fn complete_now(&mut self) -> Option<Entry> {
        let (max, _) = self.limits();
        if !self.buf.is_empty() && self.buf.chars().count() >= max {
            return Some(Entry {
                digits: std::mem::take(&mut self.buf),
                reason: "max_digits",
            });
        }
        None
    }

    /// When the entry in progress ends by the inter-digit timeout.
    pub fn due_at(&self) -> u64 {
        self.last_ms.saturating_add(self.inter_digit_ms)
    }

    /// Called on every tick: completes an entry after the inter-digit timeout.
    pub fn tick(&mut self, now_ms: u64) -> Option<Entry> {
        if !self.buf.is_empty() && now_ms.saturating_sub(self.last_ms) >= self.inter_digit_ms {
            return Some(Entry {
                digits: std::mem::take(&mut self.buf),
                reason: "timeout",
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminator_max_and_timeout() {
        let mut c = DigitCollector::new(3_000, 20, Some('#'));
        assert_eq!(c.push('5', 0), None);
        assert_eq!(c.push('5', 100), None);
        assert_eq!(
            c.push('#', 200),
            Some(Entry {
                digits: "55".into(),
                reason: "terminator"
            })
        );
        assert_eq!(c.push('#', 300), None, "a lone terminator is nothing");

        c.expect(Some(DigitSpec {
            max: 3,
            terminator: Some('#'),
        }));
        c.push('1', 0);
        c.push('2', 0);
        assert_eq!(
            c.push('3', 0),
            Some(Entry {
                digits: "123".into(),
                reason: "max_digits"
            })
        );

        c.push('9', 1_000);
        assert_eq!(c.tick(3_999), None);
        assert_eq!(
            c.tick(4_000),
            Some(Entry {
                digits: "9".into(),
                reason: "timeout"
            })
        );
        assert!(c.is_empty());
    }
}
