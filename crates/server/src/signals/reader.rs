//! The fast path for reading a heartbeat body.
//!
//! Read through serde's generic visitors, a ~7 KB heartbeat cost more than
//! half of all the server's user-space instructions per heartbeat (callgrind,
//! docs/BENCHMARKS.md): 800 numbers in 200 `[t, x, y, z]` arrays, each number
//! a chain of visitor calls. This reader walks the top-level object itself,
//! reads the two sample arrays in one tight pass and the touch events
//! itself, and hands every other member's text to `serde_json` as before.
//!
//! It is only a fast path. Anything unusual — an escaped or unknown key, a
//! duplicate, a missing field, a sample that is not four plain numbers, any
//! syntax it does not expect — gives `None`, and the caller parses with the
//! reference parser (`http::json::parse`), which decides and names the
//! field. Property tests hold it to that parser: whenever this reader
//! accepts a body, the reference parser accepts it too and reads the same
//! heartbeat.

use blockremote_engine::heartbeat::{Sample, Touch, TouchAction};

use super::ingest::HeartbeatBody;

/// Reads `bytes` as a heartbeat body, or `None` (see the module docs).
pub fn read(bytes: &[u8]) -> Option<HeartbeatBody> {
    let mut c = Cursor { bytes, at: 0 };
    let mut seq = None;
    let mut sent_at = None;
    let mut accelerometer = None;
    let mut gyroscope = None;
    let mut touches = None;
    let mut network = None;
    let mut context = None;
    c.skip_whitespace();
    c.expect(b'{')?;
    loop {
        let key = c.member_key()?;
        match key {
            b"accelerometer" => set_once(&mut accelerometer, c.samples()?)?,
            b"gyroscope" => set_once(&mut gyroscope, c.samples()?)?,
            b"touches" => set_once(&mut touches, c.touches()?)?,
            _ => {
                let value = c.value()?;
                match key {
                    b"seq" => set_once(&mut seq, serde_json::from_slice(value).ok()?)?,
                    b"sent_at" => set_once(&mut sent_at, serde_json::from_slice(value).ok()?)?,
                    b"network" => set_once(&mut network, serde_json::from_slice(value).ok()?)?,
                    b"context" => set_once(&mut context, serde_json::from_slice(value).ok()?)?,
                    _ => return None,
                }
            }
        }
        c.skip_whitespace();
        if c.eat(b'}') {
            break;
        }
        c.expect(b',')?;
    }
    c.skip_whitespace();
    if c.at != bytes.len() {
        return None;
    }
    Some(HeartbeatBody {
        seq: seq?,
        sent_at: sent_at?,
        accelerometer: accelerometer.unwrap_or_default(),
        gyroscope: gyroscope.unwrap_or_default(),
        touches: touches.unwrap_or_default(),
        network: network.unwrap_or_default(),
        context: context.unwrap_or_default(),
    })
}

