//! Entity extraction from transcripts: digit strings (spoken as words or numbers, with the
//! mishearings small ASR models make on phone audio), amounts, dates, times and yes/no.

/// Lower-cases and splits a transcript into word tokens (digits kept, punctuation dropped,
/// `5-5-4` and `5,5,4` split into digits).
pub fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for raw in text.split(|c: char| c.is_whitespace() || c == ',' || c == '-' || c == ';') {
        let w: String = raw
            .chars()
            .filter(|c| {
                c.is_alphanumeric()
                    || *c == '\''
                    || *c == '.'
                    || *c == '$'
                    || *c == ':'
                    || *c == '/'
            })
            .collect::<String>()
            .to_lowercase();
        let w = w.trim_matches(|c| c == '.' || c == '\'').to_string();
        if !w.is_empty() {
            out.push(w);
        }
    }
    out
}

fn unit_word(w: &str) -> Option<u32> {
    Some(match w {
        "zero" | "oh" | "o" | "nought" => 0,
        "one" => 1,
        "two" => 2,
        "three" => 3,
        "four" => 4,
        "five" => 5,
        "six" => 6,
        "seven" => 7,
        "eight" => 8,
        "nine" => 9,
        _ => return None,
    })
}

/// Words small ASR models put in place of digits on 8 kHz audio. Only used inside a run that
/// already holds a real digit, so "for" in "calling for my order" stays a word.
fn misheard_digit(w: &str) -> Option<u32> {
    Some(match w {
        "won" | "ones" | "wan" => 1,
        "to" | "too" | "tu" | "twos" => 2,
        "tree" | "free" => 3,
        "for" | "fore" | "fours" => 4,
        "fife" | "time" | "fives" | "fine" | "hive" => 5,
        "sex" | "sicks" | "sixes" => 6,
        "ate" | "eights" => 8,
        "nein" | "nines" => 9,
        _ => return None,
    })
}

fn teen_word(w: &str) -> Option<u32> {
    Some(match w {
        "ten" => 10,
        "eleven" => 11,
        "twelve" => 12,
        "thirteen" => 13,
        "fourteen" => 14,
        "fifteen" => 15,
        "sixteen" => 16,
        "seventeen" => 17,
        "eighteen" => 18,
        "nineteen" => 19,
        _ => return None,
    })
}

fn tens_word(w: &str) -> Option<u32> {
    Some(match w {
        "twenty" => 20,
        "thirty" => 30,
        "forty" => 40,
        "fifty" => 50,
        "sixty" => 60,
        "seventy" => 70,
        "eighty" => 80,
        "ninety" => 90,
        _ => return None,
    })
}

/// Extracts the longest digit string a caller spoke: "five five four two one", "55421",
/// "5, 5, 4, 2, 1", "double five four twenty one", "time time for two ones" (all 55421).
pub fn digits(text: &str) -> Option<String> {
    let toks = tokens(text);
    let mut best: Option<String> = None;
    let mut run = String::new();
    let mut real_in_run = 0usize;
    let mut repeat = 1usize;
    let mut pending_tens: Option<u32> = None;
    let finish = |run: &mut String, real: &mut usize, best: &mut Option<String>| {
        if *real > 0 && best.as_ref().is_none_or(|b| run.len() > b.len()) {
            *best = Some(run.clone());
        }
        run.clear();
        *real = 0;
    };
    for (i, t) in toks.iter().enumerate() {
        let next_is_digitish = toks
            .get(i + 1)
            .map(|n| {
                unit_word(n).is_some()
                    || n.chars().all(|c| c.is_ascii_digit())
                    || misheard_digit(n).is_some()
            })
            .unwrap_or(false);
        let prev_in_run = !run.is_empty();
        if let Some(tens) = pending_tens.take() {
            if let Some(u) = unit_word(t).filter(|&u| u > 0) {
                run.push_str(&(tens + u).to_string());
                real_in_run += 1;
                continue;
            }
            run.push_str(&tens.to_string());
        }
        if t == "double" || t == "triple" {
            repeat = if t == "double" { 2 } else { 3 };
            continue;
        }
        let piece: Option<(String, bool)> = if t.chars().all(|c| c.is_ascii_digit()) {
            Some((t.clone(), true))
        } else if let Some(d) = unit_word(t) {
            // "o"/"oh" alone is an exclamation unless it sits among digits.
            if (t == "oh" || t == "o") && !prev_in_run && !next_is_digitish {
                None
            } else {
                Some((d.to_string(), true))
            }
        } else if let Some(n) = teen_word(t) {
            Some((n.to_string(), true))
        } else if let Some(n) = tens_word(t) {
            pending_tens = Some(n);
            real_in_run += 1;
            continue;
        } else if t == "hundred" && !run.is_empty() {
            Some(("00".to_string(), true))
        } else if let Some(d) = misheard_digit(t) {
            if prev_in_run || next_is_digitish {
                Some((d.to_string(), false))
            } else {
                None
            }
        } else {
            None
        };
        match piece {
            Some((p, real)) => {
                for _ in 0..repeat {
                    run.push_str(&p);
                }
                repeat = 1;
                if real {
                    real_in_run += 1;
                }
            }
            None => {
                repeat = 1;
                finish(&mut run, &mut real_in_run, &mut best);
            }
        }
    }
    if let Some(tens) = pending_tens {
        run.push_str(&tens.to_string());
    }
    finish(&mut run, &mut real_in_run, &mut best);
    best
}

