//! Bulk numbers as one byte string in binary formats.
//!
//! A heartbeat carries 800 sample values and a device's state 300 ring
//! values. Through serde's derived impls a binary format (postcard, for the
//! queue jobs and the stored state) writes and reads them one call per
//! number, which showed up in profiles of the server. These `with` modules
//! write them as one byte string instead: of little-endian `f64`s (bulk
//! copies, no per-number calls), or, for heartbeats that cross the network,
//! of delta-coded scaled decimals ([`decimal_samples`]: a quarter of the
//! size, exact bit for bit). Human-readable formats (JSON, what devices
//! send) keep the ordinary form, so the wire contract is untouched.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::heartbeat::Sample;

/// Accepts the byte string in whatever form the format hands it over
/// (borrowed, owned, or — in formats without bytes — a sequence of `u8`).
struct BytesVisitor;

impl<'de> de::Visitor<'de> for BytesVisitor {
    type Value = std::borrow::Cow<'de, [u8]>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte string of little-endian f64s")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(std::borrow::Cow::Owned(bytes))
    }
}

/// The byte string, refused unless it holds whole groups of `width` `f64`s.
fn read_bytes<'de, D: Deserializer<'de>>(
    d: D,
    width: usize,
) -> Result<std::borrow::Cow<'de, [u8]>, D::Error> {
    let bytes = d.deserialize_bytes(BytesVisitor)?;
    if bytes.len() % (8 * width) != 0 {
        return Err(de::Error::invalid_length(
            bytes.len(),
            &"whole groups of little-endian f64s",
        ));
    }
    Ok(bytes)
}

/// The `i`-th little-endian `f64` of `chunk`.
fn f64_at(chunk: &[u8], i: usize) -> f64 {
    f64::from_le_bytes(chunk[8 * i..8 * i + 8].try_into().unwrap_or_default())
}

fn write_f64s<S: Serializer>(
    values: impl Iterator<Item = f64>,
    len: usize,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut bytes = Vec::with_capacity(len * 8);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    s.serialize_bytes(&bytes)
}

/// `#[serde(with = "compact::f64s")]` for a `Vec<f64>`.
pub mod f64s {
    use super::*;

    /// Serializes `values` (bytes in binary formats).
    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return values.serialize(s);
        }
        write_f64s(values.iter().copied(), values.len(), s)
    }

    /// Deserializes what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        if d.is_human_readable() {
            return Vec::deserialize(d);
        }
        let bytes = read_bytes(d, 1)?;
        Ok(bytes.chunks_exact(8).map(|c| f64_at(c, 0)).collect())
    }
}

/// `#[serde(with = "compact::bytes")]` for a `Vec<u8>`: one byte string in
/// binary formats (not a sequence of numbers), a list in JSON.
pub mod bytes {
    use super::*;

    /// Serializes `bytes`.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return bytes.serialize(s);
        }
        s.serialize_bytes(bytes)
    }

    /// Deserializes what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            return Vec::deserialize(d);
        }
        Ok(d.deserialize_bytes(BytesVisitor)?.into_owned())
    }
}

/// `#[serde(with = "compact::samples")]` for a `Vec<Sample>`.
pub mod samples {
    use super::*;

    /// Serializes `samples` (bytes in binary formats: t, x, y, z of each).
    pub fn serialize<S: Serializer>(samples: &[Sample], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return samples.serialize(s);
        }
        let values = samples.iter().flat_map(|x| [x.t, x.x, x.y, x.z]);
        write_f64s(values, samples.len() * 4, s)
    }

    /// Deserializes what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Sample>, D::Error> {
        if d.is_human_readable() {
            return Vec::deserialize(d);
        }
        let bytes = read_bytes(d, 4)?;
        Ok(bytes
            .chunks_exact(32)
            .map(|c| Sample {
                t: f64_at(c, 0),
                x: f64_at(c, 1),
                y: f64_at(c, 2),
                z: f64_at(c, 3),
            })
            .collect())
    }
}