/// Stores a member's value; a second occurrence is a duplicate (`None`).
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// Exact powers of ten as `f64` (10^0 to 10^22 are all representable).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.at += usize::from(found);
        found
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    fn skip_whitespace(&mut self) {
        self.at = skip_whitespace(self.bytes, self.at);
    }

    /// `"key":` with the whitespace around it, up to the member's value.
    fn member_key(&mut self) -> Option<&'a [u8]> {
        self.skip_whitespace();
        let key = self.plain_key()?;
        self.skip_whitespace();
        self.expect(b':')?;
        self.skip_whitespace();
        Some(key)
    }

    /// A key of plain letters and underscores (no escapes).
    fn plain_key(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        while let Some(b'a'..=b'z' | b'_') = self.peek() {
            self.at += 1;
        }
        let key = &self.bytes[start..self.at];
        self.expect(b'"')?;
        Some(key)
    }

    /// The text of one member's value: up to the `,` or `}` that ends it at
    /// this depth (strings skipped whole). `serde_json` then checks it.
    fn value(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    loop {
                        match self.peek()? {
                            b'\\' => self.at += 2,
                            b'"' => {
                                self.at += 1;
                                break;
                            }
                            _ => self.at += 1,
                        }
                    }
                }
                b'[' | b'{' => {
                    depth += 1;
                    self.at += 1;
                }
                b']' | b'}' if depth > 0 => {
                    depth -= 1;
                    self.at += 1;
                }
                b',' | b'}' if depth == 0 => return Some(&self.bytes[start..self.at]),
                _ => self.at += 1,
            }
        }
    }

    /// `[[t, x, y, z], ...]`: the hot loop (nine tenths of the bytes), on a
    /// local index so the compiler keeps it in a register.
    fn samples(&mut self) -> Option<Vec<Sample>> {
        let bytes = self.bytes;
        let mut i = self.at;
        if bytes.get(i) != Some(&b'[') {
            return None;
        }
        let mut samples = Vec::with_capacity(128);
        i = skip_whitespace(bytes, i + 1);
        if bytes.get(i) == Some(&b']') {
            self.at = i + 1;
            return Some(samples);
        }
        loop {
            if bytes.get(i) != Some(&b'[') {
                return None;
            }
            let mut values = [0.0; 4];
            for (k, value) in values.iter_mut().enumerate() {
                let (v, next) = number(bytes, skip_whitespace(bytes, i + 1))?;
                *value = v;
                i = skip_whitespace(bytes, next);
                if bytes.get(i) != Some(if k == 3 { &b']' } else { &b',' }) {
                    return None;
                }
            }
            let [t, x, y, z] = values;
            samples.push(Sample { t, x, y, z });
            i = skip_whitespace(bytes, i + 1);
            match bytes.get(i) {
                Some(b']') => {
                    self.at = i + 1;
                    return Some(samples);
                }
                Some(b',') => i = skip_whitespace(bytes, i + 1),
                _ => return None,
            }
        }
    }

    /// `[{"t": …, "x": …, "y": …, "pressure": …, "size": …, "action": "…"}, …]`,
    /// every key exactly once, in any order. A body with 12 touch events
    /// reads in 11.1 µs against 13.5 µs through serde's visitors
    /// (docs/BENCHMARKS.md).
    fn touches(&mut self) -> Option<Vec<Touch>> {
        self.expect(b'[')?;
        let mut touches = Vec::new();
        self.skip_whitespace();
        if self.eat(b']') {
            return Some(touches);
        }
        loop {
            self.skip_whitespace();
            touches.push(self.touch()?);
            self.skip_whitespace();
            if self.eat(b']') {
                return Some(touches);
            }
            self.expect(b',')?;
        }
    }

    fn touch(&mut self) -> Option<Touch> {
        self.expect(b'{')?;
        // t, x, y, pressure, size.
        let mut numbers = [None; 5];
        let mut action = None;
        loop {
            let key = self.member_key()?;
            if key == b"action" {
                set_once(&mut action, self.action()?)?;
            } else {
                let slot = match key {
                    b"t" => 0,
                    b"x" => 1,
                    b"y" => 2,
                    b"pressure" => 3,
                    b"size" => 4,
                    _ => return None,
                };
                let (value, next) = number(self.bytes, self.at)?;
                self.at = next;
                set_once(&mut numbers[slot], value)?;
            }
            self.skip_whitespace();
            if self.eat(b'}') {
                break;
            }
            self.expect(b',')?;
        }
        let [t, x, y, pressure, size] = numbers;
        Some(Touch {
            t: t?,
            x: x?,
            y: y?,
            pressure: pressure?,
            size: size?,
            action: action?,
        })
    }

    /// `"down"`, `"move"` or `"up"`, unescaped.
    fn action(&mut self) -> Option<TouchAction> {
        let rest = self.bytes.get(self.at..)?;
        let (action, len) = if rest.starts_with(b"\"down\"") {
            (TouchAction::Down, 6)
        } else if rest.starts_with(b"\"move\"") {
            (TouchAction::Move, 6)
        } else if rest.starts_with(b"\"up\"") {
            (TouchAction::Up, 4)
        } else {
            return None;
        };
        self.at += len;
        Some(action)
    }
}

/// The index of the first non-whitespace byte at or after `i`.
#[inline(always)]
fn skip_whitespace(bytes: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(i) {
        i += 1;
    }
    i
}

/// Digits from `i` into `mantissa` (which wraps past 19 digits: such a
/// number is refused anyway); returns the index after them.
#[inline(always)]
fn digits(bytes: &[u8], mut i: usize, mantissa: &mut u64) -> usize {
    while let Some(&b) = bytes.get(i) {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        *mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
    }
    i
}

