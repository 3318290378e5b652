//! What travels between simulated nodes. Payloads cross madsim's network as
//! values (no serialization), which keeps the simulator fast; the real runtime
//! carries the same values as JSON over HTTP.

use sagamq::broker::{DeliveryId, Reply};
use sagamq::saga::OrderSpec;
use sagamq::{Message, PublishRequest, SubscribeRequest, Topic};
use std::fmt;

#[derive(Clone, Debug)]
pub enum Wire {
    /// Participant -> broker. `req` is the participant's outbox id.
    Publish {
        req: u64,
        publish: PublishRequest,
    },
    PublishReply {
        req: u64,
        reply: Reply,
    },
    Subscribe {
        subscribe: SubscribeRequest,
    },
    SubscribeReply {
        topic: Topic,
        reply: Reply,
    },
    /// Broker -> subscriber: the HTTP callback.
    Callback {
        delivery: DeliveryId,
        message: Message,
    },
    /// Subscriber -> broker: the callback's HTTP status (2xx or not).
    CallbackAnswer {
        delivery: DeliveryId,
        ok: bool,
    },
    /// Workload -> order service: the client's "create order" call.
    CreateOrder {
        spec: OrderSpec,
    },
    /// Order service -> workload: the order is durably recorded (or refused, with why).
    OrderAccepted {
        order_id: String,
        refused: Option<String>,
    },
}

impl Wire {
    pub fn is_callback_answer(&self) -> bool {
        matches!(self, Wire::CallbackAnswer { .. })
    }
}

impl fmt::Display for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wire::Publish { req, publish } => {
                write!(
                    f,
                    "publish#{req} {}/{} topic={}",
                    publish.global_id, publish.sub_id, publish.topic
                )
            }
            Wire::PublishReply { req, reply } => write!(f, "publish-reply#{req} {reply}"),
            Wire::Subscribe { subscribe } => write!(f, "subscribe {} to {}", subscribe.client_id, subscribe.topic),
            Wire::SubscribeReply { topic, reply } => write!(f, "subscribe-reply {topic} {reply}"),
            Wire::Callback { delivery, message } => write!(
                f,
                "callback d{} {} {}/{} topic={}",
                delivery.0, message.msg_id, message.global_id, message.sub_id, message.topic
            ),
            Wire::CallbackAnswer { delivery, ok } => {
                write!(
                    f,
                    "callback-answer d{} {}",
                    delivery.0,
                    if *ok { "2xx" } else { "error" }
                )
            }
            Wire::CreateOrder { spec } => write!(f, "create-order {} qty={}", spec.order_id, spec.quantity),
            Wire::OrderAccepted {
                order_id,
                refused: None,
            } => write!(f, "order-accepted {order_id}"),
            Wire::OrderAccepted {
                order_id,
                refused: Some(why),
            } => write!(f, "order-refused {order_id}: {why}"),
        }
    }
}
