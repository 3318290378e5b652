//! Saga participants (order, stock, payment) as sans-IO state machines with an
//! inbox and an outbox committed in one durable record. TODO(issue 3).
