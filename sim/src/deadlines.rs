//! The orders' deadlines as the order's configuration promises them: each
//! order's creation (the step that recorded it, on the order's clock) plus
//! the scenario's deadline. The bookkeeping of the `order-deadline`
//! invariant, which the world judges after each timer step of the order.

use sagamq::Time;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
pub struct OrderDeadlines {
    due: BTreeMap<String, Time>,
    by_time: BTreeSet<(Time, String)>,
}

impl OrderDeadlines {
    /// Order `order` was recorded with deadline `due`. A second record
    /// (a create whose first record was lost in a crash, taken again)
    /// replaces the first deadline.
    pub fn created(&mut self, order: String, due: Time) {
        if let Some(old) = self.due.insert(order.clone(), due) {
            self.by_time.remove(&(old, order.clone()));
        }
        self.by_time.insert((due, order));
    }

    /// The orders whose deadline is at or before `now`, earliest first, each
    /// handed out once.
    pub fn due_by(&mut self, now: Time) -> Vec<(Time, String)> {
        let mut due = Vec::new();
        while let Some(first) = self.by_time.first()
            && first.0 <= now
        {
            let (at, order) = self.by_time.pop_first().expect("just seen");
            self.due.remove(&order);
            due.push((at, order));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_record_replaces_the_first_deadline() {
        let ms = Time::from_millis;
        let mut d = OrderDeadlines::default();
        d.created("o1".into(), ms(100));
        d.created("o2".into(), ms(150));
        d.created("o1".into(), ms(300));
        assert_eq!(d.due_by(ms(200)), vec![(ms(150), "o2".to_string())]);
        assert_eq!(d.due_by(ms(200)), vec![]);
        assert_eq!(d.due_by(ms(300)), vec![(ms(300), "o1".to_string())]);
    }
}
