//! Bulk numbers as one byte string in binary formats.
//!
//! A heartbeat carries 800 sample values and a device's state 300 ring
//! values. Through serde's derived impls a binary format (postcard, for the
//! queue jobs and the stored state) writes and reads them one call per
//! number, which showed up in profiles of the server. These `with` modules
//! write them as one byte string of little-endian `f64`s instead: bulk
//! copies, no per-number calls. Human-readable formats (JSON, what devices send) keep the
//! ordinary form, so the wire contract is untouched.

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
        // 200 samples of 32 bytes, plus a little for everything else.
        assert!(bytes.len() < 200 * 32 + 1_000, "{}", bytes.len());
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

    proptest! {
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
