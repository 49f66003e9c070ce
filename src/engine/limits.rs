//! The sizes the engine refuses to exceed.

/// Sizes the engine refuses to exceed, so one request cannot take the service down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Nodes in one expression, each value of an `IN`/`HAS ANY`/`HAS ALL` list counted as one;
    /// a text may hold 16 tokens per node, and is not read past that.
    pub max_expression_nodes: usize,
    /// Nesting depth of one expression.
    pub max_expression_depth: usize,
    /// Users in one upsert or delete batch.
    pub max_batch_users: usize,
    /// Events in one recorded batch (or one message of a stream).
    pub max_batch_events: usize,
    /// Ids in one page, sample or export chunk.
    pub max_page_size: usize,
    /// Values in one breakdown (`breakdown_limit`).
    pub max_breakdown_values: usize,
    /// Audiences in one overlap request.
    pub max_overlap_audiences: usize,
    /// Saved segments per dataset.
    pub max_segments: usize,
    /// Datasets of the server: each has its own writer, log and watch history, so a caller
    /// writing to ever new names must not create them without bound.
    pub max_datasets: usize,
    /// Open member listings kept for their next page.
    pub max_open_cursors: usize,
    /// Seconds an unused listing is kept.
    pub cursor_ttl_secs: u64,
    /// Seconds a streamed import may wait for its next message; it holds the dataset's writer.
    pub import_idle_secs: u64,
    /// User changes (entered or left) of recent writes kept per dataset for watchers to read
    /// and resume in; the oldest go first.
    pub watch_history_changes: u64,
    /// Feed entries (one per segment per write) kept per dataset, bounding the many tiny ones.
    pub watch_history_entries: usize,
    /// User changes a watcher may fall behind the writes (beyond its backlog at the start)
    /// before its stream ends with a token to resume from: well below the history, so that the
    /// token is still in it when the caller comes back.
    pub watch_max_lag: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_expression_nodes: 1_000,
            max_expression_depth: 32,
            max_batch_users: 10_000,
            max_batch_events: 100_000,
            max_page_size: 100_000,
            max_breakdown_values: 1_000,
            max_overlap_audiences: 32,
            max_segments: 10_000,
            max_datasets: 1_000,
            max_open_cursors: 1_024,
            cursor_ttl_secs: 600,
            import_idle_secs: 60,
            watch_history_changes: 10_000_000,
            watch_history_entries: 100_000,
            watch_max_lag: 1_000_000,
        }
    }
}
