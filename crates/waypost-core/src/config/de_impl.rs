//! Serde helpers for option values.

/// Serde `with` module for duration options: written as `"10s"` (humantime), read from
/// `"10s"` / `"250ms"` or a number of milliseconds. Use as
/// `#[serde(with = "waypost_core::config::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Writes `"10s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    /// Reads `"10s"`, `"250ms"` or milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::de::duration(d)
    }

    /// The same for an optional duration (absent is `None`; use with
    /// `#[serde(default, with = "waypost_core::config::duration::option")]`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserializer, Serializer};

        /// Writes `"10s"`, or nothing.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads `"10s"`, `"250ms"` or milliseconds.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::super::de::duration(d).map(Some)
        }
    }
}

/// Serde helpers for options that arrive as strings from URLs but as native values from
/// TOML or JSON.
pub mod de {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum DurationRepr {
        Text(String),
        Millis(u64),
    }

    /// A duration given as `"10s"`/`"250ms"` or as a number of milliseconds.
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match DurationRepr::deserialize(d)? {
            DurationRepr::Text(s) => humantime::parse_duration(&s).map_err(|e| {
                serde::de::Error::custom(format!("`{s}` is not a duration like `10s` ({e})"))
            }),
            DurationRepr::Millis(ms) => Ok(Duration::from_millis(ms)),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumRepr {
        Text(String),
        Num(u64),
    }

    /// An unsigned number given as a number or as a string (as in URL queries).
    pub fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
        let n = match NumRepr::deserialize(d)? {
            NumRepr::Text(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a number")))?,
            NumRepr::Num(n) => n,
        };
        T::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range")))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolRepr {
        Text(String),
        Bool(bool),
    }

    /// A boolean given as `true`/`false` or as a string (as in URL queries).
    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        match BoolRepr::deserialize(d)? {
            BoolRepr::Bool(b) => Ok(b),
            BoolRepr::Text(s) => match s.as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(serde::de::Error::custom(format!(
                    "`{s}` is not true or false"
                ))),
            },
        }
    }
}