/// A yes or no answer, taken from the first words ("yeah, that's right", "no it isn't").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YesNo {
    Yes,
    No,
}

pub fn yes_no(text: &str) -> Option<(YesNo, f32)> {
    let toks = tokens(text);
    let first: Vec<&str> = toks.iter().take(4).map(String::as_str).collect();
    const YES: [&str; 14] = [
        "yes",
        "yeah",
        "yep",
        "yup",
        "yea",
        "ya",
        "correct",
        "right",
        "sure",
        "affirmative",
        "absolutely",
        "ok",
        "okay",
        "exactly",
    ];
    const NO: [&str; 7] = ["no", "nope", "nah", "negative", "incorrect", "wrong", "not"];
    for (i, w) in first.iter().enumerate() {
        let conf = if i == 0 { 1.0 } else { 0.8 };
        if NO.contains(w) {
            return Some((YesNo::No, conf));
        }
        if YES.contains(w) {
            // "that's not right" is caught above; "that is right" lands here.
            return Some((YesNo::Yes, conf));
        }
    }
    // tiny.en hears a lone "no" on phone audio as "hello" or "know" now and then.
    if toks.len() <= 2 && matches!(first.first(), Some(&"hello") | Some(&"know") | Some(&"noh")) {
        return Some((YesNo::No, 0.6));
    }
    None
}

/// The largest amount sidecall takes, in cents (one trillion dollars): anything larger is not
/// an amount a caller means, and the arithmetic below stays far from overflow.
pub const MAX_CENTS: u64 = 100_000_000_000_000;

/// What `number_from` found at a position.
enum Num {
    /// No number starts here.
    None,
    /// A number too large for an amount (its tail must not be read as a smaller one).
    TooLarge,
    /// Cents and the tokens used.
    Cents(u64, usize),
}

/// Parses a spelled-out or numeric whole number ("one hundred twenty", "1,250", "twelve") into
/// cents. Every step is checked: "one hundred hundred hundred ..." or "1e300" is too large.
fn number_from(toks: &[String]) -> Num {
    match number_inner(toks) {
        Ok(Some((c, u))) => Num::Cents(c, u),
        Ok(None) => Num::None,
        Err(()) => Num::TooLarge,
    }
}

fn number_inner(toks: &[String]) -> Result<Option<(u64, usize)>, ()> {
    if let Some(t) = toks.first() {
        let clean: String = t
            .trim_start_matches('$')
            .chars()
            .filter(|c| *c != ',')
            .collect();
        // Only digits and one decimal point: f64's parser also takes "inf", "NaN" and "1e300".
        let numeric = !clean.is_empty()
            && clean.chars().all(|c| c.is_ascii_digit() || c == '.')
            && clean.matches('.').count() <= 1
            && clean.chars().any(|c| c.is_ascii_digit());
        if numeric {
            let v = clean.parse::<f64>().map_err(|_| ())?;
            let cents = (v * 100.0).round();
            if !(0.0..=MAX_CENTS as f64).contains(&cents) {
                return Err(());
            }
            return Ok(Some((cents as u64, 1)));
        }
        if matches!(
            clean.to_ascii_lowercase().as_str(),
            "inf" | "infinity" | "nan"
        ) {
            return Err(());
        }
    }
    let mut total = 0u64;
    let mut current = 0u64;
    let mut used = 0;
    for t in toks {
        if let Some(u) = unit_word(t).filter(|_| t != "o" && t != "oh") {
            current = current.checked_add(u64::from(u)).ok_or(())?;
        } else if let Some(n) = teen_word(t).or_else(|| tens_word(t)) {
            current = current.checked_add(u64::from(n)).ok_or(())?;
        } else if t == "hundred" {
            current = current.max(1).checked_mul(100).ok_or(())?;
        } else if t == "thousand" || t == "million" || t == "billion" {
            let scale = match t.as_str() {
                "thousand" => 1_000,
                "million" => 1_000_000,
                _ => 1_000_000_000,
            };
            total = total
                .checked_add(current.max(1).checked_mul(scale).ok_or(())?)
                .ok_or(())?;
            current = 0;
        } else if t == "and" && used > 0 {
        } else {
            break;
        }
        used += 1;
    }
    if used == 0 {
        return Ok(None);
    }
    let cents = total
        .checked_add(current)
        .and_then(|v| v.checked_mul(100))
        .filter(|c| *c <= MAX_CENTS)
        .ok_or(())?;
    Ok(Some((cents, used)))
}

