//! The macro that turns the declarative method table in `spec/mod.rs` into
//! one typed struct per AMQP method, the [`Method`](super::Method) enum and
//! their encoders and decoders.
//!
//! Each method's fields are listed once, in wire order, with pika's name, a
//! Rust type that fixes the wire type (`u8` octet, `u16` short, `u32` long,
//! `u64` longlong, `String` shortstr, `LongString` longstr, `bool` bit,
//! `FieldTable` table) and pika's default. A field marked `secret` is
//! redacted from `Debug` output. `spec::tests` checks the table against
//! RabbitMQ's extended spec XML.

macro_rules! default_value {
    () => {
        ::core::default::Default::default()
    };
    ($default:expr) => {
        $default
    };
}

macro_rules! debug_field {
    ($dbg:ident, $value:expr, $name:ident) => {
        $dbg.field(stringify!($name), &$value);
    };
    ($dbg:ident, $value:expr, $name:ident secret) => {
        $dbg.field(stringify!($name), &"<redacted>");
    };
}

macro_rules! amqp_methods {
    (
        $(
            $(#[doc = $class_doc:literal])*
            class $class_mod:ident = $class_id:literal {
                $(
                    $(#[doc = $method_doc:literal])*
                    $variant:ident => $method:ident = $method_id:literal, $name:literal,
                        synchronous: $sync:literal, content: $content:literal,
                        replies: [$($reply:ident),*]
                    {
                        $( $field:ident : $fty:ty $(= $default:expr)? $(; $secret:ident)? ),* $(,)?
                    }
                )*
            }
        )*
    ) => {
        $(
            $(#[doc = $class_doc])*
            pub mod $class_mod {
                #![allow(unused_imports)]
                use std::fmt;

                use crate::error::CodecError;
                use crate::spec::{Method, MethodDef, MethodId};
                use crate::table::{FieldTable, LongString};
                use crate::wire::{Reader, WireField, Writer};

                /// This class's id.
                pub const CLASS_ID: u16 = $class_id;

                $(
                    $(#[doc = $method_doc])*
                    #[doc = ""]
                    #[doc = concat!("AMQP `", $name, "`, class ", stringify!($class_id),
                        ", method ", stringify!($method_id), ".")]
                    #[derive(Clone, PartialEq)]
                    pub struct $method {
                        $(
                            #[doc = concat!("The `", stringify!($field), "` field (",
                                stringify!($fty), ").")]
                            pub $field: $fty,
                        )*
                    }

                    impl Default for $method {
                        /// pika's defaults.
                        fn default() -> Self {
                            $method { $( $field: default_value!($($default)?), )* }
                        }
                    }

                    impl fmt::Debug for $method {
                        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                            #[allow(unused_mut)]
                            let mut dbg = f.debug_struct($name);
                            $( debug_field!(dbg, self.$field, $field $($secret)?); )*
                            dbg.finish()
                        }
                    }

                    impl MethodDef for $method {
                        const ID: MethodId = MethodId::new($class_id, $method_id);
                        const NAME: &'static str = $name;
                        const SYNCHRONOUS: bool = $sync;
                        const HAS_CONTENT: bool = $content;
                        const REPLIES: &'static [MethodId] = &[$( <$reply as MethodDef>::ID ),*];
                    }

                    impl $method {
                        #[allow(unused_variables)]
                        pub(crate) fn write_args(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
                            $(
                                WireField::write(&self.$field, w)
                                    .map_err(|e| e.in_field($name, stringify!($field)))?;
                            )*
                            Ok(())
                        }

                        #[allow(unused_variables)]
                        pub(crate) fn read_args(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                            Ok($method {
                                $(
                                    $field: WireField::read(r)
                                        .map_err(|e| e.in_field($name, stringify!($field)))?,
                                )*
                            })
                        }

                        #[cfg(test)]
                        pub(crate) const FIELDS: &'static [(&'static str, &'static str)] =
                            &[$( (stringify!($field), stringify!($fty)) ),*];
                    }

                    impl From<$method> for Method {
                        fn from(m: $method) -> Method {
                            Method::$variant(m)
                        }
                    }

                    impl TryFrom<Method> for $method {
                        type Error = Method;
                        /// The method, when it is this one; otherwise the
                        /// method given back.
                        fn try_from(m: Method) -> Result<Self, Method> {
                            match m {
                                Method::$variant(inner) => Ok(inner),
                                other => Err(other),
                            }
                        }
                    }
                )*
            }
        )*

        /// Every AMQP 0-9-1 method RabbitMQ speaks, one variant each.
        ///
        /// ```
        /// use pika::spec::{queue, Method};
        /// let m = Method::from(queue::Declare { queue: "jobs".into(), durable: true, ..Default::default() });
        /// assert_eq!(m.name(), "Queue.Declare");
        /// assert!(m.synchronous());
        /// let mut payload = Vec::new();
        /// m.encode(&mut payload).unwrap();
        /// assert_eq!(Method::decode(&payload).unwrap(), m);
        /// ```
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub enum Method {
            $($(
                #[doc = concat!("`", $name, "`.")]
                $variant($class_mod::$method),
            )*)*
        }

        impl Method {
            /// The method's class and method ids.
            pub fn id(&self) -> MethodId {
                match self {
                    $($( Method::$variant(_) => <$class_mod::$method as MethodDef>::ID, )*)*
                }
            }

            /// pika's name for the method, e.g. `Basic.Publish`.
            pub fn name(&self) -> &'static str {
                match self {
                    $($( Method::$variant(_) => $name, )*)*
                }
            }

            /// Whether the sender waits for one of [`Method::replies`].
            pub fn synchronous(&self) -> bool {
                match self {
                    $($( Method::$variant(_) => $sync, )*)*
                }
            }

            /// Whether a content header and body frames follow the method.
            pub fn has_content(&self) -> bool {
                match self {
                    $($( Method::$variant(_) => $content, )*)*
                }
            }

            /// The methods that answer this one (empty when none does).
            pub fn replies(&self) -> &'static [MethodId] {
                match self {
                    $($( Method::$variant(_) => <$class_mod::$method as MethodDef>::REPLIES, )*)*
                }
            }

            /// Appends the method's payload (class id, method id, arguments)
            /// to `out`.
            ///
            /// # Errors
            /// A value too long for its wire type (a short string over 255
            /// bytes, a table nested too deeply). On error `out` is left as
            /// it was.
            pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
                let start = out.len();
                let result = self.write(&mut Writer::new(out));
                if result.is_err() {
                    out.truncate(start);
                }
                result
            }

            pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), CodecError> {
                let id = self.id();
                w.u16(id.class_id);
                w.u16(id.method_id);
                match self {
                    $($( Method::$variant(m) => m.write_args(w), )*)*
                }
            }

            /// Decodes a method frame's whole payload.
            ///
            /// # Errors
            /// An unknown class or method (503), or arguments that do not
            /// decode or leave bytes over (502).
            pub fn decode(payload: &[u8]) -> Result<Method, CodecError> {
                let mut r = Reader::new(payload);
                let class_id = r.u16("method class id")?;
                let method_id = r.u16("method id")?;
                let method = match (class_id, method_id) {
                    $($(
                        ($class_id, $method_id) =>
                            Method::$variant($class_mod::$method::read_args(&mut r)?),
                    )*)*
                    _ => return Err(CodecError::UnknownMethod { class_id, method_id }),
                };
                r.finish(method.name())?;
                Ok(method)
            }

            #[cfg(test)]
            pub(crate) fn table() -> Vec<(MethodId, &'static str, &'static [(&'static str, &'static str)])> {
                vec![$($(
                    (<$class_mod::$method as MethodDef>::ID, $name, $class_mod::$method::FIELDS),
                )*)*]
            }
        }
    };
}
