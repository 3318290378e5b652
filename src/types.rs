//! Domain types shared by every module and driver: time, validated ids, and the
//! messages as they travel (wire JSON uses the original Go design's field names).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A point in time, in nanoseconds. The real runtime uses Unix time; the
/// simulator uses virtual time. The core never reads a clock: `now` is an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    pub const ZERO: Time = Time(0);
    pub const MAX: Time = Time(u64::MAX);

    pub fn from_millis(ms: u64) -> Time {
        Time(ms.saturating_mul(1_000_000))
    }
    pub fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }
    pub fn as_nanos(self) -> u64 {
        self.0
    }
    pub fn plus(self, d: Duration) -> Time {
        Time(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Time {
    /// Milliseconds with a fractional part only when needed: `t=120ms`, `t=3.25ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        if frac == 0 {
            write!(f, "{ms}ms")
        } else {
            let s = format!("{frac:06}");
            write!(f, "{ms}.{}ms", s.trim_end_matches('0'))
        }
    }
}

/// Longest accepted id (GlobalID, SubID, ClientID, SenderID, Topic), in bytes.
pub const ID_LEN_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdError {
    Empty { field: &'static str },
    TooLong { field: &'static str, len: usize },
    ControlChar { field: &'static str },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty { field } => write!(f, "{field} must not be empty"),
            IdError::TooLong { field, len } => {
                write!(f, "{field} is {len} bytes, longer than the limit of {ID_LEN_MAX}")
            }
            IdError::ControlChar { field } => write!(f, "{field} contains a control character"),
        }
    }
}

impl std::error::Error for IdError {}

/// Defines a validated string id newtype (also used by `saga::ids`).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        ///
        /// Shared, immutable text: a clone is a reference count, not a copy
        /// (ids are cloned into every message, key and map the broker, the
        /// hosts and the simulator's checker keep). Ordering, equality,
        /// hashing, `Debug` and serde are those of the string (two clones of
        /// one id compare equal without reading the text).
        #[derive(Clone, Debug, Eq)]
        pub struct $name(std::sync::Arc<str>);

        /// The string's hash (as derived), consistent with `eq`.
        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state);
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }

        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                if std::sync::Arc::ptr_eq(&self.0, &other.0) {
                    std::cmp::Ordering::Equal
                } else {
                    self.0.cmp(&other.0)
                }
            }
        }

        /// A map keyed by this id is searched by a `&str` (same order and equality).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        /// From a string, validated as [`Self::new`] does (what
        /// `try_from = "String"` did, without the intermediate `String`).
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::new(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }

        /// As a plain string (what `into = "String"` wrote, without the clone it takes).
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::types::IdError;
            fn try_from(s: String) -> Result<Self, $crate::types::IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                String::from(&*id.0)
            }
        }

        impl $name {
            pub const FIELD: &'static str = $field;

            /// Validates: non-empty, at most [`ID_LEN_MAX`] bytes, no control characters.
            pub fn new(s: impl AsRef<str>) -> Result<Self, $crate::types::IdError> {
                let s = s.as_ref();
                if s.is_empty() {
                    return Err($crate::types::IdError::Empty { field: $field });
                }
                if s.len() > $crate::types::ID_LEN_MAX {
                    return Err($crate::types::IdError::TooLong { field: $field, len: s.len() });
                }
                if s.chars().any(char::is_control) {
                    return Err($crate::types::IdError::ControlChar { field: $field });
                }
                Ok($name(std::sync::Arc::from(s)))
            }

            /// For literals known to be valid (tests, scenarios); panics otherwise.
            pub fn lit(s: &str) -> Self {
                Self::new(s).expect("valid id literal")
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

pub(crate) use string_id;

string_id!(
    /// The saga's global transaction id (the Go design's `GlobalID`).
    GlobalId, "GlobalID");
string_id!(
    /// The sub-transaction id inside a saga (`SubID`). `(GlobalId, SubId)` is the dedup key.
    SubId, "SubID");
string_id!(
    /// A subscriber's identity (`ClientID`).
    ClientId, "ClientID");
string_id!(
    /// Who published a message (`SenderID`).
    SenderId, "SenderID");
string_id!(
    /// A topic name.
    Topic, "Topic");

/// The broker's id for a stored message, assigned in publish order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MsgId(pub u64);

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "msg#{}", self.0)
    }
}