/// An amount of money in cents: "$120.50", "120 dollars and 50 cents", "one hundred twenty dollars".
pub fn amount_cents(text: &str) -> Option<u64> {
    let toks = tokens(text);
    for i in 0..toks.len() {
        let (cents, used) = match number_from(&toks[i..]) {
            Num::None => continue,
            // "one hundred hundred hundred ..." is no amount, not its last few words.
            Num::TooLarge => return None,
            Num::Cents(c, u) => (c, u),
        };
        let mut value = cents;
        let rest = &toks[i + used..];
        let mut j = 0;
        if rest
            .first()
            .is_some_and(|w| w.starts_with("dollar") || w.starts_with("buck"))
        {
            j = 1;
        }
        if rest.get(j).is_some_and(|w| w == "and") {
            j += 1;
        }
        if let Num::Cents(c, u) = number_from(&rest[j..])
            && rest.get(j + u).is_some_and(|w| w.starts_with("cent"))
            && c < 10_000
        {
            value = value.checked_add(c / 100)?;
        }
        return (value <= MAX_CENTS).then_some(value);
    }
    None
}

/// How an amount of money said with its unit ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountEnd {
    /// "fifty dollars", "20 bucks", "$50" (as ASR writes "fifty dollars"): cents may follow.
    Dollars,
    /// "ten dollars and fifty cents", "$10.50": nothing more to come.
    Cents,
}

/// Whether the words are an amount of money that ends on its unit, and which. `None` for
/// "fifty", "one hundred and", "fifty dollars and": they may go on.
pub fn amount_end(text: &str) -> Option<AmountEnd> {
    let toks = tokens(text);
    let last = toks.last()?;
    let end = match last.as_str() {
        "dollar" | "dollars" | "buck" | "bucks" => AmountEnd::Dollars,
        "cent" | "cents" => AmountEnd::Cents,
        w if w.starts_with('$') && w.contains('.') => AmountEnd::Cents,
        w if w.starts_with('$') => AmountEnd::Dollars,
        _ => return None,
    };
    amount_cents(text).map(|_| end)
}