/// A finite JSON number at `i` whose value is exactly what `serde_json`
/// reads — at most 15 significant digits with a power of ten within ±22, so
/// one correctly rounded division gives it — and the index after it.
/// Others: `None`.
#[inline(always)]
fn number(bytes: &[u8], mut i: usize) -> Option<(f64, usize)> {
    let negative = bytes.get(i) == Some(&b'-');
    i += usize::from(negative);
    let start = i;
    let mut mantissa = 0u64;
    match bytes.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(bytes, i, &mut mantissa),
        _ => return None,
    }
    let mut count = i - start;
    let mut fraction = 0;
    if bytes.get(i) == Some(&b'.') {
        let from = i + 1;
        i = digits(bytes, from, &mut mantissa);
        fraction = i - from;
        if fraction == 0 {
            return None;
        }
        count += fraction;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) || count > 15 {
        // Exponents are rare in sensor data: left to the reference parser.
        return None;
    }
    let m = mantissa as f64;
    let value = if fraction > 0 { m / POW10[fraction] } else { m };
    Some((if negative { -value } else { value }, i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockremote_engine::{
        heartbeat::Heartbeat,
        sim::{load_heartbeat, Class},
    };
    use proptest::prelude::*;

    fn reference(bytes: &[u8]) -> Option<Heartbeat> {
        crate::http::json::parse::<HeartbeatBody>(bytes)
            .ok()
            .map(HeartbeatBody::into_heartbeat)
    }

    fn body(class: Class, seed: u64) -> String {
        let mut v = serde_json::to_value(load_heartbeat(class, seed)).expect("json");
        v["sent_at"] = serde_json::json!("2026-11-23T12:00:00.000Z");
        v.to_string()
    }

    const CLASSES: [Class; 4] = [
        Class::HeldInHand,
        Class::OnTable,
        Class::RemoteControlSubtle,
        Class::Bot,
    ];

    #[test]
    fn reads_what_devices_send_exactly_as_the_reference_does() {
        for (i, class) in CLASSES.into_iter().enumerate() {
            let text = body(class, i as u64);
            let fast = read(text.as_bytes()).expect("fast path").into_heartbeat();
            assert_eq!(Some(fast), reference(text.as_bytes()), "{class:?}");
        }
        let contract = r#"{"seq": 42, "sent_at": "2026-11-22T12:00:00.000Z",
            "accelerometer": [[0, 0.12, 9.78, 0.31], [20, 0.10, 9.80, 0.29]],
            "gyroscope": [[0, 0.001, -0.002, 0.0005]],
            "touches": [{"t": 120, "x": 0.41, "y": 0.77, "pressure": 0.62, "size": 0.031, "action": "down"}],
            "network": {"tx_bytes": 1200, "rx_bytes": 5600, "interval_ms": 2000},
            "context": {"screen_capture": false, "accessibility_services": [], "installer": "com.android.vending",
                        "app_hashes": [], "dns": ["a.example, }]"]}}"#;
        let fast = read(contract.as_bytes())
            .expect("fast path")
            .into_heartbeat();
        assert_eq!(fast.accelerometer[1].y, 9.80);
        assert_eq!(Some(fast), reference(contract.as_bytes()));
    }

    #[test]
    fn leaves_the_unusual_to_the_reference_parser() {
        let base = r#"{"seq":1,"sent_at":"2026-11-23T12:00:00Z","accelerometer":[[0,1,2,3]]}"#;
        assert!(read(base.as_bytes()).is_some());
        for text in [
            base.replace(r#""seq":1,"#, ""),                         // missing
            base.replace(r#""seq":1"#, r#""seq":1,"seq":2"#),        // duplicate
            base.replace(r#""seq":1"#, r#""seq":1,"extra":0"#),      // unknown
            base.replace(r#""seq""#, r#""s\u0065q""#),               // escaped key
            base.replace("[0,1,2,3]", "[0,1,2]"),                    // short sample
            base.replace("[0,1,2,3]", "[0,1e2,2,3]"),                // exponent
            base.replace("[0,1,2,3]", "[0,1.2345678901234567,2,3]"), // long
            base.replace("[0,1,2,3]", "[0,01,2,3]"),                 // leading zero
            base.replace(r#""seq":1"#, r#""seq":1.5"#),              // wrong type
            format!("{base} x"),                                     // trailing
            base.replace('}', ""),                                   // unterminated
        ] {
            assert!(read(text.as_bytes()).is_none(), "{text}");
        }
        let touch = r#"{"seq":1,"sent_at":"2026-11-23T12:00:00Z",
            "touches":[{"t":0,"x":0.5,"y":0.5,"pressure":0.4,"size":0.03,"action":"down"}]}"#;
        assert!(read(touch.as_bytes()).is_some());
        for text in [
            touch.replace(r#","action":"down""#, ""),      // missing
            touch.replace(r#""t":0,"#, r#""t":0,"t":1,"#), // duplicate
            touch.replace(r#""t":0,"#, r#""t":0,"z":1,"#), // unknown
            touch.replace(r#""down""#, r#""d\u006fwn""#),  // escaped
            touch.replace(r#""down""#, r#""hover""#),      // not an action
            touch.replace(r#""x":0.5"#, r#""x":"0.5""#),   // wrong type
            touch.replace(r#""x":0.5"#, r#""x":5e-1"#),    // exponent
            touch.replace(r#""down"}"#, r#""down",}"#),    // trailing comma
            touch.replace("}]}", "}"),                     // unterminated
        ] {
            assert!(read(text.as_bytes()).is_none(), "{text}");
        }
    }

    /// The keys of one touch event, by index into `TOUCH_KEYS`: all six once
    /// in any order, or anything (missing, repeated, unknown).
    fn touch_keys() -> impl Strategy<Value = Vec<usize>> {
        prop_oneof![
            Just((0..6).collect::<Vec<_>>()).prop_shuffle(),
            proptest::collection::vec(0..TOUCH_KEYS.len(), 0..9),
        ]
    }

    const TOUCH_KEYS: [&str; 8] = ["t", "x", "y", "pressure", "size", "action", "z", "T"];
    const TOUCH_ACTIONS: [&str; 4] = [r#""down""#, r#""move""#, r#""up""#, r#""left""#];

    proptest! {
        #[test]
        fn long_numbers_are_read_as_the_reference_reads_them_or_left_to_it(
            int in "-?(0|[1-9][0-9]{0,20})",
            frac in proptest::option::of("[0-9]{1,24}"),
            space in "[ ]?",
        ) {
            let number = match frac { Some(f) => format!("{int}.{f}"), None => int };
            let text = format!(r#"{{"seq":1,"sent_at":"2026-11-23T12:00:00Z","gyroscope":[[0,0,0,{number}{space}]]}}"#);
            let digits = number.bytes().filter(u8::is_ascii_digit).count();
            match read(text.as_bytes()) {
                Some(fast) => {
                    prop_assert!(digits <= 15, "{}", text);
                    prop_assert_eq!(Some(fast.into_heartbeat()), reference(text.as_bytes()));
                }
                None => prop_assert!(digits > 15, "{}", text),
            }
        }

        #[test]
        fn whatever_it_accepts_the_reference_reads_the_same(
            class in 0..CLASSES.len(),
            seed in 0..1000u64,
            junk in "[ ,:\\[\\]{}0-9a-z.\"eE+-]{0,4}",
            at in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let text = body(CLASSES[class], seed);
            let at = at.index(text.len() + 1);
            let spliced = format!("{}{}{}", &text[..at], junk, &text[at..]);
            let truncated = text[..cut.index(text.len() + 1)].to_owned();
            for candidate in [text, spliced, truncated] {
                if let Some(fast) = read(candidate.as_bytes()) {
                    prop_assert_eq!(Some(fast.into_heartbeat()), reference(candidate.as_bytes()), "{}", candidate);
                }
            }
        }

        #[test]
        fn numbers_are_read_as_the_reference_reads_them(
            int in "-?(0|[1-9][0-9]{0,6})",
            frac in proptest::option::of("[0-9]{1,8}"),
        ) {
            let number = match frac { Some(f) => format!("{int}.{f}"), None => int };
            let text = format!(r#"{{"seq":1,"sent_at":"2026-11-23T12:00:00Z","gyroscope":[[0,{number},0,0]]}}"#);
            // At most 15 digits: the fast path takes it.
            let fast = read(text.as_bytes()).expect("plain numbers take the fast path").into_heartbeat();
            prop_assert_eq!(Some(fast), reference(text.as_bytes()));
        }

        #[test]
        fn touches_are_read_as_the_reference_reads_them(
            touches in proptest::collection::vec(
                (
                    touch_keys(),
                    proptest::collection::vec("-?(0|[1-9][0-9]{0,4})(\\.[0-9]{1,6})?", 5),
                    0..TOUCH_ACTIONS.len(),
                    "[ ]?",
                ),
                0..5,
            ),
        ) {
            let mut well_formed = true;
            let events: Vec<String> = touches
                .iter()
                .map(|(keys, numbers, action, space)| {
                    let mut sorted = keys.clone();
                    sorted.sort_unstable();
                    well_formed &= sorted == [0, 1, 2, 3, 4, 5] && *action < 3;
                    let members: Vec<String> = keys
                        .iter()
                        .map(|&k| match TOUCH_KEYS[k] {
                            "action" => format!(r#""action":{space}{}"#, TOUCH_ACTIONS[*action]),
                            key => format!(r#""{key}":{}{space}"#, numbers[k % 5]),
                        })
                        .collect();
                    format!("{{{space}{}}}", members.join(","))
                })
                .collect();
            let text = format!(
                r#"{{"seq":1,"sent_at":"2026-11-23T12:00:00Z","touches":[{}]}}"#,
                events.join(", ")
            );
            match read(text.as_bytes()) {
                Some(fast) => prop_assert_eq!(Some(fast.into_heartbeat()), reference(text.as_bytes()), "{}", text),
                // Plain numbers, every key once: the fast path takes it.
                None => prop_assert!(!well_formed, "{}", text),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read(&bytes);
        }
    }
}