/// `#[serde(with = "compact::decimal_samples")]` for a `Vec<Sample>`: the
/// binary form of heartbeats in queue jobs on Redis, about a quarter of
/// [`samples`]' size.
///
/// Devices send sensor readings with a few decimals (`9.7812`), so each
/// column (t, x, y, z) is stored as integers scaled by the smallest power of
/// ten that gives every value of the column back bit for bit, delta-coded
/// and written as zigzag varints — one or two bytes per value instead of
/// eight. Exactness is checked while encoding, never assumed: `n / 10^d` is
/// the correctly rounded quotient, the same `f64` a correct parser makes of
/// the decimal, and the encoder compares bits. A column where any value does
/// not come back exactly (`-0.0`, a computed value with 17 significant
/// digits) is written as raw little-endian `f64`s instead.
///
/// Layout of the byte string: varint count, four column tags (scale `0..=12`
/// or [`decimal_samples::RAW`]), then each column in turn.
pub mod decimal_samples {
    use super::*;

    /// Column tag: the column is `count` little-endian `f64`s.
    pub const RAW: u8 = 0xff;
    /// Largest scale tried: `10^12`. Beyond it a sensor value is not a
    /// short decimal, and scaled integers would near 2^53.
    const MAX_SCALE: u8 = 12;
    const POW10: [f64; MAX_SCALE as usize + 1] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12,
    ];
    /// Scaled integers stay below this, where every integer is an exact `f64`.
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53

    fn column(s: &Sample, c: usize) -> f64 {
        match c {
            0 => s.t,
            1 => s.x,
            2 => s.y,
            _ => s.z,
        }
    }

    fn column_mut(s: &mut Sample, c: usize) -> &mut f64 {
        match c {
            0 => &mut s.t,
            1 => &mut s.x,
            2 => &mut s.y,
            _ => &mut s.z,
        }
    }

    /// `v` scaled by `10^d` as an integer, if that gives `v` back exactly.
    fn scaled(v: f64, d: u8) -> Option<i64> {
        let p = POW10[usize::from(d)];
        let x = v * p;
        if x.is_nan() || x.abs() >= EXACT {
            return None; // not a number, or too large (infinities included)
        }
        // Round half away from zero; a wrong guess at a tie only fails the
        // check below, which decides.
        let n = (x + 0.5f64.copysign(x)) as i64;
        ((n as f64 / p).to_bits() == v.to_bits()).then_some(n)
    }

    /// Column `c` scaled into `out`, at the smallest scale at which every
    /// value round-trips; `None` when no scale up to [`MAX_SCALE`] does.
    /// One pass in the usual case: the column's first values set the scale,
    /// and a value that needs more decimals restarts the pass at its scale.
    fn scale_column(samples: &[Sample], c: usize, out: &mut Vec<i64>) -> Option<u8> {
        let mut d = 0;
        'scale: loop {
            out.clear();
            for s in samples {
                let v = column(s, c);
                match scaled(v, d) {
                    Some(n) => out.push(n),
                    None => {
                        // The smallest scale this value needs, then again.
                        d = (d + 1..=MAX_SCALE).find(|&d| scaled(v, d).is_some())?;
                        continue 'scale;
                    }
                }
            }
            return Some(d);
        }
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Reads a varint at `*at`; `None` when truncated or longer than 10 bytes.
    fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = *bytes.get(*at)?;
            *at += 1;
            v |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// Appends the encoding of `samples` to `out`.
    pub fn encode(samples: &[Sample], out: &mut Vec<u8>) {
        put_varint(out, samples.len() as u64);
        let tags = out.len();
        out.extend_from_slice(&[RAW; 4]);
        let mut ints = Vec::with_capacity(samples.len());
        for c in 0..4 {
            match scale_column(samples, c, &mut ints) {
                Some(d) => {
                    out[tags + c] = d;
                    let mut last = 0i64;
                    for &n in &ints {
                        let delta = n.wrapping_sub(last);
                        put_varint(out, ((delta << 1) ^ (delta >> 63)) as u64);
                        last = n;
                    }
                }
                None => {
                    for s in samples {
                        out.extend_from_slice(&column(s, c).to_le_bytes());
                    }
                }
            }
        }
    }

    /// Decodes what [`encode`] wrote; `None` unless `bytes` is exactly one
    /// well-formed encoding.
    pub fn decode(bytes: &[u8]) -> Option<Vec<Sample>> {
        let mut at = 0;
        let count = usize::try_from(get_varint(bytes, &mut at)?).ok()?;
        let scales: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        // Every value takes at least one byte: refuses absurd counts before
        // allocating for them.
        if count > (bytes.len() - at) / 4 {
            return None;
        }
        let mut samples = vec![
            Sample {
                t: 0.0,
                x: 0.0,
                y: 0.0,
                z: 0.0
            };
            count
        ];
        for (c, &d) in scales.iter().enumerate() {
            if d == RAW {
                let raw = bytes.get(at..at + 8 * count)?;
                at += 8 * count;
                for (s, v) in samples.iter_mut().zip(raw.chunks_exact(8)) {
                    *column_mut(s, c) = f64_at(v, 0);
                }
                continue;
            }
            let p = *POW10.get(usize::from(d))?;
            let mut last = 0i64;
            for s in &mut samples {
                let z = get_varint(bytes, &mut at)?;
                last = last.wrapping_add(((z >> 1) as i64) ^ -((z & 1) as i64));
                *column_mut(s, c) = last as f64 / p;
            }
        }
        (at == bytes.len()).then_some(samples)
    }

    /// Serializes `samples` (the scaled byte string in binary formats).
    pub fn serialize<S: Serializer>(samples: &[Sample], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return samples.serialize(s);
        }
        let mut bytes = Vec::with_capacity(8 + samples.len() * 8);
        encode(samples, &mut bytes);
        s.serialize_bytes(&bytes)
    }

    /// Deserializes what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Sample>, D::Error> {
        if d.is_human_readable() {
            return Vec::deserialize(d);
        }
        let bytes = d.deserialize_bytes(BytesVisitor)?;
        decode(&bytes).ok_or_else(|| {
            de::Error::invalid_value(de::Unexpected::Bytes(&bytes), &"scaled decimal samples")
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        heartbeat::Heartbeat,
        sim::{load_heartbeat, Class},
        DeviceState,
    };
    use proptest::prelude::*;

    #[test]
    fn binary_forms_are_one_byte_string_and_json_is_unchanged() {
        let hb = load_heartbeat(Class::HeldInHand, 7);
        let bytes = postcard::to_allocvec(&hb).expect("postcard");
        // 200 samples to 4 decimals in under 8 bytes each (32 as raw f64s),
        // plus a little for everything else.
        assert!(bytes.len() < 200 * 8 + 1_000, "{}", bytes.len());
        assert_eq!(postcard::from_bytes::<Heartbeat>(&bytes).expect("back"), hb);
        let json = serde_json::to_value(&hb).expect("json");
        assert_eq!(json["accelerometer"][0].as_array().map(Vec::len), Some(4));
        assert_eq!(serde_json::from_value::<Heartbeat>(json).expect("back"), hb);
    }

    #[test]
    fn truncated_byte_strings_are_refused_not_misread() {
        let hb = load_heartbeat(Class::OnTable, 1);
        let bytes = postcard::to_allocvec(&hb).expect("postcard");
        for cut in [1, 7, 100, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                postcard::from_bytes::<Heartbeat>(&bytes[..cut]).is_err(),
                "{cut}"
            );
        }
    }

    use super::decimal_samples;
    use crate::heartbeat::Sample;

    fn bits(samples: &[Sample]) -> Vec<[u64; 4]> {
        samples
            .iter()
            .map(|s| [s.t.to_bits(), s.x.to_bits(), s.y.to_bits(), s.z.to_bits()])
            .collect()
    }

    fn round_trip(samples: &[Sample]) -> Vec<u8> {
        let mut bytes = Vec::new();
        decimal_samples::encode(samples, &mut bytes);
        let back = decimal_samples::decode(&bytes).expect("decodes");
        assert_eq!(bits(&back), bits(samples));
        bytes
    }

    #[test]
    fn decimal_samples_scale_each_column_or_keep_it_raw() {
        let s = |t, x, y, z| Sample { t, x, y, z };
        // t in whole ms, x to 4 decimals, y to 1, z not a short decimal.
        let samples = [
            s(0.0, 0.1234, -9.8, 0.1 + 0.2),
            s(20.0, 0.1236, -9.7, 1.0 / 3.0),
        ];
        let bytes = round_trip(&samples);
        assert_eq!(bytes[..5], [2, 0, 4, 1, decimal_samples::RAW]);
        // Zigzag deltas: t 0, 40 (one byte each); x 2468 (two), 4; y 195
        // (two), 2; then z as two raw f64s.
        assert_eq!(bytes.len(), 5 + 2 + 3 + 3 + 16, "{bytes:?}");
        // Signed zero, infinities and NaN keep their exact bits (raw).
        let odd = [s(-0.0, f64::INFINITY, f64::NAN, f64::MIN_POSITIVE)];
        let bytes = round_trip(&odd);
        assert_eq!(bytes[1..5], [decimal_samples::RAW; 4]);
        assert_eq!(round_trip(&[]), [0, 0, 0, 0, 0]);
    }

    #[test]
    fn decimal_samples_refuse_what_they_did_not_write() {
        let bytes = round_trip(&load_heartbeat(Class::Walking, 3).accelerometer);
        for cut in [0, 1, 4, 5, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(decimal_samples::decode(&bytes[..cut]), None, "{cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decimal_samples::decode(&longer), None, "trailing bytes");
        // A count no byte string of this length can hold.
        assert_eq!(
            decimal_samples::decode(&[0xff, 0xff, 0x03, 0, 0, 0, 0, 0]),
            None
        );
        let mut bad_scale = bytes.clone();
        bad_scale[2] = 13;
        assert_eq!(decimal_samples::decode(&bad_scale), None);
    }

    /// A value the way devices send it: an integer and a few decimals.
    fn arb_decimal() -> impl Strategy<Value = f64> {
        (-100_000_000i64..100_000_000, 0u32..=6)
            .prop_map(|(n, d)| format!("{n}e-{d}").parse().expect("a decimal"))
    }

    proptest! {
        #[test]
        fn decimal_samples_give_back_any_f64_bit_for_bit(
            raw in proptest::collection::vec(any::<[u64; 4]>(), 0..40),
        ) {
            let samples: Vec<Sample> = raw
                .iter()
                .map(|b| Sample {
                    t: f64::from_bits(b[0]),
                    x: f64::from_bits(b[1]),
                    y: f64::from_bits(b[2]),
                    z: f64::from_bits(b[3]),
                })
                .collect();
            round_trip(&samples);
        }

        #[test]
        fn short_decimals_are_scaled_and_exact(
            values in proptest::collection::vec(
                (arb_decimal(), arb_decimal(), arb_decimal(), arb_decimal()), 1..120),
        ) {
            let samples: Vec<Sample> =
                values.iter().map(|&(t, x, y, z)| Sample { t, x, y, z }).collect();
            let bytes = round_trip(&samples);
            // Scaled, never raw: at most 6 decimals, and every scaled value
            // |n| ≤ 10^8 · 10^6, far enough below 2^53 to round correctly.
            prop_assert!(bytes[1..5].iter().all(|&d| d <= 6), "{:?}", &bytes[..5]);
            // Deltas below 2^48 take at most 7 bytes.
            prop_assert!(bytes.len() <= 5 + samples.len() * 4 * 7);
        }

        #[test]
        fn decimal_samples_never_panic_on_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = decimal_samples::decode(&bytes);
        }

        #[test]
        fn device_state_round_trips_in_both_kinds_of_format(seed in 0..50u64, n in 0..12usize) {
            let mut state = DeviceState::default();
            let session = crate::sim::session(Class::Walking, seed, n);
            for hb in &session.heartbeats {
                crate::assess(&mut state, hb, &crate::Situation::default());
            }
            let bytes = postcard::to_allocvec(&state).expect("postcard");
            prop_assert_eq!(&postcard::from_bytes::<DeviceState>(&bytes).expect("back"), &state);
            // JSON keeps rings as arrays of numbers (exact round trips of
            // floats through JSON are serde_json's business, not tested here).
            let json = serde_json::to_value(&state).expect("json");
            let ring = json["accel_ring"]["values"].as_array().expect("an array");
            prop_assert_eq!(ring.len(), state.accel_ring.len());
            let back: DeviceState = serde_json::from_value(json).expect("back");
            prop_assert_eq!(back.accel_ring.len(), state.accel_ring.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = postcard::from_bytes::<Heartbeat>(&bytes);
            let _ = postcard::from_bytes::<DeviceState>(&bytes);
        }
    }
}