/// Formats cents as words a TTS reads well: "120 dollars and 50 cents".
pub fn say_amount(cents: u64) -> String {
    let (d, c) = (cents / 100, cents % 100);
    match c {
        0 => format!("{d} dollars"),
        _ => format!("{d} dollars and {c} cents"),
    }
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

fn capitalise(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// A date as the caller put it, normalised: "Thursday", "tomorrow", "March 3".
pub fn date(text: &str) -> Option<String> {
    let toks = tokens(text);
    for (i, t) in toks.iter().enumerate() {
        if t == "today" || t == "tomorrow" {
            return Some(t.clone());
        }
        let day = t.trim_end_matches("'s").trim_end_matches('s');
        if let Some(w) = WEEKDAYS.iter().find(|w| **w == day || **w == t.as_str()) {
            return Some(capitalise(w));
        }
        if let Some(m) = MONTHS.iter().find(|m| **m == t.as_str()) {
            if let Some(next) = toks.get(i + 1) {
                let n: String = next.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(d) = n.parse::<u32>()
                    && (1..=31).contains(&d)
                {
                    return Some(format!("{} {}", capitalise(m), d));
                }
            }
            return Some(capitalise(m));
        }
    }
    None
}

/// A time of day normalised to "10 AM" / "2:30 PM".
pub fn time_of_day(text: &str) -> Option<String> {
    let toks = tokens(text);
    for (i, t) in toks.iter().enumerate() {
        let (hour, minute): (u32, Option<u32>) = if let Some((h, m)) = t.split_once(':') {
            match (
                h.parse().ok(),
                m.trim_end_matches(|c: char| c.is_alphabetic()).parse().ok(),
            ) {
                (Some(h), Some(m)) => (h, Some(m)),
                _ => continue,
            }
        } else if let Ok(h) = t
            .trim_end_matches("am")
            .trim_end_matches("pm")
            .parse::<u32>()
        {
            (h, None)
        } else if let Some(h) = unit_word(t)
            .filter(|_| t != "o" && t != "oh")
            .or_else(|| teen_word(t))
        {
            (h, None)
        } else {
            continue;
        };
        if !(1..=12).contains(&hour) {
            continue;
        }
        let nxt = toks.get(i + 1).map(String::as_str).unwrap_or("");
        let later = &toks[i + 1..];
        let suffix = if t.ends_with("pm")
            || matches!(nxt, "pm" | "p.m" | "p")
            || later.iter().any(|w| w == "afternoon" || w == "evening")
        {
            "PM"
        } else if t.ends_with("am")
            || matches!(nxt, "am" | "a.m" | "a")
            || later.iter().any(|w| w == "morning")
        {
            "AM"
        } else if toks.get(i.wrapping_sub(1)).is_some_and(|w| w == "at") || minute.is_some() {
            if hour >= 8 && hour != 12 { "AM" } else { "PM" }
        } else {
            continue;
        };
        return Some(match minute {
            Some(m) if m > 0 => format!("{hour}:{m:02} {suffix}"),
            _ => format!("{hour} {suffix}"),
        });
    }
    None
}

/// Renders a digit string for a TTS to read one digit at a time, the way people read numbers
/// back: a short pause (comma) after each digit, a longer one (semicolon) between groups of
/// three in numbers over five digits, the last group of four rather than one digit alone
/// ("55421" as "5, 5, 4, 2, 1"; "5551234567" as "5, 5, 5; 1, 2, 3; 4, 5, 6, 7"). espeak-ng
/// runs "5 5 4" together (whisper hears "5.5 for") and read the old dashes aloud as "dash";
/// with commas each digit stands alone, and the OpenAI voices read it the same way.
pub fn spell_digits(d: &str) -> String {
    let chars: Vec<char> = d.chars().filter(|c| !c.is_whitespace()).collect();
    let sizes = digit_groups(chars.len());
    let mut out = String::with_capacity(chars.len() * 3);
    let mut at = 0;
    for (g, size) in sizes.iter().enumerate() {
        if g > 0 {
            out.push_str("; ");
        }
        for (i, c) in chars[at..at + size].iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push(*c);
        }
        at += size;
    }
    out
}

/// How a run of `n` digits is grouped for reading: one group up to five, threes after that,
/// with a four at the end instead of a lone digit.
fn digit_groups(n: usize) -> Vec<usize> {
    if n <= 5 {
        return if n == 0 { Vec::new() } else { vec![n] };
    }
    let mut sizes = vec![3; n / 3];
    match n % 3 {
        0 => {}
        1 => {
            if let Some(last) = sizes.last_mut() {
                *last = 4;
            }
        }
        r => sizes.push(r),
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amount_ends_on_its_unit() {
        for (said, end) in [
            ("Fifty dollars.", AmountEnd::Dollars),
            ("$50.", AmountEnd::Dollars),
            ("twenty bucks", AmountEnd::Dollars),
            ("one hundred twenty dollars", AmountEnd::Dollars),
            ("fifty dollars and twenty five cents", AmountEnd::Cents),
            ("I'd like to pay $120.50", AmountEnd::Cents),
        ] {
            assert_eq!(amount_end(said), Some(end), "{said}");
        }
        for open in [
            "Fifty",
            "one hundred and",
            "fifty dollars and",
            "Dollars.",
            "I want to pay",
            "fifty percent",
            "one hundred centuries",
            "a bucket",
            "",
        ] {
            assert_eq!(amount_end(open), None, "{open}");
        }
    }

    #[test]
    fn amounts_from_outside_never_overflow_or_read_back_wrong() {
        assert_eq!(amount_cents("infinity dollars"), None);
        assert_eq!(amount_cents("inf"), None);
        assert_eq!(amount_cents("NaN dollars"), None);
        assert_eq!(amount_cents("1e300 dollars"), None);
        let hundreds = format!("one {}", "hundred ".repeat(40));
        assert_eq!(amount_cents(&hundreds), None);
        assert_eq!(amount_cents("999999999999999999999 dollars"), None);
        assert_eq!(amount_cents("two million dollars"), Some(200_000_000));
        assert_eq!(amount_cents("$120.50"), Some(12_050));
        assert_eq!(
            amount_cents("one hundred twenty dollars and fifty cents"),
            Some(12_050)
        );
    }

    #[test]
    fn digits_are_grouped_for_speech() {
        assert_eq!(spell_digits("55421"), "5, 5, 4, 2, 1");
        assert_eq!(spell_digits("5551234567"), "5, 5, 5; 1, 2, 3; 4, 5, 6, 7");
        assert_eq!(spell_digits("0123"), "0, 1, 2, 3");
        assert_eq!(spell_digits("1234567"), "1, 2, 3; 4, 5, 6, 7");
        assert_eq!(spell_digits("12345678"), "1, 2, 3; 4, 5, 6; 7, 8");
        assert_eq!(spell_digits("7"), "7");
        assert_eq!(spell_digits(""), "");
        assert!(!spell_digits("4111111111111111").contains('-'));
        // What the TTS reads is what the caller said: the digits come back from the words.
        for d in ["55421", "5551234567", "0123", "12345678"] {
            assert_eq!(digits(&spell_digits(d)).as_deref(), Some(d), "{d}");
        }
    }

    #[test]
    fn spoken_digits() {
        assert_eq!(digits("five five four two one").as_deref(), Some("55421"));
        assert_eq!(
            digits("My order number is 5, 5, 4, 2, 1.").as_deref(),
            Some("55421")
        );
        assert_eq!(digits("It's 55421").as_deref(), Some("55421"));
        assert_eq!(digits("5-5-4-2-1").as_deref(), Some("55421"));
        assert_eq!(digits("double five four two one").as_deref(), Some("55421"));
        assert_eq!(
            digits("fifty five four twenty one").as_deref(),
            Some("55421")
        );
        assert_eq!(digits("one two oh four").as_deref(), Some("1204"));
    }

    #[test]
    fn misheard_digits_inside_a_run() {
        assert_eq!(
            digits("My order number in time time for two ones.").as_deref(),
            Some("55421")
        );
        assert_eq!(digits("won two three").as_deref(), Some("123"));
        assert_eq!(digits("eight ate one").as_deref(), Some("881"));
        // Alone, they stay words.
        assert_eq!(digits("I am calling for my order"), None);
        assert_eq!(digits("oh hello"), None);
    }

    #[test]
    fn yes_and_no_from_first_words() {
        assert_eq!(yes_no("Yeah, that's it.").map(|v| v.0), Some(YesNo::Yes));
        assert_eq!(yes_no("Yes.").map(|v| v.0), Some(YesNo::Yes));
        assert_eq!(yes_no("No, it's wrong").map(|v| v.0), Some(YesNo::No));
        assert_eq!(yes_no("That's not right").map(|v| v.0), Some(YesNo::No));
        assert_eq!(yes_no("Hello.").map(|v| v.0), Some(YesNo::No));
        assert_eq!(yes_no("what is the weather"), None);
    }

    #[test]
    fn amounts() {
        assert_eq!(amount_cents("$120.50"), Some(12_050));
        assert_eq!(
            amount_cents("I want to pay 120 dollars and 50 cents"),
            Some(12_050)
        );
        assert_eq!(amount_cents("one hundred twenty dollars"), Some(12_000));
        assert_eq!(amount_cents("two thousand five hundred"), Some(250_000));
        assert_eq!(amount_cents("nothing here"), None);
        assert_eq!(say_amount(12_050), "120 dollars and 50 cents");
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(date("Thursday please").as_deref(), Some("Thursday"));
        assert_eq!(date("can I come tomorrow").as_deref(), Some("tomorrow"));
        assert_eq!(date("March 3rd").as_deref(), Some("March 3"));
        assert_eq!(time_of_day("at 10 a.m.").as_deref(), Some("10 AM"));
        assert_eq!(time_of_day("ten in the morning").as_deref(), Some("10 AM"));
        assert_eq!(time_of_day("2:30 pm").as_deref(), Some("2:30 PM"));
        assert_eq!(time_of_day("Thursday at 10").as_deref(), Some("10 AM"));
        assert_eq!(time_of_day("I have 3 cats"), None);
    }
}
