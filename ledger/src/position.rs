//! Places in the ledger. A ledger is a set of partitions (Kafka's; the embedded log is
//! partition 0), each an ordered sequence of offsets from 0. A [`Position`] names one event;
//! a [`Frontier`] says how far: for each partition, the next offset (everything below it is
//! included). Producers learn positions once their events are durable; consumers and the
//! projection advance frontiers; "has the projection caught up with what I wrote" is
//! [`Frontier::covers`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One event's place: its partition and its offset within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub partition: i32,
    pub offset: u64,
}

impl Position {
    pub fn new(partition: i32, offset: u64) -> Self {
        Self { partition, offset }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.partition, self.offset)
    }
}

/// How far, per partition: the next offset (a partition not named is at 0). Serialized as a
/// JSON object from partition to next offset, e.g. `{"0": 42, "3": 7}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = BTreeMap<String, u64>)]
pub struct Frontier(BTreeMap<i32, u64>);

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next offset of `partition`.
    pub fn next(&self, partition: i32) -> u64 {
        self.0.get(&partition).copied().unwrap_or(0)
    }

    /// Moves `partition` forward to `next`; never backward. Returns whether it moved.
    pub fn advance(&mut self, partition: i32, next: u64) -> bool {
        let at = self.0.entry(partition).or_insert(0);
        if next > *at {
            *at = next;
            true
        } else {
            false
        }
    }

    /// Moves past `position` (its partition's next offset becomes at least offset + 1).
    pub fn pass(&mut self, position: Position) -> bool {
        self.advance(position.partition, position.offset + 1)
    }

    /// Moves every partition forward to at least `other`'s.
    pub fn merge(&mut self, other: &Frontier) -> bool {
        let mut moved = false;
        for (p, n) in other.iter() {
            moved |= self.advance(p, n);
        }
        moved
    }

    /// Whether `position` is below this frontier.
    pub fn includes(&self, position: Position) -> bool {
        position.offset < self.next(position.partition)
    }

    /// Whether this frontier is at or past `other` on every partition.
    pub fn covers(&self, other: &Frontier) -> bool {
        other.iter().all(|(p, n)| self.next(p) >= n)
    }

    /// How many events `other` is ahead of this frontier, summed over partitions.
    pub fn behind(&self, other: &Frontier) -> u64 {
        other
            .iter()
            .map(|(p, n)| n.saturating_sub(self.next(p)))
            .sum()
    }

    /// Events below the frontier, summed over partitions (offsets count from 0).
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `(partition, next offset)`, by partition.
    pub fn iter(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.0.iter().map(|(p, n)| (*p, *n))
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(|n| *n == 0)
    }
}

impl FromIterator<Position> for Frontier {
    /// The frontier just past every one of the positions.
    fn from_iter<I: IntoIterator<Item = Position>>(iter: I) -> Self {
        let mut frontier = Frontier::new();
        for position in iter {
            frontier.pass(position);
        }
        frontier
    }
}

impl FromIterator<(i32, u64)> for Frontier {
    fn from_iter<I: IntoIterator<Item = (i32, u64)>>(iter: I) -> Self {
        let mut frontier = Frontier::new();
        for (p, n) in iter {
            frontier.advance(p, n);
        }
        frontier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontier_only_moves_forward_and_covers_partition_by_partition() {
        let mut f = Frontier::new();
        assert!(f.pass(Position::new(0, 4)));
        assert!(!f.advance(0, 3), "never backward");
        assert!(f.advance(2, 7));
        assert_eq!((f.next(0), f.next(1), f.next(2)), (5, 0, 7));
        assert!(f.includes(Position::new(0, 4)));
        assert!(!f.includes(Position::new(0, 5)));
        let target: Frontier = [(0, 5), (2, 6)].into_iter().collect();
        assert!(f.covers(&target));
        let ahead: Frontier = [(1, 2), (2, 9)].into_iter().collect();
        assert!(!f.covers(&ahead));
        assert_eq!(f.behind(&ahead), 4);
        assert_eq!(f.total(), 12);
        assert_eq!(serde_json::to_string(&f).unwrap(), r#"{"0":5,"2":7}"#);
        let back: Frontier = serde_json::from_str(r#"{"0":5,"2":7}"#).unwrap();
        assert_eq!(back, f);
    }
}