/// The dedup key of a message.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageKey {
    pub global_id: GlobalId,
    pub sub_id: SubId,
}

impl fmt::Display for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.global_id, self.sub_id)
    }
}

/// Longest accepted `Content`, in bytes.
pub const CONTENT_LEN_MAX: usize = 64 * 1024;

/// A publish as a client sends it (`POST /publish`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    #[serde(rename = "GlobalID")]
    pub global_id: GlobalId,
    #[serde(rename = "SubID")]
    pub sub_id: SubId,
    #[serde(rename = "SenderID")]
    pub sender_id: SenderId,
    /// Unix nanoseconds as set by the sender; orders delivery per subscriber.
    #[serde(rename = "CreateTime")]
    pub create_time: i64,
    #[serde(rename = "Topic")]
    pub topic: Topic,
    #[serde(rename = "Content")]
    pub content: String,
}

impl PublishRequest {
    pub fn key(&self) -> MessageKey {
        MessageKey {
            global_id: self.global_id.clone(),
            sub_id: self.sub_id.clone(),
        }
    }
}

/// A stored message as delivered to subscribers: the publish plus its `MsgID`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    #[serde(rename = "MsgID")]
    pub msg_id: MsgId,
    #[serde(rename = "GlobalID")]
    pub global_id: GlobalId,
    #[serde(rename = "SubID")]
    pub sub_id: SubId,
    #[serde(rename = "SenderID")]
    pub sender_id: SenderId,
    #[serde(rename = "CreateTime")]
    pub create_time: i64,
    #[serde(rename = "Topic")]
    pub topic: Topic,
    #[serde(rename = "Content")]
    pub content: String,
}

impl Message {
    pub fn from_publish(msg_id: MsgId, p: PublishRequest) -> Message {
        Message {
            msg_id,
            global_id: p.global_id,
            sub_id: p.sub_id,
            sender_id: p.sender_id,
            create_time: p.create_time,
            topic: p.topic,
            content: p.content,
        }
    }
    pub fn key(&self) -> MessageKey {
        MessageKey {
            global_id: self.global_id.clone(),
            sub_id: self.sub_id.clone(),
        }
    }
}

/// A subscription request (`POST /subscribe`); subscribing again renews it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRequest {
    #[serde(rename = "ClientID")]
    pub client_id: ClientId,
    #[serde(rename = "Topic")]
    pub topic: Topic,
    #[serde(rename = "NotifyUrl")]
    pub notify_url: String,
    /// Unix nanoseconds (the simulator: virtual nanoseconds) after which the
    /// subscription gets no new messages.
    #[serde(rename = "ExpireTime")]
    pub expire_time: Time,
}

/// Longest accepted `NotifyUrl`, in bytes.
pub const URL_LEN_MAX: usize = 2048;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_oversized_and_control() {
        assert_eq!(GlobalId::new(""), Err(IdError::Empty { field: "GlobalID" }));
        assert!(matches!(
            SubId::new("x".repeat(ID_LEN_MAX + 1)),
            Err(IdError::TooLong { .. })
        ));
        assert!(SubId::new("x".repeat(ID_LEN_MAX)).is_ok());
        assert!(matches!(Topic::new("a\nb"), Err(IdError::ControlChar { .. })));
    }

    #[test]
    fn wire_names_match_the_go_design() {
        let j = r#"{"GlobalID":"g","SubID":"s","SenderID":"x","CreateTime":5,"Topic":"t","Content":"c"}"#;
        let p: PublishRequest = serde_json::from_str(j).unwrap();
        assert_eq!(p.global_id.as_str(), "g");
        assert!(serde_json::from_str::<PublishRequest>(&j.replace("\"c\"}", "\"c\",\"X\":1}")).is_err());
        assert!(serde_json::from_str::<PublishRequest>(&j.replace("\"g\"", "\"\"")).is_err());
    }

    #[test]
    fn time_displays_in_millis() {
        assert_eq!(Time::from_millis(120).to_string(), "120ms");
        assert_eq!(Time(3_250_000).to_string(), "3.25ms");
    }
}
