//! Whether a position in a dataset's log can still be resumed from: which log it is (a dataset
//! dropped and created again has another one), and whether Redis still holds every record after
//! the position. A replica's local cache keeps versions at such positions.

use redis::streams::StreamRangeReply;

use super::{check_dataset, random_id, RedisStore};
use crate::persist::{Position, Result};

/// What Redis still holds after a position of a dataset's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Every record after the position is in the log, in the same log: a version at the
    /// position plus those records is the dataset now.
    Retained,
    /// The dataset's log is another one (dropped and created again), or it has none.
    OtherLog,
    /// A snapshot trimmed records after the position from the log.
    Trimmed { covers: Position },
    /// The log never had a record at the position (Redis restored from an older copy, or the
    /// position is beyond its head).
    NotInLog { head: Position },
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Retention::Retained => write!(f, "Redis holds every record after it"),
            Retention::OtherLog => write!(
                f,
                "the dataset's log in Redis is another one (the dataset was dropped or created again)"
            ),
            Retention::Trimmed { covers } => write!(
                f,
                "stale: a newer snapshot in Redis (up to {covers}) trimmed the records after it"
            ),
            Retention::NotInLog { head } => write!(
                f,
                "the log in Redis (head {head}) has no record at its position (Redis restored from an older copy?)"
            ),
        }
    }
}

impl RedisStore {
    /// The identity of `dataset`'s log: the id of its first record, set by that append, so that
    /// a dataset dropped and created again has another. A log written before identities existed
    /// gets a random one here, kept from then on.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached; `Format` for an invalid dataset name.
    pub async fn log_id(&self, dataset: &str) -> Result<String> {
        check_dataset(dataset)?;
        let key = self.ds_key(dataset, "logid");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(&key)
            .arg(format!("legacy-{}", random_id()))
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(&key);
        let (id,): (String,) = self.run_pipe(&pipe).await?;
        Ok(id)
    }

    /// Whether the records after `position` of the log `log_id` are all still in `dataset`'s
    /// log. Read in one step, so that the answer describes one moment.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached; `Format` for an invalid dataset name or a
    /// stored position that does not parse.
    pub async fn retains(
        &self,
        dataset: &str,
        log_id: &str,
        position: Position,
    ) -> Result<Retention> {
        check_dataset(dataset)?;
        let at = position.to_string();
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("GET").arg(self.ds_key(dataset, "logid"));
        pipe.cmd("GET").arg(self.ds_key(dataset, "snapcovers"));
        pipe.cmd("GET").arg(self.ds_key(dataset, "head"));
        pipe.cmd("XRANGE")
            .arg(self.ds_key(dataset, "log"))
            .arg(&[&at, &at, "COUNT", "1"]);
        let (id, covers, head, entry): (
            Option<String>,
            Option<String>,
            Option<String>,
            StreamRangeReply,
        ) = self.run_pipe(&pipe).await?;
        if id.as_deref() != Some(log_id) {
            return Ok(Retention::OtherLog);
        }
        let covers = covers.map_or(Ok(Position::START), |c| c.parse())?;
        if position < covers {
            return Ok(Retention::Trimmed { covers });
        }
        // At the trim mark itself the record is gone, and the snapshot there vouches for it.
        if position == covers || !entry.ids.is_empty() {
            return Ok(Retention::Retained);
        }
        let head = head.map_or(Ok(Position::START), |h| h.parse())?;
        Ok(Retention::NotInLog { head })
    }

    /// For each of `datasets`, the position its current snapshot covers (the log is trimmed up
    /// to it); [`Position::START`] for one without a snapshot.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached; `Format` for an invalid dataset name or a
    /// stored position that does not parse.
    pub async fn snapshot_positions(&self, datasets: &[String]) -> Result<Vec<Position>> {
        if datasets.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::with_capacity(datasets.len());
        for dataset in datasets {
            check_dataset(dataset)?;
            keys.push(self.ds_key(dataset, "snapcovers"));
        }
        let covers: Vec<Option<String>> = self.run(redis::cmd("MGET").arg(keys)).await?;
        covers
            .into_iter()
            .map(|c| c.map_or(Ok(Position::START), |c| c.parse()))
            .collect()
    }
}
