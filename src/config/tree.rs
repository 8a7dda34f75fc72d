//! Reading the text of a `taskfly.yml` into a [`Value`] tree, as `serde_yaml` does, except that
//! an integer too large for 64 bits becomes a marked value ([`huge_integer`]) instead of failing
//! the whole parse: the field holding it is then reported as one problem among the others.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};

/// The tag marking an integer beyond 64 bits. The digits are dropped (the value may be a
/// secret, and no field can use it), so no message can show them.
const HUGE_INTEGER_TAG: &str = "taskfly-integer-beyond-64-bits";

/// Parses `text` as one YAML document.
pub(super) fn parse(text: &str) -> Result<Value, serde_yaml::Error> {
    serde_yaml::from_str::<Tree>(text).map(|tree| tree.0)
}

/// The value an integer beyond 64 bits is read as.
fn huge_integer() -> Value {
    Value::Tagged(Box::new(TaggedValue {
        tag: Tag::new(HUGE_INTEGER_TAG),
        value: Value::Null,
    }))
}

/// Whether `value` is an integer that was too large for 64 bits.
pub(super) fn is_huge_integer(value: &Value) -> bool {
    matches!(value, Value::Tagged(tagged) if tagged.tag == HUGE_INTEGER_TAG)
}

/// A [`Value`] read by [`TreeVisitor`].
struct Tree(Value);

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Tree, D::Error> {
        deserializer.deserialize_any(TreeVisitor).map(Tree)
    }
}

/// `serde_yaml`'s own reading of a value, plus 128-bit integers.
struct TreeVisitor;

impl<'de> de::Visitor<'de> for TreeVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(Value::Number(u.into()))
    }

    fn visit_i128<E>(self, i: i128) -> Result<Value, E> {
        Ok(i64::try_from(i).map_or_else(|_| huge_integer(), |i| Value::Number(i.into())))
    }

    fn visit_u128<E>(self, u: u128) -> Result<Value, E> {
        Ok(u64::try_from(u).map_or_else(|_| huge_integer(), |u| Value::Number(u.into())))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Tree::deserialize(deserializer).map(|tree| tree.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Tree(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut mapping = Mapping::new();
        while let Some(Tree(key)) = map.next_key()? {
            if mapping.contains_key(&key) {
                // As serde_yaml words it; a key that is not a string is not shown.
                return Err(de::Error::custom(match &key {
                    Value::String(name) => format!("duplicate entry with key {name:?}"),
                    _ => "duplicate entry in a mapping".to_owned(),
                }));
            }
            let Tree(value) = map.next_value()?;
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // A tagged value (`!tag value`), which the walk reports as unsupported.
        let (tag, variant) = data.variant::<String>()?;
        let Tree(value) = variant.newtype_variant()?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}
